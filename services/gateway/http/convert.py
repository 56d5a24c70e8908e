"""An HTTP request body -> the domain's ChatInput (the gRPC transport makes the same objects from protos), and the
field a domain error names -> the JSON path the caller used.

Domain errors name fields as the gRPC API has them ("sampling.max_tokens", "tools[0].parameters"); the image parts
made here are named as the caller sent them ("messages[0].content[1].image_url"), so image errors already read
right. `Params.param` maps the rest, knowing which of several JSON names the caller used (max_completion_tokens or
max_tokens, stop as a string or a list, response_format or structured_outputs...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace

from services.gateway.http.schema import ChatCompletionRequest, Message
from services.gateway.request import (ChatInput, ChatMessage, FormatInput, ImageSource, Part, Role, SamplingInput,
                                      TextPart, ToolCallInput, ToolInput)
from shared.errors import InvalidRequest

ROLES = {"system": Role.SYSTEM, "developer": Role.SYSTEM, "user": Role.USER, "assistant": Role.ASSISTANT,
         "tool": Role.TOOL}
TOOL_CHOICE_MODES = ("auto", "none", "required")
SHA256_PREFIX = "sha256:"   # an image_url naming an image sent before by the hash of its bytes (our extension)

_SAMPLING = re.compile(r"^sampling\.(\w+)(.*)$")
_TOOL = re.compile(r"^(tools\[\d+\])\.(name|description|parameters)(.*)$")
_TOOL_CALL = re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.(name|arguments)(.*)$")
_IMAGE_HASH = re.compile(r"^(messages\[\d+\]\.content\[\d+\]\.image_url)\.sha256$")
_PREFIX = re.compile(r"^messages\[\d+\]\.prefix$")


@dataclass(frozen=True, slots=True)
class Params:
    """Which JSON names the caller used, for errors that name a field."""

    max_tokens: str = "max_completion_tokens"
    is_stop_string: bool = False
    format_field: str = "response_format"      # where the output format came from
    tool_choice_field: str = "tool_choice"
    is_prefix_from_request: bool = False       # continue_final_message rather than the message's prefix

    def param(self, field: str) -> str | None:
        """The JSON path of a domain error's field; None when it names no field."""
        if not field or field == "request":
            return None
        if match := _SAMPLING.match(field):
            name, rest = match.groups()
            if name == "max_tokens":
                name = self.max_tokens
            elif name == "stop" and self.is_stop_string:
                rest = ""
            elif name == "logit_bias":
                rest = re.sub(r"^\[(\d+)\]", r".\1", rest)
            return name + rest
        if field.startswith("response_format"):
            return self.format_field
        if field.startswith("tool_choice"):
            return self.tool_choice_field
        if match := _TOOL.match(field) or _TOOL_CALL.match(field):
            owner, name, rest = match.groups()
            return f"{owner}.function.{name}{rest}"
        if match := _IMAGE_HASH.match(field):
            return f"{match[1]}.url"
        if _PREFIX.match(field) and self.is_prefix_from_request:
            return "continue_final_message"
        return field


def image_source(url: str, field: str) -> ImageSource:
    if url.startswith(SHA256_PREFIX):
        return ImageSource(field=field, sha256=url[len(SHA256_PREFIX):])
    return ImageSource(field=field, url=url)


def messages_from_json(messages: list[Message]) -> list[ChatMessage]:
    converted = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        parts: list[Part] = []
        for j, part in enumerate(message.content or ()):
            if part.type == "text":
                if part.text is None:
                    raise InvalidRequest(f"{field}.content[{j}].text", "a text part needs its text")
                parts.append(TextPart(part.text))
            else:
                if part.image_url is None:
                    raise InvalidRequest(f"{field}.content[{j}].image_url", "an image_url part needs its image_url")
                parts.append(image_source(part.image_url.url, f"{field}.content[{j}].image_url"))
        calls = tuple(ToolCallInput(call.id, call.function.name, call.function.arguments,
                                    f"{field}.tool_calls[{k}]") for k, call in enumerate(message.tool_calls or ()))
        converted.append(ChatMessage(ROLES[message.role], parts, field, tool_calls=calls,
                                     tool_call_id=message.tool_call_id or "", prefix=message.prefix))
    return converted


def _schema_text(schema: dict | str | None) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _output_format(body: ChatCompletionRequest) -> tuple[FormatInput | None, str]:
    """The output format (at most one way of giving it) and the JSON path it was given at."""
    given: list[tuple[FormatInput, str]] = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        given.append((FormatInput("json_object", ""), "response_format"))
    elif response_format is not None and response_format.type == "json_schema":
        spec = response_format.json_schema
        if spec is None:
            raise InvalidRequest("response_format.json_schema", "is required when type is json_schema")
        given.append((FormatInput("json_schema", _schema_text(spec.schema_)) if spec.schema_ is not None
                      else FormatInput("json_object", ""), "response_format.json_schema.schema"))
    outputs = body.structured_outputs
    if outputs is not None:
        for name, kind, value in (("json", "json_schema", outputs.json_), ("regex", "regex", outputs.regex),
                                  ("choice", "choice", outputs.choice), ("grammar", "grammar", outputs.grammar),
                                  ("json_object", "json_object", outputs.json_object or None)):
            if value is not None:
                spec = (_schema_text(value) if kind == "json_schema" else tuple(value) if kind == "choice"
                        else "" if kind == "json_object" else value)
                given.append((FormatInput(kind, spec), f"structured_outputs.{name}"))
    for name, kind, value in (("guided_json", "json_schema", body.guided_json),
                              ("guided_regex", "regex", body.guided_regex),
                              ("guided_choice", "choice", body.guided_choice),
                              ("guided_grammar", "grammar", body.guided_grammar)):
        if value is not None:
            spec = _schema_text(value) if kind == "json_schema" else tuple(value) if kind == "choice" else value
            given.append((FormatInput(kind, spec), name))
    if len(given) > 1:
        raise InvalidRequest(given[1][1], f"one output format at most; {given[0][1]} gives one already")
    return given[0] if given else (None, "response_format")


def _tool_choice(value) -> tuple[str | None, bool]:
    """(tool_choice, whether it names a function)."""
    if value is None or value in TOOL_CHOICE_MODES:
        return value, False
    if isinstance(value, dict) and value.get("type") == "function":
        name = (value.get("function") or {}).get("name") if isinstance(value.get("function"), dict) else None
        if isinstance(name, str) and name:
            return name, True
    raise InvalidRequest("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "function": '
                                        '{"name": ...}}')


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in (bias or {}).items():
        if not key.isascii() or not key.isdigit():
            raise InvalidRequest(f"logit_bias.{key[:32]}", "keys must be token ids (decimal integers)")
        pairs.append((int(key), value))
    return tuple(pairs)


def chat_from_json(body: ChatCompletionRequest, request_id: str) -> tuple[ChatInput, Params]:
    messages = messages_from_json(body.messages)
    if body.continue_final_message:
        if not messages or messages[-1].role is not Role.ASSISTANT:
            raise InvalidRequest("continue_final_message", "the last message must be the assistant's")
        messages[-1] = replace(messages[-1], prefix=True)
    elif not body.add_generation_prompt:
        raise InvalidRequest("add_generation_prompt", "false is only for continue_final_message: the prompt "
                                                      "always ends where the assistant's answer starts")
    response_format, format_field = _output_format(body)
    tool_choice, is_function = _tool_choice(body.tool_choice)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    top_k = None if body.top_k == -1 else body.top_k
    sampling = SamplingInput(
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=top_k, seed=body.seed, stop=stop,
        repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, min_p=body.min_p, logit_bias=_logit_bias(body.logit_bias),
        min_tokens=body.min_tokens, stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos,
        logprobs=body.logprobs, top_logprobs=body.top_logprobs)
    tools = tuple(ToolInput(tool.function.name, tool.function.description,
                            json.dumps(tool.function.parameters) if tool.function.parameters is not None else "",
                            f"tools[{i}]") for i, tool in enumerate(body.tools or ()))
    chat = ChatInput(request_id=request_id, messages=messages, sampling=sampling, n=body.n,
                     response_format=response_format, tools=tools, tool_choice=tool_choice,
                     tool_choice_is_function=is_function, parallel_tool_calls=body.parallel_tool_calls)
    params = Params(
        max_tokens="max_completion_tokens" if body.max_completion_tokens is not None or body.max_tokens is None
        else "max_tokens",
        is_stop_string=isinstance(body.stop, str), format_field=format_field,
        tool_choice_field="tool_choice.function.name" if is_function else "tool_choice",
        is_prefix_from_request=body.continue_final_message)
    return chat, params
