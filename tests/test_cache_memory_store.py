"""The memory store, with an injected clock and random source: unit tests, and a
hypothesis state machine run against a plain model of what a cache must do."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from services.cache.client.keys import MAX_PREFIX_DEPTH, escape_key
from services.cache.sidecar.stores.memory import MemoryStore
from services.common.contract.errors import InvalidArgument
from tests.support.cache import FakeClock

pytestmark = pytest.mark.fast


def store(clock: FakeClock | None = None, **overrides) -> MemoryStore:
    """A store with a position in the invalidation log (0, as for an empty log), so it
    takes fills."""
    options = dict(max_entries=1000, max_bytes=1 << 20, default_ttl=60.0, clock=clock or FakeClock(), rand=lambda: 0.5)
    options.update(overrides)
    memory = MemoryStore(**options)
    memory.sync(0, 0, (), False)
    return memory


def held(memory: MemoryStore) -> tuple[int, int]:
    """(entries, bytes) held, counting dead entries not yet reclaimed: what the bounds limit."""
    return len(memory._entries), memory._bytes


def test_ttl_expires_on_the_injected_clock_and_counts_as_ttl_eviction() -> None:
    clock = FakeClock()
    memory = store(clock)
    memory.set("agents:get:1", b"x", "", ttl=10)
    clock.now += 9.99
    assert memory.get("agents:get:1") is not None
    clock.now += 0.02
    assert memory.get("agents:get:1") is None
    stats = memory.stats()
    assert stats.evictions["ttl"] == 1
    assert stats.entries == 0 and stats.bytes == 0


def test_ttl_jitter_stays_within_ten_percent() -> None:
    clock = FakeClock()
    start = clock.now
    shortest = store(clock, rand=lambda: 0.0)
    longest = store(clock, rand=lambda: 1.0)
    shortest.set("k:1", b"x", "", ttl=100)
    longest.set("k:1", b"x", "", ttl=100)
    for elapsed, short_alive, long_alive in [(89.9, True, True), (90.1, False, True), (109.9, False, True), (110.1, False, False)]:
        clock.now = start + elapsed
        assert (shortest.get("k:1") is not None, longest.get("k:1") is not None) == (short_alive, long_alive), elapsed


def test_zero_ttl_means_the_default_ttl() -> None:
    clock = FakeClock()
    memory = store(clock, default_ttl=30.0)
    memory.set("k:1", b"x", "", ttl=0)
    clock.now += 29.0
    assert memory.get("k:1") is not None
    clock.now += 2.0
    assert memory.get("k:1") is None


def test_expired_entries_are_reclaimed_without_being_read() -> None:
    clock = FakeClock()
    memory = store(clock)
    for i in range(500):
        memory.set(f"short:{i}", b"x" * 10, "", ttl=1)
    memory.set("long:1", b"y", "", ttl=100)
    clock.now += 5
    stats = memory.stats()
    assert stats.entries == 1
    assert stats.bytes == len(b"y") + len("long:1")
    assert stats.evictions["ttl"] == 500


def test_expired_entries_make_room_before_live_ones_are_evicted() -> None:
    clock = FakeClock()
    memory = store(clock, max_entries=3)
    for key in ("old:1", "old:2", "old:3"):
        memory.set(key, b"x", "", ttl=1)
    clock.now += 5
    memory.set("new:1", b"x", "")
    evictions = memory.stats().evictions
    assert (evictions["ttl"], evictions["size"]) == (3, 0)


def test_overwrites_keep_the_expiry_heap_bounded() -> None:
    memory = store()
    for i in range(20_000):
        memory.set("hot:1", str(i).encode(), "")
    assert memory.stats().entries == 1
    assert len(memory._expiry) <= 2 * 1 + 1024 + 1
    assert memory.get("hot:1").value == b"19999"


def test_fills_older_than_the_history_are_refused() -> None:
    memory = store(history=2)
    memory.sync(0, 1, ["other:*"], False)
    assert memory.set("agents:1", b"x", "", version=0) is True  # a later record, but of other keys: fine
    memory.sync(1, 2, ["other:*"], False)
    memory.sync(2, 3, ["other:*"], False)  # the record at 1 is forgotten: the floor is 1
    assert memory.set("agents:2", b"x", "", version=0) is False
    assert memory.set("agents:3", b"x", "", version=1) is True
    assert memory.set("agents:4", b"x", "", version=memory.position.applied) is True
    assert memory.set("agents:5", b"x", "") is True  # an overwrite (no version) is unconditional
    assert memory.get("agents:5").version == 3  # ...and stored at the store's position


@pytest.mark.parametrize("pattern", ["agents:get:1", "agents:*", "agents:get:*", "agents:get:?", "*:get:1", "*"])
def test_a_fill_read_before_a_matching_invalidation_is_refused(pattern: str) -> None:
    memory = store()
    memory.sync(0, 4, ["other:*"], False)
    version = memory.position.applied  # a Get misses at 4; the loader reads
    memory.sync(4, 5, [pattern], False)  # a write's invalidation, recorded at 5
    assert memory.set("agents:get:1", b"stale", "", version=version) is False
    assert memory.get("agents:get:1") is None
    assert memory.set("agents:get:1", b"new", "", version=memory.position.applied) is True  # read after it
    assert memory.get("agents:get:1").version == 5


def test_a_fill_read_before_an_invalidation_from_outside_the_log_is_refused() -> None:
    memory = store()
    version = memory.position.applied
    memory.sync(0, 3, ["other:*"], False)
    memory.invalidate("agents:get:*")  # an operator's: recorded at the current position, 3
    memory.delete("workflows:get:1")
    assert memory.set("agents:get:1", b"stale", "", version=version) is False
    assert memory.set("workflows:get:1", b"stale", "", version=version) is False
    assert memory.set("workflows:get:2", b"fine", "", version=version) is True  # not named by either


def test_a_fill_is_refused_when_the_key_holds_a_newer_version() -> None:
    memory = store()
    memory.sync(0, 8, ["other:*"], False)
    assert memory.set("agents:get:1", b"read at 8", "", version=8) is True
    assert memory.set("agents:get:1", b"read at 6", "", version=6) is False
    assert memory.get("agents:get:1").value == b"read at 8"
    assert memory.set("agents:get:1", b"read at 8 too", "", version=8) is True  # not older: replaces
    memory.set("agents:get:2", b"overwritten at 8", "")
    assert memory.set("agents:get:2", b"read at 7", "", version=7) is False
    # Once the newer entry is gone (invalidated), an old fill is judged by the history.
    memory.invalidate("agents:get:2")
    assert memory.set("agents:get:2", b"read at 7", "", version=7) is False  # recorded at 8 > 7


def test_a_fresh_store_refuses_every_fill_until_a_sync_gives_it_a_position() -> None:
    memory = MemoryStore(max_entries=10, max_bytes=1 << 20, default_ttl=60.0, clock=FakeClock())
    assert memory.position.fresh and memory.position.applied == 0
    for version in (0, 1, 12345):
        assert memory.set("agents:get:1", b"x", "", version=version) is False
    assert memory.set("agents:get:2", b"x", "") is True  # an overwrite is stored
    memory.sync(0, 10, [], False)  # from fresh: cleared, position and floor 10
    assert memory.get("agents:get:2") is None
    assert memory.set("agents:get:1", b"x", "", version=9) is False  # below the floor
    assert memory.set("agents:get:1", b"x", "", version=10) is True
    memory.reset()  # lost its data: fresh again
    assert memory.position.fresh and memory.get("agents:get:1") is None
    assert memory.set("agents:get:1", b"x", "", version=10) is False


def test_prefix_invalidation_never_looks_at_a_key() -> None:
    class Tripwire(str):
        """A key that fails the test if a prefix check is ever run against it."""

        def startswith(self, *args, **kwargs):  # type: ignore[override]
            raise AssertionError(f"prefix invalidation scanned {self!r}")

    memory = store()
    for i in range(200):
        memory.set(Tripwire(f"workflows:get:{i}"), b"x", "")
        memory.set(Tripwire(f"agents:list:{i}"), b"x", "")
    memory.set("agents:get:1", b"x", "")
    assert memory.invalidate("agents:list:*") == 200
    assert memory.invalidate("agents:*") == 1
    assert memory.get("agents:list:7") is None and memory.get("agents:get:1") is None
    assert memory.get("workflows:get:7") is not None
    assert memory.stats().entries == 200


def test_prefix_without_colon_covers_every_namespace_it_prefixes() -> None:
    memory = store()
    for key in ("agents:1", "agentsX:2", "agent", "ag:3", "workflows:4"):
        memory.set(key, b"x", "")
    assert memory.invalidate("agent*") == 3
    assert [key for key in ("agents:1", "agentsX:2", "agent", "ag:3", "workflows:4") if memory.get(key)] == [
        "ag:3",
        "workflows:4",
    ]


def test_glob_classes_and_escaped_keys_follow_fnmatch() -> None:
    memory = store()
    for key in ("agents:get:a1", "agents:get:b1", "agents:get:a22", "odd:[x]*?"):
        memory.set(key, b"x", "")
    assert memory.invalidate("agents:get:[a]?") == 1
    assert memory.get("agents:get:a22") is not None and memory.get("agents:get:b1") is not None
    assert memory.delete("odd:[x]*?") is True
    assert memory.get("odd:[x]*?") is None


def test_store_refuses_unusable_entries_with_field_violations() -> None:
    memory = store(max_bytes=100)
    with pytest.raises(InvalidArgument) as empty:
        memory.set("", b"x", "")
    assert [field for field, _ in empty.value.violations] == ["key"]
    with pytest.raises(InvalidArgument) as too_big:
        memory.set("k:1", b"x" * 101, "")
    assert [field for field, _ in too_big.value.violations] == ["value"]
    with pytest.raises(InvalidArgument):
        memory.set("k" * 1025, b"x", "")
    assert memory.stats().entries == 0



def test_namespaces_must_be_usable_as_redis_hash_tags() -> None:
    memory = store()
    for key in (":get:1", "{agents}:get:1", "ag}ents:1", "agents"):
        if key == "agents":
            assert memory.set(key, b"x", "") is True  # a key without ':' is its own namespace
            continue
        with pytest.raises(InvalidArgument) as refused:
            memory.set(key, b"x", "")
        assert [field for field, _ in refused.value.violations] == ["key"], key
    assert memory.set("agents:{json}:1", b"x", "") is True  # braces after the namespace are fine


def test_invalidated_entries_are_reclaimed_by_later_writes_and_maintenance() -> None:
    memory = store(max_entries=2000)
    for i in range(1000):
        memory.set(f"agents:list:{i}", b"x" * 10, "")
    memory.set("agents:get:1", b"y", "")
    assert memory.invalidate("agents:list:*") == 1000
    stats = memory.stats()
    assert (stats.entries, stats.bytes) == (1, 1 + len("agents:get:1"))
    assert held(memory)[0] == 1001  # dead entries still hold memory until reclaimed...
    memory.set("agents:get:2", b"z", "")
    assert held(memory)[0] < 1002  # ...each write reclaims a few...
    memory.maintain(budget=10_000)  # ...and maintenance the rest: only the two live entries are held
    assert held(memory) == (2, stats.bytes + 1 + len("agents:get:2"))
    assert memory.stats().evictions == {"size": 0, "bytes": 0, "ttl": 0}  # reclaiming is not evicting


def test_dead_entries_count_against_the_bounds_but_never_as_evictions() -> None:
    memory = store(max_entries=10)
    for i in range(10):
        memory.set(f"old:list:{i}", b"x", "")
    memory.invalidate("old:list:*")
    for i in range(10):
        memory.set(f"new:get:{i}", b"x", "")
    assert held(memory)[0] <= 10
    assert [memory.get(f"new:get:{i}") is not None for i in range(10)] == [True] * 10
    assert memory.stats().evictions["size"] == 0


def test_a_key_written_again_after_its_prefix_was_invalidated_is_live() -> None:
    memory = store()
    memory.set("agents:list:p1", b"old", "")
    memory.invalidate("agents:list:*")
    memory.set("agents:list:p1", b"new", "")
    assert memory.get("agents:list:p1").value == b"new"
    memory.maintain()
    assert memory.get("agents:list:p1").value == b"new"
    assert memory.stats().entries == 1


def test_prefix_levels_deeper_than_the_tree_fall_back_to_a_glob() -> None:
    deep = ":".join(["d"] * (MAX_PREFIX_DEPTH + 2))
    memory = store()
    memory.set(f"{deep}:1", b"x", "")
    memory.set(f"{deep}x:2", b"x", "")
    assert memory.invalidate(f"{deep}:*") == 1
    assert memory.get(f"{deep}:1") is None and memory.get(f"{deep}x:2") is not None


def test_negative_entries_live_at_most_the_negative_ttl() -> None:
    clock = FakeClock()
    memory = store(clock, default_ttl=300, negative_ttl=5)
    memory.set("agents:get:gone", b"", "ct", ttl=300, negative=True)
    memory.set("agents:get:here", b"v", "ct", ttl=300)
    hit = memory.get("agents:get:gone")
    assert hit is not None and hit.negative and hit.value == b""
    clock.now += 5.1
    assert memory.get("agents:get:gone") is None
    assert memory.get("agents:get:here") is not None
    with pytest.raises(InvalidArgument):
        memory.set("agents:get:x", b"not empty", "ct", negative=True)


# --- the state machine -------------------------------------------------------------------

KEYS = ["a:1", "a:2", "a:x:1", "a:x:2", "a:y:1", "b:1", "b:x:1", "c", "a:x:y:z:w:1", "a:x:y:z:w:2"]
PATTERNS = ["a:*", "a:x:*", "a:y:*", "b:*", "a:?", "*:1", "a:x:[12]", "*", "a:x:y:z:w:*", "c", "a*", "b:x:1", "*x*"]
TTLS = [0, 1, 10, 100]
DEFAULT_TTL = 50.0
NEGATIVE_TTL = 5.0


class Model:
    """What a cache must answer: the last value set for a key, until its TTL passes or an
    invalidation matching it runs. Entries keep their expiry and version, and leave when
    invalidated. The position is the invalidation log's; every invalidation is recorded
    at the position it was applied as (a Sync's `through`, or the current position for
    one from outside the log)."""

    def __init__(self) -> None:
        # key -> (value, expires_at, negative, version)
        self.entries: dict[str, tuple[bytes, float, bool, int]] = {}
        self.position = 0
        self.invalidations: list[tuple[int, str]] = []

    def live(self, key: str, now: float) -> tuple[bytes, bool] | None:
        found = self.entries.get(key)
        if found is None or found[1] <= now:
            return None
        return found[0], found[2]

    def raced(self, key: str, version: int) -> bool:
        """A fill read at `version` lost to an invalidation of its key recorded later."""
        return any(at > version and fnmatch.fnmatchcase(key, pattern) for at, pattern in self.invalidations)

    def holds_newer(self, key: str, version: int, now: float) -> bool:
        found = self.entries.get(key)
        return found is not None and found[1] > now and found[3] > version


class MemoryStoreMachine(RuleBasedStateMachine):
    """Large bounds: nothing is evicted, so the store must match the model exactly."""

    max_entries = 1000
    max_bytes = 1 << 20
    exact = True

    @initialize()
    def start(self) -> None:
        self.clock = FakeClock()
        self.store = MemoryStore(
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            default_ttl=DEFAULT_TTL,
            negative_ttl=NEGATIVE_TTL,
            clock=self.clock,
            rand=lambda: 0.5,  # no jitter: expiry instants are exact
            history=10_000,
        )
        self.store.sync(0, 0, (), False)
        self.model = Model()

    def _expiry(self, ttl: float, negative: bool) -> float:
        ttl = ttl if ttl > 0 else DEFAULT_TTL
        return self.clock.now + (min(ttl, NEGATIVE_TTL) if negative else ttl)

    @rule(key=st.sampled_from(KEYS), value=st.binary(max_size=40), ttl=st.sampled_from(TTLS), negative=st.booleans())
    def set(self, key: str, value: bytes, ttl: float, negative: bool) -> None:
        """An overwrite (no version): always stored, at the store's position."""
        value = b"" if negative else value
        assert self.store.set(key, value, "ct", ttl, None, negative) is True
        self.model.entries[key] = (value, self._expiry(ttl, negative), negative, self.model.position)

    @rule(key=st.sampled_from(KEYS))
    def get(self, key: str) -> None:
        found = self.store.get(key)
        expected = self.model.live(key, self.clock.now)
        if found is None and not self.exact:
            self.model.entries.pop(key, None)  # evicted: allowed when bounds are small
            return
        assert (None if found is None else (found.value, found.negative)) == expected

    @rule(key=st.sampled_from(KEYS), age=st.integers(min_value=0, max_value=3), value=st.binary(max_size=40))
    def fill(self, key: str, age: int, value: bytes) -> None:
        """A client's fill of a miss, read at the store's position then or a few
        entries before now (its load was slow)."""
        assert self.store.position.applied == self.model.position
        version = max(0, self.model.position - age)
        raced = self.model.raced(key, version)
        newer = self.model.holds_newer(key, version, self.clock.now)
        stored = self.store.set(key, value, "ct", 10, version)
        if raced:
            assert not stored, "a fill landed after an invalidation it raced"
        elif newer and self.exact:
            assert not stored, "a fill replaced a newer version"
        elif not newer:
            assert stored, "a fill was refused"
        # (With small bounds the newer entry may have been evicted: either is right.)
        if stored:
            self.model.entries[key] = (value, self._expiry(10, False), False, version)

    @rule(key=st.sampled_from(KEYS))
    def delete(self, key: str) -> None:
        self._invalidate(escape_key(key), self.store.delete(key), self.model.position)

    @rule(pattern=st.sampled_from(PATTERNS))
    def invalidate(self, pattern: str) -> None:
        """From outside the log: recorded at the current position."""
        self._invalidate(pattern, self.store.invalidate(pattern), self.model.position)

    @rule(patterns=st.lists(st.sampled_from(PATTERNS), max_size=3), step=st.integers(min_value=1, max_value=3))
    def sync(self, patterns: list[str], step: int) -> None:
        """The log's entries after the position, recorded at their `through`."""
        through = self.model.position + step
        state = self.store.sync(self.model.position, through, patterns, False)
        assert (state.applied, state.fresh) == (through, False)
        self.model.position = through
        for pattern in patterns:
            self._forget(pattern, through)

    @rule(step=st.integers(min_value=1, max_value=3))
    def sync_elsewhere(self, step: int) -> None:
        """Writes to keys this machine never uses: the position moves, nothing here goes."""
        self.sync(["z:*"], step)

    def _invalidate(self, pattern: str, removed: int, at: int) -> None:
        matched = [key for key in self.model.entries if fnmatch.fnmatchcase(key, pattern)]
        live = [key for key in matched if self.model.live(key, self.clock.now) is not None]
        # Entries past their TTL but not yet reclaimed may be counted, or not; with
        # small bounds, live ones may have been evicted already.
        assert removed <= len(matched)
        if self.exact:
            assert removed >= len(live)
        self._forget(pattern, at)

    def _forget(self, pattern: str, at: int) -> None:
        for key in [key for key in self.model.entries if fnmatch.fnmatchcase(key, pattern)]:
            del self.model.entries[key]
        self.model.invalidations.append((at, pattern))

    @rule(seconds=st.sampled_from([0.5, 1, 4.9, 5, 20, 60]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(budget=st.integers(min_value=1, max_value=20))
    def maintain(self, budget: int) -> None:
        self.store.maintain(budget)

    @invariant()
    def bounds_hold(self) -> None:
        entries, size = held(self.store)
        assert entries <= self.max_entries and size <= self.max_bytes

    @invariant()
    def stats_count_the_live_entries(self) -> None:
        if not hasattr(self, "store"):
            return
        stats = self.store.stats()
        live = [key for key in self.model.entries if self.model.live(key, self.clock.now) is not None]
        if self.exact:
            assert stats.entries == len(live)
            assert stats.bytes == sum(len(self.model.entries[key][0]) + len(key) + len("ct") for key in live)
        else:
            assert stats.entries <= len(live)


class SmallMemoryStoreMachine(MemoryStoreMachine):
    """Bounds of a few entries: evictions happen, so the store may miss what the model
    holds, but must never answer a value the model does not."""

    max_entries = 3
    max_bytes = 120
    exact = False


HYPOTHESIS = settings(max_examples=100, stateful_step_count=60, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
TestMemoryStoreAgainstModel = MemoryStoreMachine.TestCase
TestMemoryStoreAgainstModel.settings = HYPOTHESIS
TestSmallMemoryStoreAgainstModel = SmallMemoryStoreMachine.TestCase
TestSmallMemoryStoreAgainstModel.settings = HYPOTHESIS
