"""gRPC transport of the gateway: proto <-> domain, nothing else."""

from __future__ import annotations

import dataclasses
import uuid
from contextlib import aclosing

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.chat import ChatDelta, ChatService
from services.gateway.prompt import PromptImage
from services.gateway.route import StoredImage
from services.gateway.request import ChatInput, ChatMessage, ImageSource, Role, SamplingInput, TextPart
from shared.errors import Unavailable
from shared.grpc_server import map_errors
from shared.logs import request_id_var

ROLES = {gateway_pb2.ROLE_SYSTEM: Role.SYSTEM, gateway_pb2.ROLE_USER: Role.USER,
         gateway_pb2.ROLE_ASSISTANT: Role.ASSISTANT}
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
                  "cancelled": common_pb2.FINISH_REASON_CANCELLED, "error": common_pb2.FINISH_REASON_ERROR}


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def image_from_pb(image: gateway_pb2.ImagePart, field: str) -> ImageSource:
    source = image.WhichOneof("source")
    return ImageSource(field=field, **({source: getattr(image, source)} if source else {"data": b""}))


def image_info_to_pb(image: PromptImage) -> gateway_pb2.ImageInfo:
    return gateway_pb2.ImageInfo(sha256=image.sha256, width=image.width, height=image.height,
                                 grid_width=image.grid_width, grid_height=image.grid_height,
                                 num_tokens=image.num_tokens)


def stored_to_pb(stored: StoredImage) -> gateway_pb2.StoredImage:
    return gateway_pb2.StoredImage(info=image_info_to_pb(stored.image), was_cached=stored.was_cached)


def chat_from_pb(request: gateway_pb2.ChatRequest) -> ChatInput:
    messages = []
    for i, message in enumerate(request.messages):
        parts = []
        for j, part in enumerate(message.content):
            field = f"messages[{i}].content[{j}]"
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(TextPart(part.text))
            elif kind == "image":
                parts.append(image_from_pb(part.image, f"{field}.image"))
            else:
                parts.append(TextPart(""))
        messages.append(ChatMessage(ROLES.get(message.role), parts, f"messages[{i}]"))
    sampling = request.sampling
    return ChatInput(
        request_id=request.request_id or uuid.uuid4().hex,
        messages=messages,
        sampling=SamplingInput(
            max_tokens=_optional(sampling, "max_tokens"), temperature=_optional(sampling, "temperature"),
            top_p=_optional(sampling, "top_p"), top_k=_optional(sampling, "top_k"),
            seed=_optional(sampling, "seed"), stop=tuple(sampling.stop)))


def delta_to_pb(delta: ChatDelta, request_id: str) -> gateway_pb2.ChatResponse:
    response = gateway_pb2.ChatResponse(text=delta.text, token_ids=delta.token_ids)
    if delta.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[delta.finish_reason]
        response.request_id = request_id
    if delta.usage is not None:
        response.usage.CopyFrom(common_pb2.Usage(**dataclasses.asdict(delta.usage)))
    return response


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self) -> None:
        self.service: ChatService | None = None  # set once the gateway is ready

    def _ready(self) -> ChatService:
        if self.service is None:
            raise Unavailable("gateway is starting")
        return self.service

    @map_errors
    async def Chat(self, request, context):
        chat = chat_from_pb(request)
        request_id_var.set(chat.request_id)
        service = self._ready()
        is_first = True
        async with aclosing(service.chat(chat, context.time_remaining())) as deltas:
            async for delta in deltas:
                response = delta_to_pb(delta, chat.request_id)
                if is_first:
                    response.request_id = chat.request_id
                    is_first = False
                yield response

    @map_errors
    async def Tokenize(self, request, context):
        chat = chat_from_pb(request)
        request_id_var.set(chat.request_id)
        prompt = await self._ready().route.prompt(chat, context.time_remaining())
        return gateway_pb2.TokenizeResponse(token_ids=prompt.token_ids,
                                            images=[image_info_to_pb(image) for image in prompt.images])

    @map_errors
    async def PutImages(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        sources = [image_from_pb(image, f"images[{i}]") for i, image in enumerate(request.images)]
        stored = await self._ready().route.put_images(sources, request_id, context.time_remaining())
        return gateway_pb2.PutImagesResponse(images=[stored_to_pb(item) for item in stored], request_id=request_id)

    @map_errors
    async def GetModelInfo(self, request, context):
        return gateway_pb2.ModelInfo(**dataclasses.asdict(self._ready().model_info()))
