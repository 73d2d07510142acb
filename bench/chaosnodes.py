"""The graph of the chaos script (``chaos.py``); its flow workers import the nodes
(``--allow bench``) and ``chaoscaller.py`` invokes it.

Every branch leaves a ``.start`` marker, sleeps, then leaves a ``.done`` marker (the side
effect that must not happen once its caller went away). A marker holds the
``time.time()`` it was written at; its name carries the branch, the process and a nanosecond
stamp, so a branch that ran twice leaves two of each.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def start(state: dict[str, Any]) -> dict[str, Any]:
    return {"value": state.get("value", 0)}


def start_sleep_done(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Marks its start, sleeps ``config['sleep'][node]`` seconds, marks it is done."""
    stem = f"{node}-{os.getpid()}-{time.time_ns()}"
    _mark(config, f"{stem}.start")
    time.sleep(float(config["sleep"][node]))
    _mark(config, f"{stem}.done")
    return {f"done_{node}": True}


def _mark(config: dict[str, Any], name: str) -> None:
    path = Path(config["marker_dir"], name)
    path.write_text(repr(time.time()))


def collect(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    return {"ok": {r.branch: r.success for r in parallel_results}}


def graph(branches: int) -> Any:
    """start -> b0..b{n-1} (celery) -> merge -> END."""
    from tea_dist import ParallelConfig, StateGraph

    g = StateGraph({}, name="chaos", parallel_config=ParallelConfig(strategy="celery"))
    g.add_node("start", run=start)
    g.add_fanin_node("merge", run=collect)
    for i in range(branches):
        g.add_node(f"b{i}", run=start_sleep_done)
        g.add_parallel_edge("start", f"b{i}", "merge")
        g.add_edge(f"b{i}", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    return g
