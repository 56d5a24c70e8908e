"""Requests whose bytes are not a valid message: refused with INVALID_ARGUMENT naming the field, on every role's
server.

Left to grpc, a parse failure ends the call UNKNOWN with the parser's class name, and grpc logs a traceback at
error level, for what is the caller's mistake. `ParseErrorInterceptor` wraps each method's request deserializer:
a request that does not parse becomes an `Unparsable` (never raised inside grpc), which the wrapped behaviour ends
with INVALID_ARGUMENT, logged at warning. The message names the field when the walk over the wire format finds it
(the first string holding invalid UTF-8, e.g. `messages[0].content[0].text`), else the message type.
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from shared.errors import InvalidRequest
from shared.handlers import Refuse, around_call

log = logging.getLogger(__name__)

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_MAX_DEPTH = 100   # protobuf's own recursion limit


class _Malformed(Exception):
    """The bytes end inside a field, or hold a wire type that cannot be read."""


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise _Malformed()
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7


def bad_utf8_field(descriptor: Descriptor, data: bytes, path: str = "", depth: int = 0) -> str | None:
    """The path of the first string field of `data` (a message of type `descriptor`) whose value is not valid
    UTF-8, e.g. "messages[0].content[0].text"; None when there is none (or the bytes are malformed before one)."""
    try:
        return _walk(descriptor, data, path, depth)
    except _Malformed:
        return None


def _walk(descriptor: Descriptor, data: bytes, path: str, depth: int) -> str | None:
    if depth > _MAX_DEPTH:
        raise _Malformed()
    counts: dict[int, int] = {}   # occurrences of each repeated field so far: its index in the path
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, position = _varint(data, position)
            continue
        if wire_type in (_FIXED64, _FIXED32):
            position += 8 if wire_type == _FIXED64 else 4
            if position > len(data):
                raise _Malformed()
            continue
        if wire_type != _LENGTH_DELIMITED:
            raise _Malformed()   # groups: no field of ours is one
        length, position = _varint(data, position)
        value, position = data[position:position + length], position + length
        if position > len(data):
            raise _Malformed()
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue   # unknown fields are kept as bytes by the parser, never decoded as text
        name = f"{path}.{field.name}" if path else field.name
        if field.is_repeated:
            index = counts.get(number, 0)
            counts[number] = index + 1
            if field.message_type is None or not field.message_type.GetOptions().map_entry:
                name = f"{name}[{index}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            found = _walk(field.message_type, value, name, depth + 1)
            if found is not None:
                return found
    return None


class Unparsable:
    """What the wrapped deserializer gives for bytes that do not parse: the error to end the call with."""

    def __init__(self, error: InvalidRequest) -> None:
        self.error = error


def parse_error(descriptor: Descriptor | None, data: bytes) -> InvalidRequest:
    name = descriptor.full_name if descriptor is not None else "request"
    field = bad_utf8_field(descriptor, data) if descriptor is not None else None
    if field is not None:
        return InvalidRequest(field, "not valid UTF-8")
    return InvalidRequest("request", f"not a valid {name} message (malformed or truncated bytes)")


def _parsing(deserializer):
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)

    def parse(data: bytes):
        try:
            return deserializer(data)
        except DecodeError:
            return Unparsable(parse_error(descriptor, data))
    return parse


class ParseErrorInterceptor(grpc.aio.ServerInterceptor):
    """Ends a call whose request does not parse with INVALID_ARGUMENT. Only methods that take one request are
    wrapped: every API of ours does; the request streams (reflection's) keep grpc's own handling."""

    def __init__(self, refuse: Refuse) -> None:
        self._refuse = refuse   # (context, error, rpc): ends the call with the error's status (grpc_server.py)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        rpc = handler_call_details.method.rsplit("/", 1)[-1]

        async def checked(serve, request, context):
            if isinstance(request, Unparsable):
                log.warning("refused %s: %s", rpc, request.error.message)
                return await self._refuse(context, request.error, rpc)
            return await serve()
        return around_call(handler, checked, _parsing(handler.request_deserializer))
