"""``RedisBreakerStore`` against the real Redis: atomicity across OS processes, persistence,
the one-script-per-transition rule, key layout, and what it prints.

The behaviour shared with the memory store is in ``test_breaker.py`` (the contract suite);
this file holds what only a store shared between processes must do. Child processes are
started with the ``spawn`` method, so each builds its own connection as a worker would.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from typing import Any

import pytest
import redis

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.core.results import CircuitState
from tea_dist.distributed.breaker_redis import RedisBreakerStore
from tea_dist.distributed.keys import Keys
from tea_dist.policies.breaker import CLOSED, Admission, BreakerStore
from tests.test_breaker import T0, FakeClock, cfg, trip

pytestmark = pytest.mark.redis

SPAWN = mp.get_context("spawn")


# -- what the child processes run (module level, so that spawn can import them) --


def _record_failures(url: str, prefix: str, n: int, barrier: Barrier) -> None:
    store = RedisBreakerStore(url, Keys(prefix))
    config = cfg(threshold=10**9)
    barrier.wait()
    for _ in range(n):
        store.record("shared", config, False, False)


def _acquire_once(
    store: RedisBreakerStore, config: CircuitBreakerConfig, barrier: Barrier, out: Queue[Any]
) -> None:
    barrier.wait()
    out.put(store.acquire("shared", config))


def _state_seen(url: str, prefix: str, name: str) -> tuple[str, bool]:
    store = RedisBreakerStore(url, Keys(prefix))
    return store.snapshot(name).state.value, store.acquire(name, cfg()).allowed


def _run_all(processes: list[mp.process.BaseProcess]) -> None:
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0] * len(processes)


# -- tests --


def test_td13_int_016_concurrent_failures_counted_exactly_redis(
    redis_url: str, redis_prefix: str
) -> None:
    n_procs, per_proc = 8, 100
    barrier = SPAWN.Barrier(n_procs)
    _run_all(
        [
            SPAWN.Process(
                target=_record_failures, args=(redis_url, redis_prefix, per_proc, barrier)
            )
            for _ in range(n_procs)
        ]
    )
    snap = RedisBreakerStore(redis_url, Keys(redis_prefix)).snapshot("shared")
    assert snap.failures == n_procs * per_proc
    assert snap.state is CircuitState.CLOSED


def test_redis_half_open_probe_limit_holds_across_processes(
    redis_url: str, redis_prefix: str
) -> None:
    config = cfg(threshold=1, reset=30, max_calls=2)
    trip(RedisBreakerStore(redis_url, Keys(redis_prefix), FakeClock(T0)), "shared", config)
    # pickled to each child, which opens its own connection
    later = RedisBreakerStore(redis_url, Keys(redis_prefix), FakeClock(T0 + 30))
    n_procs = 10
    barrier, out = SPAWN.Barrier(n_procs), SPAWN.Queue()
    _run_all(
        [
            SPAWN.Process(target=_acquire_once, args=(later, config, barrier, out))
            for _ in range(n_procs)
        ]
    )
    admissions: list[Admission] = [out.get(timeout=10) for _ in range(n_procs)]
    assert sum(a.allowed for a in admissions) == 2
    assert all(a.probe for a in admissions if a.allowed)
    assert [a.transition for a in admissions if a.transition] == [
        (CircuitState.OPEN, CircuitState.HALF_OPEN)
    ]
    assert later.snapshot("shared").probes_in_flight == 2


def test_redis_store_state_survives_new_store_instance(redis_url: str, redis_prefix: str) -> None:
    trip(RedisBreakerStore(redis_url, Keys(redis_prefix)), "svc", cfg())
    fresh = RedisBreakerStore(redis_url, Keys(redis_prefix))
    assert fresh.states() == {"svc": CircuitState.OPEN}
    assert fresh.acquire("svc", cfg()) == Admission(False, False, CircuitState.OPEN, None)
    with SPAWN.Pool(1) as pool:
        assert pool.apply(_state_seen, (redis_url, redis_prefix, "svc")) == ("open", False)


def test_redis_store_pickles_as_url_and_namespace(redis_url: str, redis_prefix: str) -> None:
    store = RedisBreakerStore(redis_url, Keys(redis_prefix), FakeClock())
    trip(store, "svc", cfg())
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, RedisBreakerStore)
    assert isinstance(copy, BreakerStore)
    assert copy.keys == Keys(redis_prefix)
    assert copy.snapshot("svc") == store.snapshot("svc")
    with pytest.raises(TypeError, match="from a URL"):
        pickle.dumps(RedisBreakerStore(redis.Redis.from_url(redis_url), Keys(redis_prefix)))


def test_redis_store_accepts_a_client(redis_url: str, redis_prefix: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    store = RedisBreakerStore(client, Keys(redis_prefix), FakeClock())
    trip(store, "svc", cfg())
    assert store.states() == {"svc": CircuitState.OPEN}
    assert store.reset() == [("svc", CircuitState.OPEN, CircuitState.CLOSED)]


def test_redis_store_uses_server_time_without_clock(
    redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisBreakerStore(redis_url, Keys(redis_prefix))
    server_now = redis.Redis.from_url(redis_url).time()
    monkeypatch.setattr(time, "time", lambda: 0.0)  # a wildly skewed local clock
    trip(store, "svc", cfg(threshold=1))
    opened_at = store.snapshot("svc").opened_at
    assert opened_at is not None
    assert abs(opened_at - (server_now[0] + server_now[1] / 1e6)) < 5


class CommandLog(redis.Redis):
    """A client that remembers the name of every command it sends."""

    def __init__(self, url: str) -> None:
        super().__init__(connection_pool=redis.ConnectionPool.from_url(url))
        self.sent: list[str] = []

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]).upper())
        return super().execute_command(*args, **options)


def test_redis_store_each_transition_is_one_evalsha(redis_url: str, redis_prefix: str) -> None:
    client = CommandLog(redis_url)
    clock = FakeClock()
    store = RedisBreakerStore(client, Keys(redis_prefix), clock)
    store.reset()
    trip(store, "warm", cfg(threshold=1))  # loads every script used below
    store.reset("warm")

    def half_open() -> Admission:
        clock.advance(30)
        return store.acquire("svc", cfg())

    calls = [
        lambda: store.record("svc", cfg(threshold=1), False, False),
        lambda: store.acquire("svc", cfg()),
        half_open,
        lambda: store.record("svc", cfg(), True, True),
        lambda: store.reset("svc"),
        lambda: store.reset(),
    ]
    for call in calls:
        client.sent.clear()
        call()
        assert client.sent == ["EVALSHA"]


def test_redis_store_keys_live_under_prefix_without_ttl(redis_url: str, redis_prefix: str) -> None:
    keys = Keys(redis_prefix)
    trip(RedisBreakerStore(redis_url, keys, FakeClock()), "svc", cfg())
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert set(client.scan_iter(match=f"{redis_prefix}*")) == {
        keys.circuit("svc"),
        keys.circuits_index(),
    }
    assert client.smembers(keys.circuits_index()) == {"svc"}
    assert client.ttl(keys.circuit("svc")) == -1
    assert client.hgetall(keys.circuit("svc")) == {
        "state": "open",
        "failures": "3",
        "opened_at": "1000",
        "probes": "0",
    }


def test_redis_store_repr_hides_password() -> None:
    for url in (
        "redis://:s3cret@127.0.0.1:6379/13",
        "redis://alice:s3cret@127.0.0.1:6379/13",
        "redis://127.0.0.1:6379/13?password=s3cret",
    ):
        text = repr(RedisBreakerStore(url, Keys("tea-test")))
        assert "s3cret" not in text
        assert "127.0.0.1:6379" in text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_redis_store_errors_are_tea_dist_errors_without_password() -> None:
    port = _closed_port()
    store = RedisBreakerStore(f"redis://:s3cret@127.0.0.1:{port}/0?socket_connect_timeout=0.5")
    for call in (lambda: store.acquire("svc", cfg()), store.states, lambda: store.snapshot("svc")):
        with pytest.raises(TeaDistError) as info:
            call()
        assert f"127.0.0.1:{port}" in str(info.value)
        assert "s3cret" not in str(info.value)
        assert isinstance(info.value.__cause__, redis.ConnectionError)


def test_redis_store_unknown_circuit_is_closed_and_not_created(
    redis_url: str, redis_prefix: str
) -> None:
    store = RedisBreakerStore(redis_url, Keys(redis_prefix))
    assert store.snapshot("nothing") == CLOSED
    assert store.reset("nothing") == []
    assert not list(redis.Redis.from_url(redis_url).scan_iter(match=f"{redis_prefix}*"))


def test_redis_store_rejects_a_malformed_url_without_printing_password() -> None:
    with pytest.raises(ConfigError) as info:
        RedisBreakerStore("http://:s3cret@127.0.0.1:6379/0")
    assert "s3cret" not in str(info.value)
