"""Domain errors <-> gRPC statuses with google.rpc rich error details, for our servers and for our clients of them.

Data that comes with an error travels as a detail, never inside the message text: an INVALID_ARGUMENT carries a
`BadRequest` naming the field, a FAILED_PRECONDITION for an image that is not cached an `ErrorInfo` with its hash.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.errors import DeadlineExceeded, ImageNotCached, InvalidRequest, Overloaded, ServiceError, Unavailable

DOMAIN = "pixtral.v1"
IMAGE_NOT_CACHED = "IMAGE_NOT_CACHED"


def status_code(error: ServiceError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.status, grpc.StatusCode.INTERNAL)


def _details(error: ServiceError) -> list[Message]:
    if isinstance(error, InvalidRequest):
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.problem)
        return [error_details_pb2.BadRequest(field_violations=[violation])]
    if isinstance(error, ImageNotCached):
        return [error_details_pb2.ErrorInfo(reason=IMAGE_NOT_CACHED, domain=DOMAIN, metadata={"sha256": error.sha256})]
    return []


def status_metadata(error: ServiceError) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries the error's rich details (none for errors without data)."""
    details = _details(error)
    if not details:
        return ()
    status = status_pb2.Status(code=status_code(error).value[0], message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return tuple(rpc_status.to_status(status).trailing_metadata)


def _unpacked(error: grpc.aio.AioRpcError) -> list:
    try:
        status = rpc_status.from_call(error)
    except ValueError:   # details that do not match the call's status: ignored, as if absent
        return []
    if status is None:
        return []
    found = []
    for detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                found.append(message)
    return found


def domain_error(error: grpc.aio.AioRpcError, what: str) -> ServiceError:
    """The domain error a call to one of our servers ended with; `what` names the callee in messages that
    would otherwise say nothing ("decoder"). A callee that refuses us (a wrong internal token, say) is, to our
    caller, a service that is unavailable."""
    code, details = error.code(), error.details() or ""
    unpacked = _unpacked(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violation = next((v for d in unpacked if isinstance(d, error_details_pb2.BadRequest)
                          for v in d.field_violations), None)
        if violation is not None:
            return InvalidRequest(violation.field, violation.description)
        return InvalidRequest("request", details)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        info = next((d for d in unpacked if isinstance(d, error_details_pb2.ErrorInfo)
                     and d.reason == IMAGE_NOT_CACHED), None)
        return ImageNotCached(details, info.metadata.get("sha256", "") if info is not None else "")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded while the {what} worked")
    return Unavailable(f"{what} unavailable: {code.name}")
