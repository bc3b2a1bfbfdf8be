"""The staleness checker: concurrent writer/reader pairs against real processes, a
history of every acknowledged write and every read, and what the history says.

Each pair owns one agent. Its writer sets the agent's description to 1, 2, 3, …
through one agents process, each write after the last was acknowledged (a failed
write is retried with the same number: it may have committed). Pair i writes through
process i mod N. In a fault run, the writers of even pairs (those of process 0, the one
the faults kill) stop during the fault (or when it heals), so that their last write is
one made during the fault and nothing later can mend a lost invalidation of it; odd
pairs write on, a continuous load. Its readers read the
agent (GetAgent and ListAgents, alternately) through the writer's process ("same")
and through another ("cross"). A read is **stale** when it started after the write of
a newer number was acknowledged; its **lag** is how long after that acknowledgement.

    python -m devstack.coherence                         # SQLite + memory cache, no fault
    python -m devstack.coherence --database postgresql --redis --fault redis

prints, per window of the run (before the fault, during it, the first 2 s after it
healed, and after that), the reads, the stale ones and the lag distribution, and
checks that no acknowledged write was lost. tests/test_fault_coherence.py runs the
same with asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import dataclasses
import random
import statistics
import time
from collections.abc import Awaitable, Callable

import grpc
from devops_hub.v1 import agents_pb2, agents_pb2_grpc
from google.protobuf import field_mask_pb2

from devstack.cluster import Cluster

Agent = agents_pb2.Agent
SETTLE = 2.0  # after a fault heals, reads must be fresh once this has passed
FRESH = (("cache-control", "no-cache"),)


@dataclasses.dataclass(slots=True)
class Read:
    agent: str
    path: str  # "same" or "cross"
    start: float
    value: int


@dataclasses.dataclass
class History:
    acks: dict[str, list[tuple[int, float]]] = dataclasses.field(default_factory=dict)
    reads: list[Read] = dataclasses.field(default_factory=list)
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    @property
    def write_errors(self) -> int:
        return sum(n for what, n in self.errors.items() if what.startswith("write"))

    @property
    def read_errors(self) -> int:
        return sum(n for what, n in self.errors.items() if what.startswith("read"))

    def ack(self, agent: str, value: int, at: float) -> None:
        self.acks.setdefault(agent, []).append((value, at))

    def lag(self, read: Read) -> float | None:
        """None for a fresh read; else seconds since a newer write was acknowledged."""
        acks = self.acks.get(read.agent, [])
        # Numbers are written in order, so acks are sorted by number and by time.
        newer = bisect.bisect_right(acks, (read.value, float("inf")))
        if newer < len(acks) and acks[newer][1] < read.start:
            return read.start - acks[newer][1]
        return None

    def last_acked(self, agent: str) -> int:
        acks = self.acks.get(agent)
        return acks[-1][0] if acks else 0


@dataclasses.dataclass
class Window:
    name: str
    reads: int
    stale: int
    lags_ms: list[float]

    def row(self) -> str:
        if not self.lags_ms:
            return f"| {self.name} | {self.reads} | 0 | - | - | - |"
        lags = sorted(self.lags_ms)
        p95 = lags[min(len(lags) - 1, int(len(lags) * 0.95))]
        return f"| {self.name} | {self.reads} | {self.stale} | {statistics.median(lags):.1f} | {p95:.1f} | {lags[-1]:.1f} |"


def windows(history: History, path: str, fault_at: float | None, healed_at: float | None) -> list[Window]:
    bounds: list[tuple[str, float, float]]
    if fault_at is None or healed_at is None:
        bounds = [("whole run", -float("inf"), float("inf"))]
    else:
        bounds = [
            ("before the fault", -float("inf"), fault_at),
            ("during the fault", fault_at, healed_at),
            (f"first {SETTLE:.0f} s after", healed_at, healed_at + SETTLE),
            ("settled", healed_at + SETTLE, float("inf")),
        ]
    result = []
    for name, start, end in bounds:
        reads = [r for r in history.reads if r.path == path and start <= r.start < end]
        lags = [lag * 1000 for r in reads if (lag := history.lag(r)) is not None]
        result.append(Window(name, len(reads), len(lags), lags))
    return result


class Load:
    """The writer/reader pairs: bounded (a pause between calls), stopped by stop()."""

    def __init__(self, cluster: Cluster, pairs: int, *, pause: float = 0.01, timeout: float = 2.0, seed: int = 0) -> None:
        self.cluster = cluster
        self.pairs = pairs
        self.pause = pause
        # Pauses are drawn from a seeded generator: each seed is another schedule of
        # interleavings, and the same seed asks for the same schedule again.
        self._random = random.Random(seed)
        self.timeout = timeout
        self.history = History()
        self._stopping = asyncio.Event()
        # Set when a fault has healed: the writers of even pairs stop (see the docstring).
        self.quiet = asyncio.Event()
        self._channels: dict[int, grpc.aio.Channel] = {}

    def stub(self, process: int) -> agents_pb2_grpc.AgentsServiceStub:
        if process not in self._channels:
            self._channels[process] = grpc.aio.insecure_channel(self.cluster.agents(process).address)
        return agents_pb2_grpc.AgentsServiceStub(self._channels[process])

    def agent_id(self, pair: int) -> str:
        return f"coherence-{pair}"

    async def create_agents(self) -> None:
        await self.stub(0).BatchCreateAgents(
            agents_pb2.BatchCreateAgentsRequest(
                requests=[
                    agents_pb2.CreateAgentRequest(agent=Agent(id=self.agent_id(i), name=f"Pair {i}", domain=f"coherence-{i}", description="0"))
                    for i in range(self.pairs)
                ]
            ),
            timeout=10,
        )

    async def run(self) -> None:
        processes = len([name for name in self.cluster.parts if name.startswith("agents-")])
        loops: list[Awaitable[None]] = []
        for pair in range(self.pairs):
            home = pair % processes
            loops.append(self._write(pair, home))
            loops.append(self._read(pair, home, "same"))
            if processes > 1:
                loops.append(self._read(pair, (home + 1) % processes, "cross"))
        await asyncio.gather(*loops)

    def stop(self) -> None:
        self._stopping.set()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()

    async def _write(self, pair: int, process: int) -> None:
        agent_id, value = self.agent_id(pair), 1
        mask = field_mask_pb2.FieldMask(paths=["description"])
        while not self._stopping.is_set() and not (pair % 2 == 0 and self.quiet.is_set()):
            request = agents_pb2.UpdateAgentRequest(agent=Agent(id=agent_id, description=str(value)), update_mask=mask)
            try:
                await self.stub(process).UpdateAgent(request, timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                self.history.errors[f"write {exc.code().name}"] += 1
            else:
                self.history.ack(agent_id, value, time.monotonic())
                value += 1
            await asyncio.sleep(self._random.uniform(0, 2 * self.pause))

    async def _read(self, pair: int, process: int, path: str) -> None:
        agent_id, domain = self.agent_id(pair), f"coherence-{pair}"
        turn = 0
        while not self._stopping.is_set():
            turn += 1
            start = time.monotonic()
            try:
                if turn % 2:
                    agent = await self.stub(process).GetAgent(agents_pb2.GetAgentRequest(id=agent_id), timeout=self.timeout)
                else:
                    listed = await self.stub(process).ListAgents(agents_pb2.ListAgentsRequest(domain=domain), timeout=self.timeout)
                    agent = listed.agents[0]
            except grpc.aio.AioRpcError as exc:
                self.history.errors[f"read {exc.code().name}"] += 1
            except IndexError:
                self.history.errors["read: the list lost the agent"] += 1
            else:
                self.history.reads.append(Read(agent_id, path, start, int(agent.description)))
            await asyncio.sleep(self._random.uniform(0, self.pause))

    async def lost_writes(self) -> list[str]:
        """Agents whose stored number is below the last acknowledged one (read past
        every cache, from any process that answers)."""
        lost = []
        processes = len([name for name in self.cluster.parts if name.startswith("agents-")])
        for pair in range(self.pairs):
            agent_id = self.agent_id(pair)
            agent = await self._read_fresh(agent_id, processes)
            if int(agent.description) < self.history.last_acked(agent_id):
                lost.append(f"{agent_id}: stored {agent.description}, acknowledged {self.history.last_acked(agent_id)}")
        return lost


    async def _read_fresh(self, agent_id: str, processes: int) -> Agent:
        """The stored agent, from the first process that answers (one just restarted
        may still be reconnecting)."""
        for process in range(processes):
            try:
                request = agents_pb2.GetAgentRequest(id=agent_id)
                return await self.stub(process).GetAgent(request, metadata=FRESH, timeout=10, wait_for_ready=True)
            except grpc.aio.AioRpcError:
                if process == processes - 1:
                    raise
        raise AssertionError("no agents process to read from")


# A fault gets the cluster and the load's `quiet` event, set once the even pairs'
# writers should stop (check() sets it when the fault returns, if the fault did not).
Fault = Callable[[Cluster, asyncio.Event], Awaitable[None]]


def restart(name: str, down_for: float = 1.0) -> Fault:
    """Kills one part (SIGKILL; PostgreSQL: immediate stop) and starts it again."""

    async def fault(cluster: Cluster, quiet: asyncio.Event) -> None:
        part = cluster.parts[name]
        part.kill()
        await asyncio.sleep(down_for)
        await asyncio.to_thread(part.start)

    return fault


def sidecar_and_writer(down_for: float = 1.0) -> Fault:
    """The sidecar dies; writes go on (their invalidations cannot be delivered) and
    stop; the writing process dies with them undelivered; both come back."""

    async def fault(cluster: Cluster, quiet: asyncio.Event) -> None:
        cluster.parts["sidecar"].kill()
        await asyncio.sleep(down_for)
        quiet.set()
        await asyncio.sleep(0.1)  # the last writes in flight are answered
        cluster.parts["agents-0"].kill()
        await asyncio.to_thread(cluster.parts["sidecar"].start)
        await asyncio.to_thread(cluster.parts["agents-0"].start)

    return fault


def freeze(name: str, frozen_for: float = 2.0) -> Fault:
    """Stops one part with SIGSTOP (alive, its connections open, silent: the commoner
    outage) and lets it go on again (SIGCONT)."""

    async def fault(cluster: Cluster, quiet: asyncio.Event) -> None:
        part = cluster.parts[name]
        part.freeze(True)
        try:
            await asyncio.sleep(frozen_for)
        finally:
            part.freeze(False)

    return fault


FAULTS: dict[str, Callable[[], Fault]] = {
    "sidecar": sidecar_and_writer,
    "redis": lambda: restart("redis"),
    "agents": lambda: restart("agents-0"),
    "postgresql": lambda: restart("postgresql"),
    "frozen-sidecar": lambda: freeze("sidecar"),
    "frozen-redis": lambda: freeze("redis"),
    "frozen-agents": lambda: freeze("agents-0"),
    "frozen-postgresql": lambda: freeze("postgresql"),
}


@dataclasses.dataclass
class Outcome:
    history: History
    fault_at: float | None
    healed_at: float | None
    lost: list[str]

    def table(self, path: str) -> str:
        rows = [w.row() for w in windows(self.history, path, self.fault_at, self.healed_at)]
        header = (
            f"reads through the {'writing' if path == 'same' else 'other'} process\n\n"
            "| window | reads | stale | lag p50 ms | lag p95 ms | lag max ms |\n|---|---|---|---|---|---|"
        )
        return "\n".join([header, *rows])

    def stale(self, path: str, window: str, *, allowed_ms: float = 0.0) -> int:
        """Stale reads of a window, less those whose lag is within `allowed_ms` (what the
        contract allows across processes without any fault: one stream message)."""
        found = next(w for w in windows(self.history, path, self.fault_at, self.healed_at) if w.name == window)
        return sum(1 for lag in found.lags_ms if lag >= allowed_ms)


async def check(
    cluster: Cluster, *, pairs: int, warmup: float, after: float, fault: Fault | None = None, pause: float = 0.01, seed: int = 0
) -> Outcome:
    """Runs the load for warmup seconds, then the fault (if any), then `after` more
    seconds; returns the history, the fault's times and the lost writes."""
    load = Load(cluster, pairs, pause=pause, seed=seed)
    try:
        await load.create_agents()
        running = asyncio.create_task(load.run())
        await asyncio.sleep(warmup)
        fault_at = healed_at = None
        if fault is not None:
            fault_at = time.monotonic()
            await fault(cluster, load.quiet)
            healed_at = time.monotonic()
            load.quiet.set()
        await asyncio.sleep(after)
        load.stop()
        await running
        lost = await load.lost_writes()
        return Outcome(load.history, fault_at, healed_at, lost)
    finally:
        await load.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--redis", action="store_true", help="the sidecar on a Redis of its own")
    parser.add_argument("--processes", type=int, default=2, help="agents processes (WORKERS)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--fault", choices=sorted(FAULTS))
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0, help="the schedule of pauses between calls")
    args = parser.parse_args()
    cluster = Cluster(args.database, args.redis, args.processes).start()
    try:
        fault = FAULTS[args.fault]() if args.fault else None
        outcome = asyncio.run(check(cluster, pairs=args.pairs, warmup=args.warmup, after=args.after, fault=fault, seed=args.seed))
    finally:
        cluster.close()
    history = outcome.history
    setup = f"{args.database} + {'redis' if args.redis else 'memory'}, {args.processes} agents processes, {args.pairs} pairs"
    print(f"# {setup}; fault: {args.fault or 'none'}; seed {args.seed}\n")
    print(f"writes acknowledged: {sum(len(a) for a in history.acks.values())}, failed: {history.write_errors}; "
          f"reads: {len(history.reads)}, failed: {history.read_errors}; lost writes: {len(outcome.lost)}")
    print(f"failures: {dict(history.errors) or 'none'}\n")
    for path in ("same", "cross") if args.processes > 1 else ("same",):
        print(outcome.table(path) + "\n")
    for line in outcome.lost:
        print("LOST:", line)


if __name__ == "__main__":
    main()
