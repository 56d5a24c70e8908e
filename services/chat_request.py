"""The ChatRequest that pixtral-chat's flags describe: the chat's messages (OpenAI's JSON for --messages and
--tools), sampling, output format and tools."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pixtral.v1 import common_pb2, gateway_pb2

ROLES = {"system": gateway_pb2.ROLE_SYSTEM, "user": gateway_pb2.ROLE_USER,
         "assistant": gateway_pb2.ROLE_ASSISTANT, "tool": gateway_pb2.ROLE_TOOL}
TOOL_CHOICE_MODES = {"auto": gateway_pb2.TOOL_CHOICE_MODE_AUTO, "none": gateway_pb2.TOOL_CHOICE_MODE_NONE,
                     "required": gateway_pb2.TOOL_CHOICE_MODE_REQUIRED}
# An --messages image URL of this scheme names an image sent before by its hash (the gateway's extension).
SHA256_SCHEME = "sha256:"
# Flags copied as they are into SamplingParams fields of the same name (the others need converting).
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "min_p", "min_tokens")


class UsageError(ValueError):
    """A flag whose value cannot make a request; the message names the flag."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"argument {flag}: {message}")


def image_part_from_url(url: str) -> gateway_pb2.ImagePart:
    """A data: URL as it is (the gateway decodes it); "sha256:<hex>" as a reference to an image sent before."""
    if url.startswith(SHA256_SCHEME):
        return gateway_pb2.ImagePart(sha256=url[len(SHA256_SCHEME):])
    return gateway_pb2.ImagePart(url=url)


def _content_from_openai(content: Any, where: str) -> list[gateway_pb2.ContentPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [gateway_pb2.ContentPart(text=content)]
    if not isinstance(content, list):
        raise UsageError("--messages", f"{where}: must be a string or a list of parts")
    parts = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(gateway_pb2.ContentPart(text=part["text"]))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise UsageError("--messages", f"{at}.image_url: must be {{\"url\": \"data:...\"}}")
            parts.append(gateway_pb2.ContentPart(image=image_part_from_url(url)))
        else:
            raise UsageError("--messages", f'{at}: must be {{"type": "text", "text": ...}} or '
                                           f'{{"type": "image_url", "image_url": {{"url": ...}}}}')
    return parts


def _tool_call_from_openai(call: Any, where: str) -> gateway_pb2.ToolCall:
    """OpenAI's {"id", "type", "function": {"name", "arguments"}}, or this CLI's own {"id", "name", "arguments"};
    arguments as JSON text or as an object."""
    if not isinstance(call, dict):
        raise UsageError("--messages", f"{where}: must be an object")
    function = call.get("function", call)
    name, arguments = (function.get("name"), function.get("arguments", {})) if isinstance(function, dict) else (
        None, None)
    if not isinstance(call.get("id"), str) or not isinstance(name, str):
        raise UsageError("--messages", f'{where}: must be {{"id", "function": {{"name", "arguments"}}}}')
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return gateway_pb2.ToolCall(id=call["id"], name=name, arguments=arguments)


def message_from_openai(message: Any, where: str) -> gateway_pb2.Message:
    """One OpenAI-style chat message; `where` (e.g. "messages[2]") names it in errors."""
    if not isinstance(message, dict):
        raise UsageError("--messages", f"{where}: must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise UsageError("--messages", f"{where}.role: must be one of {', '.join(ROLES)}, not {role!r}")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise UsageError("--messages", f"{where}.tool_calls: must be a list")
    call_id = message.get("tool_call_id") or ""
    if not isinstance(call_id, str):
        raise UsageError("--messages", f"{where}.tool_call_id: must be a string")
    prefix = message.get("prefix", False)
    if not isinstance(prefix, bool):
        raise UsageError("--messages", f"{where}.prefix: must be true or false")
    return gateway_pb2.Message(
        role=ROLES[role], content=_content_from_openai(message.get("content"), f"{where}.content"),
        tool_calls=[_tool_call_from_openai(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)],
        tool_call_id=call_id, prefix=prefix)


def tool_from_openai(tool: Any, where: str) -> gateway_pb2.Tool:
    """{"type": "function", "function": {"name", "description", "parameters"}} -> Tool (parameters as JSON text)."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise UsageError("--tools", f'{where}: must be {{"type": "function", "function": {{...}}}}')
    function = tool.get("function", tool)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise UsageError("--tools", f"{where}.function.name: must be a string")
    description = function.get("description") or ""
    parameters = function.get("parameters")
    if not isinstance(description, str):
        raise UsageError("--tools", f"{where}.function.description: must be a string")
    if parameters is not None and not isinstance(parameters, dict):
        raise UsageError("--tools", f"{where}.function.parameters: must be a JSON schema object")
    return gateway_pb2.Tool(name=name, description=description,
                            parameters="" if parameters is None else json.dumps(parameters, ensure_ascii=False))


def _last_user_message(args: argparse.Namespace) -> gateway_pb2.Message | None:
    if args.text is None and not args.images:
        return None
    content = []
    for kind, value in args.images:
        if kind == "file":
            with open(value, "rb") as handle:
                content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=handle.read())))
        else:
            content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(sha256=value)))
    if args.text is not None:
        content.append(gateway_pb2.ContentPart(text=args.text))
    return gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)


def _sampling(args: argparse.Namespace) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(stop=args.stop, stop_token_ids=args.stop_token_id)
    for name in SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    for token_id, bias in args.logit_bias:
        sampling.logit_bias[token_id] = bias
    if args.ignore_eos:
        sampling.ignore_eos = True
    if args.top_logprobs is not None:
        sampling.logprobs = True
        sampling.top_logprobs = args.top_logprobs
    return sampling


def _response_format(args: argparse.Namespace) -> gateway_pb2.ResponseFormat | None:
    if args.json_object:
        return gateway_pb2.ResponseFormat(json_object=True)
    if args.json_schema is not None:
        if not isinstance(args.json_schema, dict):
            raise UsageError("--json-schema", "the file must hold a JSON schema object")
        return gateway_pb2.ResponseFormat(json_schema=json.dumps(args.json_schema, ensure_ascii=False))
    if args.regex is not None:
        return gateway_pb2.ResponseFormat(regex=args.regex)
    if args.choice is not None:
        return gateway_pb2.ResponseFormat(choice=gateway_pb2.Choices(choices=args.choice))
    if args.grammar is not None:
        return gateway_pb2.ResponseFormat(grammar=args.grammar)
    return None


def build_request(args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    """The ChatRequest the flags describe; raises UsageError naming a flag whose value cannot be sent, OSError for
    an image file that cannot be read."""
    messages = [] if args.system is None else [
        gateway_pb2.Message(role=gateway_pb2.ROLE_SYSTEM, content=[gateway_pb2.ContentPart(text=args.system)])]
    if args.messages is not None:
        if not isinstance(args.messages, list):
            raise UsageError("--messages", "the file must hold a JSON list of messages")
        messages += [message_from_openai(message, f"messages[{i}]") for i, message in enumerate(args.messages)]
    last = _last_user_message(args)
    if last is not None:
        messages.append(last)
    request = gateway_pb2.ChatRequest(messages=messages, sampling=_sampling(args))
    if args.n is not None:
        request.n = args.n
    response_format = _response_format(args)
    if response_format is not None:
        request.response_format.CopyFrom(response_format)
    if args.tools is not None:
        if not isinstance(args.tools, list):
            raise UsageError("--tools", "the file must hold a JSON list of tools")
        request.tools.extend(tool_from_openai(tool, f"tools[{i}]") for i, tool in enumerate(args.tools))
    if args.tool_choice is not None:
        mode = TOOL_CHOICE_MODES.get(args.tool_choice)
        request.tool_choice.CopyFrom(gateway_pb2.ToolChoice(mode=mode) if mode is not None
                                     else gateway_pb2.ToolChoice(function=args.tool_choice))
    if args.parallel_tool_calls is not None:
        request.parallel_tool_calls = args.parallel_tool_calls
    return request
