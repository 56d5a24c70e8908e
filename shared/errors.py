"""Domain errors. Code below the transport raises these; shared/grpc_server.py maps them to gRPC status codes.

Messages name the offending field (e.g. "messages[0].content[2].image: ...") and never carry tracebacks,
file paths or memory addresses: they are shown to callers as they are.
"""


class ServiceError(Exception):
    """Base class; `status` is the name of the grpc.StatusCode the error maps to."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    status = "INVALID_ARGUMENT"


class ImageNotCached(ServiceError):
    """An image referenced by hash (or needed by a decoder) has no valid embedding in the cache."""

    status = "FAILED_PRECONDITION"

    def __init__(self, message: str, sha256: str) -> None:
        super().__init__(message)
        self.sha256 = sha256


class Overloaded(ServiceError):
    status = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """A dependency (Redis, a decoder, the engine) cannot serve now; the caller may retry."""

    status = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    status = "DEADLINE_EXCEEDED"


class EncodeFailed(ServiceError):
    """The vision pool gave up on an image (it failed on every delivery)."""

    status = "INTERNAL"


class Cancelled(ServiceError):
    status = "CANCELLED"


class Unauthenticated(ServiceError):
    """A call without the bearer token the server was configured with (or with another one)."""

    status = "UNAUTHENTICATED"
