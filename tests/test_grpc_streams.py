"""Server-streaming calls through the roles' gRPC bootstrap (shared/grpc_server.py, shared/streams.py), on a real
grpc.aio server over loopback: a stream cancelled between two messages has its generator closed before the call is
over (that is what frees a decoder slot and ends the gateway's count of chats in flight), and a stream that ends
or fails ends with the right status.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from pixtral.v1 import decoder_pb2, decoder_pb2_grpc
from shared.errors import InvalidRequest
from shared.grpc_server import GrpcServer, map_errors
from shared.metrics import GRPC_REQUESTS

BIG = list(range(100_000))   # a message large enough that a few of them fill the flow-control window


class Streams(decoder_pb2_grpc.DecoderServicer):
    """One message per prompt token (without end when there is none); request_id "big" makes each message large,
    "fail" raises after the first one."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @map_errors
    async def Generate(self, request, context):
        context.add_done_callback(lambda _: self.events.append("call over"))
        try:
            for index in range(len(request.prompt_token_ids) or 10**9):
                if request.request_id == "fail" and index == 1:
                    raise InvalidRequest("prompt_token_ids", "refused after the first message")
                yield decoder_pb2.GenerateResponse(token_ids=BIG if request.request_id == "big" else [index])
        finally:
            self.events.append("closed")


def run_with_server(scenario) -> tuple[list[str], GrpcServer]:
    async def main():
        server = GrpcServer("127.0.0.1:0")
        streams = Streams()
        server.add(decoder_pb2_grpc.add_DecoderServicer_to_server, streams, "pixtral.v1.Decoder")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                await scenario(decoder_pb2_grpc.DecoderStub(channel), streams)
        finally:
            await server.stop(None)
        return streams.events, server
    return asyncio.run(main())


def cancelled_count() -> float:
    return GRPC_REQUESTS.labels("Generate", "CANCELLED")._value.get()


def test_a_stream_cancelled_between_messages_is_closed_before_the_call_is_over(caplog):
    async def cancel_mid_stream(stub, streams):
        for _ in range(3):
            call = stub.Generate(decoder_pb2.GenerateRequest(request_id="big"))
            await call.read()
            await asyncio.sleep(0.2)   # the server is now blocked writing: the client reads no more
            call.cancel()
            for _ in range(500):   # until this call is over (10 s at most), so that the events do not interleave
                if "call over" in streams.events[-1:]:
                    break
                await asyncio.sleep(0.02)

    before = cancelled_count()
    with caplog.at_level(logging.INFO, logger="shared.grpc_server"):
        events, server = run_with_server(cancel_mid_stream)
    assert events == ["closed", "call over"] * 3
    assert server.drainer.num_in_flight == 0
    assert cancelled_count() - before == 3
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.text


def test_a_stream_ends_with_every_message_and_ok():
    async def read_all(stub, streams):
        call = stub.Generate(decoder_pb2.GenerateRequest(prompt_token_ids=[1] * 5))
        assert [list(response.token_ids) async for response in call] == [[0], [1], [2], [3], [4]]
        assert await call.code() == grpc.StatusCode.OK

    events, server = run_with_server(read_all)
    assert events == ["closed", "call over"] and server.drainer.num_in_flight == 0


def test_an_error_after_a_message_ends_the_stream_with_its_status():
    async def read_until_error(stub, streams):
        call = stub.Generate(decoder_pb2.GenerateRequest(request_id="fail", prompt_token_ids=[1] * 5))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for response in call:
                received.append(list(response.token_ids))
        assert received == [[0]]
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "prompt_token_ids: refused after the first message"

    events, server = run_with_server(read_until_error)
    assert events == ["closed", "call over"] and server.drainer.num_in_flight == 0
