"""Errors as gRPC status codes with AIP-193 details.

Domain code raises a ServiceError; every call's wrapper (grpc_calls.py) hands whatever
a handler raised to grpc_status(), which turns it into a status whose details carry an
ErrorInfo and, for bad fields, a BadRequest. The gateway maps that status to HTTP
once; nothing else formats errors.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger(__name__)

ERROR_DOMAIN = "devops-hub"


class ServiceError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    # ErrorInfo's reason when the raiser gives none; empty: the code's name.
    default_reason: str = ""

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        violations: Iterable[tuple[str, str]] = (),
        retry_after: float | None = None,
        trailing_metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason or self.code.name
        self.metadata = dict(metadata or {})
        self.violations = list(violations)
        self.retry_after = retry_after
        # Sent beside the status, e.g. the rate-limit figures the gateway turns into headers.
        self.trailing_metadata = tuple(trailing_metadata)

    def to_status(self) -> status_pb2.Status:
        details: list[Message] = [error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)]
        if self.violations:
            violations = [error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in self.violations]
            details.append(error_details_pb2.BadRequest(field_violations=violations))
        if self.retry_after is not None:
            retry = error_details_pb2.RetryInfo()
            retry.retry_delay.FromNanoseconds(int(self.retry_after * 1e9))
            details.append(retry)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[_pack(d) for d in details])


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RATE_LIMITED"


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(ServiceError):
    code = grpc.StatusCode.UNIMPLEMENTED


class CommitOutcomeUnknown(ServiceError):
    """Not UNAVAILABLE (503, "retry"): retried blindly, a write that did commit is made
    twice. A call carrying a request_id is answered UNAVAILABLE instead (idempotency.py),
    since its retry is safe either way."""

    code = grpc.StatusCode.UNKNOWN
    default_reason = "COMMIT_OUTCOME_UNKNOWN"


class InternalError(ServiceError):
    code = grpc.StatusCode.INTERNAL


def invalid_fields(violations: list[tuple[str, str]]) -> InvalidArgument:
    """One INVALID_ARGUMENT naming every bad field, so a client fixes them all at once."""
    summary = "; ".join(f"{field}: {description}" for field, description in violations)
    return InvalidArgument(f"invalid request: {summary}", reason="INVALID_FIELDS", violations=violations)


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status with trailing metadata beside its details (grpc.Status is abstract)."""


def grpc_status(exc: Exception, method: str, trailing_metadata: Iterable[tuple[str, str]] = ()) -> grpc.Status:
    """The status a call that raised `exc` ends with: a ServiceError's own, anything
    else INTERNAL (logged here, never shown to the caller). `trailing_metadata` (the
    rate-limit figures of an admitted call) goes out beside the error's own."""
    if isinstance(exc, NotImplementedError):
        # A generated servicer's method this server does not implement (a client
        # newer than the server): UNIMPLEMENTED, as grpc answers, and no error logged.
        exc = Unimplemented(f"{method} is not implemented by this server")
    if not isinstance(exc, ServiceError):
        log.error("unexpected error in %s", method, exc_info=exc)
        exc = InternalError("internal error; the service log has the details")
    status: grpc.Status = rpc_status.to_status(exc.to_status())
    extra = (*trailing_metadata, *exc.trailing_metadata)
    if extra:
        status = _Status(status.code, status.details, (*status.trailing_metadata, *extra))
    return status


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed

