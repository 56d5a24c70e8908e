"""One chat of the load generator (bench/load.py): the request it sends, and the call over gRPC or the
OpenAI-compatible HTTP API, timed token by token."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import struct
import time
import zlib
from dataclasses import dataclass

import grpc
import httpx

from bench.common import noise_png
from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TEXT = "Describe everything you can see, including colours, shapes and textures. Request {index}."


# -- images -------------------------------------------------------------------------------------------------------

def with_text_chunk(png: bytes, text: str) -> bytes:
    """The same picture with a tEXt chunk after IHDR: other bytes (another sha256: a new image to the cache) and
    the same pixels (the same encoding work), without encoding the PNG again."""
    data = b"Comment\0" + text.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", zlib.crc32(b"tEXt" + data))
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


class ImageSource:
    """New images (a base picture per size made unique by a text chunk) and repeats of images sent before."""

    def __init__(self, sizes: list[tuple[int, int]], repeat_share: float, rng: random.Random) -> None:
        self.bases = [noise_png(w, h, seed=index) for index, (w, h) in enumerate(sizes)]
        self.repeat_share = repeat_share
        self.rng = rng
        self.sent: list[bytes] = []
        self._nonce = time.time_ns()   # never an image that a previous run left in a shared Redis
        self._numbers = itertools.count()

    def next(self) -> bytes:
        if self.sent and self.rng.random() < self.repeat_share:
            return self.rng.choice(self.sent)
        image = with_text_chunk(self.rng.choice(self.bases), f"{self._nonce}-{next(self._numbers)}")
        if self.repeat_share:   # kept only to be sent again: a long run of large new images would hold them all
            self.sent.append(image)
        return image


# -- requests -----------------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    code: str                     # gRPC status name
    started: float                # monotonic seconds
    seconds: float                # whole call
    ttft: float | None = None     # seconds to the first token
    tpot: float | None = None     # seconds per output token after the first
    num_tokens: int = 0
    num_images: int = 0
    num_cached: int = 0
    num_encoded: int = 0


@dataclass(frozen=True)
class ChatSpec:
    """One request of the load, whatever the protocol: `images` then a text, in one user message."""

    index: int
    images: list[bytes]
    max_tokens: int
    temperature: float


def build_request(index: int, images: list[bytes], max_tokens: int, temperature: float):
    content = [gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=image)) for image in images]
    content.append(gateway_pb2.ContentPart(text=TEXT.format(index=index)))
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)],
                                   sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                                                      seed=index))


async def timed_chat(stub, request, timeout_s: float) -> Outcome:
    started = time.monotonic()
    first = last = None
    num_tokens = 0
    usage = None
    try:
        async for response in stub.Chat(request, timeout=timeout_s):
            if response.token_ids:
                last = time.monotonic()
                first = first or last
                num_tokens += len(response.token_ids)
            if response.HasField("usage"):
                usage = response.usage
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    seconds = time.monotonic() - started
    outcome = Outcome(code, started, seconds, num_tokens=num_tokens,
                      num_images=sum(1 for part in request.messages[0].content if part.HasField("image")))
    if first is not None:
        outcome.ttft = first - started
        if num_tokens > 1:
            outcome.tpot = (last - first) / (num_tokens - 1)
    if usage is not None:
        outcome.num_cached, outcome.num_encoded = usage.cached_images, usage.encoded_images
    return outcome


def http_body(spec: ChatSpec) -> dict:
    """The chat as the HTTP API takes it: streamed, with usage at the end and each chunk's token ids."""
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
               for image in spec.images]
    content.append({"type": "text", "text": TEXT.format(index=spec.index)})
    return {"messages": [{"role": "user", "content": content}], "max_tokens": spec.max_tokens,
            "temperature": spec.temperature, "seed": spec.index, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}


async def timed_http_chat(client: httpx.AsyncClient, spec: ChatSpec, timeout_s: float) -> Outcome:
    started = time.monotonic()
    first = last = None
    num_tokens, usage, code = 0, None, "OK"
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", "chat/completions", json=http_body(spec)) as \
                response:
            if response.status_code != 200:
                await response.aread()
                code = f"HTTP_{response.status_code}"
            else:
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue   # blank separators and the final [DONE]
                    event = json.loads(line.removeprefix("data: "))
                    if "error" in event:   # the stream's last event
                        code = f"STREAM_{event['error'].get('code')}"
                        break
                    for choice in event["choices"]:
                        if choice.get("token_ids"):
                            last = time.monotonic()
                            first = first or last
                            num_tokens += len(choice["token_ids"])
                    usage = event.get("usage") or usage
    except TimeoutError:
        code = "DEADLINE_EXCEEDED"
    except httpx.HTTPError as error:
        code = type(error).__name__
    outcome = Outcome(code, started, time.monotonic() - started, num_tokens=num_tokens, num_images=len(spec.images))
    if first is not None:
        outcome.ttft = first - started
        if num_tokens > 1:
            outcome.tpot = (last - first) / (num_tokens - 1)
    if usage is not None:
        outcome.num_cached, outcome.num_encoded = usage["cached_images"], usage["encoded_images"]
    return outcome


class GrpcCalls:
    """Chats through the gateway's gRPC Chat stream."""

    def __init__(self, address: str) -> None:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    async def chat(self, spec: ChatSpec, timeout_s: float) -> Outcome:
        return await timed_chat(self.stub, build_request(spec.index, spec.images, spec.max_tokens, spec.temperature),
                                timeout_s)

    async def close(self) -> None:
        await self.channel.close()


class HttpCalls:
    """Chats through the gateway's OpenAI-compatible HTTP API, one keep-alive connection per caller."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.client = httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", timeout=None, limits=httpx.Limits(
            max_connections=concurrency, max_keepalive_connections=concurrency))

    async def chat(self, spec: ChatSpec, timeout_s: float) -> Outcome:
        return await timed_http_chat(self.client, spec, timeout_s)

    async def close(self) -> None:
        await self.client.aclose()


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.split("x")) for size in text.split(",")]


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)
