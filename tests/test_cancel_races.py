"""Cancellation races (reliability case 20): hundreds of Chat calls cancelled at random moments (while the prompt is
built, while an image is encoded or joined, while tokens stream) beside streams that run to their end. Every
stream not cancelled ends with its final message, the decoder's KV memory is back to empty at once, and the
service keeps serving.

What the calls meet does not depend on the machine's speed: each call's plan is fixed by a seeded random draw. A
tenth of the calls are never cancelled (each must end with its final message), three tenths are cancelled once
their first tokens have arrived (mid-stream, whatever the speed), the others at a random time (wherever the call
is by then: building the prompt, waiting for an image, streaming, or already done). Which of those finish before
their cancel varies with the machine; every one must end cancelled or with its final message.
"""

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
MID_STREAM_TOKENS = 64   # cancelled after its first message: far from its end


async def consume(call) -> list:
    return [response async for response in call]


def check_finished(responses: list) -> str:
    assert responses and responses[-1].finish_reason in (common_pb2.FINISH_REASON_LENGTH,
                                                         common_pb2.FINISH_REASON_STOP), "no final message"
    return "finished"


async def cancel_and_settle(call, task: asyncio.Future) -> str:
    """Cancels the call: 'cancelled' if it was still running, else it had ended and must have its final message."""
    if call.cancel():
        try:
            await task
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        return "cancelled"
    return check_finished(await task)


async def start_and_cancel(stub, request, plan: tuple[str, float]) -> str:
    """Runs one call to its plan: ('never', 0), ('mid-stream', 0) or ('at', seconds after the start)."""
    kind, cancel_after_s = plan
    call = stub.Chat(request, timeout=60)
    if kind == "never":
        return check_finished(await consume(call))
    if kind == "mid-stream":
        responses = []
        while not (responses and responses[-1].token_ids):
            response = await call.read()
            if response is grpc.aio.EOF:
                return check_finished(responses)
            responses.append(response)
        if call.cancel():
            return "cancelled"
        while (response := await call.read()) is not grpc.aio.EOF:   # it had ended: the rest is here
            responses.append(response)
        return check_finished(responses)
    task = asyncio.ensure_future(consume(call))
    finished, _ = await asyncio.wait([task], timeout=cancel_after_s)
    if finished:
        try:
            return check_finished(task.result())
        except grpc.aio.AioRpcError as error:
            return error.code().name
    return await cancel_and_settle(call, task)


async def witness(stub, index: int) -> list:
    """A stream that nobody cancels: it must get every token and its final message."""
    request = chat_request([("user", [f"Witness {index}, tell me more."])], max_tokens=WITNESS_TOKENS,
                           temperature=1.0, seed=index)
    return await consume(stub.Chat(request, timeout=120))


def plan_of(index: int, rng: random.Random) -> tuple[str, float]:
    if index % 10 == 0:
        return ("never", 0.0)
    if index % 10 in (1, 4, 7):
        return ("mid-stream", 0.0)
    return ("at", rng.uniform(0.0, 0.4))


async def race(gateway: str) -> tuple[dict[str, dict[str, int]], list[list]]:
    rng = random.Random(20)
    # A few new images, each asked for by many calls: cancels hit encodes in flight and calls joining them.
    images = [image_bytes(noise_image(32 + 16 * i, 32, seed=2000 + i)) for i in range(4)]
    async with grpc.aio.insecure_channel(gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        witnesses = [asyncio.ensure_future(witness(stub, index)) for index in range(4)]
        slots = asyncio.Semaphore(CONCURRENCY)
        outcomes: dict[str, dict[str, int]] = {}   # plan kind -> outcome -> count

        async def one(index: int) -> None:
            plan = plan_of(index, rng)
            parts = [f"Race {index}"]
            if index % 3:
                parts.append(images[rng.randrange(len(images))])
            max_tokens = MID_STREAM_TOKENS if plan[0] == "mid-stream" else rng.choice([1, 8, 64])
            request = chat_request([("user", parts)], max_tokens=max_tokens, temperature=1.0)
            async with slots:
                outcome = await start_and_cancel(stub, request, plan)
            counts = outcomes.setdefault(plan[0], {})
            counts[outcome] = counts.get(outcome, 0) + 1

        await asyncio.gather(*(one(index) for index in range(NUM_PAIRS)))
        return outcomes, await asyncio.gather(*witnesses)


def test_hundreds_of_generate_cancel_races_lose_nothing(observed_stack):
    wait_until(lambda: decoder_load(observed_stack)["running_requests"] == 0, 10, "decoder busy before the test")
    outcomes, witnesses = asyncio.run(race(observed_stack.gateway))
    for kind, counts in outcomes.items():
        assert set(counts) <= {"cancelled", "finished"}, (kind, counts)
    assert outcomes["never"] == {"finished": NUM_PAIRS // 10}, outcomes
    # A stream is cancelled once its first tokens came: it had 63 more to go (how many calls of the random-time
    # plan finish before their cancel depends on the machine's speed, and is not asserted).
    assert outcomes["mid-stream"].get("cancelled", 0) >= 3 * NUM_PAIRS // 10 - 3, outcomes
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
