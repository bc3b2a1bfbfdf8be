"""What a full garbage collection costs a serving process, before and after gc.freeze().

Every serving process freezes what its start-up built (services/common/runtime/process.py):
a full collection pauses the event loop, and with every request in flight, for as long
as it takes to walk the tracked objects. This imports what the processes import, then
times full collections as they were, and again once frozen.

    python -m bench.gc_pause
"""

from __future__ import annotations

import gc
import statistics
import time

# Imported for the objects they make, as the processes import them.
import gateway.server  # noqa: F401
import services.agents.server  # noqa: F401
import services.cache.sidecar.server  # noqa: F401
import services.workflows.server  # noqa: F401

ROUNDS = 20


def full_collection_ms() -> float:
    samples = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        gc.collect()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def main() -> None:
    tracked = len(gc.get_objects())
    before = full_collection_ms()
    gc.freeze()
    after = full_collection_ms()
    print("| tracked objects | full collection, ms | frozen: full collection, ms | ratio |")
    print("|---|---|---|---|")
    print(f"| {tracked:,} | {before:.2f} | {after:.3f} | {after / before:.3f} |")


if __name__ == "__main__":
    main()
