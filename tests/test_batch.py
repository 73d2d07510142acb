"""Batched maps (``add_parallel_map(..., batch_size=k)``): k items per Celery task on real
workers, each item still with its own result, retries, timeout, circuit accounting, limit
permits and callbacks; fail-fast stops the batch; a crashed batch's items are sent again."""

from __future__ import annotations

import itertools
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from tea_dist import (
    CircuitBreakerConfig,
    ParallelConfig,
    ResourceLimit,
    RetryPolicy,
    StateGraph,
    load_yaml,
)
from tea_dist.core.errors import GraphError
from tea_dist.core.graph import ADAPTIVE, MapItems
from tests import celery_nodes as cn
from tests.nodes import final_state, map_graph

pytestmark = [pytest.mark.redis, pytest.mark.celery]


def batch_graph(
    config: ParallelConfig, batch_size: int | Literal["auto"], name: str = "batched"
) -> StateGraph:
    return map_graph(cn.batch_item, cn.collect, config=config, batch_size=batch_size, name=name)


class Results:
    """Every ``on_flow_start`` and each item's ``on_flow_complete`` result, as callbacks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[str] = []
        self.results: dict[str, Any] = {}

    def on_flow_start(self, ctx: Any) -> None:
        with self.lock:
            self.starts.append(ctx.branch)

    def on_flow_complete(self, ctx: Any, result: Any) -> None:
        with self.lock:
            assert ctx.branch not in self.results, f"{ctx.branch} completed twice"
            self.results[ctx.branch] = result


def run(
    graph: StateGraph, tmp_path: Path, items: int, **run_config: Any
) -> tuple[list[dict[str, Any]], Results]:
    recorder = Results()
    app = graph.compile(parallel_callbacks=[recorder])
    events = list(
        app.invoke({"docs": list(range(items))}, {"marker_dir": str(tmp_path), **run_config})
    )
    return events, recorder


def ran(tmp_path: Path, index: int) -> tuple[int, float, float] | None:
    """(pid, start, end) of the item's successful run, if it had one."""
    path = tmp_path / f"{index}.ran"
    if not path.exists():
        return None
    pid, start, end = path.read_text().split()
    return int(pid), float(start), float(end)


def runs(tmp_path: Path, index: int) -> int:
    path = tmp_path / f"{index}.runs"
    return int(path.read_text()) if path.exists() else 0


def test_i16_batch_of_k_items_runs_in_one_process_each_with_its_own_result(
    cluster: Any, tmp_path: Path
) -> None:
    config = ParallelConfig(strategy="celery")
    events, recorder = run(batch_graph(config, 10), tmp_path, 40)
    state = final_state(events)
    assert state["branches"] == [f"work[{i}]" for i in range(40)]
    assert state["ok"] == [True] * 40
    assert [r["state"]["doubled"] for r in state["results"]] == [2 * i for i in range(40)]
    assert all(r["retry_count"] == 0 and r["worker"] for r in state["results"])
    assert sorted(recorder.starts) == sorted(f"work[{i}]" for i in range(40))
    assert len(recorder.results) == 40
    for first in range(0, 40, 10):  # a batch: one process, its items one after another
        spans = [ran(tmp_path, i) for i in range(first, first + 10)]
        assert all(s is not None for s in spans)
        assert len({s[0] for s in spans if s}) == 1, f"batch at {first} ran in several processes"
        starts = [s[1] for s in spans if s]
        assert starts == sorted(starts), f"batch at {first} ran out of order"


def test_i16_a_batched_item_retries_on_its_own(cluster: Any, tmp_path: Path) -> None:
    retry = RetryPolicy(max_retries=2, base_delay=0.1, jitter=False)
    config = ParallelConfig(strategy="celery", retry_policy=retry)
    events, recorder = run(batch_graph(config, 6), tmp_path, 6, act={"3": "fail_once"})
    state = final_state(events)
    assert state["ok"] == [True] * 6
    assert [r["retry_count"] for r in state["results"]] == [0, 0, 0, 1, 0, 0]
    assert [runs(tmp_path, i) for i in range(6)] == [1, 1, 1, 2, 1, 1]
    assert recorder.starts.count("work[3]") == 1  # on_flow_start once per branch


def second_item_overruns(tmp_path: Path, act: str) -> tuple[dict[str, Any], float]:
    """One batch of 5 items with a 0.5 s timeout, item 1 doing ``act``: the fan-in's state
    and the seconds the run took."""
    config = ParallelConfig(strategy="celery", timeout_seconds=0.5)
    started = time.monotonic()
    events, _ = run(batch_graph(config, 5), tmp_path, 5, act={"1": act})
    return final_state(events), time.monotonic() - started


def test_i16_a_batched_item_past_its_timeout_stops_alone(cluster: Any, tmp_path: Path) -> None:
    state, took = second_item_overruns(tmp_path, "sleep:8")
    assert state["ok"] == [True, False, True, True, True]
    timed_out = state["results"][1]
    assert timed_out["timeout"] and timed_out["error_type"] == "TimeoutError"
    assert took < 6, f"the batch waited for the item that overran ({took:.1f}s)"
    assert ran(tmp_path, 1) is None
    assert [runs(tmp_path, i) for i in range(5)] == [1] * 5


def test_i16_a_batched_item_ignoring_its_timeout_is_killed_and_the_rest_sent_again(
    cluster: Any, tmp_path: Path
) -> None:
    state, took = second_item_overruns(tmp_path, "stubborn:20")
    assert state["ok"] == [True, False, True, True, True]
    killed = state["results"][1]
    assert killed["timeout"] and "process was killed" in killed["error"]
    assert took < 10, f"took {took:.1f}s: the stubborn item was not killed at its deadline"
    assert ran(tmp_path, 1) is None
    assert [runs(tmp_path, i) for i in range(5)] == [1] * 5  # the rest ran once, elsewhere
    pids = {ran(tmp_path, i)[0] for i in (0, 2)}  # type: ignore[index]
    assert len(pids) == 2, "item 2 ran in the process that was killed"


def test_i16_timeout_total_ends_the_items_still_queued_in_a_batch(
    cluster: Any, tmp_path: Path
) -> None:
    config = ParallelConfig(strategy="celery", timeout_total=1.5)
    started = time.monotonic()
    events, _ = run(batch_graph(config, 4), tmp_path, 4, hold=1.0)
    took = time.monotonic() - started
    results = final_state(events)["results"]
    assert [r["success"] for r in results] == [True, False, False, False]
    assert all("branch timed out after 1.5s" in r["error"] for r in results[1:])
    assert took < 4, f"the caller waited for the queued items ({took:.1f}s)"
    time.sleep(1.5)  # the batch's worker reached items 2 and 3 meanwhile: they did not run
    assert [runs(tmp_path, i) for i in range(4)] == [1, 1, 0, 0]


def test_i16_fail_fast_stops_the_rest_of_the_batch(cluster: Any, tmp_path: Path) -> None:
    config = ParallelConfig(strategy="celery", fail_fast=True)
    events, recorder = run(batch_graph(config, 10), tmp_path, 10, act={"1": "fail"}, hold=0.3)
    assert events[-1]["type"] == "error" and events[-1]["error_type"] == "ConnectionError"
    assert len(recorder.results) == 10  # one result per item, the stopped ones cancelled
    assert recorder.results["work[1]"].error_type == "ConnectionError"
    cancelled = [
        i for i in range(2, 10) if recorder.results[f"work[{i}]"].error_type == "CancelledError"
    ]
    assert cancelled == list(range(2, 10))
    time.sleep(1.0)  # anything still running would finish now
    assert [i for i in range(4, 10) if runs(tmp_path, i)] == []


def test_i16_a_crashed_batch_sends_its_unfinished_items_again_once(
    cluster: Any, tmp_path: Path
) -> None:
    config = ParallelConfig(strategy="celery")
    events, recorder = run(batch_graph(config, 6), tmp_path, 6, act={"2": "die_once"})
    state = final_state(events)
    assert state["ok"] == [True] * 6
    assert [runs(tmp_path, i) for i in range(6)] == [1, 1, 2, 1, 1, 1]
    assert len(recorder.results) == 6


def test_i16_every_batched_item_counts_in_its_circuit(cluster: Any, tmp_path: Path) -> None:
    breaker = CircuitBreakerConfig(failure_threshold=3, reset_timeout=60)
    config = ParallelConfig(strategy="celery", circuit_breaker=breaker)
    graph = batch_graph(config, 4, name=f"batch-circuit-{cluster.tag}")
    act = {str(i): "fail" for i in range(4)}
    events, _ = run(graph, tmp_path, 4, act=act)
    assert final_state(events)["ok"] == [False] * 4
    assert [runs(tmp_path, i) for i in range(4)] == [1] * 4  # admitted when sent
    # the session's Redis holds other tests' circuits too: this graph's is looked up by name
    state = graph.get_circuit_states()[f"batch-circuit-{cluster.tag}:work"]
    assert str(state.value if hasattr(state, "value") else state).lower() == "open"
    (tmp_path / "again").mkdir()
    again, _ = run(graph, tmp_path / "again", 4)
    assert [runs(tmp_path / "again", i) for i in range(4)] == [0] * 4
    results = final_state(again)["results"]
    assert [r["error_type"] for r in results] == ["CircuitOpenError"] * 4
    graph.reset_circuit()


def test_i16_limit_permits_are_taken_per_batched_item(cluster: Any, tmp_path: Path) -> None:
    limit = ResourceLimit(name=f"batch-one-{cluster.tag}", max_concurrent=1)
    config = ParallelConfig(strategy="celery", limits=[limit])
    events, _ = run(batch_graph(config, 4), tmp_path, 8, hold=0.2)
    assert final_state(events)["ok"] == [True] * 8
    spans = sorted((s[1], s[2]) for i in range(8) if (s := ran(tmp_path, i)))
    assert len(spans) == 8
    overlaps = [b for a, b in itertools.pairwise(spans) if b[0] < a[1] - 0.01]
    assert overlaps == [], f"two items held the one permit at once: {overlaps}"


def test_i16_a_refused_batch_tells_its_caller_of_every_item(
    cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tea_dist.distributed.cluster import Cluster
    from tea_dist.distributed.tasks import BATCH_TASK

    send = Cluster.send

    def as_pickle(self: Cluster, name: str, args: tuple[Any, ...], **options: Any) -> Any:
        if name != BATCH_TASK:
            return send(self, name, args, **options)
        return self.app.send_task(name, args, serializer="pickle", **options)

    # a forged or foreign sender's batches, in pickle: the worker cannot even decode them
    monkeypatch.setattr(Cluster, "send", as_pickle)
    started = time.monotonic()
    events, _ = run(batch_graph(ParallelConfig(strategy="celery"), 3), tmp_path, 6)
    results = final_state(events)["results"]
    assert [r["error_type"] for r in results] == ["ContentDisallowed"] * 6
    assert all("refused" in r["error"] for r in results)
    assert [runs(tmp_path, i) for i in range(6)] == [0] * 6
    assert time.monotonic() - started < 10  # told, not left waiting


# -- no server needed --


@pytest.mark.parametrize("bad", [0, -2, "all", 1.5, True])
def test_i16_batch_size_must_be_a_positive_int_or_auto(bad: Any) -> None:
    g = StateGraph({"docs": list})
    with pytest.raises(GraphError, match="batch_size"):
        g.add_parallel_map("a", "b", "c", "docs", batch_size=bad)


def test_i16_auto_batch_size_is_the_adaptive_default() -> None:
    for mapping in (MapItems("docs"), MapItems("docs", batch_size="auto")):
        assert [mapping.batch_for(n) for n in (0, 1, 1000, 100_000)] == [ADAPTIVE] * 4
    assert MapItems("docs", batch_size=7).batch_for(1000) == 7


def test_i16_yaml_batch_size_on_a_map_edge(tmp_path: Path) -> None:
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        textwrap.dedent(
            """\
            name: batched
            nodes:
              - {name: prepare}
              - {name: work, uses: "tests.celery_nodes:batch_item"}
              - {name: merge, fan_in: true, uses: "tests.celery_nodes:collect"}
            edges:
              - {from: __start__, to: prepare}
              - {from: prepare, to: work, parallel: true, fan_in: merge, map: docs,
                 batch_size: auto}
              - {from: work, to: merge}
              - {from: merge, to: __end__}
            """
        )
    )
    graph = load_yaml(str(agent))
    assert graph is not None
    bad = agent.read_text().replace(
        "{from: work, to: merge}", "{from: work, to: merge, batch_size: 3}"
    )
    agent.write_text(bad)
    with pytest.raises(Exception, match="batch_size"):
        load_yaml(str(agent))
