"""The embedding cache past one Redis: the cache and the jobs on two Redis servers, either of them a Redis Cluster,
and the bounded cache pixtral-serve starts for itself.

- Which kind a URL names is asked of the server on first use: a role starts while its Redis is away.
- Two Redis servers: embeddings in the cache's, the job protocol in the jobs'; readiness follows both. A worker's
  finish is then two steps, embedding first: one that dies between them leaves the job pending with the embedding
  written; the job is reclaimed, the embedding found, and it ends without a second encode (also on a cluster).
- A real Redis Cluster (three primaries, a replica each, started here): embeddings spread over its primaries, the
  job protocol in the job stream's slot; cache hits, single flight across two gateways, a killed worker's job
  reclaimed (the claim script on the cluster), pixtral-serve given the cluster's URL, and the primary of the job
  stream killed and started again mid-load: every request succeeds or fails fast with UNAVAILABLE, none hangs,
  none answers differently from the same request once the cluster is whole again, nothing is left pending.
- pixtral-serve's own Redis: a cache capped at --cache-memory-mib under a stream of new images stays under its
  cap (least recently used embeddings evicted), while the jobs Redis evicts nothing (a held lock, the group stay).
- The Kubernetes overlay with a Redis Cluster for the cache renders, validates offline like the other overlays,
  and is what the code reads: the cache URL names the cluster, KEDA's stream scaler the jobs Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2
from redis.asyncio.cluster import RedisCluster

from services.gateway.images import ImageFile
from services.gateway.vision_pool import VisionPool
from services.launcher import Launcher
from services.serve_config import ServeConfig
from services.vision.config import VisionConfig
from services.vision.worker import VisionWorker
from shared import encode_jobs
from shared.fingerprints import vision_fingerprint
from shared.embedding_cache import KEY_PREFIX, cache_key
from shared.images import sha256_hex
from shared.redis_client import Endpoint
from tests.reference import chat_request
from tests.support import (ROOT, LocalRedisCluster, RedisServer, Stack, assert_nothing_left, call_chat, child_env,
                           free_port, health_status, image_bytes, noise_image, pending_jobs, wait_until)

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
MAX_TOKENS = 4
# Short waits: a dead worker's job is reclaimed within a second; a job is never dead-lettered for the deliveries
# an outage costs it.
REDIS_TIMEOUT = ("--redis-timeout-s", "2")
WORKER_FLAGS = (*REDIS_TIMEOUT, "--claim-idle-ms", "800", "--read-block-ms", "200", "--torch-threads", "1",
                "--max-deliveries", "1000")
GATEWAY_FLAGS = (*REDIS_TIMEOUT, "--encode-timeout-s", "60")
SLOW = ("--fault-encode-delay-s", "120")   # takes a job and sits on it until killed
LATE_CLAIMS = ("--claim-idle-ms", "60000")

_seeds = itertools.count(31000)


def new_image() -> bytes:
    """An image no test has sent before (its embedding is not cached)."""
    seed = next(_seeds)
    return image_bytes(noise_image(32 + 16 * (seed % 3), 48, seed=seed))


def image_chat(image: bytes, request_id: str = ""):
    request = chat_request([("user", ["What is it?", image])], max_tokens=MAX_TOKENS, temperature=0.0)
    request.request_id = request_id
    return request


def encodes(stack: Stack, name: str, sha: str) -> int:
    return stack.logs(name).count(f"encoded image {sha}")


def jobs_added(client) -> int:
    try:
        return client.xinfo_stream(encode_jobs.STREAM)["entries-added"]
    except redis.exceptions.ResponseError:
        return 0


def job_holder(client) -> str | None:
    entries = client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min="-", max="+", count=1)
    return entries[0]["consumer"].decode() if entries else None


class CountingEncoder:
    """Zero features of `num_columns` columns per patch, counting the images it encodes: a stand-in for the model
    where the test is about the jobs, not the features."""

    def __init__(self, num_columns: int = 8) -> None:
        self.num_columns = num_columns
        self.num_images = 0

    def encode(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        self.num_images += len(images)
        return [torch.zeros(image.shape[1] // 16 * (image.shape[2] // 16), self.num_columns) for image in images]


def worker_config(consumer: str, *flags: str) -> VisionConfig:
    return VisionConfig.load(["--consumer", consumer, "--read-block-ms", "50", "--heartbeat-interval-ms", "200",
                              *flags])


# ============================================================================================ finding the kind

@pytest.fixture(scope="module")
def cluster():
    """Three primaries, a replica each, that take over within a few seconds of their primary's death."""
    running = LocalRedisCluster(num_primaries=3, replicas_per_primary=1, node_timeout_ms=1000).start()
    yield running
    running.stop()


def test_the_kind_of_redis_is_asked_of_the_server_on_first_use(cluster):
    plain = RedisServer()   # its port, with nothing listening yet

    async def run() -> tuple:
        away = Endpoint(plain.url, timeout_s=0.5)
        with pytest.raises(redis.exceptions.ConnectionError):
            await away.client()
        assert away.is_cluster is None
        plain.start()
        found = await away.client(), await Endpoint(cluster.url, timeout_s=2).client()
        try:
            return isinstance(found[0], RedisCluster), isinstance(found[1], RedisCluster), await found[1].ping()
        finally:
            for client in found:
                await client.aclose()
    try:
        plain_kind, cluster_kind, answered = asyncio.run(run())   # is a cluster, for each
    finally:
        plain.stop()
    assert (plain_kind, cluster_kind, answered) == (False, True, True)


# ================================================================================= the cache and the jobs apart

@pytest.fixture(scope="module")
def cache_redis():
    server = RedisServer(("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def jobs_redis():
    server = RedisServer(("--maxmemory-policy", "noeviction")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def split_stack(tiny_model, cache_redis, jobs_redis, tmp_path_factory):
    running = Stack(tiny_model, jobs_redis.url, tmp_path_factory.mktemp("split"), cache_redis_url=cache_redis.url,
                    decoder_args=REDIS_TIMEOUT, vision_args=WORKER_FLAGS, gateway_args=GATEWAY_FLAGS,
                    with_metrics=True).start()
    yield running
    running.stop()


def test_with_two_redis_the_embeddings_go_to_the_cache_and_the_jobs_to_the_jobs_redis(split_stack, cache_redis,
                                                                                    jobs_redis, tiny_model):
    image = new_image()
    first = call_chat(split_stack.gateway, image_chat(image), 60)
    again = call_chat(split_stack.gateway, image_chat(image), 60)
    assert first.code == again.code == grpc.StatusCode.OK, (first.details, again.details)
    assert (first.last.usage.encoded_images, again.last.usage.cached_images) == (1, 1)
    assert first.token_ids == again.token_ids
    cache, jobs = cache_redis.client(), jobs_redis.client()
    key = cache_key(vision_fingerprint(tiny_model), sha256_hex(image))
    assert cache.exists(key) and not jobs.exists(key)
    assert cache.ttl(key) == -1, "under allkeys-lru an embedding needs no expiry"
    assert jobs.exists(encode_jobs.STREAM) and not cache.exists(encode_jobs.STREAM)
    assert not list(cache.scan_iter(match="pixtral:vision:alive:*")) and list(jobs.scan_iter(
        match="pixtral:vision:alive:*"))
    assert_nothing_left(split_stack, jobs)


def test_readiness_follows_the_cache_redis_and_the_jobs_redis_each(split_stack, cache_redis, jobs_redis):
    roles = [split_stack.gateway, *split_stack.decoders, *split_stack.vision]

    def all_are(status: int) -> bool:
        return all(health_status(address) == status for address in roles)
    for server in (cache_redis, jobs_redis):
        server.process.terminate()
        server.process.wait(timeout=10)
        try:
            wait_until(lambda: all_are(NOT_SERVING), 15, f"not every role NOT_SERVING without {server.url}")
        finally:
            server.start()   # the same port, empty
        wait_until(lambda: all_are(SERVING), 20, f"not every role SERVING again with {server.url}")
    # A connection a role held from before a restart fails once when next used: that request is UNAVAILABLE, fast.
    image = new_image()

    def answered():
        outcome = call_chat(split_stack.gateway, image_chat(image), 60)
        assert outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE) and outcome.seconds < 10, outcome
        return outcome.code == grpc.StatusCode.OK
    wait_until(answered, 30, "no request answered after both Redis came back", interval_s=0.2)


async def _die_between_the_embedding_and_the_ack(jobs, cache) -> dict:
    """A gateway's pool asks for an image; worker A takes the job, writes the embedding and dies before the rest of
    its finish (its lock release, message and ack); worker B, started later, takes the job on A's missing
    heartbeat. What each saw is returned."""
    fingerprint = "d" * 16
    image = image_bytes(noise_image(32, 32, seed=30999))
    sha = sha256_hex(image)
    pool = VisionPool(jobs, fingerprint, lock_ttl_s=30.0, poll_s=0.1, cache=cache)
    await pool.start()
    dying, dying_encoder = None, CountingEncoder()
    try:
        dying = VisionWorker(jobs, dying_encoder, fingerprint, worker_config("dying"), cache=cache)
        await dying.ensure_group()
        asked = asyncio.create_task(pool.encode([ImageFile(sha, image, "images[0]")], "r", timeout_s=30.0))
        entries: list = []
        while not entries:
            entries = await dying.group.read()

        async def dies(*args, **kwargs) -> None:
            raise SystemExit("the worker died after writing the embedding")
        dying.group._retire_done = dies
        todo, _ = await dying._prepare(entries)
        with pytest.raises(SystemExit):
            await dying._encode_and_write(todo)
        jobs_client, cache_client = await pool.jobs.client(), await pool.cache.client()
        state = {
            "asked": await asyncio.wait_for(asked, 10),   # the waiter found the embedding by its poll
            "embedding written": bool(await cache_client.exists(cache_key(fingerprint, sha))),
            "lock held": bool(await jobs_client.exists(encode_jobs.lock_key(fingerprint, sha))),
            "pending": (await jobs_client.xpending(encode_jobs.STREAM, encode_jobs.GROUP))["pending"]}
        rescuer_encoder = CountingEncoder()
        rescuer = VisionWorker(jobs, rescuer_encoder, fingerprint, worker_config("rescuer"), cache=cache)
        stop = asyncio.Event()
        running = asyncio.create_task(rescuer.run(stop))
        give_up = time.monotonic() + 20
        while (await jobs_client.xpending(encode_jobs.STREAM, encode_jobs.GROUP))["pending"] or \
                await jobs_client.exists(encode_jobs.lock_key(fingerprint, sha)):
            assert time.monotonic() < give_up and not running.done(), "the rescuer never finished the job"
            await asyncio.sleep(0.05)
        stop.set()
        await running
        state.update({"encoded by the dying worker": dying_encoder.num_images,
                      "encoded by the rescuer": rescuer_encoder.num_images,
                      "found cached by the rescuer": rescuer.stats.num_deduplicated,
                      "entries left": await jobs_client.xlen(encode_jobs.STREAM)})
        return state
    finally:
        await pool.close()


@pytest.mark.parametrize("where", ["two Redis", "one cluster"])
def test_a_worker_dying_between_the_embedding_write_and_the_ack_costs_no_second_encode(where, cluster):
    servers = []
    if where == "two Redis":   # of their own: no worker of the split stack may take the job
        servers = [RedisServer().start(), RedisServer().start()]
        endpoints = (Endpoint(servers[0].url, 2.0, blocking_s=1.0), Endpoint(servers[1].url, 2.0))
    else:   # no worker runs on the module's cluster between its tests
        cluster.client().delete(encode_jobs.STREAM)
        shared = Endpoint(cluster.url, 2.0, blocking_s=1.0)   # one cluster for both: two slots, two steps
        endpoints = (shared, shared)

    async def run() -> dict:
        try:
            return await _die_between_the_embedding_and_the_ack(*endpoints)
        finally:
            for endpoint in set(endpoints):
                await endpoint.aclose()
    try:
        state = asyncio.run(run())
    finally:
        for server in servers:
            server.stop()
        if where == "one cluster":
            cluster.client().delete(encode_jobs.STREAM)
    assert state.pop("asked") == frozenset({sha256_hex(image_bytes(noise_image(32, 32, seed=30999)))})
    assert state == {"embedding written": True, "lock held": True, "pending": 1,
                     "encoded by the dying worker": 1, "encoded by the rescuer": 0, "found cached by the rescuer": 1,
                     "entries left": 0}


# ==================================================================================== the whole stack on a cluster

@pytest.fixture(scope="module")
def cluster_stack(tiny_model, cluster, tmp_path_factory):
    running = Stack(tiny_model, cluster.url, tmp_path_factory.mktemp("cluster"), num_vision=0, with_metrics=True,
                    decoder_args=REDIS_TIMEOUT, vision_args=WORKER_FLAGS, gateway_args=GATEWAY_FLAGS).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def cluster_client(cluster):
    client = cluster.client()
    yield client
    client.close()


class Workers:
    """The vision workers of one test, named apart, killed at its end."""

    _numbers = itertools.count()

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.names: list[str] = []

    def start(self, *extra_args: str) -> str:
        name = f"cluster-worker{next(self._numbers)}"
        self.stack.start_vision(name, extra_args)
        self.names.append(name)
        return name

    def kill(self, name: str) -> None:
        self.stack.stop_process(name, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in self.names:
            self.stack.stop_process(name, signal.SIGKILL)


@pytest.fixture
def workers(cluster_stack):
    started = Workers(cluster_stack)
    yield started
    started.stop_all()


def images_on_every_primary(cluster: LocalRedisCluster, fingerprint: str) -> dict[int, bytes]:
    """A new image whose embedding's slot each primary serves, by primary."""
    found: dict[int, bytes] = {}
    primaries = cluster.primaries()
    while len(found) < len(primaries):
        image = new_image()
        found.setdefault(cluster.primary_of(cache_key(fingerprint, sha256_hex(image))), image)
    return found


def test_embeddings_spread_over_the_primaries_and_repeats_are_served_from_them(cluster_stack, cluster,
                                                                            cluster_client, workers, tiny_model):
    name = workers.start()
    fingerprint = vision_fingerprint(tiny_model)
    by_primary = images_on_every_primary(cluster, fingerprint)
    assert len(by_primary) == 3
    for primary, image in by_primary.items():
        first = call_chat(cluster_stack.gateway, image_chat(image), 60)
        again = call_chat(cluster_stack.gateway, image_chat(image), 60)
        assert first.code == again.code == grpc.StatusCode.OK, (first.details, again.details)
        assert (first.last.usage.encoded_images, again.last.usage.cached_images) == (1, 1)
        assert first.token_ids == again.token_ids
        assert encodes(cluster_stack, name, sha256_hex(image)) == 1
        assert cluster.node(primary).exists(cache_key(fingerprint, sha256_hex(image))), "not on its slot's primary"
    # The job protocol lives in the stream's slot: the heartbeat is on the stream's primary.
    jobs_primary = cluster.primary_of(encode_jobs.STREAM)
    assert cluster.node(jobs_primary).exists(encode_jobs.heartbeat_key(name))
    assert cluster.primary_of(encode_jobs.lock_key(fingerprint, "ab" * 32)) == jobs_primary
    assert_nothing_left(cluster_stack, cluster_client)


def test_single_flight_holds_across_two_gateways_on_a_cluster(cluster_stack, cluster_client, workers):
    name = workers.start()
    second = cluster_stack.start_gateway("cluster-gateway-b", GATEWAY_FLAGS)
    image = new_image()
    added = jobs_added(cluster_client)
    gateways = [cluster_stack.gateway, second] * 12
    with concurrent.futures.ThreadPoolExecutor(len(gateways)) as pool:
        outcomes = list(pool.map(lambda g: call_chat(g, image_chat(image), 60), gateways))
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * len(gateways), {o.details for o in outcomes}
    assert len({tuple(o.token_ids) for o in outcomes}) == 1
    assert jobs_added(cluster_client) - added == 1
    assert encodes(cluster_stack, name, sha256_hex(image)) == 1
    assert_nothing_left(cluster_stack, cluster_client)
    cluster_stack.stop_process("cluster-gateway-b")


def test_a_killed_workers_job_is_reclaimed_on_a_cluster(cluster_stack, cluster_client, workers):
    slow = workers.start(*SLOW, *LATE_CLAIMS)
    image = new_image()
    sha = sha256_hex(image)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reply = pool.submit(call_chat, cluster_stack.gateway, image_chat(image, "killed-on-a-cluster"), 60)
        wait_until(lambda: job_holder(cluster_client) == slow, 20, "the slow worker never took the job")
        rescuer = workers.start(*LATE_CLAIMS)   # claims by idle time only after a minute: by heartbeat here
        workers.kill(slow)
        outcome = reply.result(timeout=60)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert f"consumer {slow} has no heartbeat" in cluster_stack.logs(rescuer)
    assert (encodes(cluster_stack, slow, sha), encodes(cluster_stack, rescuer, sha)) == (0, 1)
    assert_nothing_left(cluster_stack, cluster_client)


def test_pixtral_serve_takes_a_cluster_url(tiny_model, cluster, tmp_path):
    port = free_port()
    stderr = (tmp_path / "serve.stderr").open("wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "services.launcher", "--model", str(tiny_model), "--redis", cluster.url,
         "--port", str(port), "--metrics-port", "0"], cwd=ROOT, env=child_env(PIXTRAL_CACHE_DIR=str(tmp_path)),
        stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        line = serve.stdout.readline()
        assert line.strip() == f"ready 127.0.0.1:{port}", (tmp_path / "serve.stderr").read_text()[-3000:]
        image = new_image()
        first = call_chat(f"127.0.0.1:{port}", image_chat(image), 60)
        again = call_chat(f"127.0.0.1:{port}", image_chat(image), 60)
        assert first.code == again.code == grpc.StatusCode.OK, (first.details, again.details)
        assert (first.last.usage.encoded_images, again.last.usage.cached_images) == (1, 1)
        assert "is a node of a Redis Cluster" in (tmp_path / "serve.stderr").read_text()
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=120) == 0
        stderr.close()


class Load:
    """Chats from a few threads until stopped, each for a new image or one answered before: every outcome kept."""

    def __init__(self, gateway: str, num_threads: int = 4) -> None:
        self.gateway = gateway
        self.outcomes: list[tuple[bytes, object]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(num_threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        mine: list[bytes] = []
        for turn in itertools.count():
            if self._stop.is_set():
                return
            image = mine[turn % len(mine)] if mine and turn % 3 == 2 else new_image()
            outcome = call_chat(self.gateway, image_chat(image, f"load-{index}-{turn}"), 60)
            with self._lock:
                self.outcomes.append((image, outcome))
            if outcome.code == grpc.StatusCode.OK:
                mine.append(image)

    def num_ok_since(self, start: int) -> int:
        with self._lock:
            return sum(outcome.code == grpc.StatusCode.OK for _, outcome in self.outcomes[start:])

    def stop(self) -> list[tuple[bytes, object]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return self.outcomes


def test_the_primary_of_the_job_stream_killed_and_restarted_mid_load_loses_no_request(cluster_stack, cluster,
                                                                                     cluster_client, workers):
    """Last of the cluster's tests: the stream's primary is killed (its replica takes over) and started again."""
    workers.start()
    workers.start()
    victim = cluster.primary_of(encode_jobs.STREAM)
    load = Load(cluster_stack.gateway)
    try:
        wait_until(lambda: load.num_ok_since(0) >= 8, 60, "the load never got going")
        cluster.kill(victim)
        killed_at = len(load.outcomes)
        wait_until(lambda: _safe_primary_of(cluster, encode_jobs.STREAM) not in (None, victim), 30,
                   "no replica took over the stream's slot")
        cluster.wait_ok()
        wait_until(lambda: load.num_ok_since(killed_at) >= 8, 60, "requests do not succeed after the failover")
        cluster.start_node(victim)   # back empty: it rejoins as a replica of its old replica
        cluster.wait_ok()
        restarted_at = len(load.outcomes)
        wait_until(lambda: load.num_ok_since(restarted_at) >= 8, 60, "requests do not succeed after the restart")
    finally:
        outcomes = load.stop()
    codes = {outcome.code for _, outcome in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, \
        {(o.code, o.details) for _, o in outcomes if o.code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)}
    failed = [outcome for _, outcome in outcomes if outcome.code == grpc.StatusCode.UNAVAILABLE]
    assert all(outcome.seconds < 20 for outcome in failed), "a request failed, but not fast"
    # The same answer as the cluster gives once whole again: no request answered from wrong or missing features.
    for image, outcome in outcomes:
        if outcome.code == grpc.StatusCode.OK:
            again = call_chat(cluster_stack.gateway, image_chat(image), 60)
            assert again.code == grpc.StatusCode.OK and again.token_ids == outcome.token_ids
    assert_nothing_left(cluster_stack, cluster_client, timeout_s=30)
    assert sum(outcome.code == grpc.StatusCode.OK for _, outcome in outcomes) >= 24
    # The roles followed the slot to the promoted replica (their health watch saw the cluster's epoch move).
    for name in ("gateway", "decoder0", *workers.names):
        assert "refreshing its map of the slots" in cluster_stack.logs(name), name


def _safe_primary_of(cluster: LocalRedisCluster, key: str) -> int | None:
    try:
        return cluster.primary_of(key)
    except (LookupError, redis.exceptions.RedisError):
        return None


# ========================================================================= pixtral-serve's own, bounded, cache

CAP_MIB = 8
VALUE_COLUMNS = 65536   # a 32x32 image is 2x2 patches: 4 x 65536 float32 values = 1 MiB per embedding


def test_the_private_cache_stays_under_its_cap_while_jobs_and_locks_are_never_evicted():
    launcher = Launcher(ServeConfig(redis="private", cache_memory_mib=CAP_MIB))
    try:
        cache_url, jobs_url = launcher.start_redis()
        cache, jobs = redis.Redis.from_url(cache_url), redis.Redis.from_url(jobs_url)
        assert cache_url != jobs_url
        assert int(cache.config_get("maxmemory")["maxmemory"]) == CAP_MIB << 20
        assert cache.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert jobs.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        fingerprint = "c" * 16
        stuck = encode_jobs.lock_key(fingerprint, "ee" * 32)   # a lock some gateway holds meanwhile
        jobs.set(stuck, "gateway", px=600_000)
        num_images = 5 * CAP_MIB
        counts = asyncio.run(_stream_of_new_images(cache_url, jobs_url, fingerprint, num_images))
        assert all(count * (1 << 20) <= CAP_MIB << 20 for count in counts), f"embeddings held: {counts}"
        assert counts[-1] >= 3, "the cache holds much less than its cap"
        assert int(cache.info("stats")["evicted_keys"]) >= num_images - CAP_MIB
        assert int(cache.info("memory")["used_memory"]) <= (CAP_MIB + 2) << 20
        assert int(jobs.info("stats")["evicted_keys"]) == 0
        assert jobs.pttl(stuck) > 0 and jobs.exists(encode_jobs.STREAM)
        assert [group["name"] for group in jobs.xinfo_groups(encode_jobs.STREAM)] == [encode_jobs.GROUP.encode()]
        assert pending_jobs(jobs) == 0
    finally:
        launcher.stop()


async def _stream_of_new_images(cache_url: str, jobs_url: str, fingerprint: str, num_images: int) -> list[int]:
    """Each new image through the gateway's pool and a worker, one after the other; the cache's embeddings count
    after each."""
    jobs, cache = Endpoint(jobs_url, 2.0, blocking_s=1.0), Endpoint(cache_url, 2.0)
    pool = VisionPool(jobs, fingerprint, lock_ttl_s=30.0, poll_s=0.1, cache=cache)
    worker = VisionWorker(jobs, CountingEncoder(VALUE_COLUMNS), fingerprint, worker_config("capped"), cache=cache)
    await pool.start()
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    counts = []
    try:
        for seed in range(num_images):
            image = image_bytes(noise_image(32, 32, seed=32000 + seed))
            sha = sha256_hex(image)
            assert await pool.encode([ImageFile(sha, image, "images[0]")], "r", timeout_s=30.0) == {sha}
            client = await cache.client()
            counts.append(len([key async for key in client.scan_iter(match=f"{KEY_PREFIX}*")]))
            assert await client.exists(cache_key(fingerprint, sha)), "the newest embedding was evicted"
        return counts
    finally:
        stop.set()
        await running
        await pool.close()
        await worker.leave()
        await jobs.aclose()
        await cache.aclose()


# ===================================================================== Kubernetes: the cache on a Redis Cluster

CLUSTER_OVERLAY = "overlays/gpu-redis-cluster"


@pytest.fixture(scope="module")
def cluster_overlay():
    from tests.test_deploy import Rendered, render
    return Rendered("gpu-redis-cluster", render(CLUSTER_OVERLAY))


def _stateful_set(overlay, name: str) -> dict:
    return overlay.get("StatefulSet", name)


def test_the_cluster_overlay_validates_like_the_others(cluster_overlay):
    import kubernetes_validate

    from tests.test_deploy import K8S_VERSIONS, _keda_validator
    validator = _keda_validator()
    for obj in cluster_overlay.objects:
        if obj["apiVersion"].startswith("keda.sh/"):
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
            assert not errors, f"ScaledObject {obj['metadata']['name']}: {errors}"
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{error.message} at {'.'.join(map(str, error.path))}")
    assert {obj["metadata"].get("namespace") for obj in cluster_overlay.objects if obj["kind"] != "Namespace"} == \
        {"pixtral"}


def test_the_roles_read_the_cache_from_the_cluster_and_the_jobs_from_the_redis_keda_watches(cluster_overlay):
    from tests.test_deploy import ROLES
    configs = {role: cluster_overlay.config(role) for role in ROLES}
    for role, config in configs.items():
        assert config.cache_redis_url == "redis://redis-cache:6379/0", role
        assert config.jobs_redis_url == "redis://redis:6379/0", role
    assert configs["vision"].embedding_ttl_s == configs["gateway"].embedding_ttl_s == 0, "allkeys-lru: no expiry"
    # Each URL's host is a Service that selects the Redis it should: the cluster's nodes, the jobs Deployment.
    cache_service, jobs_service = cluster_overlay.get("Service", "redis-cache"), cluster_overlay.get("Service", "redis")
    nodes = _stateful_set(cluster_overlay, "redis-cache")
    assert cache_service["spec"]["selector"].items() <= nodes["spec"]["template"]["metadata"]["labels"].items()
    assert jobs_service["spec"]["selector"].items() <= \
        cluster_overlay.deployment("redis")["spec"]["template"]["metadata"]["labels"].items()
    # KEDA's stream scaler reads the jobs Redis.
    for trigger in cluster_overlay.get("ScaledObject", "vision")["spec"]["triggers"]:
        assert trigger["type"] == "redis-streams"
        assert trigger["metadata"]["address"] == "redis.pixtral.svc.cluster.local:6379"
        assert (trigger["metadata"]["stream"], trigger["metadata"]["consumerGroup"]) == (
            encode_jobs.STREAM, encode_jobs.GROUP)


def test_the_cache_nodes_evict_by_lru_and_the_jobs_redis_never(cluster_overlay):
    from tests.test_deploy import _redis_directives, parse_quantity, parse_redis_bytes
    jobs_files = cluster_overlay.get("ConfigMap", _config_map_of(cluster_overlay.pod("redis")))["data"]
    nodes = _stateful_set(cluster_overlay, "redis-cache")
    cache_files = cluster_overlay.get("ConfigMap", _config_map_of(nodes["spec"]["template"]["spec"]))["data"]
    jobs_conf, cache_conf = _redis_directives(jobs_files["redis.conf"]), _redis_directives(cache_files["redis.conf"])
    assert jobs_conf["maxmemory-policy"] == "noeviction"
    assert (cache_conf["maxmemory-policy"], cache_conf["cluster-enabled"]) == ("allkeys-lru", "yes")
    assert cache_conf["cluster-preferred-endpoint-type"] == "hostname"
    for files, container in ((jobs_files, cluster_overlay.container("redis")),
                             (cache_files, nodes["spec"]["template"]["spec"]["containers"][0])):
        maxmemory = parse_redis_bytes(_redis_directives(files["memory.conf"])["maxmemory"])
        limit = parse_quantity(container["resources"]["limits"]["memory"])
        assert limit >= 1.25 * maxmemory, container["name"]
    assert nodes["spec"]["replicas"] == 6 and "--cluster-replicas 1" in \
        cluster_overlay.get("Job", "redis-cache-create")["spec"]["template"]["spec"]["containers"][0]["args"][0]


def test_the_rendered_cache_node_config_starts_a_cluster_node(cluster_overlay, tmp_path):
    nodes = _stateful_set(cluster_overlay, "redis-cache")
    files = cluster_overlay.get("ConfigMap", _config_map_of(nodes["spec"]["template"]["spec"]))["data"]
    (tmp_path / "memory.conf").write_text(files["memory.conf"])
    # The container's paths become this test's; everything else is the rendered file.
    conf = re.sub(r"(?m)^include .*$", f"include {tmp_path / 'memory.conf'}", files["redis.conf"])
    conf = re.sub(r"(?m)^dir .*$", f"dir {tmp_path}", conf)
    conf = re.sub(r"(?m)^cluster-config-file .*$", f"cluster-config-file {tmp_path / 'nodes.conf'}", conf)
    (tmp_path / "redis.conf").write_text(conf)
    port = free_port()
    server = subprocess.Popen(["redis-server", str(tmp_path / "redis.conf"), "--port", str(port), "--bind",
                               "127.0.0.1", "--cluster-announce-hostname", "redis-cache-0.test"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        wait_until(lambda: _pings(client), 10, "redis-server did not start with the rendered config")
        assert client.info("cluster")["cluster_enabled"] == 1
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert client.config_get("cluster-announce-hostname")["cluster-announce-hostname"] == "redis-cache-0.test"
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def _config_map_of(pod: dict) -> str:
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    return volume["configMap"]["name"]


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
