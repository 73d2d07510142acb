"""Lambdas and closures on the ``process`` strategy travel by value (cloudpickle), as with Ray,
Dask or loky; what still cannot cross is refused before anything runs, naming the culprit; the
``celery`` strategy keeps refusing them (its workers import code, never receive it)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest

from tea_dist import ParallelConfig, StateGraph
from tea_dist.core.errors import GraphError
from tests.nodes import final_state


def fan(config: ParallelConfig, **branches: Any) -> StateGraph:
    graph = StateGraph({})
    graph.add_node("start", run=lambda state: {"started": True})
    for name, run in branches.items():
        graph.add_node(name, run=run)
        graph.add_parallel_edge("start", name, "merge", config)
        graph.add_edge(name, "merge")
    graph.add_fanin_node(
        "merge", run=lambda parallel_results: {"got": [r.state for r in parallel_results]}
    )
    graph.set_entry_point("start")
    graph.set_finish_point("merge")
    return graph


def test_lambdas_and_closures_run_in_worker_processes() -> None:
    factor = 7

    def scaled(state: dict[str, Any]) -> dict[str, Any]:
        return {"v": state["value"] * factor, "pid": os.getpid()}

    graph = fan(
        ParallelConfig(strategy="process", timeout_seconds=30),
        a=scaled,
        b=lambda state: {"v": state["value"] + factor, "pid": os.getpid()},
    )
    got = final_state(list(graph.compile().invoke({"value": 3})))["got"]
    assert [g["v"] for g in got] == [21, 10]
    assert all(g["pid"] != os.getpid() for g in got)


def test_a_closure_over_a_lock_is_refused_at_compile_naming_the_node() -> None:
    lock = threading.Lock()

    def guarded(state: dict[str, Any]) -> dict[str, Any]:
        with lock:
            return {"v": 1}

    graph = fan(ParallelConfig(strategy="process"), a=guarded)
    with pytest.raises(GraphError) as info:
        graph.compile()
    message = str(info.value)
    assert "node 'a'" in message and "cannot be pickled" in message and "lock" in message


@pytest.mark.celery
def test_celery_still_refuses_closures_naming_the_node(cluster: object) -> None:
    offset = 1
    graph = fan(ParallelConfig(strategy="celery"), a=lambda state: {"v": offset})
    with pytest.raises(GraphError, match=r"node 'a'.*no lambdas or closures"):
        graph.compile()
