"""deploy/ against the code: what can be checked without docker or a cluster.

The alert rules and the dashboard only name metrics a running stack exports; the
ghz configs' calls exist by reflection and their data parses (and succeeds); the
compose and Kubernetes files parse and agree with the code's ports and settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from bench import loadtest
from devstack.launcher import PROBE_FAILURES, PROBE_PERIOD, PROBE_TIMEOUT
from devstack.ports import free_port
from devstack.seed import seed
from gateway.routes import build_routes
from services.common.auth import keys
from services.common.contract.api import discover_services
from services.common.foundation.settings import Settings
from services.common.runtime.grpc_host import GrpcHost
from services.common.telemetry.metrics import SERVER_ERROR_CODES, service_metrics
from tests.support import ROOT
from tests.support.api import BACKEND_OF_SERVICE
from tests.support.deploy import DEPLOY, alert_rules, dashboard, dashboard_exprs, metric_names
from tests.support.metrics import parse_samples
from tests.support.processes import launched_stack
from tests.support.stack import make_settings, running_stack

DEFAULTS = Settings()
SETTING_NAMES = {field.name.upper() for field in dataclasses.fields(Settings)}
# Read by libraries rather than Settings: prometheus_client's and OpenTelemetry's own.
LIBRARY_VARIABLES = {"PROMETHEUS_MULTIPROC_DIR"}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def is_known_variable(name: str) -> bool:
    return name in SETTING_NAMES or name in LIBRARY_VARIABLES or name.startswith("OTEL_")


def label_regexes(exprs: list[str], label: str, operator: str) -> set[str]:
    return {m.group(1) for expr in exprs for m in re.finditer(rf'{label}{re.escape(operator)}"([^"]*)"', expr)}


# --------------------------------------------------------------------------- alert rules and dashboard


@pytest.mark.fast
def test_the_promql_reader_finds_metric_names():
    assert metric_names(
        'histogram_quantile(0.95, sum by (job, le) (rate(grpc_server_handling_seconds_bucket{grpc_type="unary"}[5m]))) > 0.1'
    ) == {"grpc_server_handling_seconds_bucket"}
    assert metric_names("sum by (job) (devops_hub_db_pool_in_use) / sum by (job) (devops_hub_db_pool_max) > 0.9") == {
        "devops_hub_db_pool_in_use",
        "devops_hub_db_pool_max",
    }


@pytest.mark.slow
def test_every_metric_in_the_alerts_and_the_dashboard_is_exported_and_documented(tmp_path):
    needed = {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    needed |= {name for expr in dashboard_exprs() for name in metric_names(expr)}
    key = keys.new_key()
    with launched_stack(tmp_path, BOOTSTRAP_ADMIN_KEY=key) as env:
        gateway = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        with httpx.Client(base_url=gateway, timeout=10, headers={"x-api-key": key}) as http:
            for path in ("/api/agents/builtin-text", "/api/agents/builtin-text", "/api/agents", "/api/agents/none"):
                http.get(path)
            started = http.post("/api/workflows/fan-out-greetings:execute", json={"input": {"services": ["a", "b"]}})
            assert started.status_code == 200, started.text
            deadline = time.monotonic() + 30
            while http.get(f"/api/executions/{started.json()['id']}").json()["status"] != "SUCCEEDED":
                assert time.monotonic() < deadline, "the example workflow did not succeed"
                time.sleep(0.1)
        exported: set[str] = set()
        families: set[str] = set()
        for port in (env["AGENTS_METRICS_PORT"], env["WORKFLOWS_METRICS_PORT"], env["CACHE_METRICS_PORT"], env["GATEWAY_PORT"]):
            response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
            assert response.status_code == 200
            exported |= {name for name, _ in parse_samples(response.text)}
            families |= set(re.findall(r"^# TYPE (\S+) ", response.text, re.MULTILINE))

    # `up` is Prometheus's own, one per scraped target.
    missing = needed - exported - {"up"}
    assert not missing, f"named in the alerts or the dashboard but exported by no process: {sorted(missing)}"

    docs = (ROOT / "docs" / "observability.md").read_text()
    ours = {name for name in families if not name.startswith(("process_", "python_"))}
    undocumented = {name for name in ours if f"`{name}" not in docs}
    assert not undocumented, f"exported but not in docs/observability.md: {sorted(undocumented)}"


@pytest.mark.fast
def test_alerts_cover_each_target_at_its_thresholds():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["for"]
    # The performance guide: (warning at the target, critical at the alert threshold).
    thresholds = {
        "GrpcLatencyP95AboveTarget": "> 0.1", "GrpcLatencyP95High": "> 0.5",
        "HttpLatencyP95AboveTarget": "> 0.1", "HttpLatencyP95High": "> 0.5",
        "GrpcErrorRateAboveTarget": "> 0.001", "GrpcErrorRateHigh": "> 0.01",
        "HttpErrorRateAboveTarget": "> 0.001", "HttpErrorRateHigh": "> 0.01",
        "CacheHitRateBelowTarget": "< 0.8", "CacheHitRateLow": "< 0.5",
        "DbPoolUseAboveTarget": "> 0.7", "DbPoolUseHigh": "> 0.9",
        "MemoryUseAboveTarget": "> 0.7", "MemoryUseHigh": "> 0.85",
        "CpuUseAboveTarget": "> 0.6", "CpuUseHigh": "> 0.8",
    }
    for name, comparison in thresholds.items():
        assert comparison in " ".join(rules[name]["expr"].split()), name
        expected = "warning" if "Target" in name else "critical"
        assert rules[name]["labels"]["severity"] == expected, name


@pytest.mark.fast
def test_latency_excludes_exactly_the_streaming_routes_and_errors_are_the_server_codes():
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    (streaming,) = label_regexes(exprs, "route", "!~")
    for route in build_routes(discover_services(), BACKEND_OF_SERVICE):
        assert bool(re.fullmatch(streaming, route.template.text)) == route.server_streaming, route.template.text
    (codes,) = label_regexes(exprs, "grpc_code", "=~")
    assert set(codes.split("|")) == {code.name for code in SERVER_ERROR_CODES}
    assert label_regexes(exprs, "grpc_type", "=") == {"unary"}


@pytest.mark.fast
def test_the_dashboard_has_a_panel_per_target_on_the_provisioned_datasource():
    board = dashboard()
    titles = [panel["title"] for panel in board["panels"]]
    targets = (
        "gRPC p95 latency", "HTTP p95 latency", "gRPC error rate", "HTTP error rate",
        "Memory usage", "CPU usage", "Cache hit rate", "Database pool use",
    )
    for target in targets:
        assert any(title.startswith(target) for title in titles), target
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yml").read_text())
    uids = {source["uid"] for source in provisioned["datasources"]}
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids and panel["targets"], panel["title"]
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


# --------------------------------------------------------------------------- docker compose


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


@pytest.mark.fast
def test_compose_runs_every_part_with_the_code_s_ports_and_settings():
    services = compose()["services"]
    assert {"postgres", "redis", "cache", "agents", "workflows", "gateway", "prometheus", "grafana", "jaeger"} <= set(services)
    parts = {
        "agents": ("services.agents", "AGENTS_ADDR", DEFAULTS.agents_addr, "AGENTS_METRICS_PORT", DEFAULTS.agents_metrics_port),
        "workflows": ("services.workflows", "WORKFLOWS_ADDR", DEFAULTS.workflows_addr, "WORKFLOWS_METRICS_PORT", DEFAULTS.workflows_metrics_port),
        "cache": ("services.cache.sidecar", "CACHE_ADDR", DEFAULTS.cache_addr, "CACHE_METRICS_PORT", DEFAULTS.cache_metrics_port),
    }
    for name, (module, addr_var, default_addr, metrics_var, metrics_port) in parts.items():
        service = services[name]
        env = service["environment"]
        assert service["command"] == [module]
        # Listens on every address of its container, on the port the code defaults to...
        assert env[addr_var] == f"0.0.0.0:{port_of(default_addr)}"
        assert int(env[metrics_var]) == metrics_port
        assert f"{port_of(default_addr)}:{port_of(default_addr)}" in service["ports"]
        # ...and every other part reaches it there, by service name.
        for other in ("agents", "workflows", "cache", "gateway"):
            if other != name:
                assert services[other]["environment"][addr_var] == f"{name}:{port_of(default_addr)}", (other, addr_var)
    gateway = services["gateway"]
    assert gateway["command"] == ["gateway"]
    assert int(gateway["environment"]["GATEWAY_PORT"]) == DEFAULTS.gateway_port
    assert f"{DEFAULTS.gateway_port}:{DEFAULTS.gateway_port}" in gateway["ports"]

    for name in ("cache", "agents", "workflows", "gateway"):
        env = services[name]["environment"]
        unknown = {variable for variable in env if not is_known_variable(variable)}
        assert not unknown, f"{name}: {unknown} are not settings"
        Settings.from_env({k: str(v) for k, v in env.items()})  # every value parses
        assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"].startswith("redis://redis:6379")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()


@pytest.mark.fast
def test_compose_prometheus_scrapes_every_part_and_mounts_what_exists():
    services = compose()["services"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {
        "agents": [f"agents:{services['agents']['environment']['AGENTS_METRICS_PORT']}"],
        "workflows": [f"workflows:{services['workflows']['environment']['WORKFLOWS_METRICS_PORT']}"],
        "cache": [f"cache:{services['cache']['environment']['CACHE_METRICS_PORT']}"],
        "gateway": [f"gateway:{services['gateway']['environment']['GATEWAY_PORT']}"],
    }
    mounted_rules = {Path(v.split(":")[1]).name for v in services["prometheus"]["volumes"]}
    assert {Path(rule).name for rule in config["rule_files"]} <= mounted_rules
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert any(v.endswith(f":{dashboards_path}:ro") for v in services["grafana"]["volumes"])


# --------------------------------------------------------------------------- Dockerfile


@pytest.mark.fast
def test_the_dockerfile_is_multi_stage_non_root_and_copies_what_exists():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)
    assert len(stages) >= 2
    runtime = text.split(f"AS {stages[-1]}", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", runtime, re.MULTILINE)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.MULTILINE):
        assert (ROOT / source).exists(), source
    exposed = {int(port) for port in re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE)[0].split()}
    assert exposed == {
        port_of(DEFAULTS.agents_addr), port_of(DEFAULTS.workflows_addr), port_of(DEFAULTS.cache_addr),
        DEFAULTS.gateway_port, DEFAULTS.agents_metrics_port, DEFAULTS.workflows_metrics_port, DEFAULTS.cache_metrics_port,
    }
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for source in re.findall(r"^COPY\s+(?!--from)(\S+)\s", text, re.MULTILINE):
        assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is left out of the build context"


async def test_the_container_health_check_asks_grpc_health_and_http():
    host = GrpcHost("127.0.0.1:0", metrics=service_metrics().grpc)
    port = await host.start()
    script = str(DEPLOY / "healthcheck.py")

    async def check(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, script, *args, stderr=subprocess.DEVNULL)
        return await proc.wait()

    try:
        assert await check("grpc", f"127.0.0.1:{port}") == 0
        assert await check("grpc", f"127.0.0.1:{free_port()}") == 1
        assert await check("http", f"http://127.0.0.1:{free_port()}/health/ready") == 1
        assert await check("nonsense") == 2
    finally:
        await host.stop(0)


# --------------------------------------------------------------------------- Kubernetes


def k8s_objects() -> list[dict]:
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    objects = []
    for resource in kustomization["resources"]:
        objects += [doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / resource).read_text()) if doc]
    return objects


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.fast
def test_every_manifest_parses_and_is_listed():
    listed = set(yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    objects = k8s_objects()
    for o in objects:
        assert o["apiVersion"] and o["kind"] and o["metadata"]["name"]
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret"} <= kinds


@pytest.mark.fast
def test_kubernetes_agrees_with_the_code_s_ports_settings_and_probes():
    objects = k8s_objects()
    deployments = by_kind(objects, "Deployment")
    services = by_kind(objects, "Service")
    (config,) = by_kind(objects, "ConfigMap").values()
    (secret,) = by_kind(objects, "Secret").values()
    settings_everywhere = {**config["data"], **secret["stringData"]}
    assert all(is_known_variable(name) for name in settings_everywhere), settings_everywhere
    in_cluster = Settings.from_env(settings_everywhere)
    assert not in_cluster.grpc_reflection, "reflection is off in the cluster"

    grpc_parts = {
        "agents": ("services.agents", "AGENTS_ADDR", DEFAULTS.agents_addr, DEFAULTS.agents_metrics_port),
        "workflows": ("services.workflows", "WORKFLOWS_ADDR", DEFAULTS.workflows_addr, DEFAULTS.workflows_metrics_port),
    }
    for name, (module, addr_var, default_addr, metrics_port) in grpc_parts.items():
        pod = deployments[f"devops-hub-{name}"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == [module]
        env = {e["name"]: e["value"] for e in container["env"]}
        grpc_port = port_of(default_addr)
        assert env[addr_var] == f"0.0.0.0:{grpc_port}"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        # Native gRPC probes on the port it serves grpc.health.v1 on.
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port
        assert container["livenessProbe"]["grpc"]["port"] == grpc_port
        # Others reach it through its headless Service, at the dns:/// address the
        # ConfigMap gives, and spread their calls over its pods.
        target = config["data"][addr_var]
        assert target.startswith("dns:///"), target
        service_name, service_port = target.removeprefix("dns:///").rsplit(":", 1)
        service = services[service_name]
        assert service["spec"]["clusterIP"] == "None"
        (service_port_spec,) = service["spec"]["ports"]
        assert service_port_spec["port"] == int(service_port) and service_port_spec["targetPort"] == "grpc"

    gateway_pod = deployments["devops-hub-gateway"]["spec"]["template"]["spec"]
    (gateway,) = gateway_pod["containers"]
    assert gateway["args"] == ["gateway"]
    assert {p["name"]: p["containerPort"] for p in gateway["ports"]} == {"http": int(config["data"]["GATEWAY_PORT"])}
    assert int(config["data"]["GATEWAY_PORT"]) == DEFAULTS.gateway_port
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health/live"

    for name, deployment in deployments.items():
        spec = deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        if name == "devops-hub-redis":
            continue
        assert pod["securityContext"]["runAsUser"] == 10001  # the Dockerfile's USER
        # The cache sidecar beside the service, sharing Redis through the Secret.
        (sidecar,) = pod["initContainers"]
        assert sidecar["restartPolicy"] == "Always" and sidecar["args"] == ["services.cache.sidecar"]
        cache_port = port_of(DEFAULTS.cache_addr)
        assert {e["name"]: e["value"] for e in sidecar["env"]}["CACHE_ADDR"] == f"0.0.0.0:{cache_port}"
        assert config["data"]["CACHE_ADDR"] == f"127.0.0.1:{cache_port}"
        assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {
            "cache-grpc": cache_port, "cache-metrics": DEFAULTS.cache_metrics_port,
        }
        assert sidecar["readinessProbe"]["grpc"]["port"] == cache_port
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in sidecar["envFrom"]
        assert settings_everywhere["REDIS_URL"].startswith("redis://")
        for container in [sidecar, *pod["containers"]]:
            for source in container["envFrom"]:
                ref = source.get("configMapRef") or source.get("secretRef")
                assert ref["name"] in (config["metadata"]["name"], secret["metadata"]["name"])
            assert all(is_known_variable(e["name"]) for e in container.get("env", []))
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "memory" in container["resources"]["limits"] and "cpu" in container["resources"]["requests"]
            # The kubelet's liveness checks are the launcher's (devstack/launcher.py): a
            # process that stops answering is restarted within the same bound.
            liveness = container["livenessProbe"]
            assert (liveness["periodSeconds"], liveness["timeoutSeconds"], liveness["failureThreshold"]) == (
                PROBE_PERIOD, PROBE_TIMEOUT, PROBE_FAILURES
            ), container["name"]

    for service in services.values():
        selector = service["spec"]["selector"]
        (target,) = [d for d in deployments.values() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        port_names = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"])

    for hpa in by_kind(objects, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    budgets = by_kind(objects, "PodDisruptionBudget")
    assert {name for name in budgets} == {name for name in deployments if name != "devops-hub-redis"}
    for name, budget in budgets.items():
        assert budget["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]


@pytest.mark.fast
def test_kubernetes_prometheus_scrapes_the_ports_the_pods_name():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-kubernetes.yml").read_text())
    (job,) = config["scrape_configs"]
    keep = next(r["regex"] for r in job["relabel_configs"] if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"])
    deployments = by_kind(k8s_objects(), "Deployment")
    scraped = set()
    for deployment in deployments.values():
        pod = deployment["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            for port in container["ports"]:
                if re.fullmatch(keep, port["name"]):
                    scraped.add(container["name"])
    # The job label is the container's name, which the alerts' `up` rule names.
    assert scraped == {"agents", "workflows", "cache", "gateway"}
    up_rule = next(rule for rule in alert_rules() if rule["alert"] == "DevOpsHubTargetDown")
    assert set(label_regexes([up_rule["expr"]], "job", "=~").pop().split("|")) == scraped


# --------------------------------------------------------------------------- ghz


def ghz_configs() -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((DEPLOY / "ghz").glob("*.json"))}


GHZ_KEYS = {
    "name", "call", "host", "insecure", "total", "concurrency", "connections", "timeout", "data", "metadata",
    "proto", "protoset", "import-paths", "duration", "max-duration", "qps", "format", "output", "connect-timeout",
}


@pytest.mark.fast
def test_there_is_a_ghz_config_per_main_rpc_aimed_at_the_default_address():
    configs = ghz_configs()
    calls = {config["call"] for config in configs.values()}
    assert calls == {
        "devops_hub.v1.AgentsService.GetAgent",
        "devops_hub.v1.AgentsService.ListAgents",
        "devops_hub.v1.AgentsService.DiscoverAgents",
        "devops_hub.v1.CacheService.Get",
        "devops_hub.v1.WorkflowsService.ExecuteWorkflow",
    }
    for name, config in configs.items():
        assert set(config) <= GHZ_KEYS, name
        # No proto files: ghz resolves the call by server reflection.
        assert "proto" not in config and "protoset" not in config
        assert config["insecure"] is True and config["total"] >= config["concurrency"] >= 1
        service = config["call"].rsplit(".", 1)[0]
        backend = BACKEND_OF_SERVICE[service]
        assert config["host"] == getattr(DEFAULTS, f"{backend}_addr"), name


async def test_every_ghz_call_exists_by_reflection_and_its_data_works(sqlite_url):
    async with running_stack(make_settings(sqlite_url), with_workflows=True) as stack:
        await seed(stack.settings)
        for name, config in ghz_configs().items():
            service = config["call"].rsplit(".", 1)[0]
            address = getattr(stack.settings, f"{BACKEND_OF_SERVICE[service]}_addr")
            # What ghz does: ask the server itself for the method and its types.
            method = await asyncio.to_thread(_reflect, address, config["call"])
            async with grpc.aio.insecure_channel(address) as channel:
                request = message_factory.GetMessageClass(method.input_type)()
                json_format.ParseDict(config["data"], request)
                response_class = message_factory.GetMessageClass(method.output_type)
                call = channel.unary_unary(
                    f"/{service}/{method.name}",
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_class.FromString,
                )
                response = await call(request, timeout=10)
                assert isinstance(response, response_class), name
        # The load test reads the same configs into the same methods.
        assert {c.method.full_name for c in loadtest.load_configs()} == {
            config["call"] for config in ghz_configs().values()
        }


def _reflect(address: str, call: str):
    """The method by server reflection (blocking, so off the loop the servers run on)."""
    service, _, method = call.rpartition(".")
    with grpc.insecure_channel(address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        return pool.FindServiceByName(service).methods_by_name[method]


@pytest.mark.fast
def test_loadtest_prints_ghz_reports_in_its_own_shape(tmp_path):
    report = tmp_path / "get_agent.json"
    report.write_text(json.dumps({
        "name": "GetAgent", "count": 200, "total": 2_000_000_000, "rps": 100.0,
        "latencyDistribution": [{"percentage": 50, "latency": 1_500_000}, {"percentage": 95, "latency": 3_000_000},
                                {"percentage": 99, "latency": 4_000_000}],
        "statusCodeDistribution": {"OK": 199, "Unavailable": 1},
    }))
    out = io.StringIO()
    with redirect_stdout(out):
        assert loadtest.main(["--summarize", str(report)]) == 0
    text = out.getvalue()
    assert "Count:        200" in text and "95 % in 3.00 ms" in text
    assert "[OK]   199 responses" in text and "[Unavailable]   1 responses" in text


@pytest.mark.skipif(not loadtest.load.shutil.which("h2load"), reason="h2load is not installed (apt-get install nghttp2-client)")
def test_make_loadtest_drives_every_call_and_counts_status_codes():
    out = io.StringIO()
    with redirect_stdout(out):
        assert loadtest.main(["--scale", "0.002"]) == 0
    text = out.getvalue()
    for config in ghz_configs().values():
        method = config["call"].rsplit(".", 1)[1]
        row = next(line for line in text.splitlines() if line.startswith(f"| {method} |"))
        count = int(row.split("|")[2])
        assert count >= config["concurrency"]
        assert f"OK {count}" in row, row


@pytest.mark.parametrize(
    ("docker", "says"),
    [("no-such-docker-command", "docker, which is not installed"), ("false", "a running docker daemon")],
    ids=["no docker", "no daemon"],
)
def test_make_ghz_without_docker_or_its_daemon_says_to_run_make_loadtest(docker, says):
    # `false` stands for a docker whose `docker info` reaches no daemon.
    result = subprocess.run(["make", "-s", "ghz", f"DOCKER={docker}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert says in result.stdout and "run make loadtest instead" in result.stdout, result.stdout + result.stderr
    assert "docker: " not in result.stderr  # no raw docker error


# --------------------------------------------------------------------------- redis


def test_deployed_redis_evicts_only_keys_with_a_ttl():
    # Cache entries carry TTLs; the invalidation-log position keys have none and must
    # never be evicted (docs/cache.md).
    redis_k8s = next(o for o in k8s_objects() if o["kind"] == "Deployment" and "redis" in o["metadata"]["name"])
    commands = {
        "compose": compose()["services"]["redis"]["command"],
        "k8s": redis_k8s["spec"]["template"]["spec"]["containers"][0]["args"],
    }
    for where, command in commands.items():
        policy = command[command.index("--maxmemory-policy") + 1]
        assert policy in ("volatile-lru", "volatile-ttl"), where
        assert f"`{policy}`" in (ROOT / "docs" / "cache.md").read_text()
