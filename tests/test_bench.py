"""The bench's parts, not its timings: the readers (hey's summary, wrk's report, CPU time from
/proc, py-spy's collapsed stacks), the targets' verdicts, the chart, the bare app's answers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest

from bench import baselines, chart, cpu, load
from bench.run import EVENT_LOOP, ConfigResult, Measured, Pair, innermost_own_code, module_of, own_time, targets
from devstack.ports import free_port, wait_for_port

HEY_OUTPUT = """
Summary:
  Total:\t4.1223 secs
  Requests/sec:\t2425.8364

Latency distribution:
  10% in 0.0156 secs
  50% in 0.0371 secs
  95% in 0.0702 secs
  99% in 0.0914 secs

Status code distribution:
  [200]\t9990 responses
  [429]\t10 responses

Error distribution:
  [2]\tGet "http://127.0.0.1:8100/api/agents": dial tcp: connection refused
"""


@pytest.mark.fast
def test_hey_figures_count_every_answer_but_a_200_as_an_error():
    figures = load.hey_figures(HEY_OUTPUT, requested=10_002)
    assert figures.requests == 10_000 and round(figures.rps) == 2426
    assert (round(figures.p50_ms, 1), round(figures.p95_ms, 1), round(figures.p99_ms, 1)) == (37.1, 70.2, 91.4)
    assert figures.errors == 12  # ten 429s and two requests that got no answer
    assert figures.statuses == {200: 9990, 429: 10}


def test_cpu_time_is_read_for_a_process_and_its_descendants():
    before = cpu.cpu_seconds([os.getpid()])
    sum(i * i for i in range(3_000_000))
    assert cpu.cpu_seconds([os.getpid()]) > before
    assert os.getpid() in cpu.descendants(os.getppid())
    assert cpu.cpu_seconds([2**22 + 7]) == 0  # a process that is not there costs nothing


def test_a_process_is_named_by_the_module_it_runs():
    child = subprocess.Popen([sys.executable, "-m", "code"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Until the child has exec'd, /proc shows the parent's command line.
        deadline = time.monotonic() + 30
        while module_of(child.pid) != "code" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert module_of(child.pid) == "code"
    finally:
        child.kill()
        child.wait()


@pytest.mark.fast
def test_py_spy_stacks_become_own_time_shares():
    raw = "main;serve;send 30\nmain;serve;call 10\nmain;render;send 10\n"
    assert own_time(raw, 2) == [("send", 0.8), ("call", 0.2)]


@pytest.mark.fast
def test_py_spy_stacks_go_to_the_hubs_innermost_function_with_what_it_calls():
    raw = (
        "main (gateway/server.py:9);run (asyncio/runners.py:118);__call__ (gateway/front.py:90);render (gateway/rest.py:12);"
        "dumps (json/__init__.py:231) 6\n"
        "main (gateway/server.py:9);run (asyncio/runners.py:118);__call__ (gateway/front.py:95);"
        "send (uvicorn/protocols/http/httptools_impl.py:522) 3\n"
        "main (gateway/server.py:9);run (services/common/runtime/process.py:190);run (asyncio/runners.py:118) 1\n"
    )
    assert innermost_own_code(raw, 3) == [("render (gateway/rest.py)", 0.6), ("__call__ (gateway/front.py)", 0.3), (EVENT_LOOP, 0.1)]


WRK_OUTPUT = """Running 30s test @ http://127.0.0.1:8100/api/agents
  12 threads and 400 connections
  Latency Distribution
     50%   38.00ms
     99%  150.00ms
  24000 requests in 30.00s, 100.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 7
  Non-2xx or 3xx responses: 3
Requests/sec:    800.00
BENCH 24000 30000000 38000 95500 150000 3 0 2 0 7 200:23995,429:3
"""


@pytest.mark.fast
def test_wrk_figures_come_from_the_report_hook():
    figures = load.wrk_figures(WRK_OUTPUT)
    assert (figures.requests, round(figures.rps), figures.p95_ms) == (24000, 800, 95.5)
    assert (figures.errors, figures.socket_errors, figures.timeouts) == (3, 2, 7)
    assert figures.statuses == {200: 23995, 429: 3}


def measured(rps: float, cpu_ms: float, *, errors: int = 0, timeouts: int = 0) -> Measured:
    return Measured(load.Figures(10_000, rps, 5.0, 15.0, 19.0, errors, timeouts=timeouts), cpu_ms, {"gateway": cpu_ms})


@pytest.mark.fast
def test_a_target_is_missed_by_one_answer_other_than_a_200_or_one_timeout():
    result = ConfigResult("plain", "as make run")
    result.pairs.append(Pair("plain", "hey GET /api/agents", "hey", "hey", measured(3000, 0.09, errors=1), measured(5000, 0.05), "bare"))
    result.pairs.append(Pair("plain", "wrk GET /api/agents", "wrk", "wrk", measured(3000, 0.09, timeouts=1), measured(5000, 0.05), "bare"))
    verdicts = {what.split(": ", 1)[1]: met for what, _, _, met in targets(result)}
    assert verdicts["CPU per request, every hub process"] and verdicts["req/s, hub / bare ASGI app"] and verdicts["p95"]
    assert not verdicts["answers, all rounds"]
    assert not verdicts["timeouts, socket errors, non-2xx"]


@pytest.mark.fast
def test_a_ratio_is_the_median_of_the_rounds_ratios():
    hub, bare = measured(200, 1.0), measured(400, 0.05)
    hub.round_rps, bare.round_rps = [100, 300, 200], [1000, 400, 400]
    assert Pair("plain", "hey", "hey", "hey", hub, bare, "bare").ratio == 0.5  # of 0.1, 0.75 and 0.5


def test_the_chart_is_a_png(tmp_path):
    path = tmp_path / "results.png"
    bars = [chart.Bar("plain\nhey GET /api/agents", 900, 4000, 1.1, 0.06, 0.22), chart.Bar("redis\nhey GET /api/agents", 1500, 4200, 0.3, 0.06, 0.36)]
    chart.write(path, bars, title="bench", cpu_target_ms=0.1, ratio_target=0.5)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 10_000


def test_the_bare_app_answers_the_hubs_bytes_and_headers(tmp_path):
    headers = [(b"date", b"Mon, 07 Dec 2026 05:41:44 GMT"), (b"etag", b'"1"'), (b"cache-control", b"max-age=300"),
               (b"content-length", b"2"), (b"content-type", b"application/json"), (b"x-request-id", b"a" * 32)]
    baselines.write_answer(tmp_path, baselines.AGENT_JSON, b"{}", headers)
    baselines.write_answer(tmp_path, baselines.LIST_JSON, b"[]", headers)
    port = free_port()
    bare = subprocess.Popen([sys.executable, "-m", "bench.baselines", "asgi", "--port", str(port), "--answers", str(tmp_path)])
    try:
        wait_for_port(port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
            first, second = http.get("/api/agents/bench-agent"), http.get("/api/agents/bench-agent")
        assert first.status_code == 200 and first.content == b"{}"
        assert [(k, v) for k, v in first.headers.raw if k not in (b"date", b"x-request-id")] == headers[1:5]
        # Made per answer, as the hub makes them; and no Server header, as the gateway sends none.
        assert first.headers["x-request-id"] != second.headers["x-request-id"] and "date" in first.headers
        assert "server" not in first.headers
    finally:
        bare.terminate()
        bare.wait(timeout=10)


def test_make_bench_says_what_to_install_when_a_load_tool_is_missing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick"], env=dict(os.environ, PATH=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "apt-get install hey wrk nghttp2-client" in done.stderr
