"""The bench's readers: hey's summary, CPU time from /proc, py-spy's collapsed stacks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench import cpu, load
from bench.run import module_of, own_time

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
