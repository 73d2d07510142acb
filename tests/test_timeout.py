"""TD.13 AC1 timeouts: per attempt, per branch (``timeout_total``), best effort and fail-fast.

Every behavioural test runs on each in-process strategy (the ``strategy`` fixture). Timeouts
are 0.2-0.5 s; the work they stop would take 10 s, so an elapsed-time bound proves the stop.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, ParallelFlowResult, RetryPolicy
from tea_dist.core.errors import BranchTimeoutError
from tests import nodes
from tests.nodes import fan_graph, final_state


def cfg(strategy: str, **fields: Any) -> ParallelConfig:
    return ParallelConfig(strategy=strategy, **fields)


def run(
    graph: Any, run_config: dict[str, Any] | None = None, **state: Any
) -> tuple[list[dict[str, Any]], float]:
    """Invoke ``graph``; returns the fan-in's results (as dicts) and the elapsed seconds."""
    app = graph.compile()
    started = time.monotonic()
    events = list(app.invoke({"value": 1, **state}, config=run_config))
    return final_state(events)["results"], time.monotonic() - started


def dirs(tmp_path: Path) -> dict[str, str]:
    return {"counter_dir": str(tmp_path), "marker_dir": str(tmp_path)}


# -- unit level: the supervisor's deadlines and the result fields --


def test_td13_unit_001_attempt_over_timeout_is_stopped_at_its_deadline(strategy: str) -> None:
    g = fan_graph({"slow": nodes.cooperative_sleep}, config=cfg(strategy, timeout_seconds=0.3))
    (r,), elapsed = run(g)
    assert r["timeout"] is True and r["success"] is False
    assert 0.28 <= elapsed < 2.0, elapsed  # the node alone would take 10 s
    assert 280 <= r["timing_ms"] < 2000


def test_td13_unit_002_no_timeout_by_default(strategy: str) -> None:
    assert ParallelConfig().timeout_seconds is None and ParallelConfig().timeout_total is None
    g = fan_graph({"a": nodes.sleep_node}, config=cfg(strategy))
    (r,), elapsed = run(g, sleep=0.3)
    assert r["success"] is True and r["timeout"] is False
    assert elapsed >= 0.3


def test_td13_unit_003_per_edge_timeout_overrides_graph_default(strategy: str) -> None:
    g = fan_graph(
        {"a": nodes.sleep_node, "b": nodes.cooperative_sleep, "c": nodes.cooperative_sleep},
        config=cfg(strategy, timeout_seconds=0.2),
        edge_configs={
            "a": ParallelConfig(timeout_seconds=5.0),
            "c": ParallelConfig(timeout_seconds=0.4),
        },
    )
    (a, b, c), elapsed = run(g, sleep=0.45)
    assert a["success"] is True  # 0.45 s of work under its own 5 s, not the graph's 0.2 s
    assert b["timeout"] is True and 190 <= b["timing_ms"] < 380  # the graph default
    assert c["timeout"] is True and c["timing_ms"] >= 390  # its own, longer limit
    assert elapsed < 3.0


def test_td13_unit_004_timed_out_result_is_marked_timeout(strategy: str) -> None:
    g = fan_graph(
        {"ok": nodes.add_one, "slow": nodes.cooperative_sleep},
        config=cfg(strategy, timeout_seconds=0.2),
    )
    (ok, slow), _ = run(g)
    assert slow["timeout"] is True and ok["timeout"] is False
    assert ok["success"] is True and slow["success"] is False


def test_td13_unit_004_a_timeout_shorter_than_the_bookkeeping_is_still_a_timeout(
    strategy: str,
) -> None:
    """A 1 ms timeout runs out before the node starts, or while the worker reports it: the
    branch still ends a plain timeout, and every run of the graph finds its branches (a
    celery worker must not be interrupted mid-way through its own Redis round trips)."""
    g = fan_graph(
        {"hang1": nodes.cooperative_sleep, "hang2": nodes.cooperative_sleep, "ok": nodes.add_one},
        config=cfg(strategy),
        edge_configs={h: ParallelConfig(timeout_seconds=0.001) for h in ("hang1", "hang2")},
    )
    app = g.compile()
    for _ in range(20):
        hang1, hang2, ok = final_state(list(app.invoke({"value": 1})))["results"]
        assert [hang1["error_type"], hang2["error_type"]] == ["TimeoutError"] * 2
        assert hang1["timeout"] and hang2["timeout"] and ok["success"], ok


def test_td13_unit_031_timeout_error_fields(strategy: str) -> None:
    g = fan_graph({"slow": nodes.cooperative_sleep}, config=cfg(strategy, timeout_seconds=0.2))
    (r,), _ = run(g)
    result = ParallelFlowResult.from_dict(r)
    assert result.timeout is True and result.error_type == "TimeoutError"
    assert result.error is not None and "timed out after 0.2s" in result.error
    assert result.state is None and result.retry_count == 0
    assert result.start_time is not None and result.end_time is not None
    assert result.end_time - result.start_time == pytest.approx(result.timing_ms / 1000, abs=0.01)
    assert result.attempt_errors == [
        {"attempt": 1, "error": result.error, "error_type": "TimeoutError", "timeout": True}
    ]


def test_td13_unit_005_best_effort_keeps_collecting_after_a_timeout(strategy: str) -> None:
    g = fan_graph(
        {"slow": nodes.cooperative_sleep, "steady": nodes.sleep_node},
        config=cfg(strategy, timeout_seconds=2.0),
        edge_configs={"slow": ParallelConfig(timeout_seconds=0.2)},
    )
    (slow, steady), elapsed = run(g, sleep=0.45)
    assert slow["timeout"] is True
    assert steady["success"] is True and steady["state"]["done_steady"] is True
    assert steady["end_time"] > slow["end_time"] + 0.15  # finished well after the timeout
    assert elapsed >= 0.45


def test_td13_unit_006_fail_fast_stops_at_the_first_timeout(strategy: str, tmp_path: Path) -> None:
    g = fan_graph(
        {"slow": nodes.cooperative_sleep, "sibling": nodes.slow_marker},
        config=cfg(strategy, fail_fast=True),
        edge_configs={"slow": ParallelConfig(timeout_seconds=0.2)},
    )
    started = time.monotonic()
    events = list(g.compile().invoke({}, config={**dirs(tmp_path), "slow": 0.5}))
    elapsed = time.monotonic() - started
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["branch"] == "slow" and events[0]["error_type"] == "TimeoutError"
    assert elapsed < 0.45, elapsed  # did not wait for the 0.5 s sibling
    time.sleep(max(0.0, 0.7 - elapsed))
    assert not (tmp_path / "sibling.done").exists()  # the sibling was stopped, not abandoned


def test_fail_fast_with_simultaneous_timeouts_reports_one_of_them(strategy: str) -> None:
    """Branches sharing one ``timeout_total`` deadline expire together; the first ends the run."""
    g = fan_graph(
        {f"hang{i}": nodes.cooperative_sleep for i in range(4)},
        config=cfg(strategy, fail_fast=True, timeout_total=0.2),
    )
    events = list(g.compile().invoke({}))
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["error_type"] == "TimeoutError" and events[0]["branch"] == "hang0"


def test_a_cooperative_node_stopped_by_timeout_is_not_reported_as_leaked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from tea_dist.core.strategies import get_executor
    from tea_dist.executors.thread import LEAK_GRACE_SECONDS

    g = fan_graph({"hang": nodes.cooperative_sleep}, config=cfg("thread", timeout_seconds=0.2))
    with caplog.at_level(logging.WARNING):
        (r,), _ = run(g)
        time.sleep(LEAK_GRACE_SECONDS * 2 + 0.1)
    assert r["timeout"] is True
    assert "ignored the cancel token" not in caplog.text
    assert not get_executor("thread").pool.abandoned  # type: ignore[attr-defined]


def test_fail_fast_timeout_raises_with_raise_exceptions(strategy: str) -> None:
    g = fan_graph(
        {"slow": nodes.cooperative_sleep}, config=cfg(strategy, fail_fast=True, timeout_seconds=0.2)
    )
    g.raise_exceptions = True
    with pytest.raises(BranchTimeoutError) as info:
        list(g.compile().invoke({}))
    assert info.value.branch == "slow" and info.value.error_type == "TimeoutError"
    assert isinstance(info.value, TimeoutError)


# -- integration: invoke, stream, mixed, fan-in --


def test_td13_int_001_invoke_collects_partial_results_past_a_timeout(strategy: str) -> None:
    g = fan_graph(
        {"a": nodes.add_one, "hang": nodes.cooperative_sleep, "b": nodes.double},
        config=cfg(strategy, timeout_seconds=0.3),
    )
    (a, hang, b), elapsed = run(g, value=5)
    assert [a["branch"], hang["branch"], b["branch"]] == ["a", "hang", "b"]
    assert a["state"]["value"] == 6 and b["state"]["value"] == 10
    assert hang["timeout"] is True and hang["state"] is None
    assert elapsed < 2.0


def test_td13_int_002_stream_yields_timeout_event_and_other_flows_continue(strategy: str) -> None:
    g = fan_graph(
        {"hang": nodes.cooperative_sleep, "a": nodes.sleep_node},
        config=cfg(strategy, timeout_seconds=0.25),
    )
    started = time.monotonic()
    events = list(g.compile().stream({"value": 1, "sleep": 0.1}))
    assert time.monotonic() - started < 2.0
    branch_events = [e for e in events if e["type"].startswith("parallel")]
    assert [(e["type"], e["branch"]) for e in branch_events] == [
        ("parallel_error", "hang"),
        ("parallel_state", "a"),
    ]
    hang, a = branch_events
    assert hang["timeout"] is True and hang["error_type"] == "TimeoutError"
    assert hang["result"].timeout is True
    assert a["state"]["done_a"] is True
    assert events[-1]["type"] == "final"
    assert [r["branch"] for r in events[-1]["state"]["results"]] == ["hang", "a"]


def test_td13_int_003_one_of_three_times_out_two_succeed(strategy: str) -> None:
    g = fan_graph(
        {"x": nodes.sleep_node, "hang": nodes.cooperative_sleep, "y": nodes.sleep_node},
        config=cfg(strategy, timeout_seconds=0.4),
    )
    results, elapsed = run(g, sleep=0.1)
    assert [(r["branch"], r["success"], r["timeout"]) for r in results] == [
        ("x", True, False),
        ("hang", False, True),
        ("y", True, False),
    ]
    assert 0.38 <= elapsed < 2.0


def test_td13_int_004_fan_in_receives_timeout_metadata(strategy: str) -> None:
    seen: list[tuple[str, bool, bool, str | None, Any]] = []

    def merge(state: dict[str, Any], parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        for r in parallel_results:
            seen.append((r.branch, r.success, r.timeout, r.error_type, r.get("value", "missing")))
        return {"timed_out": [r.branch for r in parallel_results if r.timeout]}

    g = fan_graph(
        {"ok": nodes.add_one, "hang": nodes.cooperative_sleep},
        config=cfg(strategy, timeout_seconds=0.2),
        fan_in=merge,
    )
    state = final_state(list(g.compile().invoke({"value": 1})))
    assert state["timed_out"] == ["hang"]
    assert seen == [("ok", True, False, None, 2), ("hang", False, True, "TimeoutError", "missing")]


# -- timeout_total, retry_on_timeout, abandoned work --


def test_timeout_total_bounds_the_whole_branch_including_retries(
    strategy: str, tmp_path: Path
) -> None:
    policy = RetryPolicy(max_retries=5, base_delay=0.01, retry_on_timeout=True)
    g = fan_graph(
        {"hang": nodes.slow_then_fast},
        config=cfg(strategy, timeout_seconds=0.3, timeout_total=0.5, retry_policy=policy),
    )
    (r,), elapsed = run(g, {**dirs(tmp_path), "slow_times": 99})
    # without timeout_total: 6 attempts x 0.3 s = 1.8 s
    assert elapsed < 1.2, elapsed
    assert r["timeout"] is True and "branch timed out after 0.5s" in r["error"]
    errors = [e["timeout"] for e in r["attempt_errors"]]
    if strategy == "celery":  # queue and retry latency decide whether a third attempt began
        assert r["retry_count"] in (1, 2) and errors == [True] * (r["retry_count"] + 1)
    else:
        assert r["retry_count"] == 1 and errors == [True, True]
    assert nodes.calls(tmp_path, "hang") <= 3 if strategy == "celery" else 2


def test_timeout_total_alone_stops_a_branch(strategy: str) -> None:
    g = fan_graph({"hang": nodes.cooperative_sleep}, config=cfg(strategy, timeout_total=0.3))
    (r,), elapsed = run(g)
    assert r["timeout"] is True and r["error_type"] == "TimeoutError"
    assert elapsed < 2.0


def test_timeout_total_counts_the_wait_for_a_slot(local_strategy: str, tmp_path: Path) -> None:
    """With one slot, a branch queued behind a long one times out on time, never having run.

    (In-process strategies: max_workers sets their slots; Celery workers set their own.)"""
    strategy = local_strategy
    g = fan_graph(
        {"long": nodes.sleep_node, "queued": nodes.slow_marker},
        config=cfg(strategy, max_workers=1),
        edge_configs={"queued": ParallelConfig(timeout_total=0.2)},
    )
    (long, queued), _ = run(g, {**dirs(tmp_path), "slow": 0.0, "sleep": {"long": 0.5}})
    assert long["success"] is True
    assert queued["timeout"] is True and "branch timed out after 0.2s" in queued["error"]
    assert queued["end_time"] - long["start_time"] < 0.4  # at its deadline, not when 'long' ended
    assert not (tmp_path / "queued.done").exists()  # never started


def test_a_timeout_is_not_retried_by_default(strategy: str, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.01)
    assert policy.retry_on_timeout is False
    g = fan_graph(
        {"hang": nodes.slow_then_fast},
        config=cfg(strategy, timeout_seconds=0.2, retry_policy=policy),
    )
    (r,), elapsed = run(g, {**dirs(tmp_path), "slow_times": 99})
    assert r["timeout"] is True and r["retry_count"] == 0
    assert nodes.calls(tmp_path, "hang") == 1
    assert elapsed < 0.8


def test_retry_on_timeout_retries_timeouts(strategy: str, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=1, base_delay=0.01, retry_on_timeout=True)
    # 0.3 s: a killed process worker is replaced (~0.1 s) within each attempt's time
    g = fan_graph(
        {"hang": nodes.slow_then_fast},
        config=cfg(strategy, timeout_seconds=0.3, retry_policy=policy),
    )
    (r,), _ = run(g, {**dirs(tmp_path), "slow_times": 99})
    assert r["timeout"] is True and r["retry_count"] == 1
    assert nodes.calls(tmp_path, "hang") == 2
    assert [e["attempt"] for e in r["attempt_errors"]] == [1, 2]
    assert all(e["timeout"] and e["error_type"] == "TimeoutError" for e in r["attempt_errors"])


def test_invoke_returns_on_time_even_if_the_node_ignores_cancellation(
    strategy: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = fan_graph({"stubborn": nodes.stubborn_marker}, config=cfg(strategy, timeout_seconds=0.2))
    with caplog.at_level(logging.WARNING):
        (r,), elapsed = run(g, {**dirs(tmp_path), "slow": 0.5})
        assert r["timeout"] is True
        assert elapsed < 0.45, elapsed  # the node itself takes 0.5 s
        time.sleep(0.7 - elapsed)
    if strategy == "process":  # the worker process was killed: the work never finished
        assert not (tmp_path / "stubborn.done").exists()
    if strategy == "thread":  # threads cannot be killed: the leak is counted and logged
        assert "ignored the cancel token" in caplog.text
