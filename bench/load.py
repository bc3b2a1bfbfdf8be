"""Drives the load tools and reads their output into the figures the tables print.

h2load speaks HTTP/2, so with a gRPC-framed body and the gRPC headers it loads a
gRPC server as ghz would; its percentiles come from its per-request log, not from its
summary (which has none). hey is the performance guide's own HTTP/1.1 test
(`hey -n 10000 -c 100`), run exactly so; its summary has the percentiles. wrk holds
many more connections for a fixed time (`wrk -t12 -c400 -d30s`); its summary has no
p95 and no status counts, so a Lua `done` hook prints them (WRK_REPORT).
"""

from __future__ import annotations

import re
import shutil
import statistics
import struct
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.message import Message


@dataclass
class Figures:
    requests: int
    rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int  # answers other than a 200 (other than a 2xx or 3xx for wrk), and requests never answered
    # Connections wrk could not open, read or write, and requests it gave up on (its
    # 2 s timeout): hey and h2load count those among `errors`.
    socket_errors: int = 0
    timeouts: int = 0
    statuses: dict[int, int] = field(default_factory=dict)  # answers by HTTP status


# The Debian package each tool comes in.
PACKAGES = {"h2load": "nghttp2-client", "hey": "hey", "wrk": "wrk"}


def missing(tool: str) -> str | None:
    """Why `tool` cannot run here, or None when it can."""
    if shutil.which(tool) is None:
        return f"{tool} is not installed (apt-get install {PACKAGES[tool]})"
    return None


def require_h2load() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit(f"{missing('h2load')}; install it and run again")
    return path


def grpc_frame(message: Message) -> bytes:
    """The gRPC length-prefixed message: no compression flag, 4-byte big-endian length."""
    body = message.SerializeToString()
    return struct.pack(">BI", 0, len(body)) + body


def run(
    url: str,
    *,
    requests: int,
    clients: int,
    streams: int,
    body: bytes | None = None,
    http1: bool = False,
    headers: Mapping[str, str] | None = None,
) -> Figures:
    """`headers` go on every request (an API key, say)."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "requests.log"
        command = [require_h2load(), "-n", str(requests), "-c", str(clients), "-t", "1", f"--log-file={log}"]
        if http1:
            command.append("--h1")
        else:
            command += ["-m", str(streams)]
        if body is not None:
            data = Path(tmp) / "body.bin"
            data.write_bytes(body)
            command += ["-d", str(data), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        for name, value in (headers or {}).items():
            command += ["-H", f"{name}: {value}"]
        command.append(url)
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=600).stdout
        return _figures(log.read_text().splitlines(), output, requests)


def _figures(lines: list[str], summary: str, requested: int) -> Figures:
    starts, ends, latencies, errors = [], [], [], 0
    for line in lines:
        start_us, status, elapsed_us = (int(x) for x in line.split("\t")[:3])
        starts.append(start_us)
        ends.append(start_us + elapsed_us)
        latencies.append(elapsed_us / 1000)
        if status != 200:
            errors += 1
    errors += requested - len(lines)  # requests h2load gave up on never reach the log
    if not latencies:
        raise RuntimeError(f"h2load logged no request:\n{summary}")
    seconds = (max(ends) - min(starts)) / 1e6
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return Figures(len(latencies), len(latencies) / seconds, cuts[49], cuts[94], cuts[98], errors)


_HEY_RATE = re.compile(r"Requests/sec:\s+([\d.]+)")
_HEY_PERCENTILE = re.compile(r"(\d+)% in ([\d.]+) secs")
_HEY_STATUS = re.compile(r"\[(\d+)\]\s+(\d+) responses")


def hey(url: str, *, requests: int, clients: int, headers: Mapping[str, str] | None = None) -> Figures:
    """`hey -n requests -c clients url`; every answer other than a 200 is an error."""
    command = ["hey", "-n", str(requests), "-c", str(clients)]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True, timeout=600).stdout
    return hey_figures(output, requests)


def hey_figures(output: str, requested: int) -> Figures:
    rate = _HEY_RATE.search(output)
    if rate is None:
        raise RuntimeError(f"hey printed no summary:\n{output}")
    percentiles = {int(p): float(seconds) * 1000 for p, seconds in _HEY_PERCENTILE.findall(output)}
    statuses = {int(code): int(count) for code, count in _HEY_STATUS.findall(output)}
    answered = sum(statuses.values())
    return Figures(
        answered, float(rate.group(1)), percentiles[50], percentiles[95], percentiles[99], requested - statuses.get(200, 0),
        statuses=statuses,
    )


# wrk's hooks: each thread counts its answers by status; `done` prints, on one line, the
# figures wrk's summary leaves out (microseconds) and those counts ("200:9990,429:10").
WRK_REPORT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local e, counts, parts = summary.errors, {}, {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do counts[status] = (counts[status] or 0) + n end
  end
  for status, n in pairs(counts) do table.insert(parts, status .. ":" .. n) end
  io.write(string.format("BENCH %d %d %.0f %.0f %.0f %d %d %d %d %d %s\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
"""


def wrk(url: str, *, threads: int, connections: int, seconds: int) -> Figures:
    """`wrk -t threads -c connections -dNs --latency url`, with WRK_REPORT's figures read."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "report.lua"
        script.write_text(WRK_REPORT)
        command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script), url]
        output = subprocess.run(command, capture_output=True, text=True, check=True, timeout=seconds + 120).stdout
    return wrk_figures(output)


def wrk_figures(output: str) -> Figures:
    line = next((line for line in output.splitlines() if line.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no report:\n{output}")
    fields = line.split()
    requests, micros, p50, p95, p99, status, connect, read, write, timeout = (float(x) for x in fields[1:11])
    counts = (pair.partition(":") for pair in fields[11].split(",")) if len(fields) > 11 else ()
    return Figures(
        int(requests), requests / (micros / 1e6), p50 / 1000, p95 / 1000, p99 / 1000, int(status),
        socket_errors=int(connect + read + write), timeouts=int(timeout),
        statuses={int(code): int(n) for code, _, n in counts},
    )
