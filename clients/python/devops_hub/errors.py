"""A failed call as a Python exception that carries its AIP-193 details.

The services answer every error with a status whose details hold an ErrorInfo (a
stable `reason` to branch on), a BadRequest naming each bad field, and a RetryInfo
when waiting helps. grpc hands those over as bytes in the trailers; ApiError reads
them once, so callers write `except NotFound` and `err.violations` instead.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class ApiError(Exception):
    """A call that ended with a status other than OK."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        violations: list[tuple[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata = metadata or {}
        # (field path, description) for each field a BadRequest named.
        self.violations = violations or []
        # Seconds the server asked to wait (RetryInfo), when it did.
        self.retry_after = retry_after


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ApiError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ApiError):
    """An etag that no longer matches: read again, then retry."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ApiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(ApiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ApiError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ApiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[ApiError]] = {cls.code: cls for cls in ApiError.__subclasses__()}


def from_rpc_error(error: grpc.aio.AioRpcError) -> ApiError:
    """The ApiError (of the class for its code) that `error` carries, details read."""
    code, message = error.code(), error.details() or ""
    info, bad_request, retry = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
    retry_after = None
    for key, value in error.trailing_metadata() or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                # Any.Unpack fills the message only when the detail is of its type.
                if detail.Unpack(retry):
                    retry_after = retry.retry_delay.ToNanoseconds() / 1e9
                elif not detail.Unpack(info):
                    detail.Unpack(bad_request)
    return _BY_CODE.get(code, ApiError)(
        code,
        message,
        reason=info.reason,
        metadata=dict(info.metadata),
        violations=[(v.field, v.description) for v in bad_request.field_violations],
        retry_after=retry_after,
    )
