"""The ``process`` strategy (seed 002): real processes, real kills, pickle checked up front."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, RetryPolicy, StateGraph
from tea_dist.core.errors import SerializationError
from tea_dist.core.strategies import get_executor
from tea_dist.engine.attempt import BranchTask
from tea_dist.engine.runtime import Runtime
from tea_dist.executors.process import ProcessExecutor
from tests import nodes
from tests.nodes import fan_graph, final_state

PROCESS = ParallelConfig(strategy="process")


def results(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["branch"]: r for r in final_state(events)["results"]}


def pid_of(worker: str) -> int:
    return int(worker.rsplit("/", 1)[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for(condition: Any, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(scope="module", autouse=True)
def warm_pool() -> None:
    """Start the workers once, so start-up time never eats into a test's timeout."""
    get_executor("process").pool.reserve(os.cpu_count() or 1)  # type: ignore[attr-defined]


def test_p001_int_007_process_branches_run_in_other_pids() -> None:
    graph = fan_graph({"a": nodes.tag_branch, "b": nodes.tag_branch}, config=PROCESS)
    by_branch = results(list(graph.compile().invoke({"value": 1})))
    for result in by_branch.values():
        assert result["success"], result
        pid = result["state"]["pid"]
        assert pid != os.getpid()
        assert pid_of(result["worker"]) == pid
        assert result["state"]["value"] == 11


def test_p001_int_010_process_nested_structures_round_trip() -> None:
    data = {"list": [1, {"b": (2, 3)}], "pair": (1, "x"), "tags": {"t"}, "none": None}
    seen: list[Any] = []

    def capture(parallel_results: list[Any]) -> None:  # the fan-in runs in the caller
        seen.extend(parallel_results)

    graph = fan_graph({"a": nodes.nested_structures}, config=PROCESS, fan_in=capture)
    final_state(list(graph.compile().invoke({"data": data})))
    (result,) = seen
    assert result.success, result
    assert result.state["data"] == {**data, "list": [1, {"b": (2, 3)}, {"added": (4, 5)}]}
    assert result.state["keys"] == ["list", "none", "pair", "tags"]
    assert result.state["pair"] == ("x", 1) and result.state["tags"] == {"t", "new"}
    assert data == {"list": [1, {"b": (2, 3)}], "pair": (1, "x"), "tags": {"t"}, "none": None}


def test_p001_unit_004_process_pool_uses_max_workers() -> None:
    branches = {f"s{i}": nodes.sleep_node for i in range(4)}
    config = ParallelConfig(strategy="process", max_workers=2)
    started = time.monotonic()
    events = list(fan_graph(branches, config=config).compile().invoke({"sleep": 0.3}))
    elapsed = time.monotonic() - started
    spans = [(r["start_time"], r["end_time"]) for r in results(events).values()]
    peak = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert peak == 2
    assert len({r["worker"] for r in results(events).values()}) == 2
    assert elapsed >= 0.6


def test_p001_unit_005_non_picklable_state_detected_before_execution(tmp_path: Path) -> None:
    graph = fan_graph({"a": nodes.stubborn_marker, "b": nodes.add_one}, config=PROCESS)
    graph.raise_exceptions = True
    app = graph.compile()
    with pytest.raises(SerializationError):
        list(app.invoke({"conn": threading.Lock()}, {"slow": 0, "marker_dir": str(tmp_path)}))
    time.sleep(0.2)
    assert not (tmp_path / "a.done").exists()


def test_p001_unit_006_non_picklable_error_names_key_and_branch(tmp_path: Path) -> None:
    graph = fan_graph({"a": nodes.add_one, "b": nodes.add_one}, config=PROCESS)
    (event,) = list(graph.compile().invoke({"value": 1, "conn": threading.Lock()}))
    assert event["type"] == "error" and event["error_type"] == "SerializationError"
    assert event["error"] == (
        "state key 'conn' of branch 'a' cannot be pickled for the process strategy: "
        "TypeError: cannot pickle '_thread.lock' object"
    )
    with open(tmp_path / "f", "w") as handle:
        (event,) = list(graph.compile().invoke({"value": 1}, {"log": handle}))
    assert "config key 'log' of branch 'a'" in event["error"]


def test_only_branch_nodes_must_pickle() -> None:
    graph = StateGraph({}, parallel_config=PROCESS)
    graph.add_node("start", run=lambda state: {"value": 1})  # runs in the caller: may be a lambda
    graph.add_node("a", run=nodes.add_one)
    graph.add_node("b", run=nodes.add_one)  # a thread branch may hold lambdas too
    graph.add_fanin_node("merge", run=lambda parallel_results: {"n": len(parallel_results)})
    graph.add_parallel_edge("start", "a", "merge")
    graph.add_parallel_edge("start", "b", "merge", config=ParallelConfig(strategy="thread"))
    graph.add_edge("a", "merge")
    graph.add_edge("b", "merge")
    graph.set_entry_point("start")
    graph.set_finish_point("merge")
    assert final_state(list(graph.compile().invoke({})))["n"] == 2


def test_p001_int_008_process_timeout_kills_child(tmp_path: Path) -> None:
    config = ParallelConfig(strategy="process", timeout_seconds=0.5)
    graph = fan_graph({"slow": nodes.stubborn_with_pid, "fast": nodes.add_one}, config=config)
    run_config = {"slow": 2.0, "marker_dir": str(tmp_path)}
    started = time.monotonic()
    by_branch = results(list(graph.compile().invoke({"value": 1}, run_config)))
    assert time.monotonic() - started < 1.5
    assert by_branch["slow"]["timeout"] and by_branch["slow"]["error_type"] == "TimeoutError"
    assert by_branch["fast"]["success"]
    pid = int((tmp_path / "slow.pid").read_text())
    assert wait_for(lambda: not alive(pid)), "the timed-out worker is still alive"
    time.sleep(max(0.0, started + 2.3 - time.monotonic()))
    assert not (tmp_path / "slow.done").exists()
    # the killed worker was replaced: the pool still runs branches
    again = results(list(graph.compile().invoke({"value": 1}, {**run_config, "slow": 0})))
    assert again["slow"]["success"] and pid_of(again["slow"]["worker"]) != pid


def test_p001_int_011_process_crash_gives_failed_result() -> None:
    graph = fan_graph({"boom": nodes.crash, "ok": nodes.add_one}, config=PROCESS)
    started = time.monotonic()
    by_branch = results(list(graph.compile().invoke({"value": 1})))
    assert time.monotonic() - started < 5
    crashed = by_branch["boom"]
    assert not crashed["success"] and crashed["error_type"] == "WorkerCrashedError"
    assert "exit code 3" in crashed["error"] and "branch 'boom'" in crashed["error"]
    assert by_branch["ok"]["success"]
    assert results(list(graph.compile().invoke({"value": 1})))["ok"]["success"]


def test_process_fail_fast_kills_siblings(tmp_path: Path) -> None:
    config = ParallelConfig(strategy="process", fail_fast=True, max_workers=3)
    branches = {"bad": nodes.fail, "s1": nodes.stubborn_with_pid, "s2": nodes.stubborn_with_pid}
    run_config = {"slow": 1.0, "marker_dir": str(tmp_path)}
    started = time.monotonic()
    (event,) = list(fan_graph(branches, config=config).compile().invoke({}, run_config))
    assert event["type"] == "error" and event["branch"] == "bad"
    assert time.monotonic() - started < 0.9  # did not wait for the 1 s siblings
    time.sleep(max(0.0, started + 1.3 - time.monotonic()))
    assert not list(tmp_path.glob("*.done"))


def test_process_retry_matches_original_exception_by_name(tmp_path: Path) -> None:
    retry = RetryPolicy(max_retries=2, base_delay=0.01, retry_on=[RuntimeError])
    config = ParallelConfig(strategy="process", retry_policy=retry)
    graph = fan_graph({"f": nodes.flaky}, config=config)
    run_config = {"counter_dir": str(tmp_path), "fail_times": 1}
    (result,) = final_state(list(graph.compile().invoke({}, run_config)))["results"]
    assert result["success"] and result["retry_count"] == 1
    assert result["state"]["attempts"] == 2


def test_nested_fan_out_inside_a_process_branch() -> None:
    graph = StateGraph({}, name="nested")
    graph.add_node("start", run=nodes.start)
    graph.add_node("outer", run=nodes.add_one)
    graph.add_node("x", run=nodes.tag_branch)
    graph.add_node("y", run=nodes.tag_branch)
    graph.add_fanin_node("inner", run=nodes.collect)
    graph.add_fanin_node("merge", run=nodes.collect)
    graph.add_parallel_edge("start", "outer", "merge", config=PROCESS)
    graph.add_parallel_edge("outer", "x", "inner")
    graph.add_parallel_edge("outer", "y", "inner")
    for src, dst in (("x", "inner"), ("y", "inner"), ("inner", "merge")):
        graph.add_edge(src, dst)
    graph.set_entry_point("start")
    graph.set_finish_point("merge")
    (outer,) = final_state(list(graph.compile().invoke({"value": 1})))["results"]
    assert outer["success"], outer
    assert outer["state"]["total"] == 24  # (1 + 1 + 10) twice
    pids = {r["state"]["pid"] for r in outer["state"]["results"]}
    assert pids == {pid_of(outer["worker"])} and os.getpid() not in pids


def test_shutdown_kills_every_worker() -> None:
    executor = ProcessExecutor()  # a private pool: the shared one stays up
    spec = fan_graph({"a": nodes.where}, config=PROCESS).to_spec()
    fan = spec.fanouts["start"]
    task = BranchTask(spec=spec, branch="a", fan_in=fan.fan_in, state={})
    (result,) = executor.execute([task], fan.configs, Runtime())
    pid = result.state["pid"] if result.state else -1
    assert executor.pool.pids == [pid]
    executor.shutdown()
    assert wait_for(lambda: not alive(pid))
