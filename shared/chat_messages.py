"""Chat messages in a plain domain form -> mistral-common's request, for Pixtral's tokenizer (v3).

The form follows OpenAI's chat messages: system, user (text and images), assistant (text and/or tool calls, or
the start of an answer to continue), tool (a result for a call id). Images stay opaque: the caller turns each
non-text part into a mistral-common content chunk (the gateway's carry only the image's size).

What v3 cannot hold: an assistant message with both text and tool calls keeps its tool calls only (the next
turn depends on them; v3 writes an assistant turn as one or the other). Text parts of one message are joined
by mistral-common itself, with a blank line, as it joins OpenAI's content lists.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mistral_common.protocol.instruct.chunk import TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall
from mistral_common.protocol.instruct.tool_calls import ToolCall as MistralToolCall

from shared.tool_calls import ChatFormatError, ToolCall, ToolSetup, prompt_tool_call_id

ROLES = ("system", "user", "assistant", "tool")
ImageChunker = Callable[[Any], Any]  # an image part -> a mistral-common ImageChunk or ImageURLChunk


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str                               # system, user, assistant or tool
    content: tuple[Any, ...] = ()           # str parts; a user's may hold images: anything that is not a str
    tool_calls: tuple[ToolCall, ...] = ()   # assistant
    tool_call_id: str | None = None         # tool: the call this is the result of
    is_prefix: bool = False                 # assistant, last message: the answer goes on from this text


def mistral_messages(turns: Sequence[ChatTurn], image_chunk: ImageChunker | None = None) -> list:
    """The messages as mistral-common takes them; raises ChatFormatError naming `messages[i]`."""
    messages = []
    for index, turn in enumerate(turns):
        where = f"messages[{index}]"
        if turn.role not in ROLES:
            raise ChatFormatError(f"{where}.role", f"must be one of {', '.join(ROLES)}, not {turn.role!r}")
        if turn.role != "user":
            for part_index, part in enumerate(turn.content):
                if not isinstance(part, str):
                    raise ChatFormatError(f"{where}.content[{part_index}]", "only user messages may hold images")
        if turn.tool_calls and turn.role != "assistant":
            raise ChatFormatError(f"{where}.tool_calls", "only assistant messages make tool calls")
        if turn.is_prefix and (turn.role != "assistant" or index != len(turns) - 1):
            raise ChatFormatError(f"{where}.prefix", "only the last message, an assistant one, can be continued")
        texts = [TextChunk(text=part) for part in turn.content if isinstance(part, str) and part]
        if turn.role == "system":
            messages.append(SystemMessage(content=texts))
        elif turn.role == "user":
            messages.append(UserMessage(content=_user_content(turn.content, image_chunk, where)))
        elif turn.role == "tool":
            if not turn.tool_call_id:
                raise ChatFormatError(f"{where}.tool_call_id", "a tool message answers a call id")
            messages.append(ToolMessage(content=texts, tool_call_id=prompt_tool_call_id(turn.tool_call_id)))
        else:
            messages.append(_assistant_message(turn, texts, where))
    return messages


def _user_content(parts: Sequence[Any], image_chunk: ImageChunker | None, where: str) -> list:
    content = []
    for part_index, part in enumerate(parts):
        if isinstance(part, str):
            if part:
                content.append(TextChunk(text=part))
        elif image_chunk is None:
            raise ChatFormatError(f"{where}.content[{part_index}]", "images are not accepted here")
        else:
            content.append(image_chunk(part))
    return content


def _assistant_message(turn: ChatTurn, texts: list[TextChunk], where: str) -> AssistantMessage:
    if turn.tool_calls:
        if turn.is_prefix:
            raise ChatFormatError(f"{where}.prefix", "an answer to continue is text, not tool calls")
        calls = []
        for call_index, call in enumerate(turn.tool_calls):
            if not isinstance(call.arguments, dict):
                raise ChatFormatError(f"{where}.tool_calls[{call_index}].arguments", "must be a JSON object")
            calls.append(MistralToolCall(id=prompt_tool_call_id(call.id), function=FunctionCall(
                name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False))))
        return AssistantMessage(content=None, tool_calls=calls)
    if not any(chunk.text.strip() for chunk in texts):
        raise ChatFormatError(f"{where}.content", "an assistant message needs text or tool calls")
    return AssistantMessage(content=texts, prefix=turn.is_prefix)


def chat_request(turns: Sequence[ChatTurn], tools: ToolSetup | None = None,
                 image_chunk: ImageChunker | None = None) -> ChatCompletionRequest:
    """The request to hand `MistralTokenizer.encode_chat_completion`."""
    if tools is None or not tools.tools:
        return ChatCompletionRequest(messages=mistral_messages(turns, image_chunk))
    return ChatCompletionRequest(messages=mistral_messages(turns, image_chunk), tools=list(tools.tools),
                                 tool_choice=tools.tool_choice)
