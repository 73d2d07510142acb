"""Graphs and nodes of the durable-run tests (``tests.durable_graphs:NAME``).

Every node counts its executions in Redis (``config["redis"]``, keys under
``config["counter"]``), so a test sees how often each ran, whichever process ran it. Branches
hold until the test sets ``{counter}:release`` (or ``config["hold"]`` seconds pass), so a test
can kill run workers while they run without racing a sleep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis

from tea_dist import ParallelConfig, StateGraph


def _count(config: dict[str, Any], node: str) -> redis.Redis:
    client = redis.Redis.from_url(config["redis"])
    key = f"{config['counter']}:{node}"
    client.incr(key)
    client.expire(key, 600)  # a test's own key: gone after the test, like tea_dist's
    return client


def prepare(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    _count(config, "prepare")
    return {"value": state.get("value", 0) + 1}


def held(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """A branch: counted, then held until released; leaves a marker file once it is done."""
    client = _count(config, node)
    deadline = time.monotonic() + float(config.get("hold", 120))
    while not client.exists(f"{config['counter']}:release") and time.monotonic() < deadline:
        time.sleep(0.05)
    if config.get("marker_dir"):
        Path(config["marker_dir"], f"{node}.done").write_text("done")
    return {f"{node}_value": state["value"] * 10}


def gather(state: dict[str, Any], config: dict[str, Any], parallel_results: Any) -> dict[str, Any]:
    _count(config, "gather")
    return {
        "branches": [r.branch for r in parallel_results],
        "ok": [r.success for r in parallel_results],
        "values": [(r.state or {}).get(f"{r.branch}_value") for r in parallel_results],
    }


def finish(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    _count(config, "finish")
    return {"finished": True}


def held_fanout() -> StateGraph:
    """prepare -> (a, b on celery, held) -> gather -> finish -> END."""
    g = StateGraph({}, name="durable", parallel_config=ParallelConfig(strategy="celery"))
    g.add_node("prepare", run=prepare)
    g.add_fanin_node("gather", run=gather)
    for branch in ("a", "b"):
        g.add_node(branch, run=held)
        g.add_parallel_edge("prepare", branch, "gather")
        g.add_edge(branch, "gather")
    g.add_node("finish", run=finish)
    g.add_edge("gather", "finish")
    g.set_entry_point("prepare")
    g.set_finish_point("finish")
    return g


def held_item(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A map item: counted as ``item-<index>``, then held like ``held``."""
    client = _count(config, f"item-{state['index']}")
    deadline = time.monotonic() + float(config.get("hold", 120))
    while not client.exists(f"{config['counter']}:release") and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"work_value": state["item"] * 10}


def held_batched_map() -> StateGraph:
    """prepare -> a map of held items over ``items``, 3 per celery task -> gather -> END."""
    g = StateGraph({}, name="durable-map", parallel_config=ParallelConfig(strategy="celery"))
    g.add_node("prepare", run=prepare)
    g.add_node("work", run=held_item)
    g.add_fanin_node("gather", run=gather)
    g.add_parallel_map("prepare", "work", "gather", "items", batch_size=3)
    g.add_edge("work", "gather")
    g.set_entry_point("prepare")
    g.set_finish_point("gather")
    return g
