"""The OpenAI-compatible HTTP API (services/gateway/http/), through the official `openai` SDK and plain HTTP, against
the multi-process stack:

- streamed and whole answers equal the gRPC Chat's token for token (greedy and seeded, images as data: URLs and by
  sha256, stop strings, max_tokens), /tokenize equals the gRPC Tokenize, /v1/models names the model;
- every bad input of test_gateway_bad_input.py gets its HTTP status and an error body naming its `param`, and so do
  what only HTTP has (pydantic's checks, unsupported fields, an unknown model, a body over the size limit);
- the bearer token is refused as on gRPC, before the body is read; /health is open;
- a client that leaves, mid-stream or waiting for a whole answer, frees its decoder slot at once; an error after
  the stream started is its last event; a draining gateway finishes its streams and refuses new calls;
- pixtral-serve prints the API's URL after `ready`; calls are counted by route and status; the load generator
  drives both APIs alike.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import ssl
import threading
from typing import Literal

import bench.common
import grpc
import httpx
import openai
import pytest

from bench import load
from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from shared import encode_jobs
from shared.images import sha256_hex
from tests.reference import chat_request, encode_reference
from tests.support import (_LEAKS, Stack, decoder_load, free_port, image_bytes, metric_value, noise_image,
                           wait_decoder_idle, wait_until)
from tests.test_gateway_bad_input import BAD_FIELDS, NOT_ALLOWED, png_bomb
from tests.test_launcher import Serve
from tests.test_security import credentials as tls_credentials
from tests.test_security import make_pki

MODEL = "pixtral-tiny"        # the gateways' --model-name
MAX_BODY_BYTES = 8 * 2**20     # the stack's --max-message-bytes: small, so that the 413 tests send little
LONG_STREAM_TOKENS = 3000      # seconds of streaming on the tiny model: outlasts what a test does meanwhile
IMAGE_PARAM = "messages[0].content[1].image_url"   # the image of image_chat()


@pytest.fixture(scope="module")
def http_stack(tiny_model, module_redis, tmp_path_factory):
    """One decoder, one vision worker, one gateway serving HTTP beside gRPC; metrics on every process."""
    port = free_port()
    running = Stack(tiny_model, module_redis.url, tmp_path_factory.mktemp("http"), with_metrics=True,
                    gateway_args=("--http-port", str(port), "--max-message-bytes", str(MAX_BODY_BYTES),
                                  "--model-name", MODEL)).start()
    running.http = f"http://127.0.0.1:{port}"
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(http_stack) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{http_stack.http}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


# -- helpers ------------------------------------------------------------------------------------------------------

def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def openai_messages(chat) -> list[dict]:
    """A test chat [(role, [str | bytes | {"sha256": hex}, ...])] as OpenAI messages (images as data: URLs)."""
    messages = []
    for role, parts in chat:
        if role != "user":
            messages.append({"role": role, "content": "".join(parts)})
            continue
        content = []
        for part in parts:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                url = f"sha256:{part['sha256']}" if isinstance(part, dict) else data_url(part)
                content.append({"type": "image_url", "image_url": {"url": url}})
        messages.append({"role": role, "content": content})
    return messages


def grpc_chat(gateway: str, request) -> list[gateway_pb2.ChatResponse]:
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(request, timeout=120))


def grpc_request(chat, **sampling) -> gateway_pb2.ChatRequest:
    """chat_request, with {"sha256": hex} parts as references."""
    request = chat_request([(role, [b"" if isinstance(part, dict) else part for part in parts])
                            for role, parts in chat], **sampling)
    for message, (_, parts) in zip(request.messages, chat):
        for content, part in zip(message.content, parts):
            if isinstance(part, dict):
                content.image.CopyFrom(gateway_pb2.ImagePart(sha256=part["sha256"]))
    return request


def post(url: str, body, headers: dict | None = None, timeout_s: float = 120) -> httpx.Response:
    """A JSON body as Python writes it (NaN and Infinity included, which httpx's own encoder refuses)."""
    return httpx.post(url, content=json.dumps(body).encode(), timeout=timeout_s,
                      headers={"content-type": "application/json", **(headers or {})})


def chat_body(chat, **fields) -> dict:
    return {"model": MODEL, "messages": openai_messages(chat), "max_tokens": 4, "temperature": 0.0} | fields


def image_chat(url: str, **fields) -> dict:
    return {"model": MODEL, "max_tokens": 4, "temperature": 0.0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": url}}]}]} | fields


def assert_error(response: httpx.Response, status: int, param: str | None, *fragments: str,
                 code: str | None = None) -> str:
    """The answer is OpenAI's error body with this status and param; its message holds every fragment (and
    names the param first), leaks nothing; returns the message."""
    assert response.status_code == status, f"{response.status_code}: {response.text}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["param"] == param, error
    message = error["message"]
    if param is not None:
        assert message.startswith(f"{param}: "), message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert not _LEAKS.search(message), f"leaks internals: {message!r}"
    if code is not None:
        assert error["code"] == code, error
    return message


def assert_still_serving(stack) -> None:
    """Health is 200 and the next chat is answered."""
    assert httpx.get(f"{stack.http}/health", timeout=10).status_code == 200
    answer = post(f"{stack.http}/v1/chat/completions", chat_body([("user", ["Still there?"])], max_tokens=2)).json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 2


def streamed(client: openai.OpenAI, **request) -> tuple[str, list[int], list, object]:
    """(text, token ids, chunks, usage) of a streamed answer read with the SDK."""
    text, token_ids, chunks, usage = "", [], [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                extra_body={"return_token_ids": True}, **request):
        chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            token_ids += choice.model_extra["token_ids"]
    return text, token_ids, chunks, usage


def http_requests(stack, route: str, status: int) -> float:
    return metric_value(stack.metrics("gateway"), "pixtral_http_requests_total", route=route,
                        status=str(status)) or 0.0


# -- answers equal the gRPC API's -----------------------------------------------------------------------------

def test_answers_equal_grpc_token_for_token_streamed_and_whole(http_stack, client):
    first, second = (image_bytes(noise_image(48, 32 + 16 * i, seed=700 + i)) for i in range(2))
    grpc_chat(http_stack.gateway, chat_request([("user", ["warm", second])], max_tokens=1))   # cached: by hash below
    chat = [("system", ["Answer briefly."]), ("user", ["What is", first, "?"]), ("assistant", ["A picture."]),
            ("user", [{"sha256": sha256_hex(second)}, "and this?"])]
    responses = grpc_chat(http_stack.gateway, grpc_request(chat, max_tokens=12, temperature=0.0))
    expected_ids = [token for response in responses for token in response.token_ids]
    expected_text = "".join(response.text for response in responses)
    assert len(expected_ids) == 12

    whole = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_completion_tokens=12,
                                           temperature=0.0, extra_body={"return_token_ids": True})
    (choice,) = whole.choices
    assert (choice.message.content, choice.model_extra["token_ids"]) == (expected_text, expected_ids)
    assert (choice.message.role, choice.finish_reason, choice.index) == ("assistant", "length", 0)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion" and whole.model == MODEL
    usage = responses[-1].usage
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (
        usage.prompt_tokens, 12, usage.prompt_tokens + 12)
    assert whole.usage.prompt_tokens_details.image_tokens == usage.image_tokens > 0
    assert whole.usage.model_extra["cached_images"] == 2   # the first image was encoded by the gRPC call

    text, token_ids, chunks, stream_usage = streamed(client, model=MODEL, messages=openai_messages(chat),
                                                     max_tokens=12, temperature=0.0)
    assert (text, token_ids) == (expected_text, expected_ids)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(choice.delta.role is None for chunk in chunks[1:] for choice in chunk.choices)
    assert [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason] == ["length"]
    assert chunks[-1].choices == [] and stream_usage.completion_tokens == 12
    assert {chunk.id for chunk in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_seeded_sampling_and_stop_strings_equal_grpc(http_stack, client):
    chat = [("user", ["Tell me a story."])]
    sampled = grpc_chat(http_stack.gateway, chat_request(chat, max_tokens=16, temperature=1.0, seed=1234))
    text, token_ids, _, _ = streamed(client, model=MODEL, messages=openai_messages(chat), max_tokens=16,
                                     temperature=1.0, seed=1234)
    assert token_ids == [token for response in sampled for token in response.token_ids]
    assert text == "".join(response.text for response in sampled)

    greedy = "".join(response.text for response in grpc_chat(
        http_stack.gateway, chat_request(chat, max_tokens=16, temperature=0.0)))
    stop = greedy[len(greedy) // 2:len(greedy) // 2 + 3]
    stopped = grpc_chat(http_stack.gateway, chat_request(chat, max_tokens=16, temperature=0.0, stop=[stop]))
    assert stopped[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    for stop_field in (stop, [stop, "never appears"]):
        answer = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_tokens=16,
                                                temperature=0.0, stop=stop_field)
        assert answer.choices[0].message.content == "".join(response.text for response in stopped)
        assert answer.choices[0].finish_reason == "stop"
        assert stop not in answer.choices[0].message.content


def test_models_and_tokenize_equal_grpc(http_stack, client):
    (model,) = client.models.list().data
    assert (model.id, model.owned_by, model.model_extra["max_model_len"]) == (MODEL, "pixtral-serve", 8192)
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")

    picture = image_bytes(noise_image(40, 24, seed=710), "JPEG")
    chat = [("system", ["Be brief."]), ("user", ["What?", picture])]
    with grpc.insecure_channel(http_stack.gateway) as channel:
        expected = gateway_pb2_grpc.GatewayStub(channel).Tokenize(chat_request(chat), timeout=60)
    answer = post(f"{http_stack.http}/tokenize", {"model": MODEL, "messages": openai_messages(chat)}).json()
    assert answer["tokens"] == list(expected.token_ids) == encode_reference(chat).tokens
    assert (answer["count"], answer["max_model_len"]) == (len(expected.token_ids), 8192)
    assert [image["sha256"] for image in answer["images"]] == [sha256_hex(picture)]
    assert answer["images"][0]["num_tokens"] == expected.images[0].num_tokens
    # A prompt is one user message: the same tokens as the chat of that text.
    assert post(f"{http_stack.http}/tokenize", {"prompt": "Hello"}).json()["tokens"] == \
        encode_reference([("user", ["Hello"])]).tokens
    assert_error(post(f"{http_stack.http}/tokenize", {}), 400, "messages", "give messages or prompt")


# -- bad input: the cases of test_gateway_bad_input.py -----------------------------------------------------------

@pytest.mark.parametrize("name", list(NOT_ALLOWED))
def test_bytes_that_are_no_allowed_image_are_400_naming_the_part(http_stack, name):
    response = post(f"{http_stack.http}/v1/chat/completions", image_chat(data_url(NOT_ALLOWED[name])))
    message = assert_error(response, 400, IMAGE_PARAM, code="invalid_argument")
    assert "unsupported image format" in message or "unreadable image header" in message, message
    assert response.headers["x-request-id"]
    assert_still_serving(http_stack)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_400_naming_the_part(http_stack, fmt):
    data = image_bytes(noise_image(96, 80, seed=731 if fmt == "PNG" else 732), fmt)
    response = post(f"{http_stack.http}/v1/chat/completions", image_chat(data_url(data[:len(data) * 2 // 3])))
    assert_error(response, 400, IMAGE_PARAM, "image data is truncated")
    assert_still_serving(http_stack)


def test_decompression_bomb_is_refused_from_its_header(http_stack):
    response = post(f"{http_stack.http}/v1/chat/completions", image_chat(data_url(png_bomb())))
    assert_error(response, 400, IMAGE_PARAM, "image has 1600000000 pixels (40000x40000), over the limit of "
                                             f"{GatewayConfig.max_image_pixels}")
    assert_still_serving(http_stack)


def test_empty_image_and_bad_urls_are_400(http_stack):
    url = f"{http_stack.http}/v1/chat/completions"
    assert_error(post(url, image_chat("data:image/png;base64,")), 400, IMAGE_PARAM, "empty image data")
    assert_error(post(url, image_chat("")), 400, f"{IMAGE_PARAM}.url", "only data:image/...;base64 URLs")
    assert_error(post(url, image_chat("file:///etc/passwd")), 400, f"{IMAGE_PARAM}.url", "not file:")
    assert_error(post(url, image_chat("https://example.com/cat.png")), 400, f"{IMAGE_PARAM}.url",
                 "http(s) image URLs are not enabled on this gateway")
    assert_error(post(url, image_chat("data:image/png;base64,@@@@")), 400, f"{IMAGE_PARAM}.url",
                 "payload is not valid base64")
    assert_still_serving(http_stack)


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1)])
def test_one_pixel_wide_images_work_end_to_end(http_stack, size):
    data = image_bytes(noise_image(*size, seed=sum(size) + 700))
    answer = post(f"{http_stack.http}/v1/chat/completions", image_chat(data_url(data))).json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == len(encode_reference([("user", ["Look:", data])]).tokens)


def test_more_images_than_the_limit_is_refused_before_decoding(http_stack):
    limit = GatewayConfig.max_images
    body = chat_body([("user", ["Many:", *([b"not an image"] * (limit + 1))])])
    assert_error(post(f"{http_stack.http}/v1/chat/completions", body), 400, "messages",
                 f"at most {limit} images, got {limit + 1}")
    assert_still_serving(http_stack)


def test_context_overflow_names_messages_or_the_max_tokens_field_used(http_stack, module_redis):
    from PIL import Image
    big = [image_bytes(Image.new("RGB", (1024, 1024), color)) for color in ("red", "blue")]
    jobs = module_redis.client().xinfo_stream(encode_jobs.STREAM)["entries-added"]
    url = f"{http_stack.http}/v1/chat/completions"
    prompt_tokens = len(encode_reference([("user", ["Two:", *big])]).tokens)
    body = chat_body([("user", ["Two:", *big])])
    del body["max_tokens"]
    assert_error(post(url, body), 400, "messages", f"the prompt has {prompt_tokens} tokens, the context length "
                                                   "is 8192")
    one = [("user", ["One:", big[0]])]
    prompt_tokens = len(encode_reference(one).tokens)
    too_many = 8192 - prompt_tokens + 1
    for name in ("max_tokens", "max_completion_tokens"):
        body = chat_body(one)
        del body["max_tokens"]
        assert_error(post(url, body | {name: too_many}), 400, name,
                     f"prompt ({prompt_tokens} tokens) + max_tokens ({too_many}) exceeds the context length of 8192")
    assert module_redis.client().xinfo_stream(encode_jobs.STREAM)["entries-added"] == jobs, "an image was encoded"
    assert_still_serving(http_stack)


def test_body_over_the_size_limit_is_413_before_it_is_parsed(http_stack):
    url = f"{http_stack.http}/v1/chat/completions"
    oversized = json.dumps(image_chat(data_url(b"\0" * MAX_BODY_BYTES))).encode()
    response = httpx.post(url, content=oversized, headers={"content-type": "application/json"}, timeout=60)
    assert_error(response, 413, None, f"the body of {len(oversized)} bytes is larger than the limit of "
                                      f"{MAX_BODY_BYTES} bytes", code="request_too_large")

    def chunks():   # no Content-Length: refused once the limit is crossed
        for start in range(0, len(oversized), 1 << 20):
            yield oversized[start:start + (1 << 20)]
    response = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert_error(response, 413, None, f"larger than the limit of {MAX_BODY_BYTES} bytes")
    assert_still_serving(http_stack)


def test_huge_headers_are_refused(http_stack):
    """Over 64 KiB of headers, as gRPC bounds metadata: 431 from the gateway, or 400 from the HTTP parser when they
    arrive in pieces larger than that."""
    for size in (100_000, 1_000_000):
        with socket.create_connection(("127.0.0.1", int(http_stack.http.rsplit(":", 1)[1])), timeout=30) as sock:
            request = (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * size + b"\r\n\r\n")
            try:
                sock.sendall(request)
            except OSError:
                pass   # the server may close the connection before all of it is sent
            answer = b""
            try:
                while chunk := sock.recv(4096):   # the server closes the connection after its answer
                    answer += chunk
            except ConnectionResetError:
                pass   # closed with some of what was sent unread: the answer may be lost with the reset
        if not answer and size >= 1_000_000:
            continue   # refused before it was read
        assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 ")), answer[:100]
        if answer.startswith(b"HTTP/1.1 431 "):
            assert b"headers of" in answer and b"over the limit of 65536 bytes" in answer
    response = httpx.get(f"{http_stack.http}/v1/models", headers={"x-padding": "a" * 70_000}, timeout=30)
    assert_error(response, 431, None, "over the limit of 65536 bytes")
    assert_still_serving(http_stack)


@pytest.mark.parametrize("name", list(BAD_FIELDS))
def test_bad_sampling_field_is_named(http_stack, name):
    sampling, grpc_message = BAD_FIELDS[name]
    if sampling == {"top_k": -1}:   # vLLM's "no limit" over HTTP: the first value below it is the bad one
        sampling, grpc_message = {"top_k": -2}, "sampling.top_k: must be >= 0, got -2"
    param, _, problem = grpc_message.removeprefix("sampling.").partition(": ")
    response = post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])]) | sampling)
    assert_error(response, 400, param, problem)
    assert_still_serving(http_stack)


def test_stop_as_a_string_and_the_newer_max_tokens_name_are_named_as_sent(http_stack):
    url = f"{http_stack.http}/v1/chat/completions"
    assert_error(post(url, chat_body([("user", ["Hi"])], stop="")), 400, "stop", "must have 1 to 256 characters")
    body = chat_body([("user", ["Hi"])], max_completion_tokens=0)
    assert_error(post(url, body), 400, "max_completion_tokens", "must be in [1, 1048576], got 0")


def test_bad_messages_are_named(http_stack):
    url = f"{http_stack.http}/v1/chat/completions"
    picture = image_bytes(noise_image(16, 16, seed=740))
    cases = [
        ({"model": MODEL, "messages": []}, "messages", "at least one message is needed"),
        ({"model": MODEL}, "messages", "is required"),
        ({"model": MODEL, "messages": [{"content": "Hi"}]}, "messages[0].role", "is required"),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role", "Input should be"),
        (chat_body([("user", ["Hi"]), ("assistant", ["Hello"])]), "messages[1].role",
         "the last message must be the user's"),
        ({"model": MODEL, "messages": [{"role": "system", "content": [
            {"type": "text", "text": "Be brief"}, {"type": "image_url", "image_url": {"url": data_url(picture)}}]},
            {"role": "user", "content": "Hi"}]}, "messages[0].content[1].image_url",
         "only user messages may hold images"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
         "messages[0].content[0].type", "Input should be 'text' or 'image_url'"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages[0].content[0].text", "a text part needs its text"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0].image_url", "an image_url part needs its image_url"),
        ({"model": MODEL, "messages": [{"role": "user", "content": 42}]}, "messages[0].content", "Input should be"),
    ]
    for body, param, fragment in cases:
        assert_error(post(url, body), 400, param, fragment)
    assert_still_serving(http_stack)


def test_control_tokens_typed_as_text_are_text(http_stack, client):
    chat = [("user", ["[IMG][IMG_BREAK][IMG_END] [INST] </s> [/INST] <s>"])]
    expected = grpc_chat(http_stack.gateway, chat_request(chat, max_tokens=5, temperature=0.0))
    answer = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_tokens=5,
                                            temperature=0.0, extra_body={"return_token_ids": True})
    assert answer.choices[0].model_extra["token_ids"] == [t for r in expected for t in r.token_ids]
    assert answer.usage.prompt_tokens == len(encode_reference(chat).tokens)


def test_reference_to_an_uncached_image_is_400_image_not_cached_naming_the_part(http_stack):
    sha = sha256_hex(b"an image nobody sent over HTTP")
    response = post(f"{http_stack.http}/v1/chat/completions", image_chat(f"sha256:{sha}"))
    assert_error(response, 400, f"{IMAGE_PARAM}.url", f"image {sha} is not cached; send its bytes",
                 code="image_not_cached")
    assert_still_serving(http_stack)


@pytest.mark.parametrize("sha", ["abc", "A" * 64, "0" * 63, "g" * 64, "0" * 65, " " + "0" * 63])
def test_malformed_reference_is_400(http_stack, sha):
    response = post(f"{http_stack.http}/v1/chat/completions", image_chat(f"sha256:{sha}"))
    assert_error(response, 400, f"{IMAGE_PARAM}.url", "must be 64 lowercase hex characters")


# -- what only HTTP has -----------------------------------------------------------------------------------------

def test_pydantic_errors_name_their_param(http_stack):
    url = f"{http_stack.http}/v1/chat/completions"
    hi = chat_body([("user", ["Hi"])])
    cases = [
        (hi | {"temperature": "hot"}, "temperature", "Input should be a valid number"),
        (hi | {"max_tokens": 1.5}, "max_tokens", "Input should be a valid integer"),
        (hi | {"stop": [1]}, "stop[0]", "Input should be a valid string"),
        (hi | {"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name", "is required"),
        (hi | {"response_format": {"type": "xml"}}, "response_format.type", "Input should be"),
        (hi | {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag",
         "is not supported"),
        (hi | {"logit_bias": {"many": 1}}, "logit_bias.many", "keys must be token ids"),
        (hi | {"tool_choice": "sometimes"}, "tool_choice", 'must be "auto", "none", "required"'),
        (hi | {"continue_final_message": True}, "continue_final_message", "the last message must be the assistant's"),
        (hi | {"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex",
         "one output format at most; response_format gives one already"),
    ]
    for body, param, fragment in cases:
        response = post(url, body)
        assert_error(response, 400, param, fragment)
        assert response.headers["x-request-id"]
    for content, fragment in ((b"{not json", "the body is not valid JSON"), (b"[1, 2]", "the body: ")):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert_error(response, 400, None, fragment)
    response = httpx.post(url, content=json.dumps(hi).encode(), timeout=30,
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(response, 400, None, "the body must be a JSON object (is its Content-Type application/json?)")


def test_unknown_fields_are_ignored_and_output_changing_ones_refused(http_stack, client):
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0.0, user="someone",
        store=False, metadata={"a": "b"}, extra_body={"a_field_of_the_future": {"x": 1}, "modalities": ["text"],
                                                      "echo": False, "top_k": -1})
    assert answer.choices[0].finish_reason == "length"
    url = f"{http_stack.http}/v1/chat/completions"
    for field, value, fragment in (("audio", {"voice": "alloy", "format": "wav"}, "audio output is not supported"),
                                   ("modalities", ["text", "audio"], "only text output"),
                                   ("prediction", {"type": "content", "content": "x"}, "predicted outputs"),
                                   ("functions", [{"name": "f"}], "use tools"),
                                   ("use_beam_search", True, "beam search"),
                                   ("echo", True, "echoing the prompt")):
        assert_error(post(url, chat_body([("user", ["Hi"])]) | {field: value}), 400, field, fragment)


def test_unknown_model_is_404_model_not_found(http_stack, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    assert (caught.value.param, caught.value.code) == ("model", "model_not_found")
    # Absent, it is the served one.
    answer = post(f"{http_stack.http}/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "max_tokens": 1}).json()
    assert answer["model"] == MODEL
    assert_error(httpx.get(f"{http_stack.http}/v1/nothing", timeout=10), 404, None, "Not Found")


def test_sdk_errors_carry_status_param_and_request_id(http_stack, client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=-1)
    error = caught.value
    assert (error.status_code, error.param, error.code, error.type) == (
        400, "temperature", "invalid_argument", "invalid_request_error")
    assert error.response.headers["x-request-id"]
    answer = post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])], max_tokens=1),
                  headers={"x-request-id": "caller-id-1"})
    assert answer.headers["x-request-id"] == "caller-id-1" and answer.json()["id"] == "chatcmpl-caller-id-1"
    named = post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])], max_tokens=1,
                                                                     request_id="body-id-2"))
    assert named.json()["id"] == "chatcmpl-body-id-2"


# -- the bearer token ---------------------------------------------------------------------------------------------

def test_bearer_token_as_on_grpc_refused_before_the_body_is_read(http_stack):
    port = free_port()
    http_stack.start_gateway("gateway-auth", ("--http-port", str(port), "--auth-token", "s3cret",
                                              "--model-name", MODEL))
    base = f"http://127.0.0.1:{port}"
    body = chat_body([("user", ["Hi"])], max_tokens=1)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret"},
                    {"authorization": "s3cret"}):
        assert_error(post(f"{base}/v1/chat/completions", body, headers), 401, None, "missing or invalid bearer token",
                     code="unauthenticated")
    assert_error(httpx.get(f"{base}/v1/models", timeout=10), 401, None, "bearer token")
    for scheme in ("Bearer", "bearer", "BEARER"):
        response = post(f"{base}/v1/chat/completions", body, {"authorization": f"{scheme} s3cret"})
        assert response.status_code == 200, response.text
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200   # open, for probes
    with openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0) as sdk, \
            pytest.raises(openai.AuthenticationError):
        sdk.models.list()
    with openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0) as sdk:
        assert sdk.models.list().data[0].id == MODEL

    # A body announced and never sent: the answer comes without waiting for it.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 401 ")
    http_stack.stop_process("gateway-auth")


def test_a_gateway_with_tls_serves_http_over_the_same_tls(http_stack, tmp_path):
    """--tls-cert/--tls-key/--tls-client-ca apply to the HTTP port too: no plaintext door beside a TLS one."""
    pki = make_pki(tmp_path)
    port = free_port()
    http_stack.credentials = tls_credentials(pki)   # for start_gateway's health check
    try:
        http_stack.start_gateway("gateway-tls", (
            "--http-port", str(port), "--model-name", MODEL, "--tls-cert", str(pki["server"]), "--tls-key",
            str(pki["server-key"]), "--tls-client-ca", str(pki["ca"])))
    finally:
        http_stack.credentials = None
    trusted = ssl.create_default_context(cafile=str(pki["ca"]))
    trusted.load_cert_chain(str(pki["client"]), str(pki["client-key"]))
    response = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=trusted, timeout=30)
    assert response.status_code == 200 and response.json()["data"][0]["id"] == MODEL
    with pytest.raises(httpx.TransportError):   # no client certificate
        httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=ssl.create_default_context(cafile=str(pki["ca"])),
                  timeout=30)
    with pytest.raises(httpx.TransportError):   # plaintext
        httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
    http_stack.stop_process("gateway-tls")


# -- a client that leaves, an error mid-stream, the drain ---------------------------------------------------------

def test_a_client_that_leaves_mid_stream_frees_its_decoder_slot_at_once(http_stack, client):
    wait_decoder_idle(http_stack, 30)
    generated = decoder_load(http_stack)["generated_tokens_total"]
    left = http_requests(http_stack, "/v1/chat/completions", 499)
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=LONG_STREAM_TOKENS, temperature=0.0, stream=True)
    for number, chunk in enumerate(stream):
        assert chunk.choices[0].finish_reason is None
        if number == 20:
            break
    assert decoder_load(http_stack)["running_requests"] == 1
    stream.close()
    wait_decoder_idle(http_stack, 30)
    assert decoder_load(http_stack)["generated_tokens_total"] - generated < LONG_STREAM_TOKENS
    wait_until(lambda: http_requests(http_stack, "/v1/chat/completions", 499) == left + 1, 10,
               "the call counted as a client that left")
    assert metric_value(http_stack.metrics("gateway"), "pixtral_gateway_chats_in_flight") == 0


@pytest.mark.parametrize("is_stream", [False, True])
def test_a_client_that_leaves_before_its_answer_frees_its_decoder_slot(http_stack, is_stream):
    """Gone without reading anything: while its whole answer is generated, or from a stream it never read."""
    wait_decoder_idle(http_stack, 30)
    generated = decoder_load(http_stack)["generated_tokens_total"]
    body = json.dumps(chat_body([("user", ["Go on"])], max_tokens=LONG_STREAM_TOKENS, stream=is_stream)).encode()
    with socket.create_connection(("127.0.0.1", int(http_stack.http.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: decoder_load(http_stack)["running_requests"] == 1, 30, "the chat reached the decoder")
    wait_decoder_idle(http_stack, 30)
    assert decoder_load(http_stack)["generated_tokens_total"] - generated < LONG_STREAM_TOKENS


def test_an_error_after_the_stream_started_is_its_last_event(http_stack, client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=LONG_STREAM_TOKENS, temperature=0.0, stream=True)
    chunks = iter(stream)
    for _ in range(5):
        next(chunks)
    http_stack.stop_process("decoder0", signal.SIGKILL)
    try:
        with pytest.raises(openai.APIError) as caught:
            for _ in chunks:
                pass
        assert "decoder" in caught.value.message, caught.value.message
        assert caught.value.body["type"] == "service_unavailable_error"
    finally:
        http_stack.restart_process("decoder0", http_stack.decoders[0])
    wait_until(lambda: post(f"{http_stack.http}/v1/chat/completions",
                            chat_body([("user", ["Back?"])], max_tokens=1)).status_code == 200, 60,
               "the gateway serves again with the restarted decoder")


def test_an_error_event_ends_the_raw_stream(http_stack):
    """The stream's bytes: chunks, then one `data: {"error": ...}` event, and the stream ends (no [DONE])."""
    events: list[str] = []
    seen_tokens = threading.Event()

    def read() -> None:
        body = chat_body([("user", ["Go on"])], max_tokens=LONG_STREAM_TOKENS, stream=True)
        with httpx.stream("POST", f"{http_stack.http}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if len(events) == 5:
                        seen_tokens.set()
        seen_tokens.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert seen_tokens.wait(60)
    http_stack.stop_process("decoder0", signal.SIGKILL)
    try:
        reader.join(60)
        assert not reader.is_alive()
    finally:
        http_stack.restart_process("decoder0", http_stack.decoders[0])
    assert events[-1] != "[DONE]" and "[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["type"] == "service_unavailable_error" and error["code"] == "unavailable", error
    assert all("choices" in json.loads(event) for event in events[:-1])
    wait_until(lambda: post(f"{http_stack.http}/v1/chat/completions",
                            chat_body([("user", ["Back?"])], max_tokens=1)).status_code == 200, 60,
               "the gateway serves again with the restarted decoder")


def test_a_draining_gateway_finishes_its_streams_and_refuses_new_calls(http_stack):
    port = free_port()
    http_stack.start_gateway("gateway-drain", ("--http-port", str(port), "--model-name", MODEL))
    base = f"http://127.0.0.1:{port}"
    events: list[str] = []
    streaming = threading.Event()

    def read() -> None:
        body = chat_body([("user", ["Go on"])], max_tokens=400, stream=True)
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    streaming.set()

    reader = threading.Thread(target=read)
    reader.start()
    assert streaming.wait(60)
    http_stack.processes["gateway-drain"].send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{base}/health", timeout=10).status_code == 503, 30, "health says 503")
    assert_error(post(f"{base}/v1/chat/completions", chat_body([("user", ["Hi"])])), 503, None, "shutting down")
    reader.join(120)
    assert events[-1] == "[DONE]"
    finishes = [choice["finish_reason"] for event in events[:-1] for choice in json.loads(event)["choices"]]
    assert finishes[-1] == "length"
    assert http_stack.processes["gateway-drain"].wait(60) == 0



def test_a_full_decoder_is_429_and_the_sdk_says_rate_limited(tiny_model, module_redis, tmp_path):
    """A decoder that takes one sequence and queues none (RESOURCE_EXHAUSTED on gRPC) refuses the second call."""
    port = free_port()
    full = Stack(tiny_model, module_redis.url, tmp_path, decoder_args=("--max-num-seqs", "1", "--max-queued", "0"),
                 gateway_args=("--http-port", str(port), "--model-name", MODEL)).start()
    try:
        base = f"http://127.0.0.1:{port}"
        streaming, done = threading.Event(), threading.Event()

        def read() -> None:   # holds the decoder's one slot until done
            body = chat_body([("user", ["Go on"])], max_tokens=LONG_STREAM_TOKENS, stream=True)
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
                for _ in response.iter_lines():
                    streaming.set()
                    if done.is_set():
                        return   # leaves: the slot is freed

        reader = threading.Thread(target=read)
        reader.start()
        assert streaming.wait(60)
        with openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0) as sdk, \
                pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Me too"}], max_tokens=2)
        assert (caught.value.status_code, caught.value.code) == (429, "resource_exhausted")
        assert caught.value.body["type"] == "rate_limit_error"
        done.set()
        reader.join(60)
    finally:
        done.set()
        full.stop()


# -- pixtral-serve, metrics ---------------------------------------------------------------------------------------

def test_pixtral_serve_prints_the_http_url_after_ready(tmp_path, tiny_model):
    http_port = free_port()
    serve = Serve(tmp_path, tiny_model, "--http-port", str(http_port), "--metrics-port", "0", "--redis", "private")
    try:
        serve.wait_ready()
        assert serve.process.stdout.readline().strip() == f"http http://127.0.0.1:{http_port}/v1"
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0) as sdk:
            (model,) = sdk.models.list().data   # the checkpoint directory's name
            answer = sdk.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
    finally:
        serve.stop()
    assert serve.process.returncode == 0


def test_http_calls_are_counted_by_route_and_status(http_stack):
    counts = {(route, status): http_requests(http_stack, route, status) for route, status in (
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 400), ("/v1/models", 200), ("other", 404))}
    post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])], max_tokens=1))
    post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])], temperature=-2))
    httpx.get(f"{http_stack.http}/v1/models", timeout=10)
    httpx.get(f"{http_stack.http}/a/path/of/the/caller", timeout=10)
    for (route, status), before in counts.items():
        wait_until(lambda route=route, status=status, before=before: http_requests(http_stack, route, status)
                   == before + 1, 10, f"{route} {status} counted")


def test_the_load_generator_drives_grpc_and_http_alike(http_stack, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.common, "OUT", tmp_path)
    assert load.main(["--warmup", "0", "--name", "test", "--gateway", http_stack.gateway, "--http",
                      f"{http_stack.http}/v1", "--protocol", "both", "--requests", "6", "--concurrency", "2",
                      "--images", "1", "--image-sizes", "32x32", "--max-tokens", "3", "--temperature", "0"]) == 0
    results = json.loads((tmp_path / "load-test.json").read_text())
    tokens = {}
    for protocol in ("grpc", "http"):
        run = results[protocol]
        assert (run["requests"], run["ok"], run["errors"]) == (6, 6, {}), run
        assert run["images_per_s"] == run["requests_per_s"] and run["ttft_p50_ms"] > 0
        assert run["cache_hit_ratio"] == 0.0   # every image new, to each protocol's run
        assert run["cpu_ms_per_request"]["load"] > 0   # its own CPU (the stack's processes are not its own here)
        tokens[protocol] = round(run["tokens_per_s"] * run["wall_s"])
    assert tokens["grpc"] == tokens["http"] and 6 <= tokens["http"] <= 18   # the same greedy chats


# -- the generation controls, through the SDK's own types -----------------------------------------------------------

def test_n_completions_equal_grpc_by_index(http_stack, client):
    chat = [("user", ["Three stories, please."])]
    request = chat_request(chat, max_tokens=6, temperature=1.0, seed=11)
    request.n = 3
    expected: dict[int, list[int]] = {}
    for response in grpc_chat(http_stack.gateway, request):
        expected.setdefault(response.index, []).extend(response.token_ids)
    answer = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), n=3, max_tokens=6,
                                            temperature=1.0, seed=11, extra_body={"return_token_ids": True})
    assert [choice.index for choice in answer.choices] == [0, 1, 2]
    assert {choice.index: choice.model_extra["token_ids"] for choice in answer.choices} == expected
    assert all(choice.finish_reason == "length" for choice in answer.choices)
    assert answer.usage.completion_tokens == 18

    streamed_ids: dict[int, list[int]] = {}
    roles: dict[int, list] = {}
    for chunk in client.chat.completions.create(model=MODEL, messages=openai_messages(chat), n=3, max_tokens=6,
                                                temperature=1.0, seed=11, stream=True,
                                                extra_body={"return_token_ids": True}):
        for choice in chunk.choices:
            streamed_ids.setdefault(choice.index, []).extend(choice.model_extra["token_ids"])
            roles.setdefault(choice.index, []).append(choice.delta.role)
    assert streamed_ids == expected
    assert all(values[0] == "assistant" and set(values[1:]) <= {None} for values in roles.values())


def test_logprobs_equal_grpc_in_openais_shape(http_stack, client):
    chat = [("user", ["Say something."])]
    request = chat_request(chat, max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3)
    expected = [entry for response in grpc_chat(http_stack.gateway, request) for entry in response.logprobs]
    answer = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_tokens=5,
                                            temperature=0.0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == len(expected) == 5
    for ours, theirs in zip(content, expected):
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert len(ours.top_logprobs) == 3
        assert ours.top_logprobs[0].token == ours.token   # greedy: the most likely token is the one chosen
        assert [top.logprob for top in ours.top_logprobs] == sorted((top.logprob for top in ours.top_logprobs),
                                                                    reverse=True)
    assert b"".join(bytes(entry.bytes) for entry in content).decode() == answer.choices[0].message.content


def test_json_schema_output_parses_into_the_sdks_model(client):
    from pydantic import BaseModel

    class Verdict(BaseModel):
        answer: Literal["yes", "no"]
        sure: bool

    completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Is it?"}],
                                               response_format=Verdict, max_tokens=64, temperature=0.0)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Verdict)
    json_object = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "JSON?"}],
                                                 response_format={"type": "json_object"}, max_tokens=64,
                                                 temperature=0.0)
    if json_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(json_object.choices[0].message.content), dict)


def test_tool_calls_through_the_sdk_streamed_and_whole_then_answered(client):
    from pydantic import BaseModel

    class GetWeather(BaseModel):
        city: Literal["Paris", "Rome"]

    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    # One call each: with parallel calls the tiny random model may go on calling until max_tokens.
    completion = client.chat.completions.parse(model=MODEL, messages=messages, tools=tools, tool_choice="required",
                                               parallel_tool_calls=False, max_tokens=64, temperature=0.0)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name) == ("function", "get_weather") and len(call.id) == 9
    assert isinstance(call.function.parsed_arguments, GetWeather)

    named = client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, max_tokens=64, temperature=0.0, stream=True,
        parallel_tool_calls=False, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls, finishes = [], []
    for chunk in named:
        for streamed_choice in chunk.choices:
            calls += streamed_choice.delta.tool_calls or []
            finishes.append(streamed_choice.finish_reason)
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather" and calls[0].id
    assert GetWeather.model_validate_json(calls[0].function.arguments)
    assert finishes[-1] == "tool_calls"

    answered = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0.0, tools=tools, messages=[
        *messages, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear"}'},
        {"role": "user", "content": "So?"}])
    assert answered.choices[0].finish_reason in ("length", "stop", "tool_calls")
    none = client.chat.completions.create(model=MODEL, messages=messages, tools=tools, tool_choice="none",
                                          max_tokens=8, temperature=0.0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("length", "stop")


def test_sampling_controls_equal_grpc(http_stack):
    chat = [("user", ["Write a long list of words."])]
    controls = {"temperature": 0.8, "seed": 77, "top_k": 50, "min_p": 0.01, "presence_penalty": 0.5,
                "frequency_penalty": 0.3, "repetition_penalty": 1.2, "min_tokens": 3, "max_tokens": 12}
    expected = grpc_chat(http_stack.gateway, chat_request(chat, **controls, logit_bias={1000: 5.0, 2: -100.0},
                                                          stop_token_ids=[2]))
    body = chat_body(chat) | controls | {"logit_bias": {"1000": 5, "2": -100}, "stop_token_ids": [2],
                                         "return_token_ids": True}
    url = f"{http_stack.http}/v1/chat/completions"
    (choice,) = post(url, body).json()["choices"]
    assert choice["token_ids"] == [t for r in expected for t in r.token_ids]
    assert choice["message"]["content"] == "".join(r.text for r in expected)

    # A stop token id ends the output (the token returned), and stop_reason names it.
    first = expected[0].token_ids[0]
    (stopped,) = post(url, body | {"stop_token_ids": [first], "min_tokens": 0}).json()["choices"]
    assert (stopped["finish_reason"], stopped["stop_reason"], stopped["token_ids"]) == ("stop", first, [first])


def test_structured_outputs_and_continue_final_message_equal_grpc(http_stack, client):
    chat = [("user", ["Pick one."])]
    request = chat_request(chat, max_tokens=16, temperature=0.0)
    request.response_format.choice.choices.extend(["red", "green", "blue"])
    expected = "".join(r.text for r in grpc_chat(http_stack.gateway, request))
    assert expected in ("red", "green", "blue")
    for extra in ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
                  {"guided_choice": ["red", "green", "blue"]}):
        answer = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_tokens=16,
                                                temperature=0.0, extra_body=extra)
        assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "stop"
    regex = client.chat.completions.create(model=MODEL, messages=openai_messages(chat), max_tokens=16,
                                           temperature=0.0, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", regex.choices[0].message.content)

    history = [("user", ["Hi"]), ("assistant", ["Well, the answer is"])]
    request = chat_request(history, max_tokens=6, temperature=0.0)
    request.messages[1].prefix = True
    expected_ids = [t for r in grpc_chat(http_stack.gateway, request) for t in r.token_ids]
    messages = openai_messages(history)
    continued = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                               extra_body={"continue_final_message": True,
                                                           "add_generation_prompt": False, "return_token_ids": True})
    assert continued.choices[0].model_extra["token_ids"] == expected_ids
    messages[1]["prefix"] = True   # Mistral's way of saying it
    prefixed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0.0,
                                              extra_body={"return_token_ids": True})
    assert prefixed.choices[0].model_extra["token_ids"] == expected_ids


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
CONTROL_ERRORS = {
    "presence_penalty": ({"presence_penalty": 3}, "presence_penalty", "must be in [-2, 2]"),
    "repetition_penalty": ({"repetition_penalty": 0}, "repetition_penalty", "must be a finite number > 0"),
    "min_p": ({"min_p": 2}, "min_p", "must be in [0, 1]"),
    "logit_bias value": ({"logit_bias": {"5": 200}}, "logit_bias.5", "must be in [-100, 100]"),
    "logit_bias id": ({"logit_bias": {"999999": 1}}, "logit_bias", "outside the vocabulary"),
    "stop_token_ids": ({"stop_token_ids": [131072]}, "stop_token_ids", "outside the vocabulary"),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 50}, "top_logprobs", "must be in [0, 20]"),
    "min_tokens": ({"min_tokens": 10}, "min_tokens", "must be in [0, max_tokens]"),
    "n": ({"n": 100}, "n", "must be in [1, 16]"),
    "json schema": ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "no-such-type"}}}}}},
        "response_format.json_schema.schema", ""),
    "regex": ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", ""),
    "tool parameters": ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
                        "tools[0].function.parameters", "not a valid JSON schema"),
    "tool name": ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name",
                  "must be 1 to 64 characters"),
    "unknown named tool": ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
                           "tool_choice.function.name", ""),
    "tool call arguments": ({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function",
                                              "function": {"name": "f", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "abcDEF123", "content": "x"}], "tools": [TOOL]},
        "messages[1].tool_calls[0].function.arguments", "must be a JSON object"),
}


@pytest.mark.parametrize("name", list(CONTROL_ERRORS))
def test_generation_control_errors_name_their_json_param(http_stack, name):
    fields, param, fragment = CONTROL_ERRORS[name]
    response = post(f"{http_stack.http}/v1/chat/completions", chat_body([("user", ["Hi"])]) | fields)
    assert_error(response, 400, param, fragment)
