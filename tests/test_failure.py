"""TD.13 AC2 partial failure (best effort vs fail-fast) and copy-on-execute state isolation,
on each in-process strategy."""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, ParallelFlowResult, StateGraph
from tea_dist.core.errors import BranchError
from tests import nodes
from tests.nodes import fan_graph, final_state


def test_td13_int_007_best_effort_one_fails_the_others_finish(strategy: str) -> None:
    seen: list[tuple[str, bool, str | None]] = []

    def merge(state: dict[str, Any], parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        seen.extend((r.branch, r.success, r.error_type) for r in parallel_results)
        return {"total": sum(r.get("value", 0) for r in parallel_results if r.success)}

    g = fan_graph(
        {"a": nodes.sleep_node, "bad": nodes.fail, "b": nodes.add_one},
        config=ParallelConfig(strategy=strategy),
        fan_in=merge,
    )
    events = list(g.compile().invoke({"value": 1, "sleep": 0.2}))
    assert final_state(events)["total"] == 1 + 2  # a keeps value 1, b adds one
    assert seen == [("a", True, None), ("bad", False, "ValueError"), ("b", True, None)]


def test_td13_int_008_fail_fast_error_ends_the_run(strategy: str, tmp_path: Path) -> None:
    g = fan_graph(
        {"slow": nodes.slow_marker, "bad": nodes.fail},
        config=ParallelConfig(strategy=strategy, fail_fast=True),
    )
    slow = 1.0 if strategy == "celery" else 0.35  # celery: beyond its dispatch latency
    run_config = {"marker_dir": str(tmp_path), "slow": slow}
    started = time.monotonic()
    events = list(g.compile().invoke({}, config=run_config))
    elapsed = time.monotonic() - started
    assert events == [
        {
            "type": "error",
            "node": "start",
            "branch": "bad",
            "error_type": "ValueError",
            "error": "branch 'bad' failed (ValueError: boom); fail_fast stopped the other branches",
            "state": {"started": True},
        }
    ]
    # the slow sibling was cancelled, not awaited (celery adds its dispatch round trips)
    assert elapsed < (0.6 if strategy == "celery" else 0.3), elapsed
    time.sleep(max(0.0, slow + 0.15 - elapsed))
    assert not (tmp_path / "slow.done").exists()

    g.raise_exceptions = True
    with pytest.raises(BranchError) as info:
        list(g.compile().invoke({}, config=run_config))
    assert info.value.branch == "bad" and info.value.error_type == "ValueError"


def test_fail_fast_with_many_simultaneous_failures_reports_the_first(strategy: str) -> None:
    """Several branches failing at the same moment must not confuse the supervisor."""
    g = fan_graph(
        {f"bad{i}": nodes.fail for i in range(6)},
        config=ParallelConfig(strategy=strategy, fail_fast=True),
    )
    app = g.compile()
    kinds = collections.Counter(
        (events[-1]["type"], events[-1]["error_type"])
        for events in (list(app.invoke({})) for _ in range(20))
    )
    assert kinds == {("error", "ValueError"): 20}


def test_best_effort_stream_yields_one_event_per_branch_in_order(strategy: str) -> None:
    """Best effort: the fan-in always gets one result per branch, in declaration order."""
    g = fan_graph(
        {"x": nodes.fail, "y": nodes.add_one, "z": nodes.fail_connection},
        config=ParallelConfig(strategy=strategy),
    )
    events = list(g.compile().stream({"value": 1}))
    branch_events = [
        (e["type"], e["branch"], e.get("error_type"))
        for e in events
        if e["type"].startswith("parallel")
    ]
    assert branch_events == [
        ("parallel_error", "x", "ValueError"),
        ("parallel_state", "y", None),
        ("parallel_error", "z", "ConnectionError"),
    ]


# -- state isolation (copy-on-execute) --


def test_branches_work_on_private_copies_of_the_state(strategy: str) -> None:
    """One branch mutates nested lists in place; its sibling, the fan-in, the main state and
    the caller's input never see it."""
    seen_by_fan_in: dict[str, Any] = {}

    def merge(state: dict[str, Any], parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        seen_by_fan_in.update(items=list(state["items"]), inner=list(state["nested"]["inner"]))
        return {
            "reader_saw": parallel_results[1]["reader_saw"],
            "writer_items": parallel_results[0]["items"],
        }

    g = StateGraph({"items": list})
    g.add_node("start")
    g.add_node("writer", run=nodes.mutate_nested)
    g.add_node("reader", run=nodes.read_items_later)
    g.add_fanin_node("merge", run=merge)
    for branch in ("writer", "reader"):
        g.add_parallel_edge("start", branch, "merge", config=ParallelConfig(strategy=strategy))
        g.add_edge(branch, "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")

    given = {"items": ["orig"], "nested": {"inner": ["orig"]}}
    state = final_state(list(g.compile().invoke(given)))
    assert state["writer_items"] == ["orig", "mutated"]  # the writer changed its own copy
    assert state["reader_saw"] == ["orig"]  # the sibling did not see it
    assert seen_by_fan_in == {"items": ["orig"], "inner": ["orig"]}  # nor did the fan-in
    assert state["items"] == ["orig"] and state["nested"] == {"inner": ["orig"]}
    assert given == {"items": ["orig"], "nested": {"inner": ["orig"]}}  # nor the caller


def test_every_retry_starts_from_the_original_state(strategy: str, tmp_path: Path) -> None:
    """A failed attempt's in-place mutations do not leak into the next attempt."""
    from tea_dist import RetryPolicy

    g = StateGraph({"items": list})
    g.add_node("start")
    g.add_node("mutate", run=nodes.mutate_nested)
    g.add_node("flaky", run=nodes.flaky)
    g.add_fanin_node("merge", run=nodes.collect)
    g.add_parallel_edge(
        "start",
        "mutate",
        "merge",
        config=ParallelConfig(
            strategy=strategy, retry_policy=RetryPolicy(max_retries=2, base_delay=0.01)
        ),
    )
    g.add_edge("mutate", "flaky")
    g.add_edge("flaky", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    given = {"items": ["orig"], "nested": {"inner": []}}
    (r,) = final_state(
        list(g.compile().invoke(given, config={"counter_dir": str(tmp_path), "fail_times": 2}))
    )["results"]
    assert r["success"] and r["retry_count"] == 2
    assert r["state"]["items"] == ["orig", "mutated"]  # one mutation, not three


def test_a_cancelled_run_stops_its_running_branches(strategy: str, tmp_path: Path) -> None:
    """The run's cancel token (set by WorkflowRun.cancel on a run worker) ends a fan-out early;
    the branches are stopped (their side effects never happen) and the run ends in error."""
    import threading

    from tea_dist import CancelToken

    token = CancelToken()
    g = fan_graph(
        {"a": nodes.slow_marker, "b": nodes.slow_marker}, config=ParallelConfig(strategy=strategy)
    )
    threading.Timer(0.5, token.cancel).start()
    started = time.monotonic()
    events = list(
        g.compile().invoke({}, {"marker_dir": str(tmp_path), "slow": 3.0}, cancel_token=token)
    )
    assert events[-1]["type"] == "error"
    assert time.monotonic() - started < 2.5
    time.sleep(3)
    assert not list(tmp_path.glob("*"))  # no branch got to leave its marker
