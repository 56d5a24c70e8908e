"""Routing by prefix-cache affinity: the policy's logic (pure, on made-up decoder states), the gateway's pool with
decoders that report their state over real gRPC (in process), and the whole stack with two decoder processes:
repeats of an image hit its decoder's prefix cache, a full decoder's requests go to the other one, and a killed
decoder's images are served by the one left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
import uuid
from collections import Counter
from dataclasses import replace

import grpc
import pytest

from pixtral.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from services.gateway.decoders import DecoderPool
from services.gateway.routing import (Affinity, DecoderLoad, LeastBusy, Ranking, affinity_key, image_key,
                                      policy, score)
from shared.errors import Overloaded
from shared.generation import DecoderInfo, GenerateRequest, ImageRef
from shared.grpc_server import GrpcServer
from shared.images import sha256_hex
from shared.sampling import SamplingParams
from tests.reference import chat_request
from tests.support import (BackgroundChat, Stack, call_chat, image_bytes, metric_value, noise_image,
                           wait_until)

ADDRESSES = tuple(f"10.0.0.{i}:50061" for i in range(1, 5))


def info(capacity: int = 64, num_unfinished: int = 0, num_waiting: int = 0, num_free_blocks: int = 100,
         **fields) -> DecoderInfo:
    values = dict(max_model_len=8192, vocab_size=131072, block_size=16, model_fingerprint="f", prefix_caching=True,
                  max_num_seqs=capacity, max_queued=0, num_unfinished=num_unfinished, num_blocks=100,
                  num_free_blocks=num_free_blocks, num_waiting=num_waiting)
    return DecoderInfo(**{**values, **fields})


def idle(addresses=ADDRESSES) -> list[DecoderLoad]:
    return [DecoderLoad(address, True, 0, 0, info()) for address in addresses]


def keys(count: int) -> list[bytes]:
    return [image_key(f"{index:064x}") for index in range(count)]


def first(ranking) -> str:
    return ranking.addresses[0]


def with_load(decoders: list[DecoderLoad], address: str, **changes) -> list[DecoderLoad]:
    return [replace(decoder, **changes) if decoder.address == address else decoder for decoder in decoders]


# -- the policy ----------------------------------------------------------------------------------------------------

def test_the_same_key_goes_to_the_same_decoder_in_every_gateway():
    decoders = idle()
    for key in keys(50):
        choices = {first(Affinity().rank(key, decoders)) for _ in range(3)}
        choices.add(first(Affinity().rank(key, list(reversed(decoders)))))   # another gateway's order
        assert len(choices) == 1
        assert choices == {max(ADDRESSES, key=lambda address: score(key, address))}


def test_keys_spread_over_the_decoders():
    counts = Counter(first(Affinity().rank(key, idle())) for key in keys(2000))
    assert set(counts) == set(ADDRESSES)
    assert all(350 <= count <= 650 for count in counts.values()), counts   # 500 each on average


def test_a_decoder_over_the_load_bound_sends_the_request_to_the_keys_second_choice():
    two = idle(ADDRESSES[:2])
    key = keys(1)[0]
    ranked = Affinity(1.25, 0).rank(key, two).addresses
    preferred, second = ranked
    # 1 in flight there, none on the other: the bound is ceil(1.25 x (1 + 1) / 2) = 2, so it still takes one
    loaded = with_load(two, preferred, num_outstanding=1)
    assert Affinity(1.25, 0).rank(key, loaded) == Ranking((preferred, second), "affinity")
    # 2 in flight: the bound is ceil(1.25 x 3 / 2) = 2, reached
    loaded = with_load(two, preferred, num_outstanding=2)
    ranking = Affinity(1.25, 0).rank(key, loaded)
    assert ranking.addresses == (second, preferred) and ranking.reason == "spilled"
    # A looser bound keeps it there; others' requests (from their Info) count like this gateway's own.
    assert first(Affinity(2.0, 0).rank(key, loaded)) == preferred
    assert first(Affinity(1.25, 0).rank(key, with_load(two, preferred, num_elsewhere=2))) == second


def test_the_load_slack_keeps_a_request_with_its_decoder_until_it_is_that_far_ahead_of_the_least_loaded():
    two = idle(ADDRESSES[:2])
    key = keys(1)[0]
    preferred, second = Affinity().rank(key, two).addresses
    # 31 in flight there, 0 on the other: far over ceil(1.25 x 32 / 2) = 20, within the default slack of 32
    loaded = with_load(two, preferred, num_outstanding=31)
    assert Affinity().rank(key, loaded) == Ranking((preferred, second), "affinity")
    assert first(Affinity().rank(key, with_load(two, preferred, num_outstanding=32))) == second
    # The slack counts from the least loaded decoder: with 10 on the other, 41 still stays.
    busy = with_load(with_load(two, preferred, num_outstanding=41), second, num_outstanding=10)
    assert first(Affinity().rank(key, busy)) == preferred
    assert first(Affinity().rank(key, with_load(busy, preferred, num_outstanding=42))) == second
    # Under heavy load the factor's bound is the larger: ceil(1.25 x 301 / 2) = 189.
    roomy = [replace(decoder, info=info(capacity=512)) for decoder in two]
    heavy = with_load(with_load(roomy, preferred, num_outstanding=188), second, num_outstanding=112)
    assert first(Affinity().rank(key, heavy)) == preferred
    assert first(Affinity().rank(key, with_load(heavy, preferred, num_outstanding=189))) == second
    assert first(Affinity(1.25, 8).rank(key, with_load(two, preferred, num_outstanding=8))) == second


def test_the_spill_goes_to_the_same_second_choice_every_time():
    decoders = idle()
    for key in keys(20):
        preferred, second, *_ = Affinity().rank(key, decoders).addresses
        loaded = with_load(decoders, preferred, num_outstanding=5)
        assert {first(Affinity(1.25, 0).rank(key, loaded)) for _ in range(3)} == {second}


def test_a_full_decoder_is_passed_over_even_under_the_bound():
    two, key = idle(ADDRESSES[:2]), keys(1)[0]
    preferred, second = Affinity().rank(key, two).addresses
    at_capacity = with_load(two, preferred, num_outstanding=1, info=info(capacity=1))
    assert Affinity(100.0).rank(key, at_capacity).addresses == (second, preferred)
    out_of_memory = with_load(two, preferred, info=info(num_waiting=1, num_free_blocks=0))
    assert first(Affinity().rank(key, out_of_memory)) == second
    # Waiting for a batch slot with memory free is not full; nor is a decoder whose Info is unknown.
    assert first(Affinity().rank(key, with_load(two, preferred, info=info(num_waiting=1)))) == preferred
    assert first(Affinity().rank(key, with_load(two, preferred, info=None))) == preferred


def test_when_every_decoder_is_full_the_least_loaded_is_tried_first():
    two, key = idle(ADDRESSES[:2]), keys(1)[0]
    preferred, second = Affinity().rank(key, two).addresses
    full = [replace(decoder, info=info(capacity=1), num_outstanding=3 if decoder.address == preferred else 1)
            for decoder in two]
    ranking = Affinity().rank(key, full)
    assert ranking.addresses == (second, preferred) and ranking.reason == "spilled"


def test_a_removed_decoder_moves_only_its_keys():
    before = {key: first(Affinity().rank(key, idle())) for key in keys(2000)}
    gone = ADDRESSES[1]
    for remaining in (idle(ADDRESSES[:1] + ADDRESSES[2:]),                       # dropped from the list
                      with_load(idle(), gone, is_healthy=False)):                # unhealthy
        after = {key: first(Affinity().rank(key, remaining)) for key in before}
        moved = {key for key in before if before[key] != after[key]}
        assert moved == {key for key, address in before.items() if address == gone}
        assert gone not in after.values()
        assert len(Counter(after[key] for key in moved)) == 3   # spread over the others, not piled on one


def test_a_decoder_that_comes_back_takes_back_its_keys():
    back = ADDRESSES[2]
    owned = {key for key in keys(500) if first(Affinity().rank(key, idle())) == back}
    assert owned
    away = with_load(idle(), back, is_healthy=False)
    assert all(first(Affinity().rank(key, away)) != back for key in owned)
    assert all(first(Affinity().rank(key, idle())) == back for key in owned)


def test_with_no_healthy_decoder_all_are_tried_in_the_keys_order():
    sick = [replace(decoder, is_healthy=False) for decoder in idle()]
    key = keys(1)[0]
    assert Affinity().rank(key, sick).addresses == Affinity().rank(key, idle()).addresses
    assert len(Affinity().rank(key, sick).addresses) == 4
    assert Affinity().rank(key, []).addresses == ()


def test_the_key_is_the_first_image_or_the_first_tokens():
    def request(ids, images=()):
        return GenerateRequest("r", list(ids), [ImageRef(sha, 2, 2) for sha in images], SamplingParams(max_tokens=1))

    a, b = "a" * 64, "b" * 64
    assert affinity_key(request([1, 3, 10], [a, b])) == affinity_key(request([1, 3, 10, 10, 5], [a])) == image_key(a)
    assert affinity_key(request([1, 3, 10], [b, a])) != image_key(a)
    prefix = list(range(1000, 1064))
    assert affinity_key(request(prefix + [1, 2])) == affinity_key(request(prefix + [7]))   # the same first 64
    assert affinity_key(request(prefix[:-1] + [9, 1, 2])) != affinity_key(request(prefix + [1, 2]))
    assert affinity_key(request([1, 3, 5])) != affinity_key(request([1, 3, 6]))


def test_least_busy_takes_the_fewest_in_flight_and_ties_in_turn():
    decoders, key = idle(ADDRESSES[:3]), keys(1)[0]
    balancer = LeastBusy()
    assert {first(balancer.rank(key, decoders)) for _ in range(3)} == set(ADDRESSES[:3])
    loaded = [replace(decoder, num_outstanding=2 - index) for index, decoder in enumerate(decoders)]
    assert {first(balancer.rank(key, loaded)) for _ in range(3)} == {ADDRESSES[2]}
    assert first(balancer.rank(key, with_load(loaded, ADDRESSES[2], is_healthy=False))) == ADDRESSES[1]


def test_the_routing_flag():
    assert GatewayConfig.load([]).routing == "affinity"
    assert GatewayConfig.load(["--routing", "least-busy"]).routing == "least-busy"
    assert isinstance(policy("least-busy"), LeastBusy) and policy("affinity", 1.5).load_factor == 1.5
    assert policy("affinity", 1.5, 4).load_slack == 4 and GatewayConfig.load([]).routing_load_slack == 32
    for field, value in (("routing", "random"), ("routing_load_factor", 1.0), ("decoder_info_interval_s", 0.0),
                         ("routing_load_slack", -1)):
        with pytest.raises(ValueError, match="--" + field.replace("_", "-")):
            GatewayConfig(**{field: value})


# -- the pool: decoders in this process that report their state --------------------------------------------------

class ReportingDecoder(decoder_pb2_grpc.DecoderServicer):
    """Streams one token; its Info says what the test sets (as if other gateways' requests were on it)."""

    def __init__(self) -> None:
        self.num_calls = 0
        self.num_info_calls = 0
        self.num_unfinished = 0
        self.is_refusing = False   # its admission refuses every request, whatever its Info says

    async def Generate(self, request, context):
        self.num_calls += 1
        if self.is_refusing:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "decoder queue is full (4 requests); retry later")
        yield decoder_pb2.GenerateResponse(token_ids=[7], finish_reason=common_pb2.FINISH_REASON_LENGTH)

    async def Info(self, request, context):
        self.num_info_calls += 1
        return decoder_pb2.InfoResponse(
            max_model_len=8192, vocab_size=131072, block_size=16, max_num_seqs=4, max_queued=0, num_blocks=10,
            num_free_blocks=10, num_unfinished=self.num_unfinished, num_running=self.num_unfinished,
            num_prefix_hit_tokens=32, num_prefix_queried_tokens=64, num_prefix_cached_blocks=2)


def text_request(text_id: int) -> GenerateRequest:
    return GenerateRequest(f"r{text_id}", [1, 3, 1000 + text_id, 4], [], SamplingParams(max_tokens=1))


def run_pool(scenario, routing: str = "affinity") -> None:
    async def main():
        servers, fakes = [], []
        for _ in range(2):
            server, fake = GrpcServer("127.0.0.1:0"), ReportingDecoder()
            server.add(decoder_pb2_grpc.add_DecoderServicer_to_server, fake, "pixtral.v1.Decoder")
            await server.start()
            await server.set_serving(True)
            servers.append(server)
            fakes.append(fake)
        pool = DecoderPool(tuple(f"127.0.0.1:{server.port}" for server in servers), health_retry_s=0.1,
                           routing=routing, info_interval_s=0.05)
        await pool.start()
        try:
            await until(lambda: all(decoder.info is not None for decoder in pool.decoders))
            await scenario(pool, fakes)
        finally:
            await pool.close()
            for server in servers:
                await server.stop(0)
    asyncio.run(main())


async def until(predicate, timeout_s: float = 10.0) -> None:
    give_up = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < give_up, "condition not reached"
        await asyncio.sleep(0.02)


async def served(pool: DecoderPool, request: GenerateRequest) -> None:
    assert [output.token_ids async for output in pool.generate(request, 5.0)] == [[7]]


def test_the_pool_reads_each_decoders_state_again_and_again():
    async def scenario(pool, fakes):
        first_reads = [fake.num_info_calls for fake in fakes]
        await until(lambda: all(fake.num_info_calls >= count + 3 for fake, count in zip(fakes, first_reads)))
        decoder = pool.decoders[0]
        assert (decoder.info.num_running, decoder.info.num_prefix_hit_tokens, decoder.info.num_prefix_queried_tokens,
                decoder.info.num_prefix_cached_blocks) == (0, 32, 64, 2)
        fakes[0].num_unfinished = 3
        await until(lambda: decoder.info.num_unfinished == 3 and decoder.num_elsewhere == 3)
    run_pool(scenario)


def test_the_pool_sends_a_key_to_one_decoder_and_away_from_one_others_have_filled():
    async def scenario(pool, fakes):
        for text_id in range(16):
            for _ in range(3):
                await served(pool, text_request(text_id))
        # Each prompt went to one decoder three times: every count is a multiple of 3, and both got some.
        assert all(fake.num_calls % 3 == 0 and fake.num_calls > 0 for fake in fakes), [f.num_calls for f in fakes]
        request = text_request(0)
        preferred = pool._ranked(request)[0]
        fake = fakes[pool.decoders.index(preferred)]
        fake.num_unfinished = 4   # its capacity (4 + 0), taken by other gateways' requests
        await until(lambda: preferred.info.num_unfinished == 4)
        other = fakes[1 - pool.decoders.index(preferred)]
        before = other.num_calls
        await served(pool, request)
        assert other.num_calls == before + 1
    run_pool(scenario)


def test_a_decoder_that_refuses_as_full_passes_the_request_to_the_next_one():
    """Its Info (read a moment before) said it had room: the refusal, before any work, sends the request on; with
    every decoder refusing, the caller gets RESOURCE_EXHAUSTED."""
    async def scenario(pool, fakes):
        request = text_request(0)
        preferred = pool._ranked(request)[0]
        refusing, other = fakes[pool.decoders.index(preferred)], fakes[1 - pool.decoders.index(preferred)]
        refusing.is_refusing = True
        await served(pool, request)
        assert (refusing.num_calls, other.num_calls) == (1, 1)
        other.is_refusing = True
        with pytest.raises(Overloaded, match="decoder queue is full"):
            await served(pool, request)
        assert (refusing.num_calls, other.num_calls) == (2, 2)
        assert all(decoder.num_outstanding == 0 for decoder in pool.decoders)
    run_pool(scenario)


def test_least_busy_spreads_one_prompt_over_the_decoders():
    async def scenario(pool, fakes):
        for _ in range(6):
            await served(pool, text_request(0))
        assert [fake.num_calls for fake in fakes] == [3, 3]
    run_pool(scenario, routing="least-busy")


# -- the whole stack: two decoder processes ------------------------------------------------------------------------

QUESTION = "What is in this picture?"


def owned_images(addresses: list[str], per_decoder: int, seeds) -> dict[str, list[bytes]]:
    """PNG images (128x128: 72 image tokens) that the affinity policy sends to each decoder, `per_decoder` each."""
    owned: dict[str, list[bytes]] = {address: [] for address in addresses}
    for seed in seeds:
        data = image_bytes(noise_image(128, 128, seed=seed))
        owner = max(addresses, key=lambda address: score(image_key(sha256_hex(data)), address))
        if len(owned[owner]) < per_decoder:
            owned[owner].append(data)
        if all(len(images) == per_decoder for images in owned.values()):
            return owned
    raise AssertionError("not enough seeds")


def ask(gateway: str, image: bytes, **sampling):
    """One chat about `image` -> (request id, its last response); the call must succeed."""
    request = chat_request([("user", [image, QUESTION])], **{"max_tokens": 2, "temperature": 0.0, **sampling})
    request.request_id = uuid.uuid4().hex
    outcome = call_chat(gateway, request)
    assert outcome.code == grpc.StatusCode.OK, outcome.details
    return request.request_id, outcome.last


def served_by(stack: Stack, request_id: str) -> str:
    """The address of the decoder that served a request, from its log (written as its call ends)."""
    def find():
        for name, address in zip(("decoder0", "decoder1"), stack.decoders):
            if any(entry.get("request_id") == request_id and entry["msg"].startswith("Generate OK")
                   for entry in stack.log_entries(name)):
                return address
        return None
    return wait_until(find, 30, f"no decoder logged request {request_id}")


def decoder_info(address: str) -> decoder_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return decoder_pb2_grpc.DecoderStub(channel).Info(decoder_pb2.InfoRequest(), timeout=10)


def wait_decoders_known(gateway: str, count: int) -> None:
    """Until the gateway has the Info (limits, load) of `count` healthy decoders."""
    def known() -> bool:
        with grpc.insecure_channel(gateway) as channel:
            return gateway_pb2_grpc.GatewayStub(channel).GetModelInfo(
                gateway_pb2.GetModelInfoRequest(), timeout=10).num_decoders == count
    wait_until(known, 30, f"the gateway {gateway} does not know {count} decoders")


def two_decoder_stack(tiny_model, redis_server, directory, decoder_args=(), with_metrics=False) -> Stack:
    stack = Stack(tiny_model, redis_server.url, directory, num_decoders=2, decoder_args=decoder_args,
                  gateway_args=("--health-check-interval-s", "0.2"), with_metrics=with_metrics).start()
    wait_decoders_known(stack.gateway, 2)
    return stack


@pytest.fixture(scope="module")
def both_policies(tiny_model, redis_server, tmp_path_factory):
    """Two decoders, one vision worker and two gateways over them: affinity (stack.gateway) and least-busy."""
    stack = two_decoder_stack(tiny_model, redis_server, tmp_path_factory.mktemp("affinity"))
    try:
        least_busy = stack.start_gateway("gateway-least-busy", ("--routing", "least-busy"))
        wait_decoders_known(least_busy, 2)
        yield stack, least_busy
    finally:
        stack.stop()


def test_repeats_of_an_image_hit_its_decoders_prefix_cache_and_spread_without_affinity(both_policies):
    stack, least_busy = both_policies
    hit_fraction, spread = {}, {}
    for routing, gateway, seeds in (("affinity", stack.gateway, range(0, 100)),
                                    ("least-busy", least_busy, range(100, 200))):
        owned = owned_images(stack.decoders, 2, seeds)
        num_repeat_tokens = num_repeat_hits = 0
        spread[routing] = 0
        for owner, images in owned.items():
            for image in images:
                decoders = set()
                for repeat in range(3):
                    request_id, last = ask(gateway, image)
                    decoders.add(served_by(stack, request_id))
                    if repeat == 0:
                        assert last.usage.cached_prompt_tokens == 0   # no decoder has seen this image
                    else:
                        num_repeat_tokens += last.usage.prompt_tokens
                        num_repeat_hits += last.usage.cached_prompt_tokens
                if routing == "affinity":
                    assert decoders == {owner}
                spread[routing] += len(decoders) > 1
        hit_fraction[routing] = num_repeat_hits / num_repeat_tokens

    # With affinity every repeat finds its image's KV (all but the prompt's last, partial block: the image's 72
    # tokens and more); without, a repeat on the other decoder is prefilled whole.
    assert hit_fraction["affinity"] > 0.9, hit_fraction
    assert hit_fraction["least-busy"] < hit_fraction["affinity"], hit_fraction
    assert spread == {"affinity": 0, "least-busy": spread["least-busy"]} and spread["least-busy"] >= 1, spread
    for address in stack.decoders:   # what each decoder reports in its Info, which the gateways read
        info = decoder_info(address)
        assert info.num_prefix_hit_tokens > 0 and info.num_prefix_cached_blocks > 0
        assert info.num_prefix_queried_tokens > info.num_prefix_hit_tokens
        assert (info.num_running, info.num_waiting, info.num_unfinished) == (0, 0, 0)


def test_a_full_decoder_sends_its_images_to_the_other_one(tiny_model, redis_server, tmp_path_factory):
    """Each decoder takes one request at a time (--max-num-seqs 1, no queue): while a long stream holds an
    image's decoder, a request for that image goes to the other decoder (the full one would refuse it)."""
    stack = two_decoder_stack(tiny_model, redis_server, tmp_path_factory.mktemp("full"),
                              decoder_args=("--max-num-seqs", "1", "--max-queued", "0"), with_metrics=True)

    def gateway_metric(name: str, **labels: str) -> float:
        return metric_value(stack.metrics("gateway"), name, **labels) or 0.0

    def wait_gateway_idle() -> None:   # its count of requests on each decoder is back to 0
        wait_until(lambda: gateway_metric("pixtral_gateway_chats_in_flight") == 0, 30, "chats still in flight")

    try:
        owned = owned_images(stack.decoders, 1, range(200, 300))
        preferred, other = stack.decoders
        image = owned[preferred][0]
        # A stream that ends only when cancelled here (max_tokens fills the model's 8,192-token context).
        long_stream = BackgroundChat(stack.gateway, chat_request([("user", [image, "Tell me a long story."])],
                                                                 max_tokens=8000, ignore_eos=True), timeout_s=300)
        long_stream.wait_tokens(1)
        assert decoder_info(preferred).num_running == 1 and decoder_info(other).num_running == 0
        request_id, last = ask(stack.gateway, image)
        assert served_by(stack, request_id) == other
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.cached_prompt_tokens == 0
        assert not long_stream.call.done(), "the long stream ended before the request it was to hold off"
        assert gateway_metric("pixtral_gateway_decoder_choices_total", reason="spilled") == 1
        long_stream.call.cancel()
        assert long_stream.result().code == grpc.StatusCode.CANCELLED
        wait_gateway_idle()
        # The decoder frees the cancelled stream's slot when its engine takes the abort, after the gateway let go.
        wait_until(lambda: decoder_info(preferred).num_unfinished == 0, 30, "the cancelled stream still holds its slot")
        request_id, last = ask(stack.gateway, image)   # free again: back to its own decoder and its prefix cache
        assert served_by(stack, request_id) == preferred and last.usage.cached_prompt_tokens > 0
        assert gateway_metric("pixtral_gateway_decoder_choices_total", reason="affinity") == 2
    finally:
        stack.stop()


def test_a_killed_decoders_images_are_served_by_the_other_one(tiny_model, redis_server, tmp_path_factory):
    stack = two_decoder_stack(tiny_model, redis_server, tmp_path_factory.mktemp("killed"))
    try:
        owned = owned_images(stack.decoders, 2, range(300, 400))
        killed, survivor = stack.decoders
        for address, images in owned.items():
            for image in images:
                assert served_by(stack, ask(stack.gateway, image)[0]) == address

        stack.stop_process("decoder0", signal.SIGKILL)
        # Right after the kill (the gateway may not know yet): none fails; the survivor's images stay put, hitting
        # its prefix cache, and the killed one's move to it.
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda image: ask(stack.gateway, image), owned[killed] + owned[survivor]))
        assert {served_by(stack, request_id) for request_id, _ in answers} == {survivor}
        assert all(last.usage.cached_prompt_tokens > 0 for _, last in answers[len(owned[killed]):])

        wait_until(lambda: f"decoder {killed} unhealthy: skipped" in stack.logs("gateway"), 30,
                   "the gateway never saw the decoder die")
        for image in owned[killed]:   # now theirs on the survivor: its prefix cache has them since the kill
            request_id, last = ask(stack.gateway, image)
            assert served_by(stack, request_id) == survivor and last.usage.cached_prompt_tokens > 0
    finally:
        stack.stop()
