"""Module-level node functions for the benchmarks.

Importable by path (``bench.benchnodes:name``), so process children and Celery flow workers
run them exactly as the caller does (workers need the repository root on ``PYTHONPATH``).
Time markers are ``time.time()`` values written to files under ``config["marker_dir"]``:
one machine, one clock, every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any


def spin(iterations: int) -> int:
    """Pure-Python CPU work (holds the GIL the whole time)."""
    total = 0
    for i in range(iterations):
        total += i * i % 7
    return total


def calibrate(seconds: float) -> int:
    """Iterations of ``spin`` that take about ``seconds`` here (best of three probes)."""
    probe = 200_000
    best = min(_timed(probe) for _ in range(3))
    return max(1, int(probe * seconds / best))


def _timed(iterations: int) -> float:
    started = time.perf_counter()
    spin(iterations)
    return time.perf_counter() - started


# -- nodes --


def start(state: dict[str, Any]) -> dict[str, Any]:
    return {}


def noop(state: dict[str, Any]) -> dict[str, Any]:
    return {}


async def anoop(state: dict[str, Any]) -> dict[str, Any]:
    return {}


def cpu(state: dict[str, Any]) -> dict[str, Any]:
    spin(int(state["iterations"]))
    return {}


async def async_sleep(state: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(float(state.get("sleep", 0.1)))
    return {}


def count(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """The fan-in: how many branches succeeded."""
    return {"ok": sum(1 for r in parallel_results if r.success), "n": len(parallel_results)}


def write_mark(marker_dir: str, node: str, what: str) -> None:
    """Write ``time pid`` to ``node.what`` atomically (a reader never sees a partial file)."""
    path = Path(marker_dir, f"{node}.{what}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{time.time()!r} {os.getpid()}")
    tmp.replace(path)


def _mark(config: dict[str, Any], node: str, what: str) -> None:
    write_mark(config["marker_dir"], node, what)


def mark_sleep(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Records its start, then sleeps ``config['sleep'][node]`` s (a soft limit interrupts it)."""
    _mark(config, node, "start")
    time.sleep(float(config.get("sleep", {}).get(node, 0.0)))
    return {}


def stubborn(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Records its start, then ignores every exception (the soft limit, a cancel) until killed."""
    _mark(config, node, "start")
    end = time.time() + float(config.get("sleep", {}).get(node, 10.0))
    while time.time() < end:
        with contextlib.suppress(BaseException):  # deliberately swallows the soft limit
            time.sleep(0.02)
    _mark(config, node, "survived")
    return {}


def fail_after(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Records its start, sleeps ``config['sleep'][node]`` s, records the failure time, raises."""
    _mark(config, node, "start")
    time.sleep(float(config.get("sleep", {}).get(node, 0.2)))
    _mark(config, node, "fail")
    raise RuntimeError("planned failure")


def read_mark(marker_dir: str | Path, node: str, what: str = "start") -> tuple[float, int] | None:
    """(time, pid) written by ``_mark``, or None when the node never got there."""
    path = Path(marker_dir, f"{node}.{what}")
    if not path.exists():
        return None
    when, pid = path.read_text().split()
    return float(when), int(pid)


def hold_until(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Records its start, then holds its slot until ``config['release'][node]`` has started."""
    _mark(config, node, "start")
    other = config["release"][node]
    end = time.time() + float(config.get("sleep", {}).get(node, 8.0))
    while time.time() < end and read_mark(config["marker_dir"], other) is None:
        time.sleep(0.005)
    return {}


def flapping_service(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fails while ``config['down']`` is true: a dependency that goes down and comes back."""
    if config.get("down"):
        raise ConnectionError("service down")
    return {"served": True}


def results(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Fan-in keeping every branch result as a dict."""
    return {"results": [r.to_dict() for r in parallel_results]}
