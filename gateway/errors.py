"""gRPC status → HTTP: the one table, and the one error body every failure uses, the
google.rpc.Status (AIP-193) as JSON, details decoded; the gateway's own failures (bad
JSON, unknown path) too, so a client parses one error shape whoever found the problem."""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf import any_pb2, json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from gateway.json_body import JSON_MEDIA_TYPE, encode
from services.common.contract.errors import InternalError, InvalidArgument, NotFound, RateLimited, ServiceError, Unimplemented

HTTP_STATUS: Mapping[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    # The gateway only ever reads a CANCELLED its backend chose (a stop cut the call
    # short): when its own client hangs up, nobody is left to answer. So not 499,
    # which would blame the client, but 503: retry, another process will serve it.
    grpc.StatusCode.CANCELLED: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

_HTTP_BY_NUMBER = {code.value[0]: status for code, status in HTTP_STATUS.items()}
# The reverse, for HTTP errors raised by Starlette itself: the first code listed wins.
_CODE_BY_HTTP = {status: code for code, status in reversed(list(HTTP_STATUS.items()))}


def http_status(code: int) -> int:
    return _HTTP_BY_NUMBER.get(code, 500)


# Failures that only exist in HTTP, which the table cannot produce: the class gives the
# gRPC code their body carries, beside their own reason.
_HTTP_ONLY: Mapping[int, tuple[type[ServiceError], str]] = {
    405: (Unimplemented, "METHOD_NOT_ALLOWED"),
    413: (RateLimited, "PAYLOAD_TOO_LARGE"),
    415: (InvalidArgument, "UNSUPPORTED_MEDIA_TYPE"),
}


class GatewayError(Exception):
    """A failure found by the gateway before or instead of a backend call."""

    def __init__(self, error: ServiceError, *, status_code: int | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error.message)
        self.status = error.to_status()
        self.status_code = status_code or http_status(self.status.code)
        self.headers = headers

    def response(self) -> Response:
        return status_response(self.status, self.status_code, self.headers)


def bad_request(message: str, *, field: str = "", description: str = "", reason: str = "INVALID_REQUEST") -> GatewayError:
    violations = [(field, description or message)] if field else []
    return GatewayError(InvalidArgument(message, reason=reason, violations=violations))


def http_only(status_code: int, message: str, headers: Mapping[str, str] | None = None) -> GatewayError:
    error_class, reason = _HTTP_ONLY[status_code]
    return GatewayError(error_class(message, reason=reason), status_code=status_code, headers=headers)


def route_not_found(http_method: str, path: str) -> GatewayError:
    return GatewayError(NotFound(f"no route for {http_method} {path}", reason="ROUTE_NOT_FOUND"))


def status_of(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The backend's rich status from the trailer, or one built from code and message."""
    try:
        rich = rpc_status.from_call(error)
    except ValueError:  # a trailer that contradicts the call's own status: trust the call
        rich = None
    return rich if rich is not None else status_pb2.Status(code=error.code().value[0], message=error.details() or "")


def rpc_error_response(error: grpc.aio.AioRpcError) -> Response:
    status = status_of(error)
    code = http_status(status.code)
    return status_response(status, code, retry_after(status, code))


def retry_after(status: status_pb2.Status, http_code: int) -> dict[str, str] | None:
    """Retry-After from the status's RetryInfo; one second for any other 503, which
    is by definition worth retrying (a dependency or a process briefly away)."""
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return {"Retry-After": str(max(1, math.ceil(info.retry_delay.ToTimedelta().total_seconds())))}
    return {"Retry-After": "1"} if http_code == 503 else None


def status_body(status: status_pb2.Status) -> bytes:
    """The JSON of google.rpc.Status; `details` is always present so clients need no guard."""
    return encode({"code": status.code, "message": status.message, "details": [_detail(d) for d in status.details]})


def status_response(status: status_pb2.Status, status_code: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status_body(status), status_code=status_code, headers=headers, media_type=JSON_MEDIA_TYPE)


def _detail(packed: any_pb2.Any) -> dict[str, Any]:
    try:
        return json_format.MessageToDict(packed)
    except (TypeError, KeyError, json_format.Error):
        # A detail type this process has no descriptor for: pass it on undecoded.
        return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode("ascii")}


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405s (e.g. POST /health) in the same body shape as the rest."""
    assert isinstance(exc, HTTPException)
    if exc.status_code in _HTTP_ONLY:
        return http_only(exc.status_code, exc.detail, exc.headers).response()
    code = _CODE_BY_HTTP.get(exc.status_code, grpc.StatusCode.UNKNOWN)
    return status_response(status_pb2.Status(code=code.value[0], message=exc.detail), exc.status_code, exc.headers)


def internal_error_response() -> Response:
    """A bug in the gateway still answers in the error shape; the traceback goes to the log."""
    return status_response(InternalError("internal gateway error").to_status(), 500)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    return internal_error_response()
