"""The gateway's pages for people, in a real headless browser (tests/support/browser.py)
against a stack started as `make run` starts it: /docs, the interactive reference,
with one call made from it; /status, the performance guide's table with live values."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from gateway import status
from tests.support.auth import ADMIN_KEY
from tests.support.browser import browser_page
from tests.support.processes import launched_stack

GUIDE = {
    "p95 latency": ("< 100 ms", "> 500 ms"),
    "error rate": ("< 0.1 %", "> 1 %"),
    "memory usage": ("< 70 %", "> 85 %"),
    "CPU usage": ("< 60 %", "> 80 %"),
    "cache hit rate": ("> 80 %", "< 50 %"),
    "connection pool usage": ("< 70 %", "> 90 %"),
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with launched_stack(tmp_path_factory.mktemp("stack"), BOOTSTRAP_ADMIN_KEY=ADMIN_KEY) as env:
        base = f"http://127.0.0.1:{env['GATEWAY_PORT']}"
        with httpx.Client(base_url=base, timeout=10) as http:
            # A loaded machine may answer the very first calls 503 (Retry-After) while
            # the gateway's connections come up: wait for a 200, as a client would.
            deadline = time.monotonic() + 30
            while http.get("/api/agents").status_code != 200:
                assert time.monotonic() < deadline, "the stack never answered 200"
                time.sleep(0.2)
            for _ in range(3):  # traffic for every row: HTTP, the sidecar, the pools
                assert http.get("/api/agents").status_code == 200
                assert http.get("/api/agents/builtin-text").status_code == 200
                assert http.get("/api/workflows").status_code == 200
            # Enough reads of the sidecar for a hit rate (status.MIN_CACHE_READS): each a first read.
            for i in range(status.MIN_CACHE_READS):
                assert http.get(f"/api/agents/absent-{i}").status_code == 404
        yield base


def test_status_json_computes_every_row_of_the_guide_from_the_metrics(gateway):
    report = httpx.get(f"{gateway}/status.json", timeout=10).json()
    assert report["unreachable"] == []
    rows = {row["metric"]: row for row in report["rows"]}
    assert list(rows) == list(GUIDE)
    for metric, (target, alert) in GUIDE.items():
        row = rows[metric]
        assert (row["target"], row["alert"]) == (target, alert)
        assert isinstance(row["value"], float) and row["state"] in ("ok", "warning", "alert"), row
    assert 0 < rows["memory usage"]["value"] < 100 and rows["CPU usage"]["value"] >= 0


def test_every_process_exports_process_metrics_and_its_memory_limit(gateway):
    text = httpx.get(f"{gateway}/metrics", timeout=10).text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_start_time_seconds", "devops_hub_memory_limit_bytes"):
        assert f"\n{name} " in text, name


def test_root_leads_to_docs_and_pages_allow_only_their_own_origin(gateway):
    root = httpx.get(f"{gateway}/", timeout=10)
    assert root.status_code == 307 and root.headers["location"] == "/docs"
    for path in ("/docs", "/status"):
        policy = httpx.get(f"{gateway}{path}", timeout=10).headers.get_list("content-security-policy")
        assert len(policy) == 1 and "script-src 'self'" in policy[0] and "connect-src 'self'" in policy[0]
    # The API keeps its own, stricter one.
    assert httpx.get(f"{gateway}/api/agents", timeout=10).headers["content-security-policy"].startswith("default-src 'none'")


async def test_docs_is_an_interactive_reference_that_calls_the_api(gateway, tmp_path):
    async with browser_page(tmp_path / "profile") as page:
        await page.goto(f"{gateway}/")
        assert await page.evaluate("location.pathname") == "/docs"
        operation = "#operations-AgentsService-AgentsService_ListAgents"
        await page.wait_for(f"!!document.querySelector({json.dumps(operation)})")
        operations = await page.evaluate("document.querySelectorAll('.opblock').length")
        spec = httpx.get(f"{gateway}/openapi.json", timeout=10).json()
        assert operations == sum(len(item) for item in spec["paths"].values())

        # One call from the page: expand ListAgents, "Try it out", "Execute".
        await page.evaluate(f"document.querySelector('{operation} .opblock-summary-control').click()")
        # The proto's own comment, shown as the operation's description.
        await page.wait_for(f"document.querySelector('{operation}').innerText.includes('Lists agents in id order')")
        await page.wait_for(f"!!document.querySelector('{operation} .try-out__btn')")
        await page.evaluate(f"document.querySelector('{operation} .try-out__btn').click()")
        await page.wait_for(f"!!document.querySelector('{operation} .btn.execute')")
        await page.evaluate(f"document.querySelector('{operation} .btn.execute').click()")
        code = await page.wait_for(f"document.querySelector('{operation} .live-responses-table tbody .response-col_status')?.innerText.trim()")
        assert code == "200"
        body = await page.wait_for(f"document.querySelector('{operation} .live-responses-table .microlight')?.innerText")
        assert "builtin-text" in body and '"nextPageToken"' in body
        assert any(url.startswith(f"{gateway}/api/agents") for url in page.requested)
        # Everything the page loaded or called came from the gateway itself.
        assert page.requested and all(url.startswith(gateway) or url.startswith("data:") for url in page.requested), page.requested


async def test_status_page_shows_the_guide_rows_with_values_and_refreshes(gateway, tmp_path):
    async with browser_page(tmp_path / "profile") as page:
        await page.goto(f"{gateway}/status")
        await page.wait_for("Number(document.body.dataset.polls || 0) >= 2", timeout=20)  # refreshed while open
        rows = await page.evaluate(
            "[...document.querySelectorAll('#rows tr')].map(r => [...r.cells].map(c => c.innerText))"
        )
        assert [row[0] for row in rows] == list(GUIDE)
        for metric, value, target, alert, state, _ in rows:
            assert (target, alert) == GUIDE[metric]
            assert value != "–" and value.split()[1] in ("ms", "%"), (metric, value)
            assert state in ("ok", "warning", "alert"), (metric, state)
        assert all(url.startswith(gateway) for url in page.requested), page.requested


def test_rows_judge_values_against_the_guide_in_either_direction():
    latency, hit_rate = status.GUIDE[0], status.GUIDE[4]
    assert [latency.state(v) for v in (None, 50, 100, 300, 500, 501)] == ["no data", "ok", "warning", "warning", "warning", "alert"]
    assert [hit_rate.state(v) for v in (95, 80, 60, 50, 49)] == ["ok", "warning", "warning", "warning", "alert"]


def test_a_hit_rate_needs_enough_reads_to_be_judged():
    def hit_rate(hits: float, misses: float) -> float | None:
        cache = {"devops_hub_cache_hits_total": [({}, hits)], "devops_hub_cache_misses_total": [({}, misses)]}
        board = status.StatusBoard(None, {}, ())  # type: ignore[arg-type]  # its metrics serve endpoint() only
        return board._values({"gateway": {}, "cache": cache}, None, time.time())["cache hit rate"][0]

    assert hit_rate(0, 5) is None  # a fresh stack's first reads: no data, not an alert
    assert hit_rate(0, status.MIN_CACHE_READS) == 0 and hit_rate(45, 15) == 75


def test_p95_is_interpolated_within_its_bucket_as_prometheus_does():
    # 100 requests: 90 under 10 ms, 10 between 10 and 100 ms: the 95th is halfway up the second bucket.
    assert status._quantile(0.95, {0.01: 90, 0.1: 100, float("inf"): 100}) == pytest.approx(55.0)
    assert status._quantile(0.95, {0.01: 0, float("inf"): 0}) is None
    # Beyond the last finite bucket: its bound, as histogram_quantile answers.
    assert status._quantile(0.95, {0.5: 10, float("inf"): 100}) == pytest.approx(500.0)
