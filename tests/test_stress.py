"""TD.13 E2E and TD.4 stress scenarios: leaks, concurrency, memory, chaos, overhead.

Marked ``stress`` (they run by default). Sizes are chosen so the whole file stays well under
30 s on two cores; ``TEA_DIST_SOAK_SECONDS`` lengthens the sustained-load scenario (E2E-005,
an hour in the test design) when run by hand.
"""

from __future__ import annotations

import collections
import gc
import logging
import os
import random
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import pytest

from tea_dist import CircuitBreakerConfig, CircuitState, ParallelConfig, RetryPolicy
from tea_dist.core.strategies import get_executor
from tea_dist.observe.events import FlowContext
from tests import nodes
from tests.nodes import fan_graph, final_state

pytestmark = pytest.mark.stress

VOLATILE = ("timing_ms", "start_time", "end_time", "worker")


def stable(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results without the fields that legitimately differ between runs."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in results]


def outcome(r: dict[str, Any]) -> str:
    return "ok" if r["success"] else str(r["error_type"])


class Counting:
    """A callback that counts events (and keeps nothing else)."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.transitions: list[tuple[str | None, str, str]] = []
        self.lock = threading.Lock()

    def on_flow_start(self, ctx: FlowContext) -> None:
        with self.lock:
            self.counts["start"] += 1

    def on_flow_complete(self, ctx: FlowContext, result: Any) -> None:
        with self.lock:
            self.counts["complete"] += 1

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        with self.lock:
            self.transitions.append((ctx.circuit, str(old), str(new)))


# -- TD.13 E2E --

# process: each timeout kills a worker; celery: the caller's threads are what could leak
LEAK_RUNS = {"thread": 100, "asyncio": 100, "process": 10, "celery": 10}


def test_td13_e2e_001_repeated_timeouts_leak_no_threads_or_processes(strategy: str) -> None:
    """100 invocations, each with two branches timing out (nodes that honour cancel_token) and
    a callback: the threads of stopped nodes, callback lanes and workers all go away."""
    callback = Counting()
    g = fan_graph(
        {"hang1": nodes.cooperative_sleep, "hang2": nodes.cooperative_sleep, "ok": nodes.add_one},
        config=ParallelConfig(strategy=strategy),
        edge_configs={h: ParallelConfig(timeout_seconds=0.01) for h in ("hang1", "hang2")},
    )
    app = g.compile(parallel_callbacks=[callback])
    list(app.invoke({"value": 1}))  # warm up: pool threads and workers exist before counting
    time.sleep(0.3)
    me = psutil.Process()
    threads, children = threading.active_count(), len(me.children(recursive=True))
    runs = LEAK_RUNS[strategy]
    started = time.monotonic()
    for _ in range(runs):
        hang1, hang2, ok = final_state(list(app.invoke({"value": 1})))["results"]
        assert hang1["timeout"] and hang2["timeout"] and ok["success"]
    elapsed = time.monotonic() - started
    # a run that waited for its hung branches would take their 10 s: the bound is wide
    assert elapsed < runs * (1.0 if strategy in ("process", "celery") else 0.2), elapsed
    time.sleep(0.6)  # allowance for clean-up (the seed waits 1 s)
    assert threading.active_count() <= threads + 10, (threads, threading.active_count())
    assert len(me.children(recursive=True)) <= children + 2
    assert callback.counts == {"start": 3 * (runs + 1), "complete": 3 * (runs + 1)}
    if strategy == "thread":
        assert not get_executor("thread").pool.abandoned  # type: ignore[attr-defined]


def test_td13_e2e_002_timeout_retry_and_circuit_breaker_together(
    strategy: str, tmp_path: Path
) -> None:
    callback = Counting()
    config = ParallelConfig(
        strategy=strategy,
        timeout_seconds=0.3,
        retry_policy=RetryPolicy(max_retries=2, base_delay=0.01, retry_on_timeout=True),
        circuit_breaker=CircuitBreakerConfig(failure_threshold=3, reset_timeout=60),
    )
    g = fan_graph(
        {"recovers": nodes.slow_then_fast, "hangs": nodes.slow_then_fast, "flaky": nodes.flaky},
        config=config,
        edge_configs={"hangs": ParallelConfig(timeout_seconds=0.2)},
    )
    app = g.compile(parallel_callbacks=[callback])
    run_config = {"counter_dir": str(tmp_path), "fail_times": 1}

    started = time.monotonic()
    run_config["slow_times"] = {"recovers": 1, "hangs": 99}
    recovers, hangs, flaky = final_state(list(app.invoke({}, config=run_config)))["results"]
    first = time.monotonic() - started
    assert recovers["success"] and recovers["retry_count"] == 1  # timed out once, then made it
    assert flaky["success"] and flaky["retry_count"] == 1  # failed once, then made it
    assert hangs["timeout"] and hangs["retry_count"] == 2  # three timeouts ...
    assert hangs["circuit_state"] == "open"  # ... opened its circuit
    assert [e["error_type"] for e in hangs["attempt_errors"]] == ["TimeoutError"] * 3
    assert 0.6 <= first < 2.5, first

    # 'hangs' still hangs, but its circuit refuses it at once; the others run
    hang_calls = nodes.calls(tmp_path, "hangs")
    started = time.monotonic()
    again = final_state(list(app.invoke({}, config=run_config)))["results"]
    assert time.monotonic() - started < 0.5
    assert [outcome(r) for r in again] == ["ok", "CircuitOpenError", "ok"]
    assert nodes.calls(tmp_path, "hangs") == hang_calls
    assert app.get_circuit_states() == {
        "fan:recovers": CircuitState.CLOSED,
        "fan:hangs": CircuitState.OPEN,
        "fan:flaky": CircuitState.CLOSED,
    }
    assert callback.transitions == [("fan:hangs", "closed", "open")]


def test_td13_e2e_003_fifty_flows_across_ten_graphs_from_ten_threads(strategy: str) -> None:
    """Ten graphs of five branches, each invoked repeatedly by its own caller thread, all at
    once: every result lands in its own run, in order, with the exact value."""
    reps = 2 if strategy == "process" else 5  # process: concurrent fan-outs start workers
    rng = random.Random(3)
    apps = [
        fan_graph(
            {f"w_{i}": nodes.echo for i in range(5)},
            config=ParallelConfig(strategy=strategy, max_workers=5),
            name=f"g{k}",
        ).compile()
        for k in range(10)
    ]
    sleeps = [{f"w_{i}": rng.uniform(0.0, 0.01) for i in range(5)} for _ in range(10)]
    errors: list[BaseException] = []
    got: dict[tuple[int, int], list[dict[str, Any]]] = {}
    barrier = threading.Barrier(10)

    def caller(k: int) -> None:
        try:
            barrier.wait(timeout=10)
            for rep in range(reps):
                events = list(
                    apps[k].invoke({"value": k * 100 + rep}, config={"sleeps": sleeps[k]})
                )
                got[(k, rep)] = final_state(events)["results"]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(got) == 10 * reps
    for (k, rep), results in got.items():
        value = k * 100 + rep
        assert [(r["branch"], r["state"]["who"], r["state"]["value"]) for r in results] == [
            (f"w_{i}", f"w_{i}", value * 1000 + i) for i in range(5)
        ]


def test_td13_e2e_004_memory_is_stable_over_1000_invocations() -> None:
    """1000 invocations with a failing, retried branch, a circuit breaker and a callback:
    the memory still allocated afterwards (traced by tracemalloc) stays under 5 MB."""
    g = fan_graph(
        {"ok": nodes.add_one, "bad": nodes.fail},
        config=ParallelConfig(
            timeout_seconds=5,
            retry_policy=RetryPolicy(max_retries=1, base_delay=0.0),
            circuit_breaker=CircuitBreakerConfig(failure_threshold=10**6),
        ),
    )
    app = g.compile(parallel_callbacks=[Counting()])
    for _ in range(100):  # warm-up: caches, pools, interned strings
        list(app.invoke({"value": 1}))
    quiet = logging.getLogger("tea_dist")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # pytest keeps every captured log record: not ours to count
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(1000):
            ok, bad = final_state(list(app.invoke({"value": 1})))["results"]
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        quiet.setLevel(level)
    assert ok["success"] and bad["retry_count"] == 1
    print(f"memory growth over 1000 invocations: {growth / 1024:.0f} KiB")
    assert growth < 5 * 1024 * 1024, f"memory grew by {growth / 1024:.0f} KiB"


def test_td13_e2e_005_sustained_load_with_circuit_cycling(tmp_path: Path) -> None:
    """A scaled-down soak (2 s; ``TEA_DIST_SOAK_SECONDS`` for longer): a service goes down and
    comes back in phases while a circuit with a short reset_timeout cycles through all its
    states; every invocation still gets exactly one result per branch."""
    seconds = float(os.environ.get("TEA_DIST_SOAK_SECONDS", "2"))
    callback = Counting()
    g = fan_graph(
        {"svc": nodes.service, "a": nodes.add_one, "b": nodes.double},
        config=ParallelConfig(
            circuit_breaker=CircuitBreakerConfig(failure_threshold=2, reset_timeout=0.05)
        ),
    )
    app = g.compile(parallel_callbacks=[callback])
    threads = threading.active_count()
    outcomes: collections.Counter[str] = collections.Counter()
    runs = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        down = ["svc"] if (runs // 20) % 2 == 0 else []
        results = final_state(
            list(app.invoke({"value": 1}, config={"counter_dir": str(tmp_path), "down": down}))
        )["results"]
        assert [r["branch"] for r in results] == ["svc", "a", "b"]
        assert results[1]["success"] and results[2]["success"]
        outcomes[outcome(results[0])] += 1
        runs += 1
        time.sleep(0.005)
    assert runs >= 100
    assert {"ok", "ConnectionError", "CircuitOpenError"} <= set(outcomes)
    cycles = collections.Counter((old, new) for _, old, new in callback.transitions)
    assert cycles[("half_open", "closed")] >= 2 and cycles[("closed", "open")] >= 2
    assert cycles[("open", "half_open")] >= 2
    assert callback.counts["complete"] == callback.counts["start"] + outcomes["CircuitOpenError"]
    assert threading.active_count() <= threads + 10


class ChaosModel:
    """What the circuits must do, predicted from the behaviour of every branch in every run.

    Per-branch circuits, threshold 3, no recovery within the test (reset_timeout 60 s); a
    failing branch is retried once (two failures), a hang times out once (one failure).
    """

    def __init__(self) -> None:
        self.failures: collections.Counter[str] = collections.Counter()
        self.open: set[str] = set()

    def _fail(self, branch: str) -> None:
        self.failures[branch] += 1
        if self.failures[branch] >= 3:
            self.open.add(branch)

    def run(self, branch: str, what: str) -> str:
        if branch in self.open:
            return "CircuitOpenError"
        if what == "ok":
            self.failures[branch] = 0
            return "ok"
        self._fail(branch)
        if what == "hang":
            return "TimeoutError"
        if branch in self.open:  # the retry meets the circuit its first attempt opened
            return "CircuitOpenError"
        self._fail(branch)
        return "ValueError"

    def reset(self, branch: str) -> None:
        self.open.discard(branch)
        self.failures[branch] = 0


@pytest.mark.parametrize("strategy", ["thread", "asyncio"])
def test_td13_e2e_006_chaos_every_branch_accounted_for_once(strategy: str) -> None:
    """Random failures, hangs and circuit trips (seeded): each run's results are one per
    branch, in declaration order, each exactly the outcome the circuit model predicts."""
    rng = random.Random(20251213)
    branches = [f"c_{i}" for i in range(8)]
    g = fan_graph(
        dict.fromkeys(branches, nodes.chaos),
        config=ParallelConfig(
            strategy=strategy,
            timeout_seconds=0.05,
            retry_policy=RetryPolicy(max_retries=1, base_delay=0.001, retry_on=[ValueError]),
            circuit_breaker=CircuitBreakerConfig(failure_threshold=3, reset_timeout=60),
        ),
    )
    callback = Counting()
    app = g.compile(parallel_callbacks=[callback])
    model = ChaosModel()
    seen: collections.Counter[str] = collections.Counter()
    for run in range(30):
        plan = {b: rng.choices(["ok", "fail", "hang"], weights=[6, 3, 1.5])[0] for b in branches}
        if rng.random() < 0.4:
            victim = rng.choice(branches)
            app.reset_circuit(victim)
            model.reset(victim)
        results = final_state(list(app.invoke({"value": run}, config={"chaos": plan})))["results"]
        assert [r["branch"] for r in results] == branches
        expected = [model.run(b, plan[b]) for b in branches]
        assert [outcome(r) for r in results] == expected, (run, plan)
        for r in results:
            if r["success"]:
                assert r["state"] == {"value": run + 1, "who": r["branch"], "started": True}
        seen.update(expected)
    assert set(seen) == {"ok", "ValueError", "TimeoutError", "CircuitOpenError"}, seen
    refused = seen["CircuitOpenError"]
    assert callback.counts["complete"] == 30 * len(branches)
    assert callback.counts["start"] <= 30 * len(branches) - refused + 30  # refused never start


def test_td13_e2e_007_overhead_of_the_reliability_features() -> None:
    """Measured, not tightly asserted: the per-branch cost with timeouts, retries, a circuit
    breaker and a callback against plain branches. The bound is deliberately wide."""
    names = {f"w_{i}": nodes.add_one for i in range(20)}
    plain = fan_graph(names).compile()
    full = fan_graph(
        names,
        config=ParallelConfig(
            timeout_seconds=5,
            timeout_total=10,
            retry_policy=RetryPolicy(max_retries=3),
            circuit_breaker=CircuitBreakerConfig(),
        ),
    ).compile(parallel_callbacks=[Counting()])

    def per_branch(app: Any, runs: int = 30) -> float:
        list(app.invoke({"value": 1}))
        started = time.perf_counter()
        for _ in range(runs):
            list(app.invoke({"value": 1}))
        return (time.perf_counter() - started) / (runs * len(names))

    base, features = per_branch(plain), per_branch(full)
    print(f"per branch: plain {base * 1e3:.3f} ms, all features {features * 1e3:.3f} ms")
    assert features < 0.005, features


# -- TD.4 stress: no lost results (and seed 004's determinism) --


def _stress(strategy: str, width: int, runs: int, max_workers: int) -> None:
    rng = random.Random(width * runs)
    names = [f"w_{i}" for i in range(width)]
    app = fan_graph(
        dict.fromkeys(names, nodes.echo),
        config=ParallelConfig(strategy=strategy, max_workers=max_workers),
    ).compile()
    reference = None
    for _ in range(runs):
        sleeps = {n: rng.uniform(0.01, 0.05) for n in names}
        results = final_state(list(app.invoke({"value": 7}, config={"sleeps": sleeps})))["results"]
        assert len(results) == width
        assert [r["state"]["who"] for r in results] == names  # each exactly once, in order
        assert [r["state"]["value"] for r in results] == [7000 + i for i in range(width)]
        reference = reference or stable(results)
        assert stable(results) == reference  # same inputs, same outputs whatever the timing


def test_td4_stress_20_branches_10_runs_no_lost_results(strategy: str) -> None:
    _stress(strategy, width=20, runs=10, max_workers=10)


def test_td4_stress_100_branches_20_runs_no_lost_results() -> None:
    _stress("thread", width=100, runs=20, max_workers=50)
