import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import EMBEDDING_TTL_S, ROOT, RedisServer, Stack, child_env


def make_tiny_checkpoint(directory: Path, seed: int = 0, shards: int = 1) -> Path:
    """Through the console script, as users make one (python -m when it is not on PATH)."""
    script = Path(sys.executable).parent / "pixtral-make-tiny"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "shared.tiny"]
    subprocess.run([*command, str(directory), "--seed", str(seed), "--shards", str(shards)], check=True,
                   cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny checkpoint in three shards with an index, as large checkpoints are laid out."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", seed=0, shards=3)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def module_redis():
    """A Redis of the test module's own, for modules that stop, slow, corrupt or fill it."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tiny_model, redis_server, tmp_path_factory):
    """One decoder, one vision worker, one gateway: shared by the tests that do not change the stack. Embeddings
    expire as deployed: written with a TTL, renewed by the gateway when a request uses one."""
    ttl = ("--embedding-ttl-s", str(EMBEDDING_TTL_S))
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("stack"), vision_args=ttl,
                    gateway_args=ttl).start()
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def _no_pixtral_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PIXTRAL_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def observed_redis():
    """The Redis of observed_stack alone: its tests may stop it without disturbing the shared stack."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def observed_stack(tiny_model, observed_redis, tmp_path_factory):
    """One decoder, one vision worker, one gateway, each serving Prometheus metrics on a port of its own."""
    running = Stack(tiny_model, observed_redis.url, tmp_path_factory.mktemp("observed"), with_metrics=True).start()
    yield running
    running.stop()
