"""Malformed input at the edge, and work refused before it starts: request ids, request bytes that are not a
message, empty content, data: URLs of other media types, prompts longer than the context; unauthenticated huge
calls; images refused before any encode while every decoder is full.

Each case asserts the status and the field its message names, against the real stack (separate processes, real
gRPC on loopback, real Redis), then that a good request is served right after.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from pixtral.v1 import gateway_pb2, gateway_pb2_grpc
from shared.errors import InvalidRequest
from shared.grpc_server import REQUEST_ID_KEY, abort_with
from shared.logs import request_id_var
from tests.reference import chat_request
from tests.support import assert_status, image_bytes, noise_image
from tests.test_gateway_bad_input import assert_still_serving, chat_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def unary_error(gateway: str, method: str, request) -> grpc.RpcError:
    with grpc.insecure_channel(gateway) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            getattr(gateway_pb2_grpc.GatewayStub(channel), method)(request, timeout=60)
    return caught.value


# -- request ids -------------------------------------------------------------------------------------------------

BAD_REQUEST_IDS = {
    "newline": ("abc\ndef", "printable ASCII characters only"),
    "control character": ("abc\x01", "printable ASCII characters only"),
    "non-ASCII": ("r\u00e9sum\u00e9", "printable ASCII characters only"),
    "too long": ("x" * 129, "at most 128 characters, got 129"),
}


@pytest.mark.parametrize("name", list(BAD_REQUEST_IDS))
def test_a_request_id_that_cannot_be_echoed_is_invalid_argument(stack, name):
    """Not INTERNAL "Invalid metadata": the id is checked before anything else, so no call echoes it back."""
    request_id, problem = BAD_REQUEST_IDS[name]
    request = chat_request([("user", ["Hi"])], max_tokens=2)
    request.request_id = request_id
    assert_status(chat_error(stack.gateway, request), INVALID, f"request_id: {problem}")
    assert_status(unary_error(stack.gateway, "Tokenize", request), INVALID, f"request_id: {problem}")
    put = gateway_pb2.PutImagesRequest(images=[gateway_pb2.ImagePart(data=image_bytes(noise_image(16, 16)))],
                                       request_id=request_id)
    assert_status(unary_error(stack.gateway, "PutImages", put), INVALID, f"request_id: {problem}")
    assert_still_serving(stack.gateway)


def test_a_request_id_of_the_longest_printable_kind_comes_back_with_the_error(stack):
    request_id = "".join(chr(c) for c in range(0x20, 0x7F))[:128]
    request = chat_request([("user", ["Hi"])], max_tokens=0)
    request.request_id = request_id
    assert_status(chat_error(stack.gateway, request), INVALID, "sampling.max_tokens", request_id=request_id)


class _AbortedContext:
    """Records what abort_with ends a call with (the logic of the metadata it builds, nothing of gRPC's)."""

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = (code, details, tuple(trailing_metadata))


@pytest.mark.parametrize("request_id", ["ok-id", "bad\nid", "caf\u00e9", ""])
def test_error_metadata_carries_only_ids_that_are_metadata_safe(request_id):
    context = _AbortedContext()

    async def abort() -> None:
        request_id_var.set(request_id)   # in this task's context only
        await abort_with(context, InvalidRequest("sampling.top_p", "must be in (0, 1]"))
    asyncio.run(abort())
    code, details, metadata = context.aborted
    assert (code, details) == (INVALID, "sampling.top_p: must be in (0, 1]")
    assert dict(metadata).get(REQUEST_ID_KEY) == (request_id if request_id == "ok-id" else None)
