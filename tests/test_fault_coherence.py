"""Faults under load: each part killed, or frozen, while writer/reader pairs run (devstack/coherence.py,
the staleness checker), then restarted. Nothing acknowledged may be lost, and once
the fault has healed and SETTLE seconds have passed, no read may return a value
older than the last acknowledged write, through any process.

Each run has a PostgreSQL, a Redis and services of its own (devstack/cluster.py), never
the machine's shared servers. Without redis-server or PostgreSQL's binaries these
tests skip, except under CI=true.
"""

from __future__ import annotations

import pytest

from devstack.cluster import Cluster, Unavailable
from devstack.coherence import FAULTS, Outcome, check
from tests.support import unavailable

pytestmark = pytest.mark.slow

# The most another process may lag behind an acknowledged write without any fault.
CROSS_PROCESS_MS = 100.0

SETUPS = {
    "sqlite+memory": ("sqlite", False),
    "postgresql+redis": ("postgresql", True),
}
RUNS = [
    ("sqlite+memory", None),
    ("sqlite+memory", "sidecar"),
    ("sqlite+memory", "agents"),
    ("postgresql+redis", None),
    ("postgresql+redis", "sidecar"),
    ("postgresql+redis", "redis"),
    ("postgresql+redis", "agents"),
    ("postgresql+redis", "postgresql"),
    # Frozen (SIGSTOP), not killed: alive, connections open, silent.
    ("sqlite+memory", "frozen-sidecar"),
    ("postgresql+redis", "frozen-sidecar"),
    ("postgresql+redis", "frozen-redis"),
    ("postgresql+redis", "frozen-agents"),
    ("postgresql+redis", "frozen-postgresql"),
]


def start_cluster(setup: str) -> Cluster:
    database, redis = SETUPS[setup]
    # The relay polls often so that a run of a few seconds shows what it mends.
    cluster = Cluster(database, redis, agents_processes=2, settings={"RELAY_INTERVAL": "0.2"})
    try:
        return cluster.start()
    except Unavailable as exc:
        unavailable(f"the {setup} cluster", str(exc))


@pytest.mark.parametrize(("setup", "fault"), RUNS, ids=[f"{s}-{f or 'no-fault'}" for s, f in RUNS])
async def test_nothing_lost_and_nothing_stale_once_healed(setup: str, fault: str | None) -> None:
    cluster = start_cluster(setup)
    seed = RUNS.index((setup, fault))
    try:
        outcome: Outcome = await check(
            cluster, pairs=4, warmup=1.5, after=4.5, fault=FAULTS[fault]() if fault else None, pause=0.02, seed=seed
        )
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.close()
    report = f"seed {seed}\n\n" + "\n\n".join(outcome.table(path) for path in ("same", "cross"))
    history = outcome.history
    assert history.reads and history.acks, report
    assert outcome.lost == [], report
    if fault is None:
        # The process that acknowledged a write never reads the old value back.
        assert outcome.stale("same", "whole run") == 0, report
    else:
        assert outcome.stale("same", "before the fault") == 0, report
        assert outcome.stale("same", "settled") == 0, report
        # Across processes the contract allows, with no fault, the propagation of one
        # stream message (docs/cache.md: under 100 ms); once healed, nothing more.
        assert outcome.stale("cross", "settled", allowed_ms=CROSS_PROCESS_MS) == 0, report
