"""Circuit breaker: the pure transitions, then one contract suite run against every store.

The pure-function tests need no server. The contract tests are parametrised over
``MemoryBreakerStore`` and ``RedisBreakerStore`` (the real Redis, marked ``redis``), so both
stores are held to the same behaviour. Time is an injected ``FakeClock``: nothing sleeps.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import pytest

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.errors import ConfigError
from tea_dist.core.results import CircuitState
from tea_dist.distributed.breaker_redis import RedisBreakerStore
from tea_dist.distributed.keys import Keys
from tea_dist.policies.breaker import (
    CLOSED,
    Admission,
    BreakerStore,
    CircuitSnapshot,
    Clock,
    MemoryBreakerStore,
    on_acquire,
    on_record,
    transition_between,
)

CLOSED_S, OPEN_S, HALF_S = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN
T0 = 1_000.0


class FakeClock:
    """Epoch seconds that move only when a test says so (picklable, for other processes)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def cfg(threshold: int = 3, reset: float = 30.0, max_calls: int = 1) -> CircuitBreakerConfig:
    return CircuitBreakerConfig(
        failure_threshold=threshold, reset_timeout=reset, half_open_max_calls=max_calls
    )


def opened(at: float = T0, failures: int = 3) -> CircuitSnapshot:
    return CircuitSnapshot(OPEN_S, failures, at, 0)


def half_open(at: float = T0, probes: int = 1) -> CircuitSnapshot:
    return CircuitSnapshot(HALF_S, 0, at, probes)


# ---------------------------------------------------------------- pure transitions


def test_td13_unit_020_circuit_state_enum_has_three_states() -> None:
    assert {s.value for s in CircuitState} == {"closed", "open", "half_open"}
    assert CircuitState("half_open") is HALF_S


def test_td13_unit_021_circuit_starts_closed() -> None:
    assert CircuitSnapshot() == CLOSED == CircuitSnapshot(CLOSED_S, 0, None, 0)
    admission, after = on_acquire(CLOSED, cfg(), T0)
    assert admission == Admission(True, False, CLOSED_S, None)
    assert after == CLOSED


def test_td13_unit_022_opens_after_failure_threshold() -> None:
    snap = CLOSED
    for i in range(2):
        snap = on_record(snap, cfg(threshold=3), False, False, T0 + i)
        assert snap.state is CLOSED_S
    snap = on_record(snap, cfg(threshold=3), False, False, T0 + 2)
    assert snap == CircuitSnapshot(OPEN_S, 3, T0 + 2, 0)


def test_success_resets_consecutive_failures() -> None:
    snap = CLOSED
    for success in (False, False, True, False, False):
        snap = on_record(snap, cfg(threshold=3), success, False, T0)
    assert snap == CircuitSnapshot(CLOSED_S, 2, None, 0)


def test_td13_unit_023_open_circuit_refuses_requests() -> None:
    admission, after = on_acquire(opened(T0), cfg(reset=30), T0 + 29.999)
    assert admission == Admission(False, False, OPEN_S, None)
    assert after == opened(T0)


def test_td13_unit_024_half_open_after_reset_timeout() -> None:
    admission, after = on_acquire(opened(T0), cfg(reset=30), T0 + 30)
    assert admission == Admission(True, True, HALF_S, (OPEN_S, HALF_S))
    assert after == CircuitSnapshot(HALF_S, 0, T0 + 30, 1)


def test_td13_unit_028_half_open_admits_max_calls() -> None:
    config = cfg(reset=30, max_calls=2)
    first, snap = on_acquire(opened(T0), config, T0 + 30)
    second, snap = on_acquire(snap, config, T0 + 31)
    third, snap = on_acquire(snap, config, T0 + 32)
    assert [a.allowed for a in (first, second, third)] == [True, True, False]
    assert [a.probe for a in (first, second, third)] == [True, True, False]
    assert third == Admission(False, False, HALF_S, None)
    assert snap.probes_in_flight == 2


def test_td13_unit_029_success_in_half_open_closes() -> None:
    after = on_record(half_open(T0, probes=1), cfg(), True, True, T0 + 1)
    assert after == CLOSED
    assert transition_between(half_open(), after) == (HALF_S, CLOSED_S)


def test_td13_unit_030_failure_in_half_open_reopens() -> None:
    after = on_record(half_open(T0, probes=2), cfg(), False, True, T0 + 5)
    assert after == CircuitSnapshot(OPEN_S, 1, T0 + 5, 0)
    refused, _ = on_acquire(after, cfg(reset=30), T0 + 34)
    assert not refused.allowed


def test_late_failure_while_open_does_not_extend_open_period() -> None:
    snap = opened(T0)
    assert on_record(snap, cfg(), False, False, T0 + 20) == snap
    assert on_record(snap, cfg(), True, False, T0 + 20) == snap
    assert on_record(snap, cfg(), False, True, T0 + 20) == snap  # a probe of a past period


def test_non_probe_outcome_while_half_open_is_ignored() -> None:
    snap = half_open(T0, probes=1)
    assert on_record(snap, cfg(), True, False, T0 + 1) == snap
    assert on_record(snap, cfg(), False, False, T0 + 1) == snap


def test_late_probe_after_close_counts_as_closed_outcome() -> None:
    assert on_record(CLOSED, cfg(threshold=1), False, True, T0) == opened(T0, failures=1)


def test_half_open_reclaims_lost_probe_slots_after_reset_timeout() -> None:
    stuck = half_open(T0, probes=1)
    refused, _ = on_acquire(stuck, cfg(reset=30), T0 + 29)
    admitted, after = on_acquire(stuck, cfg(reset=30), T0 + 30)
    assert not refused.allowed
    assert admitted == Admission(True, True, HALF_S, None)
    assert after == CircuitSnapshot(HALF_S, 0, T0 + 30, 1)


def test_transition_between_reports_only_changes() -> None:
    assert transition_between(CLOSED, opened()) == (CLOSED_S, OPEN_S)
    assert transition_between(opened(T0), opened(T0 + 1)) is None


def test_keys_build_names_from_one_namespace() -> None:
    assert Keys().prefix == "tea"
    keys = Keys("acme")
    assert keys.circuit("api") == "acme:circuit:api"
    assert keys.circuit("api") == keys.circuit_prefix() + "api"
    assert keys.circuits_index() == "acme:circuits"
    for bad in ("", "acme:"):
        with pytest.raises(ConfigError):
            Keys(bad)


# ---------------------------------------------------------------- the store contract

StoreFactory = Callable[[Clock], BreakerStore]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds a store of the parametrised kind on a given clock (Redis: this test's prefix)."""
    if request.param == "memory":
        return MemoryBreakerStore
    url: str = request.getfixturevalue("redis_url")
    keys = Keys(request.getfixturevalue("redis_prefix"))
    return lambda clock: RedisBreakerStore(url, keys, clock)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_factory: StoreFactory, clock: FakeClock) -> BreakerStore:
    return store_factory(clock)


def trip(store: BreakerStore, name: str, config: CircuitBreakerConfig) -> None:
    """Record failures until ``name`` opens."""
    for _ in range(config.failure_threshold):
        store.acquire(name, config)
        store.record(name, config, False, False)
    assert store.snapshot(name).state is OPEN_S


def test_store_satisfies_protocol(store: BreakerStore) -> None:
    assert isinstance(store, BreakerStore)


def test_td13_unit_021_store_circuit_starts_closed(store: BreakerStore) -> None:
    assert store.snapshot("svc") == CLOSED
    assert store.states() == {}
    assert store.acquire("svc", cfg()) == Admission(True, False, CLOSED_S, None)
    assert store.states() == {"svc": CLOSED_S}


def test_td13_unit_022_store_opens_after_failure_threshold(
    store: BreakerStore, clock: FakeClock
) -> None:
    config = cfg(threshold=3)
    transitions = [store.record("svc", config, False, False) for _ in range(3)]
    assert transitions == [None, None, (CLOSED_S, OPEN_S)]
    assert store.snapshot("svc") == CircuitSnapshot(OPEN_S, 3, clock.now, 0)


def test_store_success_resets_failure_count(store: BreakerStore) -> None:
    config = cfg(threshold=3)
    for success in (False, False, True, False, False):
        store.record("svc", config, success, False)
    assert store.snapshot("svc") == CircuitSnapshot(CLOSED_S, 2, None, 0)


def test_td13_unit_023_store_open_circuit_refuses_requests(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    clock.advance(29.9)
    assert store.acquire("svc", cfg()) == Admission(False, False, OPEN_S, None)
    assert store.snapshot("svc").state is OPEN_S


def test_td13_unit_024_store_half_open_after_reset_timeout(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    clock.advance(30)
    assert store.acquire("svc", cfg()) == Admission(True, True, HALF_S, (OPEN_S, HALF_S))
    assert store.snapshot("svc") == CircuitSnapshot(HALF_S, 0, clock.now, 1)


def test_td13_unit_028_store_half_open_admits_max_calls(
    store: BreakerStore, clock: FakeClock
) -> None:
    config = cfg(max_calls=2)
    trip(store, "svc", config)
    clock.advance(30)
    admissions = [store.acquire("svc", config) for _ in range(4)]
    assert [a.allowed for a in admissions] == [True, True, False, False]
    assert [a.transition for a in admissions] == [(OPEN_S, HALF_S), None, None, None]
    assert store.snapshot("svc").probes_in_flight == 2


def test_td13_unit_029_store_success_in_half_open_closes(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    clock.advance(30)
    probe = store.acquire("svc", cfg())
    assert store.record("svc", cfg(), True, probe.probe) == (HALF_S, CLOSED_S)
    assert store.snapshot("svc") == CLOSED
    assert store.acquire("svc", cfg()).allowed


def test_td13_unit_030_store_failure_in_half_open_reopens(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    clock.advance(30)
    probe = store.acquire("svc", cfg())
    assert store.record("svc", cfg(), False, probe.probe) == (HALF_S, OPEN_S)
    assert store.snapshot("svc").opened_at == clock.now
    clock.advance(29)
    assert not store.acquire("svc", cfg()).allowed


def test_store_late_outcomes_while_open_change_nothing(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    before = store.snapshot("svc")
    clock.advance(20)
    assert store.record("svc", cfg(), False, False) is None
    assert store.record("svc", cfg(), True, False) is None
    assert store.snapshot("svc") == before


def test_store_reclaims_lost_probe_after_reset_timeout(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "svc", cfg())
    clock.advance(30)
    assert store.acquire("svc", cfg()).probe  # this probe's holder dies, never records
    clock.advance(29)
    assert not store.acquire("svc", cfg()).allowed
    clock.advance(1)
    assert store.acquire("svc", cfg()) == Admission(True, True, HALF_S, None)


def test_td13_unit_025_store_reset_closes_circuit(store: BreakerStore) -> None:
    trip(store, "svc", cfg())
    store.record("other", cfg(), False, False)
    assert store.reset("svc") == [("svc", OPEN_S, CLOSED_S)]
    assert store.snapshot("svc") == CLOSED
    assert store.acquire("svc", cfg()).allowed
    assert store.snapshot("other").failures == 1  # only the named circuit
    assert store.reset("svc") == []  # already closed: no transition
    assert store.reset("unknown") == []
    assert "unknown" not in store.states()


def test_td13_unit_025_store_reset_all_closes_every_circuit(
    store: BreakerStore, clock: FakeClock
) -> None:
    trip(store, "a", cfg())
    trip(store, "b", cfg())
    clock.advance(30)
    store.acquire("b", cfg())
    store.record("c", cfg(), False, False)
    changed = sorted(store.reset())
    assert changed == [("a", OPEN_S, CLOSED_S), ("b", HALF_S, CLOSED_S)]
    assert store.states() == {"a": CLOSED_S, "b": CLOSED_S, "c": CLOSED_S}
    assert store.snapshot("c") == CLOSED


def test_td13_unit_026_store_states_lists_all(store: BreakerStore, clock: FakeClock) -> None:
    store.acquire("fine", cfg())
    trip(store, "down", cfg())
    trip(store, "probing", cfg())
    clock.advance(30)
    store.acquire("probing", cfg())
    assert store.states() == {"fine": CLOSED_S, "down": OPEN_S, "probing": HALF_S}


def test_td13_int_018_store_circuits_are_independent(store: BreakerStore) -> None:
    trip(store, "a", cfg(threshold=1))
    assert store.acquire("b", cfg(threshold=1)).allowed
    assert not store.acquire("a", cfg(threshold=1)).allowed


class YieldingClock(FakeClock):
    """A clock that gives up the CPU when read, widening any unguarded read-modify-write."""

    def __call__(self) -> float:
        os.sched_yield()
        return self.now


def hammer(n_threads: int, work: Callable[[int], object]) -> None:
    """Run ``work(i)`` on ``n_threads`` threads released together."""
    barrier = threading.Barrier(n_threads)

    def run(i: int) -> None:
        barrier.wait()
        work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_td13_unit_027_thread_safe_transitions(store_factory: StoreFactory) -> None:
    clock = YieldingClock()
    store = store_factory(clock)
    config = cfg(threshold=10**9, max_calls=3)
    n_threads, per_thread = 8, 200
    hammer(
        n_threads,
        lambda _: [store.record("count", config, False, False) for _ in range(per_thread)],
    )
    assert store.snapshot("count").failures == n_threads * per_thread

    trip(store, "probe", cfg(threshold=1, max_calls=3))
    clock.advance(30)
    admitted: list[Admission] = []
    hammer(16, lambda _: admitted.append(store.acquire("probe", cfg(threshold=1, max_calls=3))))
    assert sum(a.allowed for a in admitted) == 3
    assert [a.transition for a in admitted if a.transition] == [(OPEN_S, HALF_S)]
