"""Limits and checks on a response format's text before xgrammar compiles it, and the library's messages made
fit for a caller."""

from __future__ import annotations

import json
import re

MAX_REPEAT = 10_000            # largest count in a repetition ({m,n}) or a length/size keyword of a schema

_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")
_SIZE_KEYWORDS = ("maxLength", "minLength", "maxItems", "minItems", "maxProperties", "minProperties")
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: .*? is false: )?")


class FormatError(ValueError):
    """A response format that cannot be compiled (or is over the limits); the message says why."""


def check_schema(text: str, kind: str) -> None:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(f"{kind}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") \
            from None
    if not isinstance(schema, (dict, bool)):
        raise FormatError(f"{kind}: a JSON schema is an object (or true/false), not {type(schema).__name__}")
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _SIZE_KEYWORDS and isinstance(value, (int, float)) and value > MAX_REPEAT:
                    raise FormatError(f"{kind}: {key} {value} is over the limit of {MAX_REPEAT}")
                if key == "pattern" and isinstance(value, str):
                    check_repeats(value, kind)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def check_repeats(text: str, kind: str) -> None:
    """Counts in {m,n} repetitions bound how much xgrammar builds (and how long it takes): {1,1000} nested in
    {1,1000} already takes seconds. A literal brace in a quoted string may be counted too, erring on refusal."""
    for match in _REPEAT.finditer(text):
        for count in match.groups():
            if count and int(count) > MAX_REPEAT:
                raise FormatError(f"{kind}: repetition count {count} is over the limit of {MAX_REPEAT}")


def library_message(error: Exception) -> str:
    """xgrammar's message without its log prefix (time, source file and line) nor an echo of the input."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = _LOG_PREFIX.sub("", lines[0]) if lines else type(error).__name__
    text = text.split(" The JSON string is:", 1)[0]
    return text[:300]
