"""gRPC transport of the gateway: proto <-> domain, nothing else."""

from __future__ import annotations

import dataclasses
from contextlib import aclosing

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from services.gateway.chat import ChatDelta, ChatService
from services.gateway.prompt import PromptImage
from services.gateway.route import StoredImage
from services.gateway.request import (ChatInput, ChatMessage, FormatInput, ImageSource, Role, SamplingInput, TextPart,
                                     ToolCallInput, ToolInput, request_id_or_new)
from shared.errors import InvalidRequest, Unavailable
from shared.grpc_server import map_errors
from shared.logs import request_id_var

ROLES = {gateway_pb2.ROLE_SYSTEM: Role.SYSTEM, gateway_pb2.ROLE_USER: Role.USER,
         gateway_pb2.ROLE_ASSISTANT: Role.ASSISTANT, gateway_pb2.ROLE_TOOL: Role.TOOL}
FINISH_REASONS = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH,
                  "cancelled": common_pb2.FINISH_REASON_CANCELLED, "error": common_pb2.FINISH_REASON_ERROR,
                  "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS}


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


_SAMPLING_OPTIONAL = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
                      "presence_penalty", "frequency_penalty", "min_p", "min_tokens", "ignore_eos", "logprobs",
                      "top_logprobs")
TOOL_CHOICE_MODES = {gateway_pb2.TOOL_CHOICE_MODE_AUTO: "auto", gateway_pb2.TOOL_CHOICE_MODE_NONE: "none",
                     gateway_pb2.TOOL_CHOICE_MODE_REQUIRED: "required"}


def message_from_pb(message: gateway_pb2.Message, i: int) -> ChatMessage:
    parts = []
    for j, part in enumerate(message.content):
        kind = part.WhichOneof("part")
        if kind == "image":
            parts.append(image_from_pb(part.image, f"messages[{i}].content[{j}].image"))
        elif kind == "text":
            parts.append(TextPart(part.text))
        else:   # the oneof unset (or a kind this gateway does not know, from a newer client)
            raise InvalidRequest(f"messages[{i}].content[{j}]", "a content part needs its text or its image")
    calls = tuple(ToolCallInput(call.id, call.name, call.arguments, f"messages[{i}].tool_calls[{k}]")
                  for k, call in enumerate(message.tool_calls))
    return ChatMessage(ROLES.get(message.role), parts, f"messages[{i}]", calls, message.tool_call_id, message.prefix)


def format_from_pb(request: gateway_pb2.ChatRequest) -> FormatInput | None:
    kind = request.response_format.WhichOneof("format") if request.HasField("response_format") else None
    if kind is None:
        return None
    if kind == "choice":
        return FormatInput(kind, tuple(request.response_format.choice.choices))
    return FormatInput(kind, "" if kind == "json_object" else getattr(request.response_format, kind))


def chat_from_pb(request: gateway_pb2.ChatRequest, request_id: str) -> ChatInput:
    sampling = request.sampling
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    return ChatInput(
        request_id=request_id,
        messages=[message_from_pb(message, i) for i, message in enumerate(request.messages)],
        sampling=SamplingInput(**{name: _optional(sampling, name) for name in _SAMPLING_OPTIONAL},
                               stop=tuple(sampling.stop), logit_bias=tuple(sampling.logit_bias.items()),
                               stop_token_ids=tuple(sampling.stop_token_ids)),
        n=_optional(request, "n"), response_format=format_from_pb(request),
        tools=tuple(ToolInput(tool.name, tool.description, tool.parameters, f"tools[{i}]")
                    for i, tool in enumerate(request.tools)),
        tool_choice=(None if choice is None else request.tool_choice.function if choice == "function"
                     else TOOL_CHOICE_MODES.get(request.tool_choice.mode, "unspecified")),
        tool_choice_is_function=choice == "function", parallel_tool_calls=_optional(request, "parallel_tool_calls"))


def delta_to_pb(delta: ChatDelta, request_id: str) -> gateway_pb2.ChatResponse:
    response = gateway_pb2.ChatResponse(text=delta.text, token_ids=delta.token_ids, index=delta.index)
    for entry in delta.logprobs:
        response.logprobs.add(token_id=entry.token_id, logprob=entry.logprob, text=entry.text, top_logprobs=[
            common_pb2.TopLogprob(token_id=top.token_id, logprob=top.logprob, text=top.text) for top in entry.top])
    for call in delta.tool_calls:
        response.tool_calls.add(id=call.id, name=call.name, arguments=call.arguments)
    if delta.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[delta.finish_reason]
        response.request_id = request_id
        if delta.seed is not None:
            response.seed = delta.seed
        if isinstance(delta.stop_reason, str):
            response.stop_reason.stop = delta.stop_reason
        elif delta.stop_reason is not None:
            response.stop_reason.token_id = delta.stop_reason
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
        request_id_var.set(request_id_or_new(request.request_id))   # first: every other error is reported with it
        chat = chat_from_pb(request, request_id_var.get())
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
        request_id_var.set(request_id_or_new(request.request_id))
        chat = chat_from_pb(request, request_id_var.get())
        prompt = await self._ready().route.prompt(chat, context.time_remaining())
        return gateway_pb2.TokenizeResponse(token_ids=prompt.token_ids,
                                            images=[image_info_to_pb(image) for image in prompt.images])

    @map_errors
    async def PutImages(self, request, context):
        request_id = request_id_or_new(request.request_id)
        request_id_var.set(request_id)
        sources = [image_from_pb(image, f"images[{i}]") for i, image in enumerate(request.images)]
        stored = await self._ready().route.put_images(sources, request_id, context.time_remaining())
        return gateway_pb2.PutImagesResponse(images=[stored_to_pb(item) for item in stored], request_id=request_id)

    @map_errors
    async def GetModelInfo(self, request, context):
        return gateway_pb2.ModelInfo(**dataclasses.asdict(self._ready().model_info()))
