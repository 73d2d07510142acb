"""TD.13 AC4 circuit breakers at the graph level, on each in-process strategy.

The breaker's transitions and stores have their own unit tests (``test_breaker*.py``); here
circuits are driven through ``invoke()``: persistence across invocations, reset, sharing by
name, per-branch independence, per-invocation scope, and that an open circuit never starts
the branch. Node calls are counted in files so that process workers count too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import (
    CircuitBreakerConfig,
    CircuitState,
    ParallelConfig,
    ParallelFlowResult,
    RetryPolicy,
)
from tea_dist.core.errors import CircuitOpenError
from tea_dist.observe.events import FlowContext
from tests import nodes
from tests.nodes import breaker_store_for, fan_graph, final_state


def cfg(
    strategy: str, breaker: CircuitBreakerConfig | None = None, **fields: Any
) -> ParallelConfig:
    return ParallelConfig(
        strategy=strategy, circuit_breaker=breaker or CircuitBreakerConfig(), **fields
    )


def results(app: Any, run_config: dict[str, Any], **state: Any) -> list[dict[str, Any]]:
    return final_state(list(app.invoke({"value": 1, **state}, config=run_config)))["results"]


def outcome(r: dict[str, Any]) -> str:
    return "ok" if r["success"] else str(r["error_type"])


class Transitions:
    """Records ``on_circuit_state_change`` events."""

    def __init__(self) -> None:
        self.seen: list[tuple[str | None, str, str]] = []
        self.lock = threading.Lock()

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        with self.lock:
            self.seen.append((ctx.circuit, str(old), str(new)))


# -- unit: the compiled graph's circuit API and the circuit-open result --


def test_td13_unit_025_reset_circuit_closes_by_branch_by_name_or_all(
    strategy: str, tmp_path: Path
) -> None:
    one = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60)
    g = fan_graph(
        {"a": nodes.fail_counted, "b": nodes.fail_counted, "c": nodes.fail_counted},
        config=cfg(strategy, one),
        edge_configs={"c": cfg(strategy, one.model_copy(update={"name": "svc"}))},
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    results(app, run)
    assert app.get_circuit_states() == {"fan:a": "open", "fan:b": "open", "svc": "open"}

    app.reset_circuit("a")  # by branch name
    assert app.get_circuit_states() == {"fan:a": "closed", "fan:b": "open", "svc": "open"}
    app.reset_circuit("svc")  # by circuit name
    assert app.get_circuit_states()["svc"] == CircuitState.CLOSED
    assert [outcome(r) for r in results(app, run)] == [
        "ValueError",
        "CircuitOpenError",
        "ValueError",
    ]

    app.reset_circuit()  # every circuit
    assert set(app.get_circuit_states().values()) == {CircuitState.CLOSED}
    assert [outcome(r) for r in results(app, run)] == ["ValueError"] * 3
    assert [nodes.calls(tmp_path, n) for n in "abc"] == [3, 2, 3]


def test_td13_unit_026_get_circuit_states_lists_every_circuit(
    strategy: str, tmp_path: Path
) -> None:
    g = fan_graph(
        {"up": nodes.service, "down": nodes.service, "plain": nodes.add_one},
        config=cfg(strategy, CircuitBreakerConfig(failure_threshold=1)),
        edge_configs={"plain": ParallelConfig(circuit_breaker=None)},
    )
    app = g.compile()
    assert app.get_circuit_states() == {}
    results(app, {"counter_dir": str(tmp_path), "down": ["down"]})
    states = app.get_circuit_states()
    assert states == {"fan:up": CircuitState.CLOSED, "fan:down": CircuitState.OPEN}  # not 'plain'
    assert all(isinstance(s, CircuitState) for s in states.values())


def test_td13_unit_032_circuit_open_result_fields(strategy: str, tmp_path: Path) -> None:
    g = fan_graph(
        {"a": nodes.fail_counted}, config=cfg(strategy, CircuitBreakerConfig(failure_threshold=1))
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    (tripping,) = results(app, run)
    assert tripping["error_type"] == "ValueError" and tripping["circuit_state"] == "open"
    events = list(app.stream({}, config=run))
    (event,) = [e for e in events if e["type"] == "parallel_error"]
    result: ParallelFlowResult = event["result"]
    assert result.success is False and result.error_type == "CircuitOpenError"
    assert result.circuit_state == CircuitState.OPEN and result.to_dict()["circuit_state"] == "open"
    assert "fan:a" in (result.error or "") and "open" in (result.error or "")
    assert result.timeout is False and result.retry_count == 0 and result.state is None
    assert event["error_type"] == "CircuitOpenError"


# -- integration --


def test_td13_int_014_circuit_state_persists_across_invocations(
    strategy: str, tmp_path: Path
) -> None:
    g = fan_graph(
        {"a": nodes.fail_counted}, config=cfg(strategy, CircuitBreakerConfig(failure_threshold=2))
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    outcomes = [outcome(results(app, run)[0]) for _ in range(4)]
    assert outcomes == ["ValueError", "ValueError", "CircuitOpenError", "CircuitOpenError"]
    assert nodes.calls(tmp_path, "a") == 2  # the open circuit never started the node
    assert app.get_circuit_states() == {"fan:a": CircuitState.OPEN}


def test_td13_int_015_reset_clears_state_for_the_next_invocation(
    strategy: str, tmp_path: Path
) -> None:
    g = fan_graph(
        {"a": nodes.service}, config=cfg(strategy, CircuitBreakerConfig(failure_threshold=1))
    )
    app = g.compile()
    results(app, {"counter_dir": str(tmp_path), "down": ["a"]})
    assert outcome(results(app, {"counter_dir": str(tmp_path)})[0]) == "CircuitOpenError"
    app.reset_circuit()
    (r,) = results(app, {"counter_dir": str(tmp_path)})
    assert r["success"] is True and r["circuit_state"] == "closed"
    assert nodes.calls(tmp_path, "a") == 2


def test_td13_int_016_concurrent_failures_are_all_counted(strategy: str, tmp_path: Path) -> None:
    """Twelve branches fail at once on one shared circuit with threshold 12: the circuit opens
    only if no failure was lost, and then refuses all twelve on the next invocation."""
    names = [f"b{i}" for i in range(12)]
    g = fan_graph(
        dict.fromkeys(names, nodes.fail_counted),
        config=cfg(
            strategy, CircuitBreakerConfig(failure_threshold=12, name="svc"), max_workers=12
        ),
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    assert {outcome(r) for r in results(app, run)} == {"ValueError"}
    assert app.get_circuit_states() == {"svc": CircuitState.OPEN}
    assert {outcome(r) for r in results(app, run)} == {"CircuitOpenError"}
    assert [nodes.calls(tmp_path, n) for n in names] == [1] * 12


def test_td13_int_016_failures_from_concurrent_invocations_are_all_counted(
    strategy: str, tmp_path: Path
) -> None:
    """Six caller threads invoke at once, four failing branches each, all on one circuit with
    threshold 24: every admission precedes the 24th failure, so the circuit ends open exactly
    when no failure recorded by the six concurrent supervisors was lost."""
    callers, width = 6, 4
    breaker = CircuitBreakerConfig(failure_threshold=callers * width, name="svc")
    apps = [
        fan_graph(
            {f"g{k}_b{i}": nodes.fail_counted for i in range(width)},
            config=cfg(strategy, breaker, max_workers=width),
            name=f"g{k}",
        ).compile(breaker_store=store)
        for store in [breaker_store_for(strategy)]
        for k in range(callers)
    ]
    barrier = threading.Barrier(callers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def caller(app: Any) -> None:
        barrier.wait(timeout=10)
        found = [outcome(r) for r in results(app, {"counter_dir": str(tmp_path)})]
        with lock:
            outcomes.extend(found)

    threads = [threading.Thread(target=caller, args=(app,)) for app in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert outcomes == ["ValueError"] * (callers * width)
    assert apps[0].get_circuit_states() == {"svc": CircuitState.OPEN}


def test_td13_int_017_a_named_circuit_is_shared_across_flows(strategy: str, tmp_path: Path) -> None:
    shared = CircuitBreakerConfig(failure_threshold=2, name="payments")
    g = fan_graph(
        {"charge": nodes.service, "refund": nodes.service, "other": nodes.service},
        config=cfg(strategy, shared),
        edge_configs={"other": cfg(strategy, CircuitBreakerConfig(failure_threshold=2))},
    )
    app = g.compile()
    # charge and refund fail once each: two failures of the one 'payments' circuit
    first = results(app, {"counter_dir": str(tmp_path), "down": ["charge", "refund"]})
    assert [outcome(r) for r in first] == ["ConnectionError", "ConnectionError", "ok"]
    assert app.get_circuit_states() == {
        "payments": CircuitState.OPEN,
        "fan:other": CircuitState.CLOSED,
    }
    # every branch on 'payments' is refused now, even though the services are back
    second = results(app, {"counter_dir": str(tmp_path)})
    assert [outcome(r) for r in second] == ["CircuitOpenError", "CircuitOpenError", "ok"]
    assert [nodes.calls(tmp_path, n) for n in ("charge", "refund", "other")] == [1, 1, 2]


def test_a_named_circuit_is_shared_across_graphs_with_one_store(
    strategy: str, tmp_path: Path
) -> None:
    store = breaker_store_for(strategy)
    shared = CircuitBreakerConfig(failure_threshold=1, name="search")
    one = fan_graph({"a": nodes.service}, config=cfg(strategy, shared), name="one").compile(
        breaker_store=store
    )
    two = fan_graph({"b": nodes.service}, config=cfg(strategy, shared), name="two").compile(
        breaker_store=store
    )
    results(one, {"counter_dir": str(tmp_path), "down": ["a"]})
    assert outcome(results(two, {"counter_dir": str(tmp_path)})[0]) == "CircuitOpenError"
    assert nodes.calls(tmp_path, "b") == 0


def test_td13_int_018_per_flow_circuits_are_independent(strategy: str, tmp_path: Path) -> None:
    g = fan_graph(
        {"a": nodes.service, "b": nodes.service},
        config=cfg(strategy, CircuitBreakerConfig(failure_threshold=1)),
    )
    app = g.compile()
    first = results(app, {"counter_dir": str(tmp_path), "down": ["a"]})
    assert [outcome(r) for r in first] == ["ConnectionError", "ok"]
    for _ in range(2):
        later = results(app, {"counter_dir": str(tmp_path)})
        assert [outcome(r) for r in later] == ["CircuitOpenError", "ok"]
    assert app.get_circuit_states() == {"fan:a": CircuitState.OPEN, "fan:b": CircuitState.CLOSED}
    assert nodes.calls(tmp_path, "a") == 1 and nodes.calls(tmp_path, "b") == 3


def test_invocation_scope_gives_fresh_circuits_per_invoke(strategy: str, tmp_path: Path) -> None:
    """Within one invoke the circuit opens (the retry is refused); the next invoke starts
    closed (the node runs again); the graph's shared circuits never see it."""
    breaker = CircuitBreakerConfig(failure_threshold=1, scope="invocation")
    g = fan_graph(
        {"a": nodes.fail_counted},
        config=cfg(strategy, breaker, retry_policy=RetryPolicy(max_retries=3, base_delay=0.01)),
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    for expected_calls in (1, 2, 3):
        (r,) = results(app, run)
        assert r["error_type"] == "CircuitOpenError"  # the retry met the circuit this run opened
        assert r["attempt_errors"][0]["error_type"] == "ValueError"
        assert nodes.calls(tmp_path, "a") == expected_calls
    assert app.get_circuit_states() == {}


def test_shared_scope_keeps_an_opened_circuit_for_the_next_invoke(
    strategy: str, tmp_path: Path
) -> None:
    breaker = CircuitBreakerConfig(failure_threshold=1)  # scope="shared" is the default
    assert breaker.scope == "shared"
    g = fan_graph(
        {"a": nodes.fail_counted},
        config=cfg(strategy, breaker, retry_policy=RetryPolicy(max_retries=3, base_delay=0.01)),
    )
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    results(app, run)
    results(app, run)
    assert nodes.calls(tmp_path, "a") == 1


def test_an_open_circuit_never_starts_the_branch(strategy: str, tmp_path: Path) -> None:
    g = fan_graph(
        {"guarded": nodes.slow_marker, "other": nodes.add_one},
        config=ParallelConfig(strategy=strategy),
        edge_configs={
            "guarded": cfg(strategy, CircuitBreakerConfig(failure_threshold=1, name="svc"))
        },
    )
    store = breaker_store_for(strategy)
    breaker = CircuitBreakerConfig(failure_threshold=1)
    store.acquire("svc", breaker)
    store.record("svc", breaker, success=False, probe=False)  # opened elsewhere
    app = g.compile(breaker_store=store)
    started = time.monotonic()
    guarded, other = results(app, {"marker_dir": str(tmp_path), "slow": 0.0})
    assert guarded["error_type"] == "CircuitOpenError" and other["success"] is True
    assert guarded["timing_ms"] == 0.0 and time.monotonic() - started < 1.0
    assert not (tmp_path / "guarded.done").exists()


def test_half_open_probe_recovers_the_circuit_through_invoke(strategy: str, tmp_path: Path) -> None:
    spy = Transitions()
    breaker = CircuitBreakerConfig(failure_threshold=1, reset_timeout=0.2)
    g = fan_graph({"a": nodes.service}, config=cfg(strategy, breaker))
    app = g.compile(parallel_callbacks=[spy])
    down = {"counter_dir": str(tmp_path), "down": ["a"]}
    up = {"counter_dir": str(tmp_path)}
    assert outcome(results(app, down)[0]) == "ConnectionError"
    assert outcome(results(app, up)[0]) == "CircuitOpenError"
    time.sleep(0.25)
    assert outcome(results(app, down)[0]) == "ConnectionError"  # the probe fails: open again
    assert outcome(results(app, up)[0]) == "CircuitOpenError"
    time.sleep(0.25)
    (probe,) = results(app, up)
    assert probe["success"] is True and probe["circuit_state"] == "closed"
    assert spy.seen == [
        ("fan:a", "closed", "open"),
        ("fan:a", "open", "half_open"),
        ("fan:a", "half_open", "open"),
        ("fan:a", "open", "half_open"),
        ("fan:a", "half_open", "closed"),
    ]
    assert nodes.calls(tmp_path, "a") == 3


def test_reset_circuit_reports_the_change_to_callbacks(tmp_path: Path) -> None:
    spy = Transitions()
    g = fan_graph(
        {"a": nodes.fail_counted}, config=cfg("thread", CircuitBreakerConfig(failure_threshold=1))
    )
    app = g.compile(parallel_callbacks=[spy])
    results(app, {"counter_dir": str(tmp_path)})
    app.reset_circuit("a")
    assert spy.seen[-1] == ("fan:a", "open", "closed")


def test_fail_fast_on_an_open_circuit_raises_circuit_open_error(
    strategy: str, tmp_path: Path
) -> None:
    g = fan_graph(
        {"a": nodes.fail_counted},
        config=cfg(strategy, CircuitBreakerConfig(failure_threshold=1), fail_fast=True),
    )
    g.raise_exceptions = True
    app = g.compile()
    run = {"counter_dir": str(tmp_path)}
    with pytest.raises(Exception, match="boom"):
        list(app.invoke({}, config=run))
    with pytest.raises(CircuitOpenError) as info:
        list(app.invoke({}, config=run))
    assert info.value.branch == "a" and info.value.error_type == "CircuitOpenError"
    assert nodes.calls(tmp_path, "a") == 1
