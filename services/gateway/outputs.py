"""What a chat's completions must be: the request's tools (written into the prompt, their calls parsed from the
output) and the output's format (compiled here to refuse one that cannot be, before any work; the decoder compiles
it again and masks every token by it), and the seed of each completion."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass

from services.gateway.request import ChatInput, ToolInput
from shared.errors import InvalidRequest
from shared.structured_output import FormatCompiler, FormatError, ResponseFormat
from shared.tool_calls import ChatFormatError, ToolSetup, setup_tools

# The paths of the tools' fields as OpenAI's JSON names them -> as the request names them.
_TOOL_FIELDS = [(re.compile(r"^(tools\[\d+\])\.function\.(name|description|parameters)"), r"\1.\2"),
                (re.compile(r"^(tools\[\d+\])\.(function|type)$"), r"\1"),
                (re.compile(r"^tool_choice\.function\.name$"), "tool_choice.function")]


@dataclass(frozen=True, slots=True)
class Output:
    """What a chat's completions must be, and how they are read."""

    tools: ToolSetup | None           # the request's tools (listed in the prompt) and tool choice
    format: ResponseFormat | None     # the format the decoder constrains the output to

    @property
    def parses_tool_calls(self) -> bool:
        return self.tools is not None and self.tools.parses_tool_calls


async def resolve_output(chat: ChatInput, formats: FormatCompiler) -> Output:
    """The request's tools and output format, checked and the format compiled (once per text, cached)."""
    tools = None
    if chat.tools or chat.tool_choice is not None:
        choice = ({"type": "function", "function": {"name": chat.tool_choice}} if chat.tool_choice_is_function
                  else chat.tool_choice)
        try:
            tools = setup_tools([_openai_tool(tool) for tool in chat.tools], choice,
                                parallel_tool_calls=chat.parallel_tool_calls is not False)
        except ChatFormatError as error:
            raise InvalidRequest(_request_path(error.field), error.problem) from None
    requested = None
    if chat.response_format is not None:
        try:
            requested = ResponseFormat(chat.response_format.kind, chat.response_format.spec)
        except FormatError as error:
            raise InvalidRequest("response_format", str(error)) from None
    try:
        fmt = tools.output_format(requested) if tools is not None else requested
    except ChatFormatError as error:
        raise InvalidRequest(_request_path(error.field), error.problem) from None
    if fmt is not None:
        try:
            await asyncio.to_thread(formats.compile, fmt)
        except FormatError as error:
            raise InvalidRequest("tools" if fmt.kind == "tool_calls" else "response_format", str(error)) from None
    return Output(tools, fmt)


def choice_seeds(seed: int, num_choices: int) -> tuple[int, ...]:
    """The seed of each completion: the request's, then one more each (a completion sampled again alone with its
    seed gives the same tokens)."""
    return tuple((seed + index) % (1 << 64) for index in range(num_choices)) if num_choices > 1 else ()


def _openai_tool(tool: ToolInput) -> dict:
    """A request's tool as OpenAI writes it (shared/tool_calls.py reads that form)."""
    try:
        parameters = json.loads(tool.parameters) if tool.parameters.strip() else {"type": "object", "properties": {}}
    except ValueError:
        raise InvalidRequest(f"{tool.field}.parameters", "must be a JSON schema (an object), as JSON text") from None
    return {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                             "parameters": parameters}}


def _request_path(field: str) -> str:
    for pattern, replacement in _TOOL_FIELDS:
        field = pattern.sub(replacement, field)
    return field
