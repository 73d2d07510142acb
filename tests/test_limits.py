"""Resource limits (issue 12, item 3): the model, the pure rules, then one contract suite run
against every store.

The contract tests are parametrised over ``MemoryLimitStore`` and ``RedisLimitStore`` (the real
Redis, marked ``redis``), so both stores are held to the same behaviour. Time is an injected
``FakeClock``: nothing sleeps. What needs real processes is in ``test_limits_redis.py``.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import pytest
from pydantic import ValidationError
from redis.crc import key_slot

import tea_dist
from tea_dist.core.config import ParallelConfig, ResourceLimit, parse_rate, resolve_config
from tea_dist.core.errors import YAMLError
from tea_dist.core.yaml_loader import load_yaml, load_yaml_string
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.limits_redis import RedisLimitStore
from tea_dist.policies.limits import (
    EMPTY,
    Clock,
    LimitSnapshot,
    LimitState,
    LimitStore,
    MemoryLimitStore,
    on_acquire,
    on_release,
    on_renew,
)
from tests.test_breaker import T0, FakeClock

POLL = 0.1
LEASE = 5.0


def limit(
    max_concurrent: int | None = None, rate: str | None = None, name: str = "api"
) -> ResourceLimit:
    return ResourceLimit(name=name, max_concurrent=max_concurrent, rate=rate)


# ---------------------------------------------------------------- the model


def test_i12_3_resource_limit_fields_and_export() -> None:
    lim = tea_dist.ResourceLimit(name="openai", max_concurrent=2, rate="4/s")
    assert "ResourceLimit" in tea_dist.__all__
    assert (lim.name, lim.max_concurrent, lim.rate) == ("openai", 2, "4/s")
    assert lim.window == (4, 1.0)
    with pytest.raises(ValidationError):
        lim.max_concurrent = 3  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    ("rate", "window"),
    [("100/m", (100, 60.0)), ("5/s", (5, 1.0)), ("1000/h", (1000, 3600.0)), ("7", (7, 1.0))],
)
def test_i12_3_rate_in_celery_notation(rate: str, window: tuple[int, float]) -> None:
    assert parse_rate(rate) == window
    assert ResourceLimit(name="x", rate=rate).window == window


@pytest.mark.parametrize(
    ("fields", "culprit"),
    [
        ({"rate": "4/d"}, "rate"),
        ({"rate": "0/s"}, "rate"),
        ({"rate": "1.5/s"}, "rate"),
        ({"rate": "fast"}, "rate"),
        ({"max_concurrent": 0}, "max_concurrent"),
        ({}, "needs max_concurrent or rate"),
        ({"name": "", "rate": "1/s"}, "name"),
        ({"name": "  ", "rate": "1/s"}, "name"),
        ({"rate": "1/s", "burst": 3}, "burst"),
    ],
)
def test_i12_3_bad_limit_is_one_error_naming_the_field(fields: dict, culprit: str) -> None:
    with pytest.raises(ValidationError) as info:
        ResourceLimit(**{"name": "x", **fields})
    assert info.value.error_count() == 1
    assert culprit in str(info.value)
    if culprit == "rate":
        assert "'100/m'" in str(info.value)  # says what is accepted


def test_i12_3_parallel_config_limits_accepts_a_list() -> None:
    config = ParallelConfig(limits=[{"name": "a", "rate": "10/m"}, limit(2, name="b")])
    assert config.limits == (limit(rate="10/m", name="a"), limit(2, name="b"))
    assert ParallelConfig().limits == ()
    assert ParallelConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValidationError, match="'a' is named twice"):
        ParallelConfig(limits=[limit(1, name="a"), limit(2, name="a")])


def test_i12_3_edge_limits_replace_graph_limits() -> None:
    graph = ParallelConfig(limits=[limit(1, name="graph")], timeout_seconds=3)
    edge = ParallelConfig(limits=[limit(2, name="edge")])
    assert resolve_config(graph, edge).limits == (limit(2, name="edge"),)
    assert resolve_config(graph, ParallelConfig(fail_fast=True)).limits == graph.limits


AGENT = """
name: limited
settings:
  parallel:
    limits: [{name: openai, max_concurrent: 2, rate: "4/s"}]
nodes:
  - {name: prep, run: "return {}"}
  - {name: a, run: "return {}"}
  - {name: b, run: "return {}"}
  - {name: m, fan_in: true, run: "return {}"}
edges:
  - {from: __start__, to: prep}
  - {from: prep, to: [a, b], parallel: true, fan_in: m, limits: [{name: db, max_concurrent: 1}]}
  - {from: a, to: m}
  - {from: b, to: m}
  - {from: m, to: __end__}
"""


def test_i12_3_yaml_limits_on_settings_and_edges(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(AGENT)
    graph = load_yaml(path)
    assert graph.parallel_config is not None
    assert graph.parallel_config.limits == (limit(2, "4/s", name="openai"),)
    edges = graph._parallel["prep"]
    assert [e.config.limits for e in edges if e.config] == [(limit(1, name="db"),)] * 2


@pytest.mark.parametrize(
    ("before", "after", "message"),
    [
        ('rate: "4/s"', 'rate: "4/d"', "agent.yaml:5: settings.parallel.limits[0].rate: rate must"),
        ('rate: "4/s"', 'rat: "4/s"', "limits[0].rat: unknown key (did you mean 'rate'?)"),
        ("{name: db, max_concurrent: 1}", "{name: db}", "edges[1].limits[0]: limit 'db' needs"),
        ("[{name: db, max_concurrent: 1}]", "db", "edges[1].limits: must be a list"),
    ],
)
def test_i12_3_yaml_bad_limit_names_its_place(before: str, after: str, message: str) -> None:
    with pytest.raises(YAMLError) as info:
        load_yaml_string(AGENT.replace(before, after), "agent.yaml")
    assert message in str(info.value)


# ---------------------------------------------------------------- the pure rules


def test_i12_3_rule_max_concurrent_admits_n_then_polls() -> None:
    lim = limit(2)
    state = EMPTY
    for holder in ("a", "b"):
        delay, state = on_acquire(state, lim, holder, LEASE, T0, POLL)
        assert delay is None
    delay, after = on_acquire(state, lim, "c", LEASE, T0 + 1, POLL)
    assert delay == POLL and after.holders.keys() == {"a", "b"}
    # the earliest lease runs out sooner than the poll: ask again then
    delay, _ = on_acquire(state, lim, "c", LEASE, T0 + LEASE - 0.03, POLL)
    assert delay == pytest.approx(0.03)


def test_i12_3_rule_rate_counts_starts_in_a_sliding_window() -> None:
    lim = limit(rate="4/s")
    state = EMPTY
    for i in range(4):
        delay, state = on_acquire(state, lim, f"h{i}", LEASE, T0 + i * 0.1, POLL)
        assert delay is None
        state = on_release(state, f"h{i}")
    # releasing does not give a start back: the window holds 4 starts until T0 + 1
    delay, _ = on_acquire(state, lim, "late", LEASE, T0 + 0.5, POLL)
    assert delay == pytest.approx(0.5)
    delay, _ = on_acquire(state, lim, "late", LEASE, T0 + 0.999, POLL)
    assert delay == pytest.approx(0.001)
    delay, state = on_acquire(state, lim, "late", LEASE, T0 + 1.0, POLL)
    assert delay is None
    # the next one waits for the start at T0 + 0.1 to leave
    delay, _ = on_acquire(state, lim, "next", LEASE, T0 + 1.0, POLL)
    assert delay == pytest.approx(0.1)


def test_i12_3_rule_rate_refuses_what_a_token_bucket_would_admit() -> None:
    """A full burst, then one period/N later: GCRA or a token bucket admits a fifth start
    within the same second; the window log must not."""
    lim = limit(rate="4/s")
    state = EMPTY
    for i in range(4):
        _, state = on_acquire(state, lim, f"h{i}", LEASE, T0, POLL)
    delay, _ = on_acquire(state, lim, "fifth", LEASE, T0 + 0.25, POLL)
    assert delay == pytest.approx(0.75)


def test_i12_3_rule_rate_never_exceeded_in_any_window_random_arrivals() -> None:
    """Random arrivals, holds and releases, some never started: no half-open window of one
    period ever holds more than N counted starts."""
    rng = random.Random(12)
    lim = limit(max_concurrent=3, rate="5/s")
    state, now, starts = EMPTY, T0, []
    held: dict[str, bool] = {}
    for step in range(4000):
        now += rng.expovariate(20)
        if held and rng.random() < 0.5:
            holder = rng.choice(sorted(held))
            started = held.pop(holder)
            state = on_release(state, holder, started)
            if not started:
                starts.remove(next(s for s in reversed(starts) if s[1] == holder))
            continue
        holder = f"h{step}"
        delay, state = on_acquire(state, lim, holder, LEASE, now, POLL)
        if delay is None:
            assert len(state.holders) <= 3
            held[holder] = rng.random() < 0.8
            starts.append((now, holder))
    times = sorted(t for t, _ in starts)
    assert len(times) > 500
    assert all(times[i + 5] - times[i] >= 1.0 for i in range(len(times) - 5))


def test_i12_3_rule_renew_is_refused_after_release() -> None:
    _, state = on_acquire(EMPTY, limit(1), "a", LEASE, T0, POLL)
    renewed, state = on_renew(state, "a", LEASE, T0 + 1)
    assert renewed and state.holders["a"].expires == T0 + 1 + LEASE
    state = on_release(state, "a")
    assert on_renew(state, "a", LEASE, T0 + 2) == (False, state)
    assert state == LimitState(starts=())


# ---------------------------------------------------------------- the store contract

StoreFactory = Callable[[Clock], LimitStore]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def store_factory(request: pytest.FixtureRequest) -> StoreFactory:
    """Builds a store of the parametrised kind on a given clock (Redis: this test's prefix)."""
    if request.param == "memory":
        return lambda clock: MemoryLimitStore(clock, poll_seconds=POLL)
    url: str = request.getfixturevalue("redis_url")
    keys = Keys(request.getfixturevalue("redis_prefix"))
    return lambda clock: RedisLimitStore(url, keys, clock, poll_seconds=POLL)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(store_factory: StoreFactory, clock: FakeClock) -> LimitStore:
    return store_factory(clock)


def test_i12_3_store_satisfies_protocol(store: LimitStore) -> None:
    assert isinstance(store, LimitStore)


def test_i12_3_store_max_concurrent(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(2)
    assert store.acquire(lim, "a", LEASE) is None
    assert store.acquire(lim, "b", LEASE) is None
    assert store.acquire(lim, "c", LEASE) == pytest.approx(POLL)
    store.release(lim, "a")
    assert store.acquire(lim, "c", LEASE) is None
    assert store.acquire(lim, "d", LEASE) == pytest.approx(POLL)


def test_i12_3_store_rate_window(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(rate="4/s")
    for i in range(4):
        assert store.acquire(lim, f"h{i}", LEASE) is None
        store.release(lim, f"h{i}")
        clock.advance(0.125)
    assert store.acquire(lim, "late", LEASE) == pytest.approx(0.5)
    clock.advance(0.375)
    assert store.acquire(lim, "late", LEASE) == pytest.approx(0.125)
    clock.advance(0.125)  # T0 + 1: the start at T0 leaves the window
    assert store.acquire(lim, "late", LEASE) is None
    assert store.acquire(lim, "next", LEASE) == pytest.approx(0.125)


def test_i12_3_store_limit_with_both_needs_both(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(1, "2/m")
    assert store.acquire(lim, "a", LEASE) is None
    assert store.acquire(lim, "b", LEASE) == pytest.approx(POLL)  # rate has room, slot not
    store.release(lim, "a")
    assert store.acquire(lim, "b", LEASE) is None
    store.release(lim, "b")
    clock.advance(10)
    assert store.acquire(lim, "c", LEASE) == pytest.approx(50)  # slot free, rate spent
    assert store.acquire(limit(1, "2/m", name="other"), "c", LEASE) is None  # independent
    # a refused acquire took nothing: neither a slot nor a start
    clock.advance(50)
    assert store.acquire(lim, "c", LEASE) is None
    assert store.acquire(lim, "d", LEASE) == pytest.approx(POLL)


def test_i12_3_store_acquire_is_idempotent_per_holder(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(1, "2/s")
    assert store.acquire(lim, "a", LEASE) is None
    clock.advance(LEASE - 1)
    assert store.acquire(lim, "a", LEASE) is None  # again: no new start, lease extended
    clock.advance(2)  # past the first lease, within the second
    assert store.acquire(lim, "b", LEASE) == pytest.approx(POLL)
    snap = store.states()["api"]
    assert (snap.held, snap.started) == (1, 0)  # the start at T0 left the 1 s window


def test_i12_3_store_dead_holder_loses_permit_after_lease(
    store: LimitStore, clock: FakeClock
) -> None:
    lim = limit(1)
    assert store.acquire(lim, "dead", 2.0) is None
    clock.advance(1.9375)
    assert store.acquire(lim, "b", 2.0) == pytest.approx(0.0625)  # sooner than the poll
    clock.advance(0.0625)
    assert store.acquire(lim, "b", 2.0) is None
    assert store.renew(lim, "dead", 2.0) is False  # expired and taken


def test_i12_3_store_renewing_holder_keeps_permit(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(1)
    assert store.acquire(lim, "alive", 2.0) is None
    for _ in range(10):
        clock.advance(1.5)
        assert store.renew(lim, "alive", 2.0) is True
        assert store.acquire(lim, "b", 2.0) is not None
    store.release(lim, "alive")
    assert store.renew(lim, "alive", 2.0) is False  # a late renew never brings it back
    assert store.acquire(lim, "b", 2.0) is None


def test_i12_3_store_expired_untaken_lease_can_be_renewed(
    store: LimitStore, clock: FakeClock
) -> None:
    lim = limit(1)
    assert store.acquire(lim, "slow", 2.0) is None
    clock.advance(2.5)  # e.g. a long pause: expired, but nobody wanted the slot
    assert store.renew(lim, "slow", 2.0) is True
    assert store.acquire(lim, "b", 2.0) is not None


def test_i12_3_store_retry_is_a_new_acquire(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(rate="2/m")
    assert store.acquire(lim, "run:br:1", LEASE) is None
    store.release(lim, "run:br:1")
    assert store.acquire(lim, "run:br:2", LEASE) is None
    store.release(lim, "run:br:2")
    assert store.acquire(lim, "run:br:3", LEASE) == pytest.approx(60)
    assert store.states()["api"].started == 2


def test_i12_3_store_unstarted_release_gives_the_start_back(
    store: LimitStore, clock: FakeClock
) -> None:
    lim = limit(rate="1/h")
    assert store.acquire(lim, "a", LEASE) is None
    store.release(lim, "a", started=False)  # e.g. another limit of the branch refused it
    assert store.acquire(lim, "b", LEASE) is None
    store.release(lim, "b")
    assert store.acquire(lim, "c", LEASE) == pytest.approx(3600)


def test_i12_3_store_waiting_is_listed_until_granted_or_over(
    store: LimitStore, clock: FakeClock
) -> None:
    lim = limit(1, "10/m")
    assert store.acquire(lim, "a", LEASE) is None
    store.waiting(lim, "b", clock.now + 3)
    store.waiting(lim, "c", clock.now + 1)
    store.waiting(lim, "old", clock.now - 1)  # already over: not recorded
    assert store.states() == {"api": LimitSnapshot("api", 1, 2, 1, "10/m", 1)}
    clock.advance(1)
    assert store.states()["api"].waiting == 1
    store.release(lim, "a")
    assert store.acquire(lim, "b", LEASE) is None
    assert store.states() == {"api": LimitSnapshot("api", 1, 0, 1, "10/m", 2)}


def test_i12_3_store_states_lists_only_live_limits(store: LimitStore, clock: FakeClock) -> None:
    assert store.states() == {}
    assert store.acquire(limit(2, name="db"), "a", 1.0) is None
    assert store.acquire(limit(rate="3/s", name="search"), "a", 1.0) is None
    store.release(limit(rate="3/s", name="search"), "a")
    assert store.states() == {
        "db": LimitSnapshot("db", 1, 0, 2, None, 0),
        "search": LimitSnapshot("search", 0, 0, None, "3/s", 1),
    }
    clock.advance(1.0)  # the lease ran out, the start left the window
    assert store.states() == {}


def test_i12_3_store_reset_drops_a_limit(store: LimitStore, clock: FakeClock) -> None:
    lim = limit(1)
    assert store.acquire(lim, "stuck", LEASE) is None
    assert store.acquire(limit(1, name="other"), "x", LEASE) is None
    assert store.reset("api") is True
    assert "api" not in store.states() and "other" in store.states()
    assert store.acquire(lim, "b", LEASE) is None
    assert store.renew(lim, "stuck", LEASE) is False
    assert store.reset("unknown") is False


def test_i12_3_store_concurrent_threads_never_exceed_max(store_factory: StoreFactory) -> None:
    store = store_factory(FakeClock())
    lim = limit(3)
    inside, peak, lock = [0], [0], threading.Lock()
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for n in range(40):
            holder = f"t{i}:{n}"
            while store.acquire(lim, holder, LEASE) is not None:
                pass
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.001)  # hold the permit a moment, so that holders overlap
            with lock:
                inside[0] -= 1
            store.release(lim, holder)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert peak[0] == 3
    assert store.states() == {}


# ---------------------------------------------------------------- keys and scripts


def test_i12_3_limit_keys_share_one_cluster_slot() -> None:
    keys = Keys("acme")
    for name in ("openai", "a}b", "x{y", "gpu:modal"):
        names = keys.limit_keys(name)
        assert len(set(names)) == 4 and all(n.startswith("acme:") for n in names)
        assert len({key_slot(n.encode()) for n in names}) == 1
    assert keys.limit("openai", "holders") == "acme:limit:{openai}:holders"
    assert keys.limits_index() == "acme:limits"


def test_i12_3_lua_scripts_touch_only_declared_keys() -> None:
    """Redis Cluster runs a script only if every key it touches is in KEYS (one slot)."""
    text = resources.files("tea_dist.distributed").joinpath("limits.lua").read_text()
    calls = re.findall(r"redis\.call\('(\w+)'(?:,\s*([^,)]+))?", text)
    assert calls
    for command, first in calls:
        if command == "TIME":
            continue
        assert re.fullmatch(r"KEYS\[\w+\]", first.strip()), (command, first)
