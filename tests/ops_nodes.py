"""Module-level nodes and graphs of the operations tests (imported by worker processes too)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tea_dist import CancelToken, ParallelConfig, StateGraph
from tests import celery_nodes as cn
from tests.nodes import fan_graph

SLOW_AGENT = """
name: slow
nodes:
  - {name: begin, run: "return {}"}
  - {name: a, uses: "tests.ops_nodes:mark_then_sleep"}
  - {name: b, uses: "tests.ops_nodes:mark_then_sleep"}
  - {name: merge, fan_in: true, run: "return {'workers': [r.worker for r in parallel_results]}"}
edges:
  - {from: __start__, to: begin}
  - {from: begin, to: [a, b], parallel: true, fan_in: merge}
  - {from: a, to: merge}
  - {from: b, to: merge}
  - {from: merge, to: __end__}
"""


def mark_then_sleep(state: dict[str, Any], node: str) -> dict[str, Any]:
    """Leaves ``<marker_dir>/<node>.started``, then sleeps ``state['sleep']`` seconds (30)."""
    Path(state["marker_dir"], f"{node}.started").write_text(repr(time.time()))
    time.sleep(float(state.get("sleep", 30)))
    return {f"done_{node}": True}


def slow_fanout() -> StateGraph:
    """Two celery branches running ``mark_then_sleep``."""
    return fan_graph(
        {"a": mark_then_sleep, "b": mark_then_sleep},
        config=ParallelConfig(strategy="celery"),
        fan_in=cn.collect,
        name="slow",
    )


def wait_for_cancel(
    state: dict[str, Any], config: dict[str, Any], cancel_token: CancelToken
) -> dict[str, Any]:
    """The last node: its work done (a marker file), it waits until its run is cancelled."""
    Path(config["marker_dir"], "work.done").write_text("done")
    return {"saw_cancel": cancel_token.wait(20)}


def cancelled_at_the_end() -> StateGraph:
    """One main-path node, ``wait_for_cancel``: a cancel lands after the run's work is done."""
    graph = StateGraph({})
    graph.add_node("work", run=wait_for_cancel)
    graph.set_entry_point("work")
    graph.set_finish_point("work")
    return graph


def count(state: dict[str, Any], node: str) -> dict[str, Any]:
    """Counts every node step in ``state['steps']``."""
    return {"steps": state.get("steps", 0) + 1, "last": node}


def never_done(state: dict[str, Any]) -> str:
    """A condition that always loops."""
    return "again"


def summarise(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Each branch's outcome: ``ok`` or ``ErrorType: message``."""
    return {
        "outcome": {
            r.branch: "ok" if r.success else f"{r.error_type}: {r.error}" for r in parallel_results
        }
    }
