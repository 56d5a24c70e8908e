"""The HTTP API's routes (FastAPI) over the gateway's ChatService: `POST /v1/chat/completions`, `GET /v1/models`,
`POST /tokenize`, `GET /health`.

A chat's answer (`ChatAnswer`) is one JSON object or, with `stream`, server-sent events. Its status waits for the
chat's first delta, so that everything that fails before the first token (validation, images, the context, an
overload) gets its own HTTP status and error body; what fails later is an SSE event `data: {"error": ...}` that
ends the stream.

A client that leaves ends its chat at once, whatever the answer is doing then. Starlette stops a streaming response
whose client left by cancelling it (ASGI 2.3, as uvicorn speaks it), which closes the chat's async generator only
if the cancel lands inside it; one that lands while a chunk is being sent leaves the generator suspended, holding
its decoder slot until it is garbage-collected. So the answer watches for the disconnect itself, stops its
writer, and closes the chat's generator on every way out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from services.gateway.chat import ChatDelta, ChatService
from services.gateway.http.convert import Params, chat_from_json, messages_from_json
from services.gateway.http.errors import HttpError, from_service_error, from_validation
from services.gateway.http.render import Rendering, TokenPieces
from services.gateway.http.schema import ChatCompletionRequest, Message, TokenizeRequest, unsupported_fields
from services.gateway.request import ChatInput, ImageSource
from shared.errors import InvalidRequest, ServiceError
from shared.logs import request_id_var

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[\w.:-]{1,128}$")   # a caller's id is echoed in headers and logs: keep it plain


def _json(value) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def request_id_of(request: Request, body_request_id: str | None = None) -> str:
    """The caller's id (vLLM's `request_id` field, else the x-request-id header) when it is plain, else a new one."""
    for candidate in (body_request_id, request.headers.get(REQUEST_ID_HEADER)):
        if candidate and _REQUEST_ID.match(candidate):
            return candidate
    return uuid.uuid4().hex


def image_fields(chat: ChatInput) -> dict[str, str]:
    """sha256 -> the field of the image part that referenced it by hash."""
    return {part.sha256: part.field for message in chat.messages for part in message.parts
            if isinstance(part, ImageSource) and part.sha256 is not None}


class ChatAnswer(Response):
    """The answer to one chat completion; it runs the chat itself (see the module's docstring)."""

    def __init__(self, deltas: AsyncIterator[ChatDelta], rendering: Rendering, *, is_stream: bool,
                 error_of: Callable[[Exception], HttpError], request_id: str) -> None:
        self.deltas = deltas
        self.rendering = rendering
        self.is_stream = is_stream
        self.error_of = error_of
        self.status_code = 200
        self.background = None
        self._headers = [(REQUEST_ID_HEADER.encode(), request_id.encode())]

    async def __call__(self, scope, receive, send) -> None:
        writing = asyncio.create_task(self._answer(send))
        leaving = asyncio.create_task(_client_gone(receive))
        try:
            await asyncio.wait((writing, leaving), return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            writing.cancel()   # when the client left; nothing when the answer is complete
            await asyncio.wait((writing, leaving))
            await self.deltas.aclose()   # the chat ends here however the answer did: its decoder slot is freed
        if not writing.cancelled() and writing.exception() is not None:
            raise writing.exception()
        if self.background is not None:
            await self.background()

    async def _send_json(self, send, status: int, value, headers=()) -> None:
        body = _json(value)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            *self._headers, *headers]})
        await send({"type": "http.response.body", "body": body})

    async def _send_error(self, send, error: Exception) -> None:
        failure = self.error_of(error)
        await self._send_json(send, failure.status, failure.body())

    async def _answer(self, send) -> None:
        rendering = self.rendering
        try:
            if not self.is_stream:
                async for delta in self.deltas:
                    rendering.add(delta)
                if rendering.failure is not None:
                    raise rendering.failure_error()
                return await self._send_json(send, 200, rendering.completion())
            first = await anext(self.deltas)
        except Exception as error:  # noqa: BLE001 - every failure before the answer started has its status
            return await self._send_error(send, error)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), *self._headers]})

        async def event(data: bytes) -> None:
            await send({"type": "http.response.body", "body": b"data: " + data + b"\n\n", "more_body": True})

        try:
            delta: ChatDelta | None = first
            while delta is not None:
                chunk = rendering.chunk(delta)
                if chunk is not None:
                    await event(_json(chunk))
                delta = await anext(self.deltas, None)
            if rendering.failure is not None:
                raise rendering.failure_error()
            if rendering.is_usage_in_chunks:
                await event(_json(rendering.usage_chunk()))
            await event(b"[DONE]")
        except Exception as error:  # noqa: BLE001 - after the status was sent, an error is the stream's last event
            await event(_json(self.error_of(error).body()))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _client_gone(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(service: ChatService, is_ready: Callable[[], Awaitable[bool]]) -> FastAPI:
    """The API over `service`; `is_ready()` says whether the gateway is ready (its gRPC readiness)."""
    app = FastAPI(title="pixtral-serve", openapi_url=None, docs_url=None, redoc_url=None)
    pieces = TokenPieces(service.route.builder.tokenizer)
    started = int(time.time())

    def fail(error: Exception, params: Params | None = None, chat: ChatInput | None = None) -> HttpError:
        if isinstance(error, HttpError):
            return error
        if isinstance(error, ServiceError):
            return from_service_error(error, params, image_fields(chat) if chat is not None else None)
        log.error("unexpected error answering %s", request_id_var.get(), exc_info=error)
        return HttpError(500, "internal error", code="internal")

    def error_response(request: Request, error: HttpError) -> JSONResponse:
        # Refused before a route named the request (its body did not validate): the caller's id or a new one.
        request_id = request_id_var.get() or request_id_of(request)
        return JSONResponse(error.body(), status_code=error.status, headers={REQUEST_ID_HEADER: request_id})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(request, from_validation(error.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(request, HttpError(error.status_code, str(error.detail), code="not_found"
                                                 if error.status_code == 404 else None))

    @app.exception_handler(HttpError)
    async def _refused(request: Request, error: HttpError) -> JSONResponse:
        return error_response(request, error)

    @app.exception_handler(ServiceError)
    async def _service(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(request, fail(error))

    def check_model(model: str | None) -> None:
        if model is not None and model != service.model_name:
            raise HttpError(404, f"model: the model {model!r} is not served here; this gateway serves "
                                 f"{service.model_name!r}", "model", "model_not_found")

    def model_card() -> dict:
        name = service.model_name
        return {"id": name, "object": "model", "created": started, "owned_by": "pixtral-serve", "root": name,
                "parent": None, "max_model_len": service.route.context_length}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        request_id = request_id_of(request, body.request_id)
        request_id_var.set(request_id)
        check_model(body.model)
        for name, why in unsupported_fields(body.model_extra):
            raise InvalidRequest(name, why)
        chat, params = chat_from_json(body, request_id)
        rendering = Rendering(request_id, service.model_name, pieces, is_logprobs=bool(body.logprobs),
                              is_token_ids=body.return_token_ids,
                              is_usage_in_chunks=bool(body.stream_options and body.stream_options.include_usage))
        return ChatAnswer(service.chat(chat, None), rendering, is_stream=body.stream, request_id=request_id,
                          error_of=lambda error: fail(error, params, chat))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
        request_id = request_id_of(request)
        request_id_var.set(request_id)
        check_model(body.model)
        if (body.messages is None) == (body.prompt is None):
            raise HttpError(400, "messages: give messages or prompt, one of them", "messages", "invalid_argument")
        messages = body.messages if body.messages is not None else [Message(role="user", content=body.prompt)]
        chat = ChatInput(request_id=request_id, messages=messages_from_json(messages))
        try:
            prompt = await service.route.prompt(chat)
        except ServiceError as error:
            raise fail(error, Params(), chat) from None
        return JSONResponse({
            "tokens": prompt.token_ids, "count": len(prompt.token_ids),
            "max_model_len": service.route.context_length,
            "images": [{"sha256": image.sha256, "width": image.width, "height": image.height,
                        "grid_width": image.grid_width, "grid_height": image.grid_height,
                        "num_tokens": image.num_tokens} for image in prompt.images]},
            headers={REQUEST_ID_HEADER: request_id})

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if await is_ready() else 503)

    return app
