"""Reading AIP-193 details back out of a failed call or an HTTP error body, for assertions."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass
class Failure:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: dict[str, str]
    # The ErrorInfo's metadata.
    metadata: dict[str, str]


def failure_of(error: grpc.aio.AioRpcError) -> Failure:
    status = rpc_status.from_call(error)
    assert status is not None, f"{error.code()} carried no status details"
    reason = ""
    fields: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "devops-hub"
            reason = info.reason
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields.update({v.field: v.description for v in bad.field_violations})
    assert reason, "every error carries an ErrorInfo"
    return Failure(error.code(), error.details(), reason, fields, metadata)


async def expect_error(call, code: grpc.StatusCode):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return failure_of(info.value)


# The gateway's HTTP error bodies: a JSON google.rpc.Status.
def field_violations(body: dict) -> dict[str, str]:
    fields = {}
    for detail in body["details"]:
        if detail["@type"].endswith("google.rpc.BadRequest"):
            fields.update({v["field"]: v["description"] for v in detail["fieldViolations"]})
    return fields


def error_reason(body: dict) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo"))
