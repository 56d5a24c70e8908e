"""Cancellation races (reliability case 20): hundreds of Chat calls cancelled at random moments (while the prompt is
built, while an image is encoded or joined, while tokens stream) beside streams that run to their end. Every
stream not cancelled ends with its final message, the decoder's KV memory is back to empty at once, and the
service keeps serving."""

from __future__ import annotations

import asyncio
import random

import grpc

from pixtral.v1 import common_pb2, gateway_pb2_grpc
from tests.reference import chat_request
from tests.support import decoder_load, image_bytes, metric_value, noise_image, wait_decoder_idle, wait_until

NUM_PAIRS = 300
CONCURRENCY = 24
WITNESS_TOKENS = 48


async def consume(call) -> list:
    return [response async for response in call]


async def start_and_cancel(stub, request, cancel_after_s: float) -> str:
    """'cancelled' if the call was cancelled before its end, else its final status (with a final message)."""
    call = stub.Chat(request, timeout=60)
    task = asyncio.ensure_future(consume(call))
    done, _ = await asyncio.wait([task], timeout=cancel_after_s)
    if not done:
        call.cancel()
        try:
            await task
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        return "cancelled"
    try:
        responses = task.result()
    except grpc.aio.AioRpcError as error:
        return error.code().name
    assert responses[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    return "finished"


async def witness(stub, index: int) -> list:
    """A stream that nobody cancels: it must get every token and its final message."""
    request = chat_request([("user", [f"Witness {index}, tell me more."])], max_tokens=WITNESS_TOKENS,
                           temperature=1.0, seed=index)
    return await consume(stub.Chat(request, timeout=120))


async def race(gateway: str) -> tuple[dict[str, int], list[list]]:
    rng = random.Random(20)
    # A few new images, each asked for by many calls: cancels hit encodes in flight and calls joining them.
    images = [image_bytes(noise_image(32 + 16 * i, 32, seed=2000 + i)) for i in range(4)]
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        witnesses = [asyncio.ensure_future(witness(stub, index)) for index in range(4)]
        slots = asyncio.Semaphore(CONCURRENCY)
        outcomes: dict[str, int] = {}

        async def one(index: int) -> None:
            parts = [f"Race {index}"]
            if index % 3:
                parts.append(images[rng.randrange(len(images))])
            request = chat_request([("user", parts)], max_tokens=rng.choice([1, 8, 64]), temperature=1.0)
            async with slots:
                outcome = await start_and_cancel(stub, request, rng.uniform(0.0, 0.4))
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(one(index) for index in range(NUM_PAIRS)))
        return outcomes, await asyncio.gather(*witnesses)


def test_hundreds_of_generate_cancel_races_lose_nothing(observed_stack):
    wait_until(lambda: decoder_load(observed_stack)["running_requests"] == 0, 10, "decoder busy before the test")
    outcomes, witnesses = asyncio.run(race(observed_stack.gateway))
    assert set(outcomes) <= {"cancelled", "finished"}, outcomes
    # Both outcomes occur; how many calls finish before their random cancel depends on the machine's speed.
    assert outcomes.get("cancelled", 0) > NUM_PAIRS // 4 and outcomes.get("finished", 0) >= 3, outcomes
    for responses in witnesses:
        last = responses[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == WITNESS_TOKENS == sum(len(r.token_ids) for r in responses)
    # Every cancelled stream's KV memory is back at once, nothing keeps running or waiting. (A client's cancel
    # returns before the servers have seen it: the last ones may still be on their way.)
    wait_decoder_idle(observed_stack, 3)
    wait_until(lambda: metric_value(observed_stack.metrics("gateway"), "pixtral_gateway_chats_in_flight") == 0, 3,
               "the gateway still counts chats in flight")
    # And it goes on serving.
    request = chat_request([("user", ["Still there?", image_bytes(noise_image(32, 32, seed=2000))])], max_tokens=5)
    with grpc.insecure_channel(observed_stack.gateway) as channel:
        last = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=30))[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 5
