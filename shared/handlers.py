"""gRPC method handlers rebuilt around another behaviour: what the auth and drain interceptors return."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import grpc

from shared.errors import ServiceError
from shared.streams import write_all

_KINDS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}

Refuse = Callable[[grpc.aio.ServicerContext, ServiceError, str], Awaitable[None]]


def behaviour_of(handler: grpc.RpcMethodHandler) -> Callable:
    _, name = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return getattr(handler, name)


def with_behaviour(handler: grpc.RpcMethodHandler, behaviour: Callable,
                   request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serializers as `handler` (or `request_deserializer`) that runs
    `behaviour` instead."""
    make, _ = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, request_deserializer=request_deserializer or handler.request_deserializer,
                response_serializer=handler.response_serializer)


def around_call(handler: grpc.RpcMethodHandler, run: Callable[..., Awaitable],
                request_deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` whose calls go through `run(serve, request, context)`: `serve()`
    answers the call as `handler` would (a response stream written to the context), whatever the method's kind, so
    an interceptor wraps every method alike."""
    behaviour = behaviour_of(handler)
    if inspect.isasyncgenfunction(behaviour):
        async def streamed(request, context):
            await run(lambda: write_all(behaviour(request, context), context), request, context)
        return with_behaviour(handler, streamed, request_deserializer)

    async def unary(request, context):
        return await run(lambda: behaviour(request, context), request, context)
    return with_behaviour(handler, unary, request_deserializer)


def refusing_handler(refuse: Refuse, error: ServiceError, rpc: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `error` before reading its request.

    It takes the request as a stream it never reads, whatever the method's kind (the wire format is the same), so a
    refused caller costs no memory in proportion to what it sends: neither the message (up to the server's size
    limit) nor its parse."""
    async def behaviour(requests, context):
        await refuse(context, error, rpc)

    return grpc.stream_stream_rpc_method_handler(behaviour)
