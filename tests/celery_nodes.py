"""Module-level nodes for the distributed tests (imported by the worker processes too)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any


def whoami(state: dict[str, Any], node: str) -> dict[str, Any]:
    return {f"pid_{node}": os.getpid(), "value": state.get("value", 0) + 1}


def sleep_then_mark(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Sleeps ``config['sleep'][node]`` seconds, then leaves a marker file (a side effect)."""
    time.sleep(float(config.get("sleep", {}).get(node, 1.0)))
    Path(config["marker_dir"], f"{node}.done").write_text(str(os.getpid()))
    return {f"done_{node}": True}


def mark_start_then_sleep(
    state: dict[str, Any], config: dict[str, Any], node: str
) -> dict[str, Any]:
    """Records when it started (to measure slot reuse), then sleeps briefly."""
    Path(config["marker_dir"], f"{node}.start").write_text(repr(time.time()))
    time.sleep(float(config.get("sleep", {}).get(node, 0.1)))
    return {f"done_{node}": True}


def ignore_soft_limit(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Swallows every exception, the soft time limit included: only a kill stops it."""
    Path(config["marker_dir"], f"{node}.start").write_text(repr(time.time()))
    end = time.time() + float(config.get("sleep", {}).get(node, 30))
    while time.time() < end:
        with contextlib.suppress(BaseException):  # deliberately ignores the soft limit
            time.sleep(0.05)
    Path(config["marker_dir"], f"{node}.done").write_text("survived")
    return {}


def flaky_file(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Fails ``config['fail_times']`` times, counting attempts in a file."""
    path = Path(config["marker_dir"], f"{node}.count")
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < int(config.get("fail_times", 1)):
        raise ConnectionError(f"attempt {count + 1} failed")
    return {"attempts": count + 1}


def fail(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("remote boom")


def collect(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    return {
        "branches": [r.branch for r in parallel_results],
        "ok": [r.success for r in parallel_results],
        "results": [r.to_dict() for r in parallel_results],
        "total": sum(r.get("value", 0) for r in parallel_results),
    }


def mark_and_fail(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Counts its runs in a file, then fails."""
    path = Path(config["marker_dir"], f"{node}.count")
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))
    raise RuntimeError("always fails")


def start_sleep_done(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Marks its start, sleeps ``config['sleep'][node]`` seconds, then marks it is done (the
    side effect that must not happen once its run was cancelled)."""
    Path(config["marker_dir"], f"{node}.start").write_text(str(os.getpid()))
    time.sleep(float(config.get("sleep", {}).get(node, 4.0)))
    Path(config["marker_dir"], f"{node}.done").write_text(str(os.getpid()))
    return {f"done_{node}": True}


def record_interval(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Sleeps ``config['hold']`` seconds and records when it ran (a file per run of it), so a
    test can compute how many ran at once and how many started in any window."""
    started = time.time()
    time.sleep(float(config.get("hold", 0.3)))
    name = f"{state.get('index', node)}-{os.getpid()}-{started!r}.interval"
    Path(config["marker_dir"], name).write_text(f"{started!r} {time.time()!r}")
    return {"seen": state.get("item")}


def double_item(state: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": state["item"] * 2, "at": state["index"]}


def collect_items(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    return {
        "branches": [r.branch for r in parallel_results],
        "doubled": [r.get("doubled") for r in parallel_results],
        "ok": [r.success for r in parallel_results],
    }


def items_of(state: dict[str, Any]) -> list[int]:
    return list(range(int(state["count"])))


def die_once(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Its first run kills its own process (a crashed worker child); later runs succeed."""
    marker = Path(config["marker_dir"], f"{node}.died")
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        time.sleep(float(config.get("before_death", 0.2)))
        os.kill(os.getpid(), 9)
    return {"survived": True}


def echo_secret(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """Fails while ``config['fail_times']`` says so (counted in a file), then succeeds."""
    path = Path(config["marker_dir"], "echo.count")
    count = int(path.read_text()) if path.exists() else 0
    path.write_text(str(count + 1))
    if count < int(config.get("fail_times", 0)):
        raise ConnectionError("the service refused")
    if config.get("always_fail"):
        raise ValueError("it failed")
    return {"echo": len(state.get("secret_token", ""))}


def batch_item(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A map item that counts its runs (``<index>.runs``) and, once done, records its process
    and times (``<index>.ran``). ``config['act'][index]`` adds what it does first:
    ``fail_once``, ``fail``, ``sleep:<s>``, ``stubborn:<s>`` (ignores the soft limit),
    ``die_once`` (kills its own process on its first run)."""
    index, folder = state["index"], Path(config["marker_dir"])
    started = time.time()
    counter = folder / f"{index}.runs"
    runs = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(runs))
    act = str(config.get("act", {}).get(str(index), ""))
    kind, _, seconds = act.partition(":")
    if kind == "fail" or (kind == "fail_once" and runs == 1):
        raise ConnectionError(f"item {index} failed on run {runs}")
    if kind == "die_once" and runs == 1:
        os.kill(os.getpid(), 9)
    if kind == "sleep":
        time.sleep(float(seconds))
    if kind == "stubborn":
        end = started + float(seconds)
        while time.time() < end:
            with contextlib.suppress(BaseException):  # deliberately ignores the soft limit
                time.sleep(0.05)
    time.sleep(float(config.get("hold", 0.0)))
    (folder / f"{index}.ran").write_text(f"{os.getpid()} {started!r} {time.time()!r}")
    return {"doubled": state["item"] * 2}


def where(state: dict[str, Any], node: str) -> dict[str, Any]:
    """The command line of the worker that ran it (its ``-A`` app and ``-n`` name)."""
    return {f"argv_{node}": " ".join(sys.argv), "value": state.get("value", 0) + 1}
