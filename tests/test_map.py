"""Run-time fan-out (``add_parallel_map``), ``max_workers`` on celery, and ``ResourceLimit``s
on real workers: how many branches ran at once and how many started per second, measured
from the times the nodes recorded."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import END, START, ParallelConfig, ResourceLimit, StateGraph, load_yaml
from tests import celery_nodes as cn
from tests import nodes
from tests.nodes import final_state, peak_overlap


def map_graph(config: ParallelConfig, items: Any = "docs", name: str = "mapped") -> StateGraph:
    return nodes.map_graph(cn.double_item, cn.collect_items, config=config, items=items, name=name)


def test_i12_map_of_40_items_in_order(strategy: str) -> None:
    state = final_state(
        list(
            map_graph(ParallelConfig(strategy=strategy)).compile().invoke({"docs": list(range(40))})
        )
    )
    assert state["doubled"] == [2 * i for i in range(40)]
    assert state["branches"] == [f"work[{i}]" for i in range(40)]


def test_i12_map_of_no_items_runs_the_fan_in_with_none(strategy: str) -> None:
    state = final_state(
        list(map_graph(ParallelConfig(strategy=strategy)).compile().invoke({"docs": []}))
    )
    assert state["branches"] == [] and state["doubled"] == []


def test_i12_map_items_from_a_callable_in_the_caller() -> None:
    graph = map_graph(ParallelConfig(), items=cn.items_of)
    state = final_state(list(graph.compile().invoke({"count": 3})))
    assert state["doubled"] == [0, 2, 4]


def test_i12_map_over_a_missing_key_names_it() -> None:
    events = list(map_graph(ParallelConfig()).compile().invoke({"other": 1}))
    assert events[-1]["type"] == "error" and "'docs'" in events[-1]["error"]


def test_i12_map_stream_reports_each_item_branch() -> None:
    events = list(map_graph(ParallelConfig()).compile().stream({"docs": [5, 6]}))
    branches = [e["branch"] for e in events if e["type"] == "parallel_state"]
    assert branches == ["work[0]", "work[1]"]


def test_i12_yaml_map_edge(tmp_path: Path) -> None:
    agent = tmp_path / "map.yaml"
    agent.write_text(
        """
name: mapped
nodes:
  - {name: prepare, run: "return {}"}
  - {name: work, uses: "tests.celery_nodes:double_item"}
  - {name: merge, fan_in: true, uses: "tests.celery_nodes:collect_items"}
edges:
  - {from: __start__, to: prepare}
  - {from: prepare, to: work, parallel: true, fan_in: merge, map: docs, item_key: item}
  - {from: work, to: merge}
  - {from: merge, to: __end__}
"""
    )
    state = final_state(list(load_yaml(agent).compile().invoke({"docs": [1, 2, 3]})))
    assert state["doubled"] == [2, 4, 6]


def test_i12_a_map_and_other_parallel_edges_on_one_node_are_refused() -> None:
    g = map_graph(ParallelConfig())
    g.add_node("other", run=None)
    g.add_parallel_edge("prepare", "other", "merge")
    g.add_edge("other", "merge")
    with pytest.raises(Exception, match="map"):
        g.compile()


# -- concurrency: measured from the intervals the nodes recorded --


def intervals(markers: Path) -> list[tuple[float, float]]:
    spans = []
    for path in markers.glob("*.interval"):
        start, end = path.read_text().split()
        spans.append((float(start), float(end)))
    return sorted(spans)


def most_starts_in_a_window(spans: list[tuple[float, float]], window: float) -> int:
    starts = sorted(s for s, _ in spans)
    return max((sum(1 for t in starts if s <= t < s + window - 0.01) for s in starts), default=0)


def recording_graph(config: ParallelConfig, name: str) -> StateGraph:
    return nodes.map_graph(cn.record_interval, cn.collect, config=config, name=name)


def test_i12_max_workers_bounds_a_local_map(local_strategy: str, tmp_path: Path) -> None:
    config = ParallelConfig(strategy=local_strategy, max_workers=2)
    graph = recording_graph(config, "bounded")
    final_state(
        list(graph.compile().invoke({"docs": list(range(6))}, {"marker_dir": str(tmp_path)}))
    )
    assert peak_overlap(intervals(tmp_path)) == 2


def test_i12_max_concurrent_limit_bounds_threads(tmp_path: Path) -> None:
    limit = ResourceLimit(name=f"threads-{tmp_path.name}", max_concurrent=2)
    graph = recording_graph(ParallelConfig(limits=[limit], max_workers=6), "limited")
    final_state(
        list(graph.compile().invoke({"docs": list(range(6))}, {"marker_dir": str(tmp_path)}))
    )
    assert peak_overlap(intervals(tmp_path)) == 2


@pytest.mark.celery
def test_i12_max_workers_on_celery_with_more_free_slots(cluster: Any, tmp_path: Path) -> None:
    queue = f"tea.wide.{cluster.tag}"
    cluster.start_worker("wide", concurrency=6, flows_queue=queue)
    config = ParallelConfig(strategy="celery", max_workers=2, queue=queue)
    run = {"marker_dir": str(tmp_path), "hold": 0.6}
    state = final_state(
        list(recording_graph(config, "window").compile().invoke({"docs": list(range(6))}, run))
    )
    assert state["ok"] == [True] * 6
    spans = intervals(tmp_path)
    assert len(spans) == 6 and peak_overlap(spans) == 2


@pytest.mark.celery
def test_i12_limit_across_two_workers_and_two_callers(cluster: Any, tmp_path: Path) -> None:
    queue = f"tea.limited.{cluster.tag}"
    for name in ("limited-1", "limited-2"):
        cluster.start_worker(name, concurrency=2, flows_queue=queue)
    limit = ResourceLimit(name=f"api-{cluster.tag}", max_concurrent=2)
    config = ParallelConfig(strategy="celery", queue=queue, limits=[limit])
    run = {"marker_dir": str(tmp_path), "hold": 0.5}
    outs: list[list[Any]] = [[], []]

    def call(i: int) -> None:
        graph = recording_graph(config, f"caller{i}").compile()
        outs[i].extend(graph.invoke({"docs": list(range(4))}, run))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for out in outs:
        assert final_state(out)["ok"] == [True] * 4
    spans = intervals(tmp_path)
    assert len(spans) == 8
    print(f"peak concurrency with max_concurrent=2: {peak_overlap(spans)}")
    assert peak_overlap(spans) == 2


@pytest.mark.celery
def test_i12_rate_limit_on_real_workers(cluster: Any, tmp_path: Path) -> None:
    queue = f"tea.rated.{cluster.tag}"
    cluster.start_worker("rated", concurrency=4, flows_queue=queue)
    limit = ResourceLimit(name=f"rate-{cluster.tag}", rate="4/s")
    config = ParallelConfig(strategy="celery", queue=queue, limits=[limit])
    run = {"marker_dir": str(tmp_path), "hold": 0.05}
    state = final_state(
        list(recording_graph(config, "rated").compile().invoke({"docs": list(range(10))}, run))
    )
    assert state["ok"] == [True] * 10
    spans = intervals(tmp_path)
    # node start times trail their permits by up to a few hundred ms on a loaded machine: a
    # 0.8 s window leaves 0.2 s for that (with no limit, all 10 start within ~0.3 s)
    most = most_starts_in_a_window(spans, 0.8)
    print(f"most starts in any 0.8 s window with rate=4/s: {most}")
    assert most <= 4


@pytest.mark.celery
def test_i12_permit_of_a_killed_holder_comes_back_within_the_lease(
    cluster: Any, tmp_path: Path
) -> None:
    from tea_dist.distributed.keys import Keys
    from tea_dist.distributed.limits_redis import RedisLimitStore
    from tea_dist.policies.limits import DEFAULT_LEASE_SECONDS
    from tests.cluster import current_settings

    queue = f"tea.holder.{cluster.tag}"
    victim = cluster.start_worker("holder", concurrency=1, flows_queue=queue)
    limit = ResourceLimit(name=f"held-{cluster.tag}", max_concurrent=1)
    config = ParallelConfig(strategy="celery", queue=queue, limits=[limit])
    run = {"marker_dir": str(tmp_path), "sleep": {"work": 60}}
    g = StateGraph({}, name="holder", parallel_config=config)
    g.add_node("prepare", run=None)
    g.add_node("work", run=cn.start_sleep_done)
    g.add_fanin_node("merge", run=cn.collect)
    g.add_edge(START, "prepare")
    g.add_parallel_edge("prepare", "work", "merge")
    g.add_edge("work", "merge")
    g.add_edge("merge", END)
    caller = threading.Thread(target=lambda: list(g.compile().invoke({}, run)), daemon=True)
    caller.start()
    deadline = time.monotonic() + 30
    while not (tmp_path / "work.start").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    settings = current_settings()
    store = RedisLimitStore(settings.redis, Keys(settings.key_prefix))
    assert store.acquire(limit, "probe", 5.0) is not None  # held by the running branch
    cluster.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    while store.acquire(limit, "probe", 5.0) is not None:
        assert time.monotonic() - killed < DEFAULT_LEASE_SECONDS + 2, "the permit never came back"
        time.sleep(0.1)
    back_after = time.monotonic() - killed
    store.release(limit, "probe")
    print(f"permit back {back_after:.2f}s after its holder was SIGKILLed")
    assert back_after <= DEFAULT_LEASE_SECONDS + 1


def test_i12_cli_branch_table_of_a_1000_item_map_is_one_summary_line() -> None:
    from rich.console import Console

    from tea_dist.interfaces.common import BranchProgress

    progress = BranchProgress(Console(width=100, record=True, file=open(os.devnull, "w")))
    graph = map_graph(ParallelConfig(max_workers=8))
    final_state(
        list(graph.compile(parallel_callbacks=[progress]).invoke({"docs": list(range(1000))}))
    )
    console = Console(width=100, record=True, file=open(os.devnull, "w"))
    console.print(progress.table())
    text = console.export_text()
    assert "1000 branches" in text and "1000 ok" in text
    assert len(text.splitlines()) < 10


def test_i10_branches_are_queued_before_they_start(local_strategy: str) -> None:
    seen: list[tuple[str, str]] = []

    class Recorder:
        def on_flow_queued(self, ctx: Any) -> None:
            seen.append(("queued", ctx.branch))

        def on_flow_start(self, ctx: Any) -> None:
            seen.append(("start", ctx.branch))

    graph = map_graph(ParallelConfig(strategy=local_strategy, max_workers=1))
    final_state(list(graph.compile(parallel_callbacks=[Recorder()]).invoke({"docs": [1, 2, 3]})))
    for i in range(3):
        branch = f"work[{i}]"
        assert seen.index(("queued", branch)) < seen.index(("start", branch))
    assert [e for e in seen if e[0] == "queued"] == [("queued", f"work[{i}]") for i in range(3)]


def test_i12_a_map_branch_gets_its_item_not_the_whole_list() -> None:
    def peek(state: dict[str, Any]) -> dict[str, Any]:
        return {"keys": sorted(state)}

    g = StateGraph({"docs": list}, name="peek")
    g.add_node("prepare", run=None)
    g.add_node("work", run=peek)
    g.add_fanin_node(
        "merge",
        run=lambda state, parallel_results: {"keys": [r.get("keys") for r in parallel_results]},
    )
    g.add_edge(START, "prepare")
    g.add_parallel_map("prepare", "work", "merge", "docs", item_key="doc")
    g.add_edge("work", "merge")
    g.add_edge("merge", END)
    state = final_state(list(g.compile().invoke({"docs": ["a", "b"], "topic": "x"})))
    assert state["keys"] == [["doc", "index", "topic"]] * 2
    assert state["docs"] == ["a", "b"]  # the caller's state keeps it
