"""Function tools for Pixtral's tokenizer (tekken_240911, mistral-common's v3) and the model's tool calls.

How v3 encodes them (mistral-common 1.13.1, `InstructTokenizerV3`):
- the tools, as a JSON list of `{"type": "function", "function": {"name", "description", "parameters"}}`, go in
  `[AVAILABLE_TOOLS]...[/AVAILABLE_TOOLS]` right before the `[INST]` of the last user message;
- an assistant turn that called tools is `[TOOL_CALLS]` + a JSON list of `{"name", "arguments", "id"}` + `</s>`;
- a tool result is `[TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]` (the content parsed when it is
  JSON), with no `[INST]` around it;
- a tool call id is 9 characters of a-z, A-Z, 0-9 (the request is refused otherwise);
- `tool_choice` is not read at all: the prompt is the same for auto, none, required and a named function.
The model answers a call with `[TOOL_CALLS]` (id 9), a JSON list of `{"name", "arguments"}`, then `</s>`.

So tool_choice acts on the output only: `auto` leaves it free and parses it for calls; `required` and a named
function constrain it with a grammar that starts with `[TOOL_CALLS]`; `none` (with tools listed) constrains it
to plain text, which can never hold a control token, so no call. Without tools nothing is constrained.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mistral_common.protocol.instruct.tool_calls import (Function, FunctionName, NamedToolChoice, Tool, ToolChoice,
                                                         ToolChoiceEnum)
from mistral_common.utils.json_utils import validate_json_schema_by_draft7

from shared.structured_output import FormatError, ResponseFormat

MAX_TOOLS = 128
TOOL_CALL_ID_LENGTH = 9
_ID_ALPHABET = string.ascii_letters + string.digits
_TOOL_CALL_ID = re.compile(r"^[a-zA-Z0-9]{9}$")
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# Output that is text and nothing else: every grammar here excludes the control tokens, [TOOL_CALLS] with them.
PLAIN_TEXT = ResponseFormat("regex", r"[\s\S]*")


class ChatFormatError(ValueError):
    """Tools, tool_choice or messages this tokenizer cannot take: `field` names the field, `problem` says how."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolSetup:
    """What a request's tools and tool_choice mean for the prompt and for the output."""

    tools: tuple[Tool, ...]               # for ChatCompletionRequest.tools: the prompt lists them
    tool_choice: ToolChoice               # for ChatCompletionRequest.tool_choice (the prompt does not use it)
    response_format: ResponseFormat | None  # what the output must be: None for auto
    parses_tool_calls: bool               # whether the output is read for [TOOL_CALLS]

    def output_format(self, requested: ResponseFormat | None) -> ResponseFormat | None:
        """The format the output follows when the request also names a response_format. A requested format
        leaves no room for [TOOL_CALLS], so it cannot be combined with a choice that demands a call."""
        if requested is None:
            return self.response_format
        if self.response_format is not None and self.response_format.kind == "tool_calls":
            raise ChatFormatError("response_format", "cannot be combined with tool_choice required or a named function")
        return requested


def setup_tools(tools: Sequence[Mapping[str, Any]] | None, tool_choice: str | Mapping[str, Any] | None = None,
                parallel_tool_calls: bool = True) -> ToolSetup:
    """OpenAI-style `tools` and `tool_choice` (`auto`, `none`, `required`, or
    `{"type": "function", "function": {"name": ...}}`; unset: auto with tools, none without). A function's
    `strict` is not read: its parameters schema binds the arguments whenever a grammar writes the calls."""
    parsed = tuple(_parse_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools or ()))
    if len(parsed) > MAX_TOOLS:
        raise ChatFormatError("tools", f"{len(parsed)} tools, over the limit of {MAX_TOOLS}")
    names = [tool.function.name for tool in parsed]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ChatFormatError(f"tools[{index}].function.name", f"{name!r} is the name of an earlier tool too")
    choice = _parse_tool_choice(tool_choice, names)
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in parsed if tool.function.name == choice.function.name]
        return ToolSetup(parsed, choice, _calls_format(named, parallel_tool_calls), True)
    if choice is ToolChoiceEnum.required:
        return ToolSetup(parsed, choice, _calls_format(parsed, parallel_tool_calls), True)
    if not parsed:  # nothing to call: the output needs neither a grammar nor reading for calls
        return ToolSetup(parsed, choice, None, False)
    if choice is ToolChoiceEnum.none:
        return ToolSetup(parsed, choice, PLAIN_TEXT, False)
    return ToolSetup(parsed, choice, None, True)


def _calls_format(tools: Sequence[Tool], parallel_tool_calls: bool) -> ResponseFormat:
    try:
        return tool_calls_format(tools, parallel_tool_calls)
    except FormatError as error:
        raise ChatFormatError("tools", f"{error}") from None


def _parse_tool(tool: Any, where: str) -> Tool:
    if not isinstance(tool, Mapping):
        raise ChatFormatError(f"{where}", "must be an object")
    if tool.get("type", "function") != "function":
        raise ChatFormatError(f"{where}.type", f"only function tools are supported, not {tool.get('type')!r}")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise ChatFormatError(f"{where}.function", "must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
        raise ChatFormatError(f"{where}.function.name", "must be 1 to 64 characters of a-z, A-Z, 0-9, _ and -")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise ChatFormatError(f"{where}.function.description", "must be a string")
    parameters = function.get("parameters")
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, Mapping):
        raise ChatFormatError(f"{where}.function.parameters", "must be a JSON schema object")
    try:
        validate_json_schema_by_draft7(dict(parameters))
    except ValueError as error:
        raise ChatFormatError(f"{where}.function.parameters", f"not a valid JSON schema: {error}") from None
    return Tool(function=Function(name=name, description=description, parameters=dict(parameters)))


def _parse_tool_choice(tool_choice: str | Mapping[str, Any] | None, names: list[str]) -> ToolChoice:
    if tool_choice is None:
        return ToolChoiceEnum.auto if names else ToolChoiceEnum.none
    if isinstance(tool_choice, str):
        aliases = {"auto": ToolChoiceEnum.auto, "none": ToolChoiceEnum.none, "required": ToolChoiceEnum.required,
                   "any": ToolChoiceEnum.required}
        if tool_choice not in aliases:
            raise ChatFormatError("tool_choice", "must be auto, none, required or a named function, "
                                  f"not {tool_choice[:64]!r}")
        choice = aliases[tool_choice]
        if choice is ToolChoiceEnum.required and not names:
            raise ChatFormatError("tool_choice", "required needs tools")
        return choice
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise ChatFormatError('tool_choice', 'a named choice is {"type": "function", "function": {"name": ...}}')
    if name not in names:
        raise ChatFormatError("tool_choice.function.name", f"{name[:64]!r} is not one of the tools")
    return NamedToolChoice(function=FunctionName(name=name))


def tool_calls_format(tools: Sequence[Tool], parallel_tool_calls: bool = True) -> ResponseFormat:
    """[TOOL_CALLS] then a list of one or more calls (exactly one unless parallel), each named after one of the
    tools, its arguments following that tool's parameters schema (any object where it gives none)."""
    schema: dict[str, Any] = {"type": "array", "minItems": 1}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    definitions: dict[str, Any] = {}
    items = []
    for index, tool in enumerate(tools):
        parameters = tool.function.parameters or {"type": "object"}
        # Each schema moves under $defs, so that its own "#/..." references still point into it.
        definitions[f"tool{index}"] = _rebase_refs(parameters, f"#/$defs/tool{index}")
        items.append({"type": "object",
                      "properties": {"name": {"const": tool.function.name},
                                     "arguments": {"$ref": f"#/$defs/tool{index}"}},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema["items"] = items[0] if len(items) == 1 else {"anyOf": items}
    schema["$defs"] = definitions
    return ResponseFormat("tool_calls", json.dumps(schema, ensure_ascii=False))


def _rebase_refs(node: Any, base: str) -> Any:
    if isinstance(node, dict):
        return {key: (base + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
                      else _rebase_refs(value, base))
                for key, value in node.items()}
    if isinstance(node, list):
        return [_rebase_refs(value, base) for value in node]
    return node


def generate_tool_call_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(TOOL_CALL_ID_LENGTH))


def prompt_tool_call_id(call_id: str) -> str:
    """The id as the prompt carries it: ours (9 letters and digits) as they are; another service's (such as
    "call_..."), which this tokenizer refuses, as 9 characters derived from it, the same wherever it appears, so
    that a call and its result stay paired."""
    if _TOOL_CALL_ID.match(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    characters = []
    for _ in range(TOOL_CALL_ID_LENGTH):
        number, remainder = divmod(number, len(_ID_ALPHABET))
        characters.append(_ID_ALPHABET[remainder])
    return "".join(characters)
