"""Module-level node functions shared by the tests of every strategy.

They are importable by path (``tests.nodes:name``) so that process children and Celery
workers can run them exactly as the caller does.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Literal

from tea_dist import CancelToken, StateGraph
from tea_dist.core.config import ParallelConfig


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


async def async_sleep_then_mark(
    state: dict[str, Any], config: dict[str, Any], node: str
) -> dict[str, Any]:
    """Sleeps ``config['sleep']`` seconds on the loop, then leaves a marker (a side effect)."""
    await asyncio.sleep(float(config.get("sleep", 1.0)))
    (Path(config["marker_dir"]) / f"{node}.done").write_text("done")
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


def map_graph(
    work: Any,
    fan_in: Any,
    *,
    config: ParallelConfig | None = None,
    items: Any = "docs",
    batch_size: int | Literal["auto"] = 1,
    name: str = "mapped",
) -> StateGraph:
    """prepare -> one ``work`` branch per item of ``items`` -> merge -> END."""
    g = StateGraph({"docs": list}, name=name, parallel_config=config)
    g.add_node("prepare", run=None)
    g.add_node("work", run=work)
    g.add_fanin_node("merge", run=fan_in)
    g.add_parallel_map("prepare", "work", "merge", items, batch_size=batch_size)
    g.add_edge("work", "merge")
    g.set_entry_point("prepare")
    g.set_finish_point("merge")
    return g


def peak_overlap(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end at t comes before a start at t)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    inside = peak = 0
    for _, step in events:
        inside += step
        peak = max(peak, inside)
    return peak


def final_state(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert events[-1]["type"] == "final", events[-1]
    return events[-1]["state"]


# -- reliability suite (timeouts, retries, circuits, callbacks, stress) --
#
# Counters and markers live in files under ``config["counter_dir"]`` / ``config["marker_dir"]``
# so that they count across processes too. Every node keeps its own file (named after the node).


def _bump(config: dict[str, Any], node: str) -> int:
    """Count one call of ``node``; returns the 1-based call number."""
    path = Path(config["counter_dir"]) / f"{node}.count"
    count = (int(path.read_text()) if path.exists() else 0) + 1
    path.write_text(str(count))
    return count


def calls(directory: Any, node: str) -> int:
    """How many times ``node`` ran (see ``_bump``)."""
    path = Path(directory) / f"{node}.count"
    return int(path.read_text()) if path.exists() else 0


def _seconds(value: Any, node: str) -> float:
    return float(value.get(node, 0.0) if isinstance(value, dict) else value)


def slow_marker(
    state: dict[str, Any], config: dict[str, Any], node: str, cancel_token: CancelToken
) -> dict[str, Any]:
    """Waits ``config['slow']`` seconds (cooperatively), then leaves a marker file.

    A marker proves the work ran to its end: it must be absent for a cancelled branch.
    """
    if cancel_token.wait(_seconds(config.get("slow", 1.0), node)):
        return {"cancelled": True}
    (Path(config["marker_dir"]) / f"{node}.done").write_text("done")
    return {f"done_{node}": True}


def stubborn_marker(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Sleeps ``config['slow']`` seconds ignoring cancellation, then leaves a marker file."""
    time.sleep(_seconds(config.get("slow", 1.0), node))
    (Path(config["marker_dir"]) / f"{node}.done").write_text("done")
    return {f"done_{node}": True}


def fail_counted(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Counts its call, then raises ``ValueError('boom')``."""
    _bump(config, node)
    raise ValueError("boom")


def service(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Counts its call; raises ``ConnectionError`` while ``node`` is in ``config['down']``."""
    _bump(config, node)
    if node in config.get("down", ()):
        raise ConnectionError(f"{node} is down")
    return {"value": state.get("value", 0) + 1, f"served_{node}": True}


def slow_then_fast(
    state: dict[str, Any], config: dict[str, Any], node: str, cancel_token: CancelToken
) -> dict[str, Any]:
    """Its first ``config['slow_times']`` calls (a number, or one per node) hang
    (cooperatively, up to 10 s); later ones take ``config['fast']`` seconds."""
    count = _bump(config, node)
    if count <= _seconds(config.get("slow_times", 1), node):
        cancel_token.wait(10)
        return {"late": True}
    time.sleep(float(config.get("fast", 0.0)))
    return {"attempts": count}


def raise_named(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Counts its call; raises the builtin exception named by ``config['raise'][node]``."""
    _bump(config, node)
    import builtins

    raise getattr(builtins, config["raise"][node])(f"{node} failed")


def read_items_later(state: dict[str, Any]) -> dict[str, Any]:
    """Waits a little (a sibling mutates its copy meanwhile), then reports what it sees."""
    time.sleep(0.15)
    return {"reader_saw": list(state.get("items", []))}


def mutate_nested(state: dict[str, Any]) -> None:
    """Mutates nested containers of its state in place, then returns nothing."""
    state["items"].append("mutated")
    state["nested"]["inner"].append("mutated")


def echo(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Sleeps ``config['sleeps'][node]`` seconds, then returns its identity and input."""
    time.sleep(float(config.get("sleeps", {}).get(node, 0.0)))
    return {"who": node, "value": state.get("value", 0) * 1000 + int(node.rsplit("_", 1)[-1])}


def chaos(
    state: dict[str, Any], config: dict[str, Any], node: str, cancel_token: CancelToken
) -> dict[str, Any]:
    """Does what ``config['chaos'][node]`` says: ``ok``, ``fail`` or ``hang`` (cooperatively)."""
    what = config["chaos"][node]
    if what == "fail":
        raise ValueError(f"chaos failure in {node}")
    if what == "hang":
        cancel_token.wait(10)
        return {"late": True}
    return {"who": node, "value": state.get("value", 0) + 1}


# -- process and asyncio strategies --

ASYNC_RECORD: list[str] = []  # what async nodes saw (same process: the asyncio strategy)
CONCURRENCY = {"now": 0, "max": 0}  # async nodes running at once, and the peak


def crash(state: dict[str, Any]) -> dict[str, Any]:
    """Ends its process at once, as a segfault or the OOM killer would."""
    os._exit(3)


def where(state: dict[str, Any]) -> dict[str, Any]:
    """Reports the process and thread it runs in."""
    import threading

    return {"pid": os.getpid(), "thread": threading.current_thread().name}


def stubborn_with_pid(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Writes its pid to ``marker_dir/<node>.pid``, then behaves as ``stubborn_marker``."""
    (Path(config["marker_dir"]) / f"{node}.pid").write_text(str(os.getpid()))
    return stubborn_marker(state, config, node)


def nested_structures(state: dict[str, Any]) -> dict[str, Any]:
    """Transforms nested containers (dicts, lists, tuples, sets) of its input."""
    data = state["data"]
    return {
        "data": {**data, "list": [*data["list"], {"added": (4, 5)}]},
        "keys": sorted(data),
        "pair": tuple(reversed(data["pair"])),
        "tags": data["tags"] | {"new"},
    }


async def async_add_one(state: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {"value": state.get("value", 0) + 1}


async def async_cancellable(state: dict[str, Any], node: str) -> dict[str, Any]:
    """Sleeps ``state['sleep']`` seconds; records in ``ASYNC_RECORD`` how it ended."""
    try:
        await asyncio.sleep(float(state.get("sleep", 5.0)))
    except asyncio.CancelledError:
        ASYNC_RECORD.append(f"cancelled:{node}")
        raise
    finally:
        ASYNC_RECORD.append(f"finally:{node}")
    return {f"done_{node}": True}


async def async_count_concurrency(state: dict[str, Any]) -> dict[str, Any]:
    """Counts the async nodes running at once in ``CONCURRENCY`` (one loop: no lock needed)."""
    CONCURRENCY["now"] += 1
    CONCURRENCY["max"] = max(CONCURRENCY["max"], CONCURRENCY["now"])
    try:
        await asyncio.sleep(float(state.get("hold", 0.005)))
    finally:
        CONCURRENCY["now"] -= 1
    return {"counted": True}


def breaker_store_for(strategy: str) -> Any:
    """A circuit store a strategy can use: celery circuits live in Redis, shared with workers."""
    from tea_dist.policies.breaker import MemoryBreakerStore

    if strategy != "celery":
        return MemoryBreakerStore()
    from tea_dist.distributed.breaker_redis import RedisBreakerStore
    from tea_dist.distributed.keys import Keys
    from tests.cluster import current_settings

    settings = current_settings()
    return RedisBreakerStore(settings.redis, Keys(settings.key_prefix))
