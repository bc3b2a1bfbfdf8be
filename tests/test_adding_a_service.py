"""docs/design.md's "Adding a service" and "Adding an RPC" guides, followed to the letter.

A newcomer writes the proto (tests/support/new_service/reports.proto: http rules,
scopes, field_behavior, `option (backend) = "agents"`), a servicer that translates
and delegates, a use case on the resource template with its repository, and its
wiring and one `host.add(...)` in the hosting process's build. The
guides say the rest is derived from the proto: the gateway route and JSON mapping, the
OpenAPI operation, the scope check, the rate-limit bucket, the REQUIRED-field checks,
gRPC metrics and traces, reflection and health. This proves it through the real
interfaces, with stubs generated as `make protos` generates them (clients/python/gen_protos.py)
from the project's protos plus the new one.

Importing the new stubs would add ReportsService to this process's default descriptor
pool, which every other test reads (gateway routes, scope table, reflection): the
scenario runs in a process of its own (`python -m tests.support.new_service`), and
reports what it saw as JSON for the assertions here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.common.usecases import resource
from tests.support import ROOT
from tests.support.grpc_errors import error_reason

# One worker runs the module: the new service's stack is module-scoped.
pytestmark = pytest.mark.xdist_group("adding_a_service")

SCENARIO = ROOT / "tests" / "support" / "new_service"
SERVICE = "devops_hub.v1.ReportsService"


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What the new service answered, once for every test of this module."""
    work = tmp_path_factory.mktemp("new_service")
    protos, stubs, out = work / "protos", work / "client", work / "seen.json"
    # Guide step 1: the new .proto beside the others; then `make protos`, into a copy of
    # the client package (the stubs' home) of our own.
    shutil.copytree(ROOT / "protos", protos)
    shutil.copy(SCENARIO / "reports.proto", protos / "devops_hub" / "v1" / "reports.proto")
    shutil.copytree(ROOT / "clients" / "python", stubs, ignore=shutil.ignore_patterns("v1", "protos", "build", "*.egg-info"))
    _run([sys.executable, str(stubs / "gen_protos.py"), "--protos", str(protos), "--out", str(stubs)], work)
    _run([sys.executable, "-m", "tests.support.new_service", str(out), f"sqlite:///{work}/hub.db"], work, stubs)
    return json.loads(out.read_text())


def _run(command: list[str], work: Path, stubs: Path | None = None) -> None:
    env = dict(os.environ)
    # The new stubs before the venv's clients/python (a .pth entry, which comes after PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (stubs, ROOT) if p is not None)
    for name in ("REDIS_URL", "OTEL_EXPORTER_OTLP_ENDPOINT", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command[1:3]} failed:\n{done.stdout}\n{done.stderr}"


def test_the_gateway_routes_the_new_service_to_the_backend_its_proto_names(seen):
    # Only the agents process (its proto's backend) serves it: an answer proves the route.
    created = seen["http"]["create"]
    assert created["status"] == 200, created
    report = created["body"]
    # The JSON mapping is protobuf's: lowerCamelCase names, the OUTPUT_ONLY id set by the service.
    assert report["title"] == "weekly" and report["agentIds"] == ["deploy-bot"] and report["id"]
    got = seen["http"]["get"]
    assert got["status"] == 200 and got["body"] == report
    assert seen["http"]["get_unknown"]["status"] == 404
    unknown_field = seen["http"]["create_with_unknown_field"]
    assert unknown_field["status"] == 400 and "colour" in unknown_field["body"]["message"]


def test_the_openapi_document_has_its_operations(seen):
    openapi = seen["http"]["openapi"]
    assert openapi["status"] == 200
    paths = openapi["body"]["paths"]
    assert paths["/api/reports/{id}"]["get"]["operationId"] == "ReportsService_GetReport"
    assert paths["/api/reports"]["post"]["operationId"] == "ReportsService_CreateReport"
    assert "devops_hub.v1.Report" in openapi["body"]["components"]["schemas"]


def test_the_scope_each_rpc_declares_is_enforced(seen):
    assert seen["scopes"] == {f"/{SERVICE}/GetReport": "read", f"/{SERVICE}/CreateReport": "write"}
    http = seen["http"]
    assert http["create_without_key"]["status"] == 401
    assert http["create_with_read_key"]["status"] == 403
    assert "write" in http["create_with_read_key"]["body"]["message"]
    # A read is open to anonymous callers, as every read is by default (ALLOW_ANONYMOUS_READ).
    assert http["get"]["status"] == 200


def test_its_calls_take_from_the_default_rate_limit_bucket(seen):
    # The scenario's RATE_LIMIT_REQUESTS; an execute-scoped method would show the execute policy's.
    assert seen["http"]["get"]["ratelimit_limit"] == "1000"
    assert seen["http"]["create"]["ratelimit_limit"] == "1000"


def _violations(body: dict[str, Any]) -> dict[str, str]:
    return {
        violation["field"]: violation["description"]
        for detail in body.get("details", [])
        for violation in detail.get("fieldViolations", [])
    }


def test_required_fields_are_refused_before_the_servicer_and_named(seen):
    # The request's own REQUIRED fields: checked before any handler runs (request_checks.py).
    assert seen["grpc"]["get_empty_id"] == {"code": "INVALID_ARGUMENT", "fields": {"id": "is required"}}
    assert seen["grpc"]["create_without_report"] == {"code": "INVALID_ARGUMENT", "fields": {"report": "is required"}}
    # The resource's: the create checks them through field_behavior.py, answered the same way.
    without_title = seen["http"]["create_without_title"]
    assert without_title["status"] == 400
    assert _violations(without_title["body"]) == {"report.title": "is required"}


def test_the_resource_template_brings_the_id_rule_and_its_errors(seen):
    # reports.py writes only the reports' rules; the template (services/common/usecases/resource.py) does the rest.
    bad_id = seen["http"]["create_with_bad_id"]
    assert bad_id["status"] == 400 and _violations(bad_id["body"]) == {"report.id": resource.ID_RULE}
    again = seen["http"]["create_again"]
    assert again["status"] == 409 and error_reason(again["body"]) == "REPORT_EXISTS"
    assert error_reason(seen["http"]["get_unknown"]["body"]) == "REPORT_NOT_FOUND"


def test_reflection_lists_it_and_health_reports_it_serving(seen):
    assert SERVICE in seen["reflection"]["services"]
    assert seen["reflection"]["file_of_service"] == ["devops_hub/v1/reports.proto"]
    assert seen["health"] == "SERVING"


def test_its_grpc_metrics_exist_from_the_start_and_count_its_calls(seen):
    at_start = {(name, method) for name, method, _code, _value in seen["series_at_start"]}
    for method in ("GetReport", "CreateReport"):
        assert ("grpc_server_handled_total", method) in at_start
        assert ("grpc_server_handling_seconds_count", method) in at_start
    counted = {(name, method, code): float(value) for name, method, code, value in seen["series_after_calls"]}
    assert counted[("grpc_server_handled_total", "GetReport", "OK")] >= 1
    assert counted[("grpc_server_handled_total", "CreateReport", "OK")] >= 1
    assert counted[("grpc_server_handled_total", "GetReport", "INVALID_ARGUMENT")] >= 1
    # And the gateway exports its routes the same way.
    assert 'route="/api/reports/{id}"' in seen["http"]["metrics"]["body"]


def test_its_calls_are_traced_from_the_gateway_to_the_service(seen):
    assert seen["spans"] == [[f"{SERVICE}/GetReport", "CLIENT"], [f"{SERVICE}/GetReport", "SERVER"]]
