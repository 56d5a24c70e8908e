"""Malformed input at the edge, and work refused before it starts: request ids, request bytes that are not a
message, empty content, data: URLs of other media types, prompts longer than the context; unauthenticated huge
calls; images refused before any encode while every decoder is full.

Each case asserts the status and the field its message names, against the real stack (separate processes, real
gRPC on loopback, real Redis), then that a good request is served right after.
"""

from __future__ import annotations

import asyncio
import base64
import json

import grpc
import pytest

from pixtral.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.routing import DecoderLoad
from shared import encode_jobs
from shared.auth import bearer_metadata
from shared.errors import InvalidRequest
from shared.grpc_server import REQUEST_ID_KEY, abort_with
from shared.images import sha256_hex
from shared.logs import request_id_var
from shared.request_parsing import bad_utf8_field, parse_error
from tests.reference import chat_request, encode_reference
from tests.support import (BackgroundChat, Stack, assert_status, call_chat, image_bytes, noise_image,
                           wait_until)
from tests.test_affinity_routing import decoder_info, info
from tests.test_gateway_bad_input import assert_still_serving, chat_error

INVALID = grpc.StatusCode.INVALID_ARGUMENT
CHAT, TOKENIZE = "/pixtral.v1.Gateway/Chat", "/pixtral.v1.Gateway/Tokenize"


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


# -- request bytes that are not a valid message ------------------------------------------------------------------

def _call_bytes(gateway: str, method: str, data: bytes, is_stream: bool) -> grpc.RpcError | None:
    """Sends `data` as the request as it is: no serializer, so the gateway's parser sees exactly these bytes."""
    with grpc.insecure_channel(gateway) as channel:
        call = (channel.unary_stream if is_stream else channel.unary_unary)(method)
        try:
            result = call(data, timeout=60)
            if is_stream:
                list(result)
        except grpc.RpcError as error:
            return error
    return None


def _with_bad_utf8() -> bytes:
    request = chat_request([("user", ["Hello"]), ("assistant", ["Hi"]), ("user", ["first", "second \u00e9t\u00e9"])],
                           max_tokens=2)
    data = request.SerializeToString()
    assert data.count("\u00e9t\u00e9".encode()) == 1
    return data.replace("\u00e9t\u00e9".encode(), b"\xff\xfe\xfd\xfc")   # same length: every length prefix holds


@pytest.mark.parametrize("method, is_stream", [(CHAT, True), (TOKENIZE, False)])
def test_invalid_utf8_in_a_text_part_is_invalid_argument_naming_the_part(stack, method, is_stream):
    error = _call_bytes(stack.gateway, method, _with_bad_utf8(), is_stream)
    assert error is not None
    assert_status(error, INVALID, "messages[2].content[1].text: not valid UTF-8")
    assert_still_serving(stack.gateway)


@pytest.mark.parametrize("method, is_stream", [(CHAT, True), (TOKENIZE, False)])
def test_truncated_request_bytes_are_invalid_argument_naming_the_message(stack, method, is_stream):
    data = chat_request([("user", ["A message cut short"])], max_tokens=2).SerializeToString()
    error = _call_bytes(stack.gateway, method, data[:-5], is_stream)
    assert error is not None
    details = assert_status(error, INVALID, "request: not a valid pixtral.v1.ChatRequest message")
    assert "DecodeError" not in details
    assert_still_serving(stack.gateway)


def test_the_wire_walk_names_nested_repeated_fields_and_gives_up_on_malformed_bytes():
    request = gateway_pb2.ChatRequest(tools=[gateway_pb2.Tool(name="a"), gateway_pb2.Tool(name="b\u00e9")])
    request.sampling.logit_bias[7] = 1.0   # a map (entries are messages) and a float before the string
    data = request.SerializeToString().replace("b\u00e9".encode(), b"b\xff\xfe")
    assert parse_error(gateway_pb2.ChatRequest.DESCRIPTOR, data).field == "tools[1].name"
    assert bad_utf8_field(gateway_pb2.ChatRequest.DESCRIPTOR, request.SerializeToString()) is None
    assert bad_utf8_field(gateway_pb2.ChatRequest.DESCRIPTOR, b"\x0a\x05ab") is None   # ends inside a field
    assert parse_error(None, b"\xff").message == "request: not a valid request message (malformed or truncated bytes)"


def test_unparsable_requests_are_logged_as_warnings_without_traceback(stack):
    seen = len(stack.logs("gateway"))
    _call_bytes(stack.gateway, TOKENIZE, b"\x0a\xff", is_stream=False)   # a field longer than the bytes left

    def refused() -> list[dict]:
        lines = [json.loads(line) for line in stack.logs("gateway")[seen:].splitlines() if line.startswith("{")]
        return [entry for entry in lines if "not a valid pixtral.v1.ChatRequest" in entry.get("msg", "")]
    entries = wait_until(refused, 30, "no log line of the refusal")   # stderr reaches the file through a pipe
    assert all(entry["level"] == "warning" and "exc" not in entry for entry in entries), entries
    assert "DecodeError" not in stack.logs("gateway")[seen:]


# -- messages that say nothing -------------------------------------------------------------------------------------

def _message(role: int, *parts: gateway_pb2.ContentPart, **fields) -> gateway_pb2.Message:
    return gateway_pb2.Message(role=role, content=list(parts), **fields)


_TEXT = gateway_pb2.ContentPart
_USER, _ASSISTANT, _TOOL = gateway_pb2.ROLE_USER, gateway_pb2.ROLE_ASSISTANT, gateway_pb2.ROLE_TOOL
_CALL = gateway_pb2.ToolCall(id="abcDEF123", name="get_weather", arguments='{"city": "Paris"}')

EMPTY_CONTENT = {
    "no content": ([_message(_USER)], "messages[0].content: a message needs content"),
    "a tool result without content": (
        [_message(_USER, _TEXT(text="Weather?")), _message(_ASSISTANT, tool_calls=[_CALL]),
         _message(_TOOL, tool_call_id="abcDEF123")], "messages[2].content: a message needs content"),
    "an empty text part": ([_message(_USER, _TEXT(text="Look"), _TEXT(text=""))],
                           "messages[0].content[1].text: empty text"),
    "a part with nothing set": ([_message(_USER, _TEXT(text="Look"), _TEXT())],
                                "messages[0].content[1]: a content part needs its text or its image"),
}


@pytest.mark.parametrize("name", list(EMPTY_CONTENT))
def test_a_message_without_content_is_invalid_argument_naming_it(stack, name):
    messages, message = EMPTY_CONTENT[name]
    request = gateway_pb2.ChatRequest(messages=messages, request_id="empty-content")
    request.sampling.max_tokens = 2
    assert_status(chat_error(stack.gateway, request), INVALID, message, request_id="empty-content")
    assert_status(unary_error(stack.gateway, "Tokenize", request), INVALID, message, request_id="empty-content")
    assert_still_serving(stack.gateway)


def test_an_assistant_message_of_tool_calls_alone_is_still_served(stack):
    request = gateway_pb2.ChatRequest(messages=[
        _message(_USER, _TEXT(text="Weather in Paris?")), _message(_ASSISTANT, tool_calls=[_CALL]),
        _message(_TOOL, _TEXT(text='{"sky": "clear"}'), tool_call_id="abcDEF123")])
    request.sampling.max_tokens, request.sampling.temperature = 2, 0.0
    with grpc.insecure_channel(stack.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        assert 9 in stub.Tokenize(request, timeout=60).token_ids   # [TOOL_CALLS]
        # With the content "" beside the calls, as OpenAI clients send it.
        request.messages[1].content.add(text="")
        assert list(stub.Chat(request, timeout=60))[-1].usage.completion_tokens == 2


# -- clearer messages: a data: URL that is no image, a prompt longer than the context ----------------------------

def _url_chat(url: str) -> gateway_pb2.ChatRequest:
    request = chat_request([("user", ["Look:"])], max_tokens=2)
    request.messages[0].content.add(image=gateway_pb2.ImagePart(url=url))
    return request


def test_a_data_url_of_another_media_type_is_named_as_such(stack):
    field = "messages[0].content[1].image.url"
    details = assert_status(chat_error(stack.gateway, _url_chat("data:text/plain,hello")), INVALID,
                            f"{field}: a data: URL of media type 'text/plain', not an image")
    assert "not data:" not in details
    assert_status(chat_error(stack.gateway, _url_chat("data:,hello")), INVALID, "media type 'text/plain'")
    png = base64.b64encode(image_bytes(noise_image(16, 16))).decode()
    assert_status(chat_error(stack.gateway, _url_chat(f"data:application/octet-stream;base64,{png}")), INVALID,
                  "media type 'application/octet-stream', not an image")
    assert_status(chat_error(stack.gateway, _url_chat("data:image/png,rawbytes")), INVALID,
                  f"{field}: a data:image URL must be base64")
    last = list(_chat(stack.gateway, _url_chat(f"data:image/png;base64,{png}")))[-1]
    assert last.usage.completion_tokens == 2


def _chat(gateway: str, request) -> list:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=60))


def test_a_prompt_longer_than_the_context_is_blamed_on_the_messages_whatever_max_tokens_says(stack):
    long_text = " ".join(f"word{i}" for i in range(6000))   # more than the tiny model's 8192-token context
    prompt_tokens = len(encode_reference([("user", [long_text])]).tokens)
    assert prompt_tokens > 8192
    for max_tokens in (1, 100):
        error = chat_error(stack.gateway, chat_request([("user", [long_text])], max_tokens=max_tokens))
        details = assert_status(error, INVALID, f"messages: the prompt has {prompt_tokens} tokens, the context "
                                                "length is 8192")
        assert "max_tokens" not in details
    # When max_tokens is what overflows, it is named.
    short = [("user", ["Hi"])]
    too_many = 8192 - len(encode_reference(short).tokens) + 1
    assert_status(chat_error(stack.gateway, chat_request(short, max_tokens=too_many)), INVALID,
                  "sampling.max_tokens: prompt", f"max_tokens ({too_many}) exceeds the context length of 8192")
    assert_still_serving(stack.gateway)


# -- unauthenticated huge calls: refused before their request is read ----------------------------------------------

TOKEN = "inputs-test-token"
HUGE_BYTES = 200 * 2**20
NUM_HUGE_CALLS = 16
# A refused call still costs the gateway its HTTP/2 receive window and some allocator growth (10-16 MiB measured,
# whatever the message's size), more where calls overlap and glibc gives gRPC's threads new arenas. So the calls go
# one after another and the bound is half of one message: reading it would cost its bytes, then their parse.
HUGE_GROWTH_BOUND = HUGE_BYTES // 2


@pytest.fixture(scope="module")
def token_stack(tiny_model, redis_server, tmp_path_factory):
    """A gateway that wants a bearer token and takes messages well over the huge calls' size, so that nothing but
    the missing token can be what refuses them."""
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("token"),
                    gateway_args=("--auth-token", TOKEN, "--max-message-bytes", str(4 * HUGE_BYTES))).start()
    yield running
    running.stop()


def test_unauthenticated_huge_calls_are_refused_without_the_gateway_reading_them(token_stack):
    huge = chat_request([("user", ["Look:", b"\x00" * HUGE_BYTES])], max_tokens=2).SerializeToString()
    rss, peak = token_stack.rss_bytes("gateway"), token_stack.peak_rss_bytes("gateway")
    options = [("grpc.max_send_message_length", -1)]

    def call() -> grpc.RpcError | None:
        with grpc.insecure_channel(token_stack.gateway, options=options) as channel:
            try:
                list(channel.unary_stream(CHAT)(huge, timeout=120))
            except grpc.RpcError as error:
                return error
        return None

    errors = [call() for _ in range(NUM_HUGE_CALLS)]
    for error in errors:
        assert error is not None
        assert_status(error, grpc.StatusCode.UNAUTHENTICATED, "Chat: missing or invalid bearer token")
    assert token_stack.rss_bytes("gateway") - rss < HUGE_GROWTH_BOUND
    assert token_stack.peak_rss_bytes("gateway") - peak < HUGE_GROWTH_BOUND
    with grpc.insecure_channel(token_stack.gateway) as channel:
        request = chat_request([("user", ["Hi"])], max_tokens=2, temperature=0.0)
        last = list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, metadata=bearer_metadata(TOKEN),
                                                               timeout=60))[-1]
    assert last.usage.completion_tokens == 2


# -- every decoder full: a chat with a new image is refused before anything is encoded -------------------------------

@pytest.fixture(scope="module")
def tiny_capacity_stack(tiny_model, redis_server, tmp_path_factory):
    """One decoder that admits a single request at a time and queues none."""
    running = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("tiny-capacity"),
                    decoder_args=("--max-num-seqs", "1", "--max-queued", "0")).start()
    yield running
    running.stop()


def test_a_decoder_is_at_capacity_by_this_gateways_requests_and_the_others():
    assert not DecoderLoad("a", True, 5).is_at_capacity   # limits unknown: the decoder decides
    assert DecoderLoad("a", True, 1, 0, info(capacity=1)).is_at_capacity
    assert DecoderLoad("a", True, 0, 1, info(capacity=1)).is_at_capacity
    assert not DecoderLoad("a", True, 0, 0, info(capacity=1, num_waiting=3, num_free_blocks=0)).is_at_capacity


def test_a_decoder_full_by_an_old_count_of_other_requests_is_asked_again_before_a_refusal():
    from services.gateway.decoders import DecoderPool

    async def at_capacity(num_outstanding: int, num_elsewhere: int, fresh_elsewhere: int) -> tuple[bool, int]:
        pool = DecoderPool(("127.0.0.1:1",))
        decoder, asked = pool.decoders[0], []
        decoder.info, decoder.num_outstanding, decoder.num_elsewhere = info(capacity=1), num_outstanding, num_elsewhere

        async def refresh_info() -> None:   # the decoder's Info now: its own count, current
            asked.append(True)
            decoder.num_elsewhere = fresh_elsewhere

        decoder.refresh_info = refresh_info
        return await pool.are_all_at_capacity(), len(asked)

    # Full at the last Info by a request that has ended since: asked again, not refused.
    assert asyncio.run(at_capacity(0, 1, fresh_elsewhere=0)) == (False, 1)
    # Still full when asked again: refused.
    assert asyncio.run(at_capacity(0, 1, fresh_elsewhere=1)) == (True, 1)
    # Full by this gateway's own requests, which it counts exactly: refused without asking.
    assert asyncio.run(at_capacity(1, 0, fresh_elsewhere=0)) == (True, 0)
    # Room left: nothing asked.
    assert asyncio.run(at_capacity(0, 0, fresh_elsewhere=0)) == (False, 0)


def _embedding_keys(client, sha: str) -> list[bytes]:
    return list(client.scan_iter(match=f"pixtral:emb:*:{sha}"))


def test_a_new_image_is_refused_before_its_encode_while_every_decoder_is_full(tiny_capacity_stack, redis_server):
    stack, client = tiny_capacity_stack, redis_server.client()
    image = image_bytes(noise_image(48, 32, seed=4242))
    sha = sha256_hex(image)
    request = chat_request([("user", ["What is this?", image])], max_tokens=2, temperature=0.0)
    assert not _embedding_keys(client, sha)
    # A stream that ends only when cancelled here (max_tokens fills the model's 8,192-token context).
    holder = BackgroundChat(stack.gateway, chat_request([("user", ["Tell me a long story."])], max_tokens=8000,
                                                        ignore_eos=True), timeout_s=300)
    try:
        holder.wait_tokens(1)
        info = decoder_info(stack.decoders[0])
        assert info.num_unfinished >= info.max_num_seqs + info.max_queued == 1
        jobs = client.xinfo_stream(encode_jobs.STREAM)["entries-added"] if client.exists(encode_jobs.STREAM) else 0
        outcome = call_chat(stack.gateway, request)
        assert not holder.call.done(), "the long stream ended before the request it was to hold off"
        assert outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
        assert "decoders are full" in outcome.details
        assert not _embedding_keys(client, sha), "the image was encoded"
        assert (client.xinfo_stream(encode_jobs.STREAM)["entries-added"]
                if client.exists(encode_jobs.STREAM) else 0) == jobs, "an encode job was queued"
    finally:
        holder.call.cancel()
    assert holder.result().code == grpc.StatusCode.CANCELLED
    # Free again (the decoder's own count, which the gateway reads): the same chat is served, its image encoded.
    wait_until(lambda: decoder_info(stack.decoders[0]).num_unfinished == 0, 30, "the decoder is still busy")
    last = call_chat(stack.gateway, request).last
    assert last.usage.completion_tokens == 2 and last.usage.encoded_images == 1
    assert _embedding_keys(client, sha)
