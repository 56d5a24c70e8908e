"""Domain errors. Code below the transport raises these; shared/grpc_server.py maps them to gRPC status codes and
rich error details (google.rpc), and clients of our own servers map them back (services/gateway/decoders.py).

Messages name the offending field (e.g. "messages[0].content[2].image: ...") and never carry tracebacks,
file paths or memory addresses: they are shown to callers as they are. Data a caller may act on (the field, the
hash of an image that is not cached) travels beside the message, never parsed back out of it.
"""


class ServiceError(Exception):
    """Base class; `status` is the name of the grpc.StatusCode the error maps to."""

    status = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(ServiceError):
    """A field of the request is wrong: `field` names it (a path such as "sampling.top_p"), `problem` says how."""

    status = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


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


class Unauthenticated(ServiceError):
    """A call without the bearer token the server was configured with (or with another one)."""

    status = "UNAUTHENTICATED"
