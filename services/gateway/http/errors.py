"""Errors of the HTTP API in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status
that fits the domain error (its gRPC status code, shared/rpc_errors.py, mapped as google.rpc.Code documents it).

An image referenced by a hash that is not cached (FAILED_PRECONDITION on gRPC) is a 400 with code
`image_not_cached`, not a 404: the route exists and the fix is in the request (send the image's bytes instead of its
hash), so it is the request that is wrong, as google.rpc.Code maps FAILED_PRECONDITION; a 404 would tell OpenAI's
clients that the model or the endpoint is missing (their NotFoundError) and invites caches to remember the miss.
`param` is the image part's JSON path, as for every error about one field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from services.gateway.http.convert import Params
from shared.errors import ImageNotCached, InvalidRequest, ServiceError

STATUSES = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "UNAUTHENTICATED": 401, "DEADLINE_EXCEEDED": 408,
            "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "INTERNAL": 500}
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
         431: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "service_unavailable_error"}
IMAGE_NOT_CACHED = "image_not_cached"
# Names pydantic puts in an error's location for the member of a union it tried: not part of the JSON path.
_UNION_MEMBERS = {"str", "int", "float", "bool", "dict", "list", "none"}


class HttpError(Exception):
    """An error as the HTTP API answers it; raised by the routes for what only HTTP has (an unknown model)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def from_service_error(error: ServiceError, params: Params | None = None,
                       image_fields: Mapping[str, str] | None = None) -> HttpError:
    """`params`: the JSON names the request used, to map a domain error's field (None: the field is a JSON path
    already); `image_fields`: sha256 -> the field of the image part that referenced it, to name the part of an image
    that is not cached."""
    status = STATUSES.get(error.status, 500)
    code = error.status.lower()
    if isinstance(error, InvalidRequest):
        param = params.param(error.field) if params is not None else error.field or None
        return HttpError(status, f"{param}: {error.problem}" if param else error.problem, param, code)
    if isinstance(error, ImageNotCached):
        field = (image_fields or {}).get(error.sha256)
        if field is None:
            return HttpError(status, error.message, None, IMAGE_NOT_CACHED)
        return HttpError(status, f"{field}.url: image {error.sha256} is not cached; send its bytes", f"{field}.url",
                         IMAGE_NOT_CACHED)
    if status == 500:
        return HttpError(500, error.message or "internal error", None, "internal")
    return HttpError(status, error.message, None, code)


def json_path(location: Sequence[int | str]) -> str | None:
    """A pydantic error location -> the JSON path of the request body ("messages[0].content[1].image_url")."""
    path = ""
    for item in location:
        if isinstance(item, int):
            path += f"[{item}]"
        elif "[" in item or item in _UNION_MEMBERS:
            continue
        else:
            path += f".{item}" if path else item
    return path or None


def from_validation(errors: Sequence[Mapping[str, Any]]) -> HttpError:
    """The most specific of pydantic's errors (the deepest location: the union member that came closest)."""
    def location(error: Mapping[str, Any]) -> list:
        loc = list(error.get("loc", ()))
        return loc[1:] if loc[:1] == ["body"] else loc

    error = max(errors, key=lambda error: len([i for i in location(error) if isinstance(i, int)
                                               or ("[" not in i and i not in _UNION_MEMBERS)]), default={})
    kind = error.get("type", "")
    if not location(error) and isinstance(error.get("input"), (bytes, str)):
        return HttpError(400, "the body must be a JSON object (is its Content-Type application/json?)", None,
                         "invalid_json")
    if kind == "json_invalid":
        return HttpError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', 'malformed')}",
                         None, "invalid_json")
    param = json_path(location(error))
    problem = {"missing": "is required", "extra_forbidden": "is not supported"}.get(kind, error.get("msg", "invalid"))
    return HttpError(400, f"{param}: {problem}" if param else f"the body: {problem}", param, "invalid_argument")
