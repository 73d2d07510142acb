"""The ``asyncio`` strategy (seed 004): branches as tasks on one event loop."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tea_dist import ParallelConfig, StateGraph
from tests import nodes
from tests.nodes import fan_graph, final_state

ASYNCIO = ParallelConfig(strategy="asyncio")


def results(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return final_state(events)["results"]


def test_h4_ac1_speedup_4x100ms_async_branches() -> None:
    state = {"sleep": 0.1}
    started = time.perf_counter()
    for name in "abcd":
        asyncio.run(nodes.async_sleep(state, name))
    sequential = time.perf_counter() - started

    app = fan_graph({name: nodes.async_sleep for name in "abcd"}, config=ASYNCIO).compile()
    list(app.invoke(state))  # warm the loop
    started = time.perf_counter()
    out = results(list(app.invoke(state)))
    parallel = time.perf_counter() - started
    assert all(r["success"] for r in out)
    assert sequential / parallel >= 2.0, f"speedup {sequential / parallel:.2f}x < 2x"


def test_h4_ac2_100_identical_runs() -> None:
    branches = {"a": nodes.async_add_one, "b": nodes.double, "c": nodes.tag_branch}
    app = fan_graph(branches, config=ASYNCIO).compile()
    volatile = ("timing_ms", "start_time", "end_time", "worker")
    outputs = set()
    for _ in range(100):
        state = final_state(list(app.invoke({"value": 2})))
        stable = [{k: v for k, v in r.items() if k not in volatile} for r in state["results"]]
        outputs.add(json.dumps([state["total"], stable], sort_keys=True))
    assert len(outputs) == 1
    assert json.loads(outputs.pop())[0] == 3 + 4 + 12


def test_h4_ac3_state_isolation_no_race() -> None:
    branches = {f"m{i}": nodes.mutate_in_place for i in range(10)}
    start = {"items": ["orig"]}
    out = results(list(fan_graph(branches, config=ASYNCIO).compile().invoke(start)))
    assert [r["state"]["items"] for r in out] == [["orig", "mutated"]] * 10
    assert start == {"items": ["orig"]}


def test_h4_ac3_100_branches_max_workers_4_no_deadlock() -> None:
    nodes.CONCURRENCY.update(now=0, max=0)
    branches = {f"b{i}": nodes.async_count_concurrency for i in range(100)}
    config = ParallelConfig(strategy="asyncio", max_workers=4)
    started = time.monotonic()
    out = results(list(fan_graph(branches, config=config).compile().invoke({})))
    assert time.monotonic() - started < 5.0
    assert len(out) == 100 and all(r["success"] for r in out)
    assert [r["branch"] for r in out] == list(branches)
    assert nodes.CONCURRENCY["max"] == 4


def test_asyncio_default_runs_every_branch_at_once() -> None:
    nodes.CONCURRENCY.update(now=0, max=0)
    branches = {f"b{i}": nodes.async_count_concurrency for i in range(20)}
    list(fan_graph(branches, config=ASYNCIO).compile().invoke({"hold": 0.3}))  # all overlap
    assert nodes.CONCURRENCY["max"] == 20


def test_h4_ac4_error_capture_without_raising() -> None:
    branches = {"ok1": nodes.async_add_one, "bad": nodes.fail, "ok2": nodes.async_add_one}
    out = results(list(fan_graph(branches, config=ASYNCIO).compile().invoke({"value": 1})))
    assert [r["success"] for r in out] == [True, False, True]
    assert out[1]["error_type"] == "ValueError" and out[1]["error"] == "boom"
    assert out[0]["state"]["value"] == out[2]["state"]["value"] == 2


def test_asyncio_timeout_cancels_the_task() -> None:
    nodes.ASYNC_RECORD.clear()
    config = ParallelConfig(strategy="asyncio", timeout_seconds=0.2)
    graph = fan_graph({"slow": nodes.async_cancellable, "fast": nodes.async_add_one}, config=config)
    started = time.monotonic()
    out = results(list(graph.compile().invoke({"sleep": 5.0, "value": 1})))
    assert time.monotonic() - started < 1.0
    assert out[0]["timeout"] and out[0]["error_type"] == "TimeoutError"
    assert out[1]["success"]
    deadline = time.monotonic() + 1.0
    while len(nodes.ASYNC_RECORD) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nodes.ASYNC_RECORD == ["cancelled:slow", "finally:slow"]


def test_asyncio_sync_nodes_run_off_the_loop() -> None:
    app = fan_graph({"a": nodes.sleep_node, "b": nodes.sleep_node}, config=ASYNCIO).compile()
    list(app.invoke({"sleep": 0.0}))  # warm the loop
    started = time.monotonic()
    out = results(list(app.invoke({"sleep": 0.2})))
    assert time.monotonic() - started < 0.35  # 0.2 s, not 0.4 s
    assert all(r["success"] for r in out)
    where = results(list(fan_graph({"w": nodes.where}, config=ASYNCIO).compile().invoke({})))
    assert where[0]["state"]["thread"].startswith("tea-dist-asyncio-sync")


def test_nested_asyncio_fan_out_inside_an_asyncio_branch() -> None:
    graph = StateGraph({}, parallel_config=ASYNCIO)
    graph.add_node("start", run=nodes.start)
    graph.add_node("outer", run=nodes.async_add_one)
    graph.add_node("x", run=nodes.async_add_one)
    graph.add_node("y", run=nodes.double)
    graph.add_fanin_node("inner", run=nodes.collect)
    graph.add_fanin_node("merge", run=nodes.collect)
    graph.add_parallel_edge("start", "outer", "merge")
    graph.add_parallel_edge("outer", "x", "inner")
    graph.add_parallel_edge("outer", "y", "inner")
    for src, dst in (("x", "inner"), ("y", "inner"), ("inner", "merge")):
        graph.add_edge(src, dst)
    graph.set_entry_point("start")
    graph.set_finish_point("merge")
    (outer,) = results(list(graph.compile().invoke({"value": 1})))
    assert outer["success"], outer
    assert outer["state"]["total"] == 3 + 4
