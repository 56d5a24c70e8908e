"""The console scripts as users run them: pixtral-serve, pixtral-chat, the README demo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.images import sha256_hex
from tests.reference import encode_reference
from tests.support import ROOT, child_env, free_port, image_bytes, noise_image

BIN = Path(sys.executable).parent


def cli_env(tmp_path: Path) -> dict[str, str]:
    return child_env(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PIXTRAL_CACHE_DIR=str(tmp_path / "cache"))


def chat_cli(gateway: str, *args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.chat_cli", "--gateway", gateway, *args], cwd=ROOT,
                          env=env or child_env(), capture_output=True, text=True, timeout=120)


def test_readme_demo_runs_the_service_and_a_chat_with_an_image(tmp_path):
    env = cli_env(tmp_path)
    env["PIXTRAL_DEMO_PORT"] = str(free_port())
    result = subprocess.run(["bash", "scripts/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ready 127.0.0.1:")
    final = json.loads(result.stdout.strip().splitlines()[-1])
    assert final["finish_reason"] == "length" and len(final["token_ids"]) == 4
    assert final["usage"]["cached_images"] == 1 and final["usage"]["encoded_images"] == 0


def test_pixtral_chat_prints_json_and_keeps_the_image_order(stack, tmp_path):
    first, second, third = (image_bytes(noise_image(48 + 16 * i, 32, seed=60 + i)) for i in range(3))
    paths = []
    for index, data in enumerate((first, third)):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(data)
    warm = tmp_path / "second.png"
    warm.write_bytes(second)
    assert chat_cli(stack.gateway, "--image", str(warm), "--max-tokens", "1", "x").returncode == 0

    args = ["--image", str(paths[0]), "--image-ref", sha256_hex(second), "--image", str(paths[1])]
    tokenized = chat_cli(stack.gateway, *args, "--tokenize-only", "--json", "Compare them.")
    expected = encode_reference([("user", [first, second, third, "Compare them."])]).tokens
    assert json.loads(tokenized.stdout) == {"token_ids": expected}

    result = chat_cli(stack.gateway, *args, "--max-tokens", "5", "--temperature", "0", "--json", "Compare them.")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    final = lines[-1]
    assert final["finish_reason"] == "length" and final["usage"]["prompt_tokens"] == len(expected)
    assert final["token_ids"] == [t for line in lines[:-1] for t in line["token_ids"]]
    assert (final["usage"]["cached_images"], final["usage"]["encoded_images"]) == (1, 2)


def test_pixtral_chat_failure_exits_nonzero_with_the_status_on_stderr(stack):
    result = chat_cli(stack.gateway, "--image-ref", "0" * 64, "Hi")
    assert result.returncode == 1
    assert result.stderr.startswith("FAILED_PRECONDITION: ") and "0" * 64 in result.stderr
    assert result.stdout == ""


def test_pixtral_serve_starts_every_role_and_stops_them_all_on_sigterm(tmp_path, redis_server):
    port = free_port()
    serve = subprocess.Popen(
        [str(BIN / "pixtral-serve") if (BIN / "pixtral-serve").exists() else sys.executable, *(
            [] if (BIN / "pixtral-serve").exists() else ["-m", "services.launcher"]),
         "--model", "tiny", "--redis", redis_server.url, "--vision-workers", "2", "--decoders", "2",
         "--port", str(port)],
        cwd=ROOT, env=cli_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert serve.stdout.readline().strip() == f"ready 127.0.0.1:{port}"
        children = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True,
                                                        text=True).stdout.split()]
        assert len(children) == 5  # 2 decoders, 2 vision workers, the gateway
        picture = tmp_path / "p.png"
        picture.write_bytes(image_bytes(noise_image(64, 64, seed=70)))
        result = chat_cli(f"127.0.0.1:{port}", "--image", str(picture), "--max-tokens", "3", "--json", "Hi")
        assert json.loads(result.stdout.splitlines()[-1])["finish_reason"] == "length"
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=60) == 0
        time.sleep(0.5)
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        if serve.poll() is None:
            serve.kill()
