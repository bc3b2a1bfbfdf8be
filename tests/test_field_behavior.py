"""What the protos declare is what the code enforces: REQUIRED fields, writable fields
and each service's backend, all read from the descriptors."""

from __future__ import annotations

import pytest
from devops_hub.v1 import agents_pb2, cache_pb2, workflows_pb2
from google.api import annotations_pb2

from services.common.contract import field_behavior
from services.common.contract.api import backend_of, discover_services
from services.common.contract.errors import InvalidArgument
from services.common.contract.request_checks import check_request

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("request_message", "fields"),
    [
        (agents_pb2.GetAgentRequest(), ["id"]),
        (agents_pb2.ExecuteAgentRequest(), ["id", "capability"]),
        (agents_pb2.ExecuteAgentRequest(id="a"), ["capability"]),
        (agents_pb2.CreateAgentRequest(), ["agent"]),
        (agents_pb2.BatchCreateAgentsRequest(), ["requests"]),
        (cache_pb2.CacheSetRequest(), ["entry"]),
    ],
)
def test_a_request_leaving_a_required_field_unset_is_refused_naming_it(request_message, fields):
    with pytest.raises(InvalidArgument) as refused:
        check_request(request_message)
    assert refused.value.violations == [(field, "is required") for field in fields]


def test_a_request_with_its_required_fields_passes_whatever_its_resource_holds():
    # The resource's own REQUIRED fields are its create's and update's to check.
    check_request(agents_pb2.CreateAgentRequest(agent=agents_pb2.Agent()))
    check_request(agents_pb2.GetAgentRequest(id="a"))
    check_request(agents_pb2.ListAgentsRequest())


def test_required_fields_of_a_resource_among_the_names_an_update_gives():
    agent = agents_pb2.Agent(name="x")
    assert field_behavior.missing(agent) == ["domain"]
    assert field_behavior.violations(["domain"], "agent") == [("agent.domain", "is required")]


def test_writable_fields_leave_out_identity_output_and_etag():
    assert field_behavior.writable_fields(workflows_pb2.Workflow) == ("name", "description", "steps", "timeout")
    writable = field_behavior.writable_fields(agents_pb2.Agent)
    assert {"name", "domain", "capabilities", "metadata"} <= set(writable)
    assert not {"id", "etag", "create_time", "update_time"} & set(writable)


def test_every_routed_service_declares_its_backend():
    for service in discover_services():
        routed = any(method.GetOptions().HasExtension(annotations_pb2.http) for method in service.methods)
        assert not routed or backend_of(service) in ("agents", "workflows", "cache"), service.full_name

