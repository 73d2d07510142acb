"""Module-level node functions shared by the tests of every strategy.

They are importable by path (``tests.nodes:name``) so that process children and Celery
workers can run them exactly as the caller does.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from tea_dist import CancelToken, StateGraph
from tea_dist.config import ParallelConfig


def start(state: dict[str, Any]) -> dict[str, Any]:
    return {"started": True}


def add_one(state: dict[str, Any]) -> dict[str, Any]:
    return {"value": state.get("value", 0) + 1}


def double(state: dict[str, Any]) -> dict[str, Any]:
    return {"value": state.get("value", 0) * 2}


def tag_branch(state: dict[str, Any], node: str) -> dict[str, Any]:
    """Each branch writes its own key and bumps a shared one (isolation check)."""
    return {f"seen_{node}": True, "value": state.get("value", 0) + 10, "pid": os.getpid()}


def mutate_in_place(state: dict[str, Any]) -> dict[str, Any]:
    """Mutates a nested list in place: a copy-on-execute leak would show in siblings."""
    state.setdefault("items", []).append("mutated")
    return {"items": state["items"]}


def sleep_node(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    time.sleep(float(config.get("sleep", {}).get(node, state.get("sleep", 0.05))))
    return {f"done_{node}": True}


def cooperative_sleep(state: dict[str, Any], cancel_token: CancelToken) -> dict[str, Any]:
    """Sleeps up to 10 s but stops as soon as it is cancelled."""
    cancelled = cancel_token.wait(10)
    return {"cancelled": cancelled}


def stubborn_sleep(state: dict[str, Any]) -> dict[str, Any]:
    """Ignores cancellation entirely."""
    time.sleep(float(state.get("stubborn", 1.0)))
    return {"stubborn_done": True}


async def async_sleep(state: dict[str, Any], node: str) -> dict[str, Any]:
    await asyncio.sleep(float(state.get("sleep", 0.1)))
    return {f"done_{node}": True}


def fail(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("boom")


def fail_connection(state: dict[str, Any]) -> dict[str, Any]:
    raise ConnectionError("service down")


def flaky(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Fails ``config['fail_times']`` times (counted in a file, so across processes too)."""
    path = Path(config["counter_dir"]) / f"{node}.count"
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < int(config.get("fail_times", 2)):
        raise RuntimeError(f"attempt {count + 1} failed")
    return {"attempts": count + 1}


def collect(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Fan-in written for the old plain-dict results: uses only .get and ['key']."""
    return {
        "total": sum(r.get("value", 0) for r in parallel_results),
        "branches": [r["branch"] for r in parallel_results],
        "ok": [r["success"] for r in parallel_results],
        "results": [r.to_dict() for r in parallel_results],
    }


def fan_graph(
    branches: dict[str, Any],
    *,
    config: ParallelConfig | None = None,
    edge_configs: dict[str, ParallelConfig] | None = None,
    fan_in: Any = collect,
    name: str = "fan",
) -> StateGraph:
    """start -> (branches in parallel) -> merge -> END."""
    g = StateGraph({"value": int}, name=name, parallel_config=config)
    g.add_node("start", run=start)
    g.add_fanin_node("merge", run=fan_in)
    for branch, fn in branches.items():
        g.add_node(branch, run=fn)
        g.add_parallel_edge("start", branch, "merge", config=(edge_configs or {}).get(branch))
        g.add_edge(branch, "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    return g


def final_state(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["type"] == "final", events[-1]
    return events[-1]["state"]
