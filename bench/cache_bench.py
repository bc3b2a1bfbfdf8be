"""`python -m bench.cache_bench`: the cache sidecar against its yardsticks, in one run.

Starts what it needs itself, on loopback: a memory sidecar process, a bare grpc.aio
CacheService whose Get returns a constant (the cost of gRPC itself in Python), and
uses the machine's Redis under a key prefix of its own (removed at the end). Load
comes from h2load (as in bench/run.py), alternating rounds between the two sides so
machine noise hits both alike; medians are compared.

Prints markdown tables:
1. sidecar Get req/s against the bare servicer (target ≥ 0.8 of it);
2. keys/s of GetMany(100) against single Gets on the sidecar (target ≥ 20×);
3. a near-cache hit against a plain dict lookup, and a sidecar round trip (reported);
4. prefix invalidation time at 1k and 1M keys, memory and Redis (target: the 1M time
   within 2× of the 1k time, for each store).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
from devops_hub.v1 import cache_pb2, cache_pb2_grpc
from google.protobuf import wrappers_pb2

from bench import load
from devstack.ports import free_port, wait_for_port
from services.cache.client.client import CacheClient
from services.cache.client.near_cache import NearCache
from services.cache.sidecar.stores.base import NewEntry
from services.cache.sidecar.stores.memory import MemoryStore
from services.cache.sidecar.stores.redis import RedisStore, connect
from services.cache.sidecar.stores.redis_layout import KeyLayout
from services.common.contract.api import method_path

ROOT = Path(__file__).resolve().parent.parent
_CACHE_METHODS = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].methods_by_name
GET_PATH = method_path(_CACHE_METHODS["Get"])
GET_MANY_PATH = method_path(_CACHE_METHODS["GetMany"])
HOT_KEY = "bench:get:1"
VALUE = b"x" * 200  # about the size of a serialized Agent
CONSTANT = cache_pb2.CacheGetResponse(
    found=True, entry=cache_pb2.CacheEntry(key=HOT_KEY, value=VALUE, content_type="application/octet-stream", version=1), position=1
)


# --- the bare servicer -------------------------------------------------------------------


class ConstantCache(cache_pb2_grpc.CacheServiceServicer):
    async def Get(self, request, context):
        return CONSTANT


async def serve_bare(port: int) -> None:
    server = grpc.aio.server()
    cache_pb2_grpc.add_CacheServiceServicer_to_server(ConstantCache(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- measurements ------------------------------------------------------------------------


def rounds(url: str, body: bytes, args: argparse.Namespace) -> float:
    """Median req/s over the rounds, after a warm-up."""
    load.run(url, requests=2000, clients=args.clients, streams=args.streams, body=body)
    figures = [load.run(url, requests=args.requests, clients=args.clients, streams=args.streams, body=body)
               for _ in range(args.rounds)]
    errors = sum(f.errors for f in figures)
    if errors:
        raise RuntimeError(f"{url}: {errors} failed requests")
    return statistics.median(f.rps for f in figures)


def paired(ours: str, bare: str, body: bytes, args: argparse.Namespace) -> tuple[float, float]:
    """Median req/s of both sides, in alternating rounds."""
    load.run(ours, requests=2000, clients=args.clients, streams=args.streams, body=body)
    load.run(bare, requests=2000, clients=args.clients, streams=args.streams, body=body)
    ours_rps, bare_rps = [], []
    for _ in range(args.rounds):
        ours_rps.append(load.run(ours, requests=args.requests, clients=args.clients, streams=args.streams, body=body))
        bare_rps.append(load.run(bare, requests=args.requests, clients=args.clients, streams=args.streams, body=body))
    if sum(f.errors for f in ours_rps + bare_rps):
        raise RuntimeError("failed requests during the Get rounds")
    return statistics.median(f.rps for f in ours_rps), statistics.median(f.rps for f in bare_rps)


async def check_answers(address: str, keys: list[str]) -> None:
    """h2load counts HTTP statuses; make sure the gRPC calls themselves succeed."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        got = await stub.Get(cache_pb2.CacheGetRequest(key=HOT_KEY), timeout=5)
        many = await stub.GetMany(cache_pb2.CacheGetManyRequest(keys=keys), timeout=5)
    if not got.found or len(many.entries) != len(keys):
        raise RuntimeError("the sidecar does not hold the benchmark's keys")


async def fill_sidecar(address: str, keys: list[str]) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = cache_pb2_grpc.CacheServiceStub(channel)
        entries = [cache_pb2.CacheEntry(key=key, value=VALUE) for key in [HOT_KEY, *keys]]
        await stub.SetMany(cache_pb2.CacheSetManyRequest(entries=entries, ttl_seconds=3600), timeout=10)


async def near_cache_figures(address: str, iterations: int) -> tuple[float, float, float]:
    """ns per read: a dict lookup, a near-cache hit, a sidecar round trip."""
    async def loader() -> wrappers_pb2.BytesValue:
        return wrappers_pb2.BytesValue(value=VALUE)

    table = {HOT_KEY: wrappers_pb2.BytesValue(value=VALUE)}
    started = time.perf_counter_ns()
    for _ in range(iterations):
        table[HOT_KEY]
    dict_ns = (time.perf_counter_ns() - started) / iterations

    near_cache = NearCache()
    async with CacheClient(address, timeout=2.0, near_cache=near_cache) as near, CacheClient(address, timeout=2.0) as far:
        while not near_cache.live:
            await asyncio.sleep(0.01)
        key = "bench:near:1"
        await near.get_or_load(key, 3600, wrappers_pb2.BytesValue, loader)
        started = time.perf_counter_ns()
        for _ in range(iterations):
            await near.get_or_load(key, 3600, wrappers_pb2.BytesValue, loader)
        near_ns = (time.perf_counter_ns() - started) / iterations
        round_trips = max(1, iterations // 100)
        started = time.perf_counter_ns()
        for _ in range(round_trips):
            await far.get_or_load(key, 3600, wrappers_pb2.BytesValue, loader)
        far_ns = (time.perf_counter_ns() - started) / round_trips
    return dict_ns, near_ns, far_ns


def timed(operation: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter_ns()
    operation()
    return (time.perf_counter_ns() - started) / 1000


def memory_invalidation_us(size: int, repeats: int) -> float:
    store = MemoryStore(max_entries=size + 1000, max_bytes=1 << 40, default_ttl=3600)
    keys = [f"bench:list:{i}" for i in range(size)]
    samples = []
    for _ in range(repeats):
        for key in keys:
            store.set(key, b"x", "")
        store.maintain(budget=2 * size)
        samples.append(timed(lambda: store.invalidate("bench:list:*")))
    return statistics.median(samples)


async def redis_invalidation_us(url: str, size: int, repeats: int) -> float:
    prefix = f"dhbench:{uuid.uuid4().hex}:"
    store = RedisStore(connect(url, max_connections=16, timeout=5.0), default_ttl=600, layout=KeyLayout(prefix))
    try:
        await store.sync(0, 0, [], False)  # a position, as a relay gives a new store
        samples = []
        for _ in range(repeats):
            batches = [[NewEntry(f"bench:list:{i}", b"x", "") for i in range(start, min(size, start + 1000))]
                       for start in range(0, size, 1000)]
            for group in range(0, len(batches), 8):
                await asyncio.gather(*(store.set_many(batch) for batch in batches[group : group + 8]))
            state = await store.sync_state()
            # A write's invalidation, as the relay sends it: one prefix, O(1).
            started = time.perf_counter_ns()
            await store.sync(state.applied, state.applied + 1, ["bench:list:*"], False)
            samples.append((time.perf_counter_ns() - started) / 1000)
        return statistics.median(samples)
    finally:
        await store.clear()
        await store.close()


# --- the run -----------------------------------------------------------------------------


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "bare"])
    parser.add_argument("--port", type=int, help="bare mode: the port to serve on")
    parser.add_argument("--requests", type=int, default=10000, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams per HTTP/2 connection")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0")
    parser.add_argument("--big", type=int, default=1_000_000, help="the large keyspace for invalidation")
    args = parser.parse_args()
    if args.mode == "bare":
        asyncio.run(serve_bare(args.port))
        return 0
    load.require_h2load()

    ports = {"sidecar": free_port(), "bare": free_port()}
    # The sidecar alone, without the agents service that checks keys: access rules off.
    env = dict(
        os.environ, CACHE_ADDR=f"127.0.0.1:{ports['sidecar']}", CACHE_MAX_SIZE="100000", LOG_LEVEL="WARNING",
        AUTH_ENABLED="false", RATE_LIMIT_REQUESTS="0", CACHE_METRICS_PORT="0",
    )
    env.pop("REDIS_URL", None)
    processes = [
        start([sys.executable, "-m", "services.cache.sidecar"], env),
        start([sys.executable, "-m", "bench.cache_bench", "bare", "--port", str(ports["bare"])], env),
    ]
    try:
        for port in ports.values():
            wait_for_port(port)
        sidecar = f"127.0.0.1:{ports['sidecar']}"
        many_keys = [f"bench:many:{i}" for i in range(100)]
        asyncio.run(fill_sidecar(sidecar, many_keys))
        asyncio.run(check_answers(sidecar, many_keys))

        get_body = load.grpc_frame(cache_pb2.CacheGetRequest(key=HOT_KEY))
        many_body = load.grpc_frame(cache_pb2.CacheGetManyRequest(keys=many_keys))
        ours, bare = paired(f"http://{sidecar}{GET_PATH}", f"http://127.0.0.1:{ports['bare']}{GET_PATH}", get_body, args)
        many_rps = rounds(f"http://{sidecar}{GET_MANY_PATH}", many_body, args)
        dict_ns, near_ns, far_ns = asyncio.run(near_cache_figures(sidecar, 200_000))
    finally:
        for proc in processes:
            proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    small = 1000
    invalidation = {
        "memory": (memory_invalidation_us(small, 20), memory_invalidation_us(args.big, 3)),
        "Redis": (asyncio.run(redis_invalidation_us(args.redis_url, small, 20)),
                  asyncio.run(redis_invalidation_us(args.redis_url, args.big, 3))),
    }

    print(f"# Cache bench: {args.rounds} rounds x {args.requests} requests per side, {args.clients} clients x "
          f"{args.streams} streams, {os.cpu_count()} cores\n")
    print("| measure | DevOps Hub | yardstick | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| Get req/s: sidecar vs bare grpc.aio servicer | {ours:,.0f} | {bare:,.0f} | {ours / bare:.2f} | ≥ 0.8 |")
    print(f"| keys/s: GetMany(100) vs single Gets | {many_rps * 100:,.0f} | {ours:,.0f} | "
          f"{many_rps * 100 / ours:.1f}× | ≥ 20× |")
    print(f"| ns per read: near-cache hit vs dict lookup | {near_ns:,.0f} | {dict_ns:,.0f} | "
          f"{near_ns / dict_ns:.0f}× | reported |")
    print(f"| ns per read: near-cache hit vs sidecar round trip | {near_ns:,.0f} | {far_ns:,.0f} | "
          f"{far_ns / near_ns:.0f}× faster | reported |")
    print()
    print(f"| prefix invalidation | 1k keys (µs) | {args.big:,} keys (µs) | ratio | target |")
    print("|---|---|---|---|---|")
    for store, (at_small, at_big) in invalidation.items():
        print(f"| {store} | {at_small:,.1f} | {at_big:,.1f} | {at_big / at_small:.2f} | ≤ 2 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
