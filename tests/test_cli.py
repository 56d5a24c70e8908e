"""The console scripts as users run them: pixtral-serve, pixtral-chat, the README demo; the requests
pixtral-chat's flags build and how it prints an answer."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import jsonschema
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from PIL import Image

from pixtral.v1 import common_pb2, gateway_pb2
from services import chat_cli as cli
from shared.images import sha256_hex
from shared.tokenizer import load_tokenizer
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
    # No fixed ports (HTTP 8000, metrics 9100 on): another stack on this host must not make it exit before `ready`.
    serve = subprocess.Popen(
        [str(BIN / "pixtral-serve") if (BIN / "pixtral-serve").exists() else sys.executable, *(
            [] if (BIN / "pixtral-serve").exists() else ["-m", "services.launcher"]),
         "--model", "tiny", "--redis", redis_server.url, "--vision-workers", "2", "--decoders", "2",
         "--port", str(port), "--http-port", str(free_port()), "--metrics-port", "0"],
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


# -- pixtral-chat: the request its flags build (no server) -----------------------------------------------------

WEATHER_PARAMETERS = {"type": "object",
                      "properties": {"city": {"enum": ["Paris", "Oslo"]}, "unit": {"enum": ["C", "F"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                                 "parameters": WEATHER_PARAMETERS}}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "min_p", "min_tokens", "ignore_eos", "logprobs", "top_logprobs")


def write_json(path: Path, value) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def request_of(*argv: str) -> gateway_pb2.ChatRequest:
    return cli.build_request(cli.parse_args(list(argv)))


def usage_error(capsys, *argv: str) -> str:
    """The stderr of a pixtral-chat run that must stop with a usage error (exit 2) before any call."""
    with pytest.raises(SystemExit) as stopped:
        cli.main(list(argv))
    assert stopped.value.code == 2
    return capsys.readouterr().err


def test_sampling_flags_set_their_fields_and_leave_the_others_unset():
    request = request_of(
        "--max-tokens", "7", "--temperature", "0.5", "--top-p", "0.75", "--top-k", "40", "--min-p", "0.25",
        "--seed", "11", "--repetition-penalty", "1.5", "--presence-penalty", "0.5", "--frequency-penalty", "-1.5",
        "--min-tokens", "3", "--stop", "END", "--stop-token-id", "2", "--stop-token-id", "99",
        "--logit-bias", "10=-100", "--logit-bias", "42=2.5", "--ignore-eos", "--top-logprobs", "4", "--n", "3", "Hi")
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.top_k, sampling.seed, sampling.min_tokens) == (7, 40, 11, 3)
    assert (sampling.temperature, sampling.top_p, sampling.min_p) == (0.5, 0.75, 0.25)
    assert (sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty) == (1.5, 0.5, -1.5)
    assert list(sampling.stop) == ["END"] and list(sampling.stop_token_ids) == [2, 99]
    assert dict(sampling.logit_bias) == {10: -100.0, 42: 2.5}
    assert sampling.ignore_eos and sampling.logprobs and sampling.top_logprobs == 4
    assert request.n == 3

    bare = request_of("Hi")
    assert not [name for name in SAMPLING_FIELDS if bare.sampling.HasField(name)]
    assert not bare.sampling.logit_bias and not bare.sampling.stop_token_ids and not bare.tools
    assert not [name for name in ("n", "response_format", "tool_choice", "parallel_tool_calls") if bare.HasField(name)]
    assert [(m.role, [p.text for p in m.content]) for m in bare.messages] == [(gateway_pb2.ROLE_USER, ["Hi"])]

    no_alternatives = request_of("--top-logprobs", "0", "Hi").sampling
    assert no_alternatives.logprobs and no_alternatives.HasField("top_logprobs") and no_alternatives.top_logprobs == 0


def test_each_format_flag_sets_its_response_format(tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    grammar = tmp_path / "answer.gbnf"
    grammar.write_text('root ::= "yes" | "no"\n')
    formats = {
        "json_object": request_of("--json-object", "Hi").response_format,
        "json_schema": request_of("--json-schema", write_json(tmp_path / "s.json", schema), "Hi").response_format,
        "regex": request_of("--regex", "[0-9]+", "Hi").response_format,
        "choice": request_of("--choice", "yes", "--choice", "no", "Hi").response_format,
        "grammar": request_of("--grammar", str(grammar), "Hi").response_format,
    }
    assert {kind: fmt.WhichOneof("format") for kind, fmt in formats.items()} == {kind: kind for kind in formats}
    assert formats["json_object"].json_object is True
    assert json.loads(formats["json_schema"].json_schema) == schema
    assert formats["regex"].regex == "[0-9]+"
    assert list(formats["choice"].choice.choices) == ["yes", "no"]
    assert formats["grammar"].grammar == grammar.read_text()


def test_tools_become_tools_with_their_schema_as_text_and_tool_choice_a_mode_or_a_name(tmp_path):
    tools = write_json(tmp_path / "tools.json", [WEATHER_TOOL, {"type": "function", "function": {"name": "now"}}])
    request = request_of("--tools", tools, "--no-parallel-tool-calls", "Hi")
    assert [(tool.name, tool.description) for tool in request.tools] == [
        ("get_weather", "The weather in a city now"), ("now", "")]
    assert json.loads(request.tools[0].parameters) == WEATHER_PARAMETERS and request.tools[1].parameters == ""
    assert request.HasField("parallel_tool_calls") and request.parallel_tool_calls is False
    assert not request.HasField("tool_choice")
    modes = {"auto": gateway_pb2.TOOL_CHOICE_MODE_AUTO, "none": gateway_pb2.TOOL_CHOICE_MODE_NONE,
             "required": gateway_pb2.TOOL_CHOICE_MODE_REQUIRED}
    for name, mode in modes.items():
        choice = request_of("--tools", tools, "--tool-choice", name, "Hi").tool_choice
        assert choice.WhichOneof("choice") == "mode" and choice.mode == mode
    named = request_of("--tools", tools, "--tool-choice", "get_weather", "Hi").tool_choice
    assert named.WhichOneof("choice") == "function" and named.function == "get_weather"


def test_messages_file_system_flag_and_command_line_turn_make_the_chat_in_order(tmp_path):
    picture = image_bytes(noise_image(32, 32, seed=80))
    (tmp_path / "p.png").write_bytes(picture)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": data_url(picture)}},
                                     {"type": "image_url", "image_url": {"url": "sha256:" + "ab" * 32}}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "abcDEF123", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}},
            {"id": "xyzXYZ789", "name": "get_weather", "arguments": {"city": "Oslo", "unit": "F"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "22"},
        {"role": "assistant", "content": [{"type": "text", "text": "Warm."}]},
    ]
    request = request_of("--system", "Be brief.", "--messages", write_json(tmp_path / "m.json", messages),
                         "--image-ref", "cd" * 32, "--image", str(tmp_path / "p.png"), "And now?")
    assert [message.role for message in request.messages] == [
        gateway_pb2.ROLE_SYSTEM, gateway_pb2.ROLE_USER, gateway_pb2.ROLE_ASSISTANT, gateway_pb2.ROLE_TOOL,
        gateway_pb2.ROLE_ASSISTANT, gateway_pb2.ROLE_USER]
    system, user, calls, result, answer, last = request.messages
    assert [part.text for part in system.content] == ["Be brief."]
    assert [part.WhichOneof("part") for part in user.content] == ["text", "image", "image"]
    assert user.content[1].image.url == data_url(picture) and user.content[2].image.sha256 == "ab" * 32
    assert not calls.content and [(call.id, call.name, json.loads(call.arguments)) for call in calls.tool_calls] == [
        ("abcDEF123", "get_weather", {"city": "Paris", "unit": "C"}),
        ("xyzXYZ789", "get_weather", {"city": "Oslo", "unit": "F"})]
    assert result.tool_call_id == "abcDEF123" and [part.text for part in result.content] == ["22"]
    assert [part.text for part in answer.content] == ["Warm."] and not answer.prefix
    # --image and --image-ref in the order given, then TEXT
    assert last.content[0].image.sha256 == "cd" * 32 and last.content[1].image.data == picture
    assert last.content[2].text == "And now?"

    to_continue = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello", "prefix": True}]
    request = request_of("--messages", write_json(tmp_path / "prefix.json", to_continue))
    assert [message.role for message in request.messages] == [gateway_pb2.ROLE_USER, gateway_pb2.ROLE_ASSISTANT]
    assert request.messages[-1].prefix and [part.text for part in request.messages[-1].content] == ["Hello"]


def test_bad_flag_values_are_usage_errors_that_name_the_flag(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("[{")
    broken = str(tmp_path / "broken.json")
    cases = [
        (["--tools", broken, "Hi"], "argument --tools: "),
        (["--tools", write_json(tmp_path / "object.json", WEATHER_TOOL), "Hi"], "argument --tools: "),
        (["--tools", write_json(tmp_path / "nameless.json", [{"type": "function", "function": {}}]), "Hi"],
         "argument --tools: tools[0].function.name"),
        (["--tools", str(tmp_path / "missing.json"), "Hi"], "argument --tools: cannot read"),
        (["--logit-bias", "5", "Hi"], "argument --logit-bias: "),
        (["--logit-bias", "five=1", "Hi"], "argument --logit-bias: "),
        (["--messages", broken], "argument --messages: "),
        (["--messages", write_json(tmp_path / "role.json", [{"role": "robot", "content": "x"}])],
         "argument --messages: messages[0].role"),
        (["--messages", write_json(tmp_path / "part.json", [{"role": "user", "content": [{"type": "audio"}]}])],
         "argument --messages: messages[0].content[0]"),
        (["--json-schema", broken, "Hi"], "argument --json-schema: "),
        (["--regex", "a", "--choice", "b", "Hi"], "argument --choice: not allowed with argument --regex"),
        (["--json-object", "--json-schema", write_json(tmp_path / "schema.json", {}), "Hi"],
         "argument --json-schema: not allowed with argument --json-object"),
        (["--n", "0", "Hi"], "argument --n: "),
        (["--stop-token-id", "-1", "Hi"], "argument --stop-token-id: "),
        ([], "TEXT is required unless --messages is given"),
    ]
    for argv, words in cases:
        assert words in usage_error(capsys, *argv), argv


# -- pixtral-chat: how it prints an answer (a gateway's stream, in process) ------------------------------------

class FakeGateway:
    """Answers Chat with the given messages, then fails with `error` if given."""

    def __init__(self, responses: list[gateway_pb2.ChatResponse], error: grpc.RpcError | None = None) -> None:
        self.responses = responses
        self.error = error

    def Chat(self, request, timeout=None, metadata=()):
        yield from self.responses
        if self.error is not None:
            raise self.error


class CallFailed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "decoder went away"


def logprob(token_id: int, value: float, *top: tuple[int, float]) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=token_id, logprob=value, top_logprobs=[
        common_pb2.TopLogprob(token_id=i, logprob=v) for i, v in top])


def printed(argv: list[str], gateway: FakeGateway) -> str:
    args = cli.parse_args(argv)
    out = io.StringIO()
    cli.run(args, cli.build_request(args), gateway, out)
    return out.getvalue()


USAGE = common_pb2.Usage(prompt_tokens=9, completion_tokens=4, cached_prompt_tokens=5)


def test_json_lines_of_two_interleaved_choices_with_logprobs():
    responses = [
        gateway_pb2.ChatResponse(index=0, text="He", token_ids=[100], request_id="r1",
                                 logprobs=[logprob(100, -0.5, (100, -0.5), (7, -1.5))]),
        gateway_pb2.ChatResponse(index=1, text="Yo", token_ids=[200, 201],
                                 logprobs=[logprob(200, -0.25, (200, -0.25), (8, -2.0)),
                                           logprob(201, -1.0, (9, -0.5), (201, -1.0))]),
        gateway_pb2.ChatResponse(index=0, finish_reason=common_pb2.FINISH_REASON_LENGTH, seed=5),
        gateway_pb2.ChatResponse(index=1, text="!", token_ids=[2],
                                 logprobs=[logprob(2, -0.125, (2, -0.125), (3, -4.0))],
                                 finish_reason=common_pb2.FINISH_REASON_STOP, seed=6,
                                 stop_reason=gateway_pb2.StopReason(token_id=2), usage=USAGE, request_id="r1"),
    ]
    lines = [json.loads(line) for line in printed(["--json", "--n", "2", "--top-logprobs", "2", "Hi"],
                                                  FakeGateway(responses)).splitlines()]
    assert lines[:-1] == [
        {"index": 0, "text": "He", "token_ids": [100], "logprob": -0.5, "top_logprobs": [[100, -0.5], [7, -1.5]]},
        {"index": 1, "text": "", "token_ids": [200], "logprob": -0.25, "top_logprobs": [[200, -0.25], [8, -2.0]]},
        {"index": 1, "text": "Yo", "token_ids": [201], "logprob": -1.0, "top_logprobs": [[9, -0.5], [201, -1.0]]},
        {"index": 1, "text": "!", "token_ids": [2], "logprob": -0.125, "top_logprobs": [[2, -0.125], [3, -4.0]]},
    ]
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "image_tokens": 0, "cached_images": 0, "encoded_images": 0,
             "cached_prompt_tokens": 5}
    first = {"text": "He", "token_ids": [100], "finish_reason": "length", "seed": 5, "stop_reason": None,
             "tool_calls": [], "index": 0, "usage": usage,
             "logprobs": [{"token_id": 100, "logprob": -0.5, "top_logprobs": [[100, -0.5], [7, -1.5]]}]}
    second = {"text": "Yo!", "token_ids": [200, 201, 2], "finish_reason": "stop", "seed": 6,
              "stop_reason": {"token_id": 2}, "tool_calls": [], "index": 1, "usage": usage, "logprobs": [
                  {"token_id": 200, "logprob": -0.25, "top_logprobs": [[200, -0.25], [8, -2.0]]},
                  {"token_id": 201, "logprob": -1.0, "top_logprobs": [[9, -0.5], [201, -1.0]]},
                  {"token_id": 2, "logprob": -0.125, "top_logprobs": [[2, -0.125], [3, -4.0]]}]}
    assert lines[-1] == {**first, "request_id": "r1", "choices": [first, second]}


def test_tool_calls_in_json_and_in_text_and_the_other_choices_after_the_first():
    call = gateway_pb2.ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris", "unit": "C"}')
    responses = [
        gateway_pb2.ChatResponse(index=0, text="Hel", token_ids=[10], request_id="r2"),
        gateway_pb2.ChatResponse(index=1, token_ids=[9, 11, 12]),
        gateway_pb2.ChatResponse(index=0, text="lo", token_ids=[13]),
        gateway_pb2.ChatResponse(index=1, tool_calls=[call], finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS,
                                 seed=8),
        gateway_pb2.ChatResponse(index=0, finish_reason=common_pb2.FINISH_REASON_STOP, seed=7,
                                 stop_reason=gateway_pb2.StopReason(stop="END"), usage=USAGE, request_id="r2"),
    ]
    text = printed(["--n", "2", "Hi"], FakeGateway(responses))
    assert text == 'Hello\n--- choice 1\n[tool call abcDEF123] get_weather {"city": "Paris", "unit": "C"}\n'

    lines = [json.loads(line) for line in printed(["--json", "--n", "2", "Hi"], FakeGateway(responses)).splitlines()]
    assert [(line["index"], line["token_ids"]) for line in lines[:-1]] == [(0, [10]), (1, [9, 11, 12]), (0, [13])]
    last = lines[-1]
    assert "logprobs" not in last and (last["text"], last["stop_reason"]) == ("Hello", {"stop": "END"})
    assert last["choices"][1]["finish_reason"] == "tool_calls" and last["choices"][1]["seed"] == 8
    assert last["choices"][1]["tool_calls"] == [
        {"id": "abcDEF123", "name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}]
    assert last["choices"][0]["tool_calls"] == [] and "choices" not in last["choices"][0]


def test_a_call_that_fails_after_a_choice_ended_prints_the_last_line_then_raises():
    responses = [gateway_pb2.ChatResponse(index=0, text="a", token_ids=[5], request_id="r3"),
                 gateway_pb2.ChatResponse(index=0, finish_reason=common_pb2.FINISH_REASON_ERROR, usage=USAGE)]
    args = cli.parse_args(["--json", "Hi"])
    out = io.StringIO()
    with pytest.raises(CallFailed):
        cli.run(args, cli.build_request(args), FakeGateway(responses, CallFailed()), out)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert (last["finish_reason"], last["token_ids"], last["request_id"]) == ("error", [5], "r3")
    assert "choices" not in last
    out = io.StringIO()
    with pytest.raises(CallFailed):
        cli.run(args, cli.build_request(args), FakeGateway(responses[:1], CallFailed()), out)
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [{"index": 0, "text": "a", "token_ids": [5]}]


# -- pixtral-chat against the stack ----------------------------------------------------------------------------

def run_json(gateway: str, *args: str) -> list[dict]:
    result = chat_cli(gateway, *args, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_two_choices_with_top_logprobs_stream_by_index_and_end_in_a_choices_list(stack):
    flags = ["--max-tokens", "6", "--ignore-eos", "--temperature", "1", "--top-logprobs", "3", "Tell me a story."]
    lines = run_json(stack.gateway, "--n", "2", "--seed", "7", *flags)
    tokens, last = lines[:-1], lines[-1]
    for line in tokens:
        assert len(line["token_ids"]) == 1 and line["logprob"] <= 0 and len(line["top_logprobs"]) == 3
        top = [value for _, value in line["top_logprobs"]]
        assert top == sorted(top, reverse=True) and line["logprob"] <= top[0] + 1e-5
        for token_id, value in line["top_logprobs"]:
            if token_id == line["token_ids"][0]:
                assert math.isclose(value, line["logprob"], abs_tol=1e-5)
    assert [choice["index"] for choice in last["choices"]] == [0, 1]
    for choice in last["choices"]:
        mine = [line for line in tokens if line["index"] == choice["index"]]
        assert choice["token_ids"] == [line["token_ids"][0] for line in mine] and len(choice["token_ids"]) == 6
        assert choice["text"] == "".join(line["text"] for line in mine)
        assert [entry["token_id"] for entry in choice["logprobs"]] == choice["token_ids"]
        assert [entry["logprob"] for entry in choice["logprobs"]] == [line["logprob"] for line in mine]
        assert choice["finish_reason"] == "length" and choice["tool_calls"] == [] and choice["usage"] == last["usage"]
    assert {key: last[key] for key in last["choices"][0]} == last["choices"][0]
    assert last["usage"]["completion_tokens"] == 12 and "cached_prompt_tokens" in last["usage"]
    first_seed, second_seed = (choice["seed"] for choice in last["choices"])
    assert first_seed != second_seed
    # A choice's seed gives its tokens again with n = 1.
    again = run_json(stack.gateway, "--seed", str(second_seed), *flags)[-1]
    assert again["token_ids"] == last["choices"][1]["token_ids"] and "choices" not in again


def test_json_schema_output_validates_against_the_schema(stack, tmp_path):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
              "required": ["ok", "size"], "additionalProperties": False}
    # Whitespace between the tokens is bounded by the format; 512 tokens hold the longest object it allows.
    last = run_json(stack.gateway, "--json-schema", write_json(tmp_path / "schema.json", schema), "--max-tokens",
                    "512", "--temperature", "0", "Describe it as JSON.")[-1]
    assert last["finish_reason"] == "stop", last
    jsonschema.validate(json.loads(last["text"]), schema)


def test_tools_with_tool_choice_required_give_tool_calls(stack, tmp_path):
    last = run_json(stack.gateway, "--tools", write_json(tmp_path / "tools.json", [WEATHER_TOOL]), "--tool-choice",
                    "required", "--no-parallel-tool-calls", "--max-tokens", "128", "--seed", "3",
                    "What is the weather in Paris?")[-1]
    assert last["finish_reason"] == "tool_calls", last
    assert len(last["tool_calls"]) == 1
    call = last["tool_calls"][0]
    assert call["name"] == "get_weather" and re.fullmatch(r"[a-zA-Z0-9]{9}", call["id"])
    jsonschema.validate(call["arguments"], WEATHER_PARAMETERS)


def test_messages_with_a_system_turn_and_an_image(stack, tmp_path):
    picture = image_bytes(noise_image(64, 48, seed=81))
    messages = [{"role": "system", "content": "You describe images."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(picture)}}]},
                {"role": "assistant", "content": "Noise."}]
    args = ["--messages", write_json(tmp_path / "messages.json", messages), "And its colours?"]
    expected = encode_reference([("system", ["You describe images."]), ("user", ["What is this?", picture]),
                                 ("assistant", ["Noise."]), ("user", ["And its colours?"])]).tokens
    assert run_json(stack.gateway, *args, "--tokenize-only") == [{"token_ids": expected}]
    last = run_json(stack.gateway, *args, "--max-tokens", "3", "--temperature", "0")[-1]
    assert last["finish_reason"] == "length" and len(last["token_ids"]) == 3
    assert last["usage"]["prompt_tokens"] == len(expected)
    assert last["usage"]["cached_images"] + last["usage"]["encoded_images"] == 1


def test_tokenize_only_honours_system_messages_and_tools(stack, tmp_path):
    picture = image_bytes(noise_image(48, 32, seed=82))
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                     {"type": "text", "text": "Where was this taken? What is the weather there?"}]},
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 22 C"},
    ]
    tokenized = run_json(stack.gateway, "--system", "Be terse.", "--messages",
                         write_json(tmp_path / "messages.json", messages), "--tools",
                         write_json(tmp_path / "tools.json", [WEATHER_TOOL]), "--tokenize-only", "And in Oslo?")
    function = WEATHER_TOOL["function"]
    reference = ChatCompletionRequest(
        messages=[SystemMessage(content="Be terse."),
                  UserMessage(content=[ImageChunk(image=Image.open(io.BytesIO(picture))),
                                       TextChunk(text="Where was this taken? What is the weather there?")]),
                  AssistantMessage(content=None, tool_calls=[ToolCall(id="abcDEF123", function=FunctionCall(
                      name="get_weather", arguments='{"city": "Paris", "unit": "C"}'))]),
                  ToolMessage(content="sunny, 22 C", tool_call_id="abcDEF123"),
                  UserMessage(content="And in Oslo?")],
        tools=[Tool(function=Function(name=function["name"], description=function["description"],
                                      parameters=function["parameters"]))])
    assert tokenized == [{"token_ids": load_tokenizer().encode_chat_completion(reference).tokens}]
