"""What every HTTP call goes through before the app reads it (an ASGI middleware), in this order:

1. the drain: once the gateway drains, new calls are refused with 503 (health answers 503 too, from the app);
2. the bearer token, as on gRPC (shared/auth.py): `Authorization: Bearer <token>`, the scheme in any case, exactly
   one such header, compared in constant time; refused with 401 before the body is read. `/health` is open, for
   probes that cannot send headers;
3. the size: headers of at most 64 KiB, as gRPC bounds a call's metadata (431 above; the HTTP parser refuses
   larger ones that arrive in pieces with 400), and a body of at most the gateway's --max-message-bytes, as gRPC
   allows, refused with 413 before anything of it is parsed (from Content-Length when it is given, else once that
   many bytes have arrived);
4. the call is counted (pixtral_http_requests_total by route and status; 499 when the client left before the
   answer ended, as nginx has it) and logged in one line, and counted in flight for the drain to wait for.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable

from prometheus_client import Counter

from services.gateway.http.errors import HttpError
from shared.auth import canonical
from shared.in_flight import InFlight

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("pixtral_http_requests_total", "HTTP calls served, by route and final status code",
                        ["route", "status"])
OPEN_PATHS = ("/health",)
ROUTES = ("/v1/chat/completions", "/v1/models", "/tokenize", "/health")
CLIENT_LEFT = 499
MAX_HEADER_BYTES = 64 * 1024


def route_of(path: str) -> str:
    """The metric label of a path: one of ours, or "other" (a path from a caller must not become a label)."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def _header(scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers", ()) if key == name]


async def send_error(send, error: HttpError, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, *, auth_token: str, max_body_bytes: int, is_draining: Callable[[], bool]) -> None:
        self.app = app
        self._expected = f"Bearer {auth_token}".encode() if auth_token else None
        self.max_body_bytes = max_body_bytes
        self.is_draining = is_draining
        self.in_flight = InFlight()

    @property
    def num_in_flight(self) -> int:
        return self.in_flight.count

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight, False if some still are after `timeout_s`."""
        return await self.in_flight.wait_idle(timeout_s)

    def is_authorized(self, scope) -> bool:
        if self._expected is None or scope["path"] in OPEN_PATHS:
            return True
        presented = _header(scope, b"authorization")
        if len(presented) != 1:
            return False   # none, or several: refuse rather than guess which one a proxy meant
        value = canonical(presented[0])
        return value is not None and hmac.compare_digest(value, self._expected)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        route, answer = route_of(scope["path"]), {"status": None, "is_complete": False, "request_id": ""}

        async def counted_send(message) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["request_id"] = next((value.decode() for key, value in message.get("headers", ())
                                             if key == b"x-request-id"), "")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                answer["is_complete"] = True
            await send(message)

        try:
            with self.in_flight:
                await self._guarded(scope, receive, counted_send)
        finally:
            status = answer["status"] if answer["is_complete"] else CLIENT_LEFT
            HTTP_REQUESTS.labels(route, str(status)).inc()
            log.info("%s %s %s in %.3f s", scope["method"], route, status, time.monotonic() - started,
                     extra={"request_id": answer["request_id"]})

    async def _guarded(self, scope, receive, send) -> None:
        if self.is_draining() and scope["path"] not in OPEN_PATHS:
            return await send_error(send, HttpError(503, "server is shutting down; retry on another instance",
                                                    code="unavailable"), ((b"connection", b"close"),))
        if not self.is_authorized(scope):
            return await send_error(send, HttpError(
                401, "missing or invalid bearer token (header 'Authorization: Bearer <token>')",
                code="unauthenticated"), ((b"www-authenticate", b"Bearer"),))
        header_bytes = sum(len(key) + len(value) for key, value in scope.get("headers", ()))
        if header_bytes > MAX_HEADER_BYTES:
            return await send_error(send, HttpError(
                431, f"headers of {header_bytes} bytes, over the limit of {MAX_HEADER_BYTES} bytes",
                code="headers_too_large"), ((b"connection", b"close"),))
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared and declared[0].isdigit() and int(declared[0]) > self.max_body_bytes:
            return await send_error(send, self._too_large(int(declared[0])), ((b"connection", b"close"),))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await send_error(send, self._too_large(), ((b"connection", b"close"),))
            if not message.get("more_body", False):
                break
        is_replayed = False

        async def replay():
            nonlocal is_replayed
            if not is_replayed:   # the body, read already, once; then the client's later messages (a disconnect)
                is_replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int | None = None) -> HttpError:
        what = f"the body of {size} bytes is" if size is not None else "the body is"
        return HttpError(413, f"{what} larger than the limit of {self.max_body_bytes} bytes (--max-message-bytes)",
                         code="request_too_large")
