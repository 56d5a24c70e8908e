"""The model's tool calls read back from its output as it streams: after [TOOL_CALLS] (id 9), a JSON list of
`{"name", "arguments"}` (tool_calls.py says how Pixtral's tokenizer encodes them), each call given an id."""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from shared.structured_output import TOOL_CALLS_ID
from shared.tool_calls import ToolCall, generate_tool_call_id


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """What one feed adds: text of the answer, and the calls completed by it. `unparsed` (from `finish` only)
    is the model's text after [TOOL_CALLS] that did not make complete calls: output cut by max_tokens, or
    malformed; it is neither content nor calls, and is for the caller to report."""

    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    unparsed: str = ""


@dataclass(slots=True)
class _CallsScanner:
    """Finds complete calls in the text after [TOOL_CALLS]: `[{...}, {...}]` (or one bare object), each object
    delimited by tracking strings and braces, then parsed by json. Each character is scanned once."""

    text: str = ""
    position: int = 0         # next character to scan
    consumed: int = 0         # the text before it is complete calls, separators and whitespace
    expect: str = "open"      # open, item, item_or_close, object, sep, done, broken
    is_single: bool = False   # one bare object rather than a list
    depth: int = 0
    in_string: bool = False
    is_escaped: bool = False
    items: list[tuple[int, Any]] = field(default_factory=list)  # (where the object starts, its value)

    def scan(self) -> None:
        text = self.text
        while self.position < len(text) and self.expect not in ("done", "broken"):
            char = text[self.position]
            if self.expect == "object":
                self._scan_object_char(char)
            elif char.isspace():
                pass
            elif char == "{" and self.expect in ("open", "item", "item_or_close"):
                self.is_single = self.expect == "open"
                self.consumed, self.depth, self.expect = self.position, 1, "object"
            elif char == "[" and self.expect == "open":
                self.expect = "item_or_close"
            elif char == "]" and self.expect in ("item_or_close", "sep"):
                self.expect = "done"
            elif char == "," and self.expect == "sep":
                self.expect = "item"
            else:
                self.consumed, self.expect = self.position, "broken"
                return
            self.position += 1
            if self.expect not in ("open", "object", "broken"):
                self.consumed = self.position

    def _scan_object_char(self, char: str) -> None:
        if self.in_string:
            if self.is_escaped:
                self.is_escaped = False
            elif char == "\\":
                self.is_escaped = True
            elif char == '"':
                self.in_string = False
        elif char == '"':
            self.in_string = True
        elif char == "{":
            self.depth += 1
        elif char == "}":
            self.depth -= 1
            if self.depth == 0:
                try:
                    self.items.append((self.consumed, json.loads(self.text[self.consumed:self.position + 1])))
                except json.JSONDecodeError:
                    self.expect = "broken"
                    return
                self.expect = "done" if self.is_single else "sep"

    def leftover(self) -> str:
        """The text that made no call: after the list when it is closed, else from the first incomplete or
        malformed part on."""
        return self.text[self.position if self.expect == "done" else self.consumed:].strip()


class ToolCallParser:
    """The model's output, fed as token ids as they come, split into content and tool calls: the text before
    [TOOL_CALLS] is content; after it, each call is yielded once its object is complete, with a generated id.
    Never raises on what the model wrote."""

    def __init__(self, tokenizer: MistralTokenizer, new_call_id: Callable[[], str] = generate_tool_call_id) -> None:
        self._raw = tokenizer.instruct_tokenizer.tokenizer
        self._new_call_id = new_call_id
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner: _CallsScanner | None = None  # set once [TOOL_CALLS] is seen
        self._num_taken = 0                          # of the scanner's items
        self._unparsed: list[str] = []

    def feed(self, token_ids: Sequence[int]) -> ToolCallDelta:
        content: list[str] = []
        calls: list[ToolCall] = []
        for token_id in token_ids:
            if token_id == TOOL_CALLS_ID:
                self._start_calls(content, calls)
                continue
            text = self._decoder.decode(self._raw.id_to_byte_piece(token_id, SpecialTokenPolicy.IGNORE))
            if self._scanner is None:
                content.append(text)
            else:
                self._scanner.text += text
        if self._scanner is not None:
            self._take_calls(calls)
        return ToolCallDelta("".join(content), tuple(calls))

    def finish(self) -> ToolCallDelta:
        """At the end of the output: the rest of the content, and what after [TOOL_CALLS] made no call."""
        rest = self._decoder.decode(b"", final=True)
        if self._scanner is None:
            return ToolCallDelta(rest)
        self._scanner.text += rest
        calls: list[ToolCall] = []
        self._end_calls(calls)
        self._scanner = _CallsScanner(expect="done")
        unparsed, self._unparsed = "\n".join(self._unparsed), []
        return ToolCallDelta("", tuple(calls), unparsed)

    def _start_calls(self, content: list[str], calls: list[ToolCall]) -> None:
        if self._scanner is None:
            content.append(self._decoder.decode(b"", final=True))
        else:
            self._scanner.text += self._decoder.decode(b"", final=True)
            self._take_calls(calls)
            if self._scanner.expect != "done":
                return  # inside a list: the token adds no text
            self._end_calls(calls)  # the list is closed: a second one starts
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._scanner = _CallsScanner()
        self._num_taken = 0

    def _end_calls(self, calls: list[ToolCall]) -> None:
        self._take_calls(calls)
        leftover = self._scanner.leftover()
        if leftover:
            self._unparsed.append(leftover)

    def _take_calls(self, calls: list[ToolCall]) -> None:
        scanner = self._scanner
        scanner.scan()
        for start, item in scanner.items[self._num_taken:]:
            call = self._to_call(item)
            if call is None:
                scanner.consumed, scanner.expect = start, "broken"
                del scanner.items[self._num_taken:]
                return
            calls.append(call)
            self._num_taken += 1

    def _to_call(self, item: Any) -> ToolCall | None:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return None
        arguments = item.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(self._new_call_id(), item["name"], arguments)
