"""The vision pool under faults (reliability cases 16-18, 21 and 24 for the pool): workers killed mid-job (their jobs
taken by another worker once their heartbeat expires, long before claim-idle; a slow worker's job left to it; a
restarted worker taking up its own jobs), jobs that always fail, single flight across requests and gateways, deadlines shorter than an encode, workers stopped,
added and removed at any time. Nothing is lost: every request ends with its answer or a clear status, no job
stays pending, no lock is held for ever, the decoder is idle at the end.

One decoder and one gateway (on a Redis of their own) serve the whole module; each test starts the vision workers
it needs (slow or failing ones through the workers' test-only fault flags) and stops them at its end.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import signal
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2

from shared import encode_jobs
from shared.fingerprints import vision_fingerprint
from shared.embedding_cache import cache_key
from shared.encode_jobs import EncodeJob, EncodeResult
from shared.images import sha256_hex
from tests.reference import chat_request
from tests.support import (Stack, assert_nothing_left, call_chat, health_status, image_bytes,
                           noise_image, pending_jobs, wait_until)

# Short waits, so that a job of a dead worker is reclaimed within a second, but longer than a tiny encode.
WORKER_FLAGS = ("--claim-idle-ms", "800", "--read-block-ms", "200", "--torch-threads", "1")
SLOW = ("--fault-encode-delay-s", "120")   # takes a job and sits on it until killed
NEVER_RECLAIMS = ("--claim-idle-ms", "600000")
# Jobs are claimed by idle time only after a minute: a job taken sooner was taken on the heartbeat's word.
CLAIM_IDLE_S = 60
LATE_CLAIMS = ("--claim-idle-ms", str(CLAIM_IDLE_S * 1000))
MAX_TOKENS = 4

_seeds = itertools.count(7000)


def new_image() -> bytes:
    """An image no test has sent before (its embedding is not cached)."""
    seed = next(_seeds)
    return image_bytes(noise_image(32 + 16 * (seed % 4), 48, seed=seed))


def image_chat(image: bytes, request_id: str = "", text: str = "What is it?"):
    request = chat_request([("user", [text, image])], max_tokens=MAX_TOKENS, temperature=0.0)
    request.request_id = request_id
    return request


def encodes(stack: Stack, name: str, sha: str) -> int:
    return stack.logs(name).count(f"encoded image {sha}")


def jobs_added(client: redis.Redis) -> int:
    try:
        return client.xinfo_stream(encode_jobs.STREAM)["entries-added"]
    except redis.exceptions.ResponseError:
        return 0


def job_holder(client: redis.Redis) -> str | None:
    """The consumer holding the (first) pending job, if any."""
    entries = client.xpending_range(encode_jobs.STREAM, encode_jobs.GROUP, min="-", max="+", count=1)
    return entries[0]["consumer"].decode() if entries else None


@pytest.fixture(scope="module")
def stack(tiny_model, module_redis, tmp_path_factory):
    running = Stack(tiny_model, module_redis.url, tmp_path_factory.mktemp("vision-faults"), num_vision=0,
                    with_metrics=True, vision_args=WORKER_FLAGS).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(module_redis):
    return module_redis.client()


@pytest.fixture(scope="module")
def fingerprint(tiny_model):
    return vision_fingerprint(tiny_model)


class Workers:
    """Starts the vision workers of one test, with names of their own, and kills what is left at its end."""

    _numbers = itertools.count()

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.addresses: dict[str, str] = {}   # name -> health address

    def start(self, *extra_args: str, wait: bool = True) -> str:
        name = f"worker{next(self._numbers)}"
        self.addresses[name] = self.stack.start_vision(name, extra_args, wait=wait)
        return name

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.stack.stop_process(name, sig)

    def stop_all(self) -> None:
        for name in self.addresses:
            self.stack.stop_process(name, signal.SIGKILL)


@pytest.fixture
def workers(stack):
    started = Workers(stack)
    yield started
    started.stop_all()


def in_background(function, *args):
    return concurrent.futures.ThreadPoolExecutor(1).submit(function, *args)


# -- case 16: a worker killed mid-job -----------------------------------------------------------------------------

def kill_mid_job_and_rescue(stack, client, workers, fingerprint, start_rescuer_before_kill: bool) -> None:
    slow = workers.start(*SLOW, *NEVER_RECLAIMS)
    image = new_image()
    sha = sha256_hex(image)
    reply = in_background(call_chat, stack.gateway, image_chat(image, "killed-mid-job"), 60)
    wait_until(lambda: job_holder(client) == slow, 20, "the slow worker never took the job")
    if start_rescuer_before_kill:
        rescuer = workers.start()
        workers.kill(slow)
    else:
        workers.kill(slow)   # the whole pool is gone; a new worker comes up later
        assert stack.processes[slow].returncode == -signal.SIGKILL
        rescuer = workers.start()
    outcome = reply.result(timeout=60)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert outcome.last.usage.encoded_images == 1 and len(outcome.token_ids) == MAX_TOKENS
    assert "reclaimed job" in stack.logs(rescuer)
    assert (encodes(stack, slow, sha), encodes(stack, rescuer, sha)) == (0, 1), "exactly one embedding written"
    assert client.exists(cache_key(fingerprint, sha))
    assert_nothing_left(stack, client)
    assert client.xlen(encode_jobs.STREAM) == 0


def test_a_job_of_a_killed_worker_is_reclaimed_by_another_running_worker(stack, client, workers, fingerprint):
    kill_mid_job_and_rescue(stack, client, workers, fingerprint, start_rescuer_before_kill=True)


def test_a_job_of_a_killed_pool_is_reclaimed_by_a_worker_started_later(stack, client, workers, fingerprint):
    kill_mid_job_and_rescue(stack, client, workers, fingerprint, start_rescuer_before_kill=False)


def test_a_killed_workers_job_is_taken_once_its_heartbeat_expires_long_before_claim_idle(stack, client, workers,
                                                                                       fingerprint):
    slow = workers.start(*SLOW, *LATE_CLAIMS)
    image = new_image()
    sha = sha256_hex(image)
    added = jobs_added(client)
    reply = in_background(call_chat, stack.gateway, image_chat(image, "heartbeat-gone"), 120)
    wait_until(lambda: job_holder(client) == slow, 20, "the slow worker never took the job")
    rescuer = workers.start(*LATE_CLAIMS)   # up and serving: the job is still the slow worker's
    assert job_holder(client) == slow
    workers.kill(slow)
    killed = time.monotonic()
    outcome = reply.result(timeout=120)
    waited = time.monotonic() - killed
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    # The heartbeat expires after 3 s; claim-idle would take 60. Half of it is margin enough for a slow machine.
    assert waited < CLAIM_IDLE_S / 2, f"the job waited {waited:.1f} s after its worker died"
    assert "reclaimed job" in stack.logs(rescuer) and f"consumer {slow} has no heartbeat" in stack.logs(rescuer)
    assert jobs_added(client) - added == 1, "taken from the dead worker, not enqueued again"
    assert (encodes(stack, slow, sha), encodes(stack, rescuer, sha)) == (0, 1)
    assert_nothing_left(stack, client)


def test_a_slow_workers_job_is_left_to_it_and_encoded_once(stack, client, workers):
    # Either worker may take the job: each sits on it for 8 s (about three heartbeat expiries), its event loop
    # free as during a real encode, while the other looks for dead workers' jobs every second.
    slow_encode = ("--fault-encode-delay-s", "8", *LATE_CLAIMS)
    names = [workers.start(*slow_encode), workers.start(*slow_encode)]
    image = new_image()
    sha = sha256_hex(image)
    outcome = call_chat(stack.gateway, image_chat(image, "slow-not-dead"), 120)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert sorted(encodes(stack, name, sha) for name in names) == [0, 1]
    assert not any("reclaimed job" in stack.logs(name) for name in names), "a live worker's job was taken"
    assert_nothing_left(stack, client)


def test_a_restarted_worker_takes_up_its_own_jobs_at_start(stack, client, workers):
    name = workers.start(*SLOW, *LATE_CLAIMS)   # alone: nobody else could take its job
    image = new_image()
    sha = sha256_hex(image)
    reply = in_background(call_chat, stack.gateway, image_chat(image, "restarted"), 120)
    wait_until(lambda: job_holder(client) == name, 20, "the worker never took the job")
    workers.kill(name)
    killed = time.monotonic()
    # Same consumer name, same flags, without the slow encode (a flag given again wins).
    stack.restart_process(name, workers.addresses[name], ("--fault-encode-delay-s", "0"))
    outcome = reply.result(timeout=120)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    assert time.monotonic() - killed < CLAIM_IDLE_S / 2
    assert "took up 1 jobs this consumer held before its restart" in stack.logs(name)
    assert encodes(stack, name, sha) == 1
    assert_nothing_left(stack, client)


# -- case 17: a job that fails on every delivery ------------------------------------------------------------------

def test_a_poison_job_goes_to_the_dead_letter_stream_and_its_request_ends_internal(stack, client, workers):
    poison, good = new_image(), new_image()
    bad_sha = sha256_hex(poison)
    name = workers.start("--fault-encode-fail-sha256", bad_sha, "--max-deliveries", "2", "--claim-idle-ms", "300")
    dead_before = client.xlen(encode_jobs.DEAD_LETTER_STREAM) if client.exists(encode_jobs.DEAD_LETTER_STREAM) else 0
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        bad = pool.submit(call_chat, stack.gateway, image_chat(poison, "poison-1"), 60)
        mixed = pool.submit(call_chat, stack.gateway, chat_request(
            [("user", ["Both:", good, "and", poison])], max_tokens=MAX_TOKENS), 60)
        fine = pool.submit(call_chat, stack.gateway, image_chat(good, "unaffected"), 60)
    outcome = bad.result()
    assert outcome.code == grpc.StatusCode.INTERNAL, (outcome.code, outcome.details)
    assert outcome.request_id == "poison-1"
    assert f"image {bad_sha}" in outcome.details and "encoding failed" in outcome.details, outcome.details
    assert mixed.result().code == grpc.StatusCode.INTERNAL
    assert fine.result().code == grpc.StatusCode.OK and len(fine.result().token_ids) == MAX_TOKENS

    dead = client.xrange(encode_jobs.DEAD_LETTER_STREAM)[dead_before:]
    assert [entry[b"sha256"].decode() for _, entry in dead] == [bad_sha]
    assert b"deliveries" in dead[0][1][b"reason"] and b"image" not in dead[0][1]
    # The failure is remembered for a while: asking again fails at once, without another job.
    added = jobs_added(client)
    again = call_chat(stack.gateway, image_chat(poison, "poison-2"), 60)
    # (at once: well under the gateway's --encode-timeout-s of 120 s it would otherwise wait)
    assert again.code == grpc.StatusCode.INTERNAL and again.seconds < 30 and jobs_added(client) == added
    assert encodes(stack, name, sha256_hex(good)) == 1
    assert_nothing_left(stack, client)


# -- case 18: single flight -------------------------------------------------------------------------------------

def test_fifty_concurrent_requests_for_one_new_image_cause_one_encode(stack, client, workers):
    name = workers.start()
    image = new_image()
    sha = sha256_hex(image)
    added = jobs_added(client)
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        outcomes = list(pool.map(lambda i: call_chat(stack.gateway, image_chat(image, f"flight-{i}"), 120),
                                 range(50)))
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 50, {o.details for o in outcomes}
    assert len({tuple(o.token_ids) for o in outcomes}) == 1 and len(outcomes[0].token_ids) == MAX_TOKENS
    assert jobs_added(client) - added == 1
    assert encodes(stack, name, sha) == 1
    assert_nothing_left(stack, client)


@pytest.fixture(scope="module")
def second_gateway(stack):
    """Another gateway on the same Redis and decoder, whose single-flight lock expires after 1.5 s."""
    return stack.start_gateway("gateway-b", ("--lock-ttl-s", "1.5"))


def test_single_flight_holds_across_two_gateways(stack, client, workers, second_gateway):
    name = workers.start()
    image = new_image()
    added = jobs_added(client)
    gateways = [stack.gateway, second_gateway] * 12
    with concurrent.futures.ThreadPoolExecutor(len(gateways)) as pool:
        outcomes = list(pool.map(lambda g: call_chat(g, image_chat(image), 120), gateways))
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * len(gateways), {o.details for o in outcomes}
    assert len({tuple(o.token_ids) for o in outcomes}) == 1
    assert jobs_added(client) - added == 1
    assert encodes(stack, name, sha256_hex(image)) == 1
    assert_nothing_left(stack, client)


def test_when_the_encoding_worker_dies_a_waiter_takes_over_after_the_lock_expires(stack, client, workers,
                                                                                   second_gateway):
    slow = workers.start(*SLOW, *NEVER_RECLAIMS)
    image = new_image()
    sha = sha256_hex(image)
    added = jobs_added(client)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = [pool.submit(call_chat, second_gateway, image_chat(image), 60) for _ in range(20)]
        wait_until(lambda: job_holder(client) == slow, 20, "the slow worker never took the job")
        workers.kill(slow)
        # The lock (1.5 s) expires with nobody working on the image: a waiter takes it and enqueues the image
        # again; a worker of the new pool encodes it (and later finds the dead worker's job already done).
        rescuer = workers.start("--claim-idle-ms", "300")
        outcomes = [reply.result() for reply in replies]
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 20, {o.details for o in outcomes}
    assert len({tuple(o.token_ids) for o in outcomes}) == 1
    assert jobs_added(client) - added >= 2, "no waiter enqueued the image again"
    assert (encodes(stack, slow, sha), encodes(stack, rescuer, sha)) == (0, 1)
    assert_nothing_left(stack, client)


# -- case 21: a deadline shorter than the encode ----------------------------------------------------------------

def test_a_deadline_shorter_than_the_encode_is_deadline_exceeded_and_leaves_nothing(stack, client, workers):
    name = workers.start("--fault-encode-delay-s", "2")
    image = new_image()
    outcome = call_chat(stack.gateway, image_chat(image, "too-slow"), 1.0)
    assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert outcome.seconds < 2
    # The decoder never got it; the worker finishes the job it took (the embedding serves the next request)
    # and releases the lock.
    assert not [e for e in stack.log_entries("decoder0") if e.get("request_id") == "too-slow"]
    wait_until(lambda: encodes(stack, name, sha256_hex(image)) == 1, 10, "the job was never finished")
    assert_nothing_left(stack, client)
    again = call_chat(stack.gateway, image_chat(image), 30)
    assert again.code == grpc.StatusCode.OK and again.last.usage.cached_images == 1


# -- case 24: a worker stopped with jobs queued; workers added and removed at any time ----------------------------

def test_a_stopped_worker_finishes_its_job_and_leaves_the_queued_ones_to_others(stack, client, workers):
    first = workers.start("--fault-encode-delay-s", "1.5", "--max-batch-images", "1")
    images = [new_image() for _ in range(5)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        replies = [pool.submit(call_chat, stack.gateway, image_chat(image), 60) for image in images]
        wait_until(lambda: job_holder(client) == first, 20, "the worker never took a job")
        # its batch is under way (a job read but not yet started is given back by a stopping worker)
        wait_until(lambda: "injected delay: a batch of 1 images" in stack.logs(first), 20, "no batch started")
        stack.processes[first].send_signal(signal.SIGTERM)
        address = workers.addresses[first]
        wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.NOT_SERVING, 3,
                   "not NOT_SERVING at once after SIGTERM")
        assert stack.processes[first].wait(timeout=10) == 0
        assert pending_jobs(client) == 0, "the stopped worker left a job pending"
        group = client.xinfo_consumers(encode_jobs.STREAM, encode_jobs.GROUP)
        assert first not in {consumer["name"].decode() for consumer in group}, "the stopped worker stayed in the group"
        done_by_first = sum(encodes(stack, first, sha256_hex(image)) for image in images)
        assert done_by_first == 1, "the stopped worker took jobs after SIGTERM"
        second = workers.start()
        outcomes = [reply.result() for reply in replies]
    assert [o.code for o in outcomes] == [grpc.StatusCode.OK] * 5, {o.details for o in outcomes}
    assert sum(encodes(stack, second, sha256_hex(image)) for image in images) == 4
    assert_nothing_left(stack, client)


def test_workers_added_and_removed_mid_burst_lose_no_job(stack, client, workers, fingerprint):
    # Each encode stays under the pool's claim-idle time (no job is reclaimed from a live worker). New jobs are added
    # whenever fewer than 10 wait, for as long as the added worker takes to start and take one: the pool changes
    # mid-burst however slow the machine.
    slow_encode = ("--fault-encode-delay-s", "0.15", "--max-batch-images", "1")
    first = workers.start(*slow_encode)
    shas: set[str] = set()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(encode_jobs.done_channel(fingerprint))
    results: dict[str, EncodeResult] = {}

    def enqueue(count: int) -> None:
        for _ in range(count):
            image = new_image()
            shas.add(sha256_hex(image))
            client.xadd(encode_jobs.STREAM, EncodeJob(sha256_hex(image), fingerprint, image, "burst").to_fields())

    def collect(until: int, timeout_s: float = 1.0) -> None:
        give_up = time.monotonic() + timeout_s
        while len(results) < until and time.monotonic() < give_up:
            message = pubsub.get_message(timeout=0.1)
            if message is not None:
                result = EncodeResult.from_json(message["data"])
                results[result.sha256] = result

    def encoded_by(name: str) -> int:
        log = stack.logs(name)
        return sum(log.count(f"encoded image {sha}") for sha in shas)

    enqueue(20)
    collect(3, timeout_s=60)
    assert len(results) >= 3, "the first worker encodes nothing"
    second = workers.start(*slow_encode, wait=False)   # joins while the burst runs
    give_up = time.monotonic() + 300
    while encoded_by(second) < 1:
        assert time.monotonic() < give_up and stack.processes[second].poll() is None, "the added worker took no job"
        if client.xlen(encode_jobs.STREAM) < 10:
            enqueue(10)
        collect(len(shas), timeout_s=0.1)
    assert client.xlen(encode_jobs.STREAM) >= 3, "the burst ended before the pool changed"
    assert encoded_by(first) >= 3
    stack.stop_process(first, signal.SIGTERM)          # leaves mid-burst
    collect(len(shas), timeout_s=120)
    assert set(results) == shas and all(result.ok for result in results.values())
    counts = [encoded_by(name) for name in (first, second)]
    # Each job is encoded once, except one reclaimed from a worker that held it past --claim-idle-ms (the new
    # worker's first job can take that long on a busy machine): the pool delivers at least once.
    reclaimed = sum(stack.logs(name).count("reclaimed job") for name in (first, second))
    assert len(shas) <= sum(counts) <= len(shas) + reclaimed and min(counts) >= 1, f"jobs per worker: {counts}"
    assert all(client.exists(cache_key(fingerprint, sha)) for sha in shas)
    assert client.xlen(encode_jobs.STREAM) == 0
    assert_nothing_left(stack, client)
