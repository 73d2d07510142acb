"""Flower tells the truth: a branch task's Celery state is its outcome, read from the real
Celery events a worker sends (what Flower reads): ``task-succeeded`` for a branch that
succeeded, ``task-failed`` (error type and message, never state) for an error or a timeout,
``task-revoked`` for a cancelled one, and the task's name says which graph and branch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tests import celery_nodes as cn
from tests.nodes import fan_graph, final_state
from tests.test_task_events import EventCapture, own_worker

SECRET = "state-value-that-must-not-show"


def _outcomes(events: list[dict[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Branch name (from the task's name) -> (last outcome event type, that event)."""
    names = {e["uuid"]: e["name"] for e in events if e["type"] == "task-received" and e.get("name")}
    outcome: dict[str, tuple[str, dict[str, Any]]] = {}
    for event in events:
        if event["type"] in ("task-succeeded", "task-failed", "task-revoked"):
            name = names.get(event["uuid"], "")
            branch = name.rpartition("/")[2].rstrip("]")
            outcome[branch] = (event["type"], event)
    return outcome


@pytest.mark.celery
def test_i3b_flower_sees_each_branch_task_end_in_its_outcome(cluster: Any, tmp_path: Path) -> None:
    from tests.cluster import current_app

    app = current_app()

    with (
        own_worker(cluster, "truth", task_events=True) as (queue, host),
        EventCapture(app, host) as capture,
    ):
        config = ParallelConfig(strategy="celery", queue=queue, timeout_seconds=1.0)
        graph = fan_graph(
            {"ok": cn.whoami, "boom": cn.fail, "slow": cn.sleep_then_mark},
            config=config,
            fan_in=cn.collect,
            name="truthgraph",
        )
        run_config = {"marker_dir": str(tmp_path), "sleep": {"slow": 5}}
        state = final_state(list(graph.compile().invoke({"value": 1, "note": SECRET}, run_config)))
        assert [r["success"] for r in state["results"]] == [True, False, False]
        cancelled = fan_graph(
            {"boom": cn.fail, "waits": cn.sleep_then_mark},
            config=ParallelConfig(strategy="celery", queue=queue, fail_fast=True),
            fan_in=cn.collect,
            name="cancelgraph",
        )
        events = list(
            cancelled.compile().invoke(
                {"value": 1}, {"marker_dir": str(tmp_path), "sleep": {"waits": 5}}
            )
        )
        assert events[-1]["type"] == "error"
    events = capture.task_events()
    received = {e["name"] for e in events if e["type"] == "task-received"}
    assert "tea_dist.run_flow[truthgraph/ok]" in received, received
    outcome = _outcomes(events)
    assert outcome["ok"][0] == "task-succeeded"
    kind, failed = outcome["boom"]
    assert kind == "task-failed" and "ValueError" in failed["exception"], failed
    kind, timed_out = outcome["slow"]
    assert kind == "task-failed" and "TimeoutError" in timed_out["exception"], timed_out
    assert outcome["waits"][0] == "task-revoked", outcome["waits"]
    for event in events:  # never the state
        assert SECRET not in json.dumps(event, default=str)


@pytest.mark.celery
def test_i3b_a_task_lost_with_its_worker_does_not_stay_started(
    cluster: Any, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-branch can tell Flower nothing, and its message waits out the
    visibility timeout; the driver, which sends the branch again, closes the lost task with a
    ``task-failed`` event."""
    import threading
    import time

    from tests.cluster import current_app

    app = current_app()

    queue = f"tea.flows.lost.{cluster.tag}"
    victim = cluster.start_worker("lost1", concurrency=1, flows_queue=queue, task_events=True)
    results: list[Any] = []
    graph = fan_graph(
        {"slow": cn.start_sleep_done},
        config=ParallelConfig(strategy="celery", queue=queue),
        fan_in=cn.collect,
        name="lostgraph",
    )
    config = {"marker_dir": str(tmp_path), "sleep": {"slow": 2.0}}
    with EventCapture(app, "lost") as capture:
        caller = threading.Thread(
            target=lambda: results.append(final_state(list(graph.compile().invoke({}, config))))
        )
        caller.start()
        deadline = time.monotonic() + 30
        while not (tmp_path / "slow.start").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cluster.kill(victim)  # the whole worker, SIGKILL
        (tmp_path / "slow.start").unlink()
        cluster.start_worker("lost2", concurrency=1, flows_queue=queue, task_events=True)
        caller.join(90)
    assert results and results[0]["results"][0]["success"]
    events = capture.task_events()
    started = [e["uuid"] for e in events if e["type"] == "task-started"]
    ended = {e["uuid"]: e for e in events if e["type"] in ("task-succeeded", "task-failed")}
    assert len(started) == 2 and set(started) <= set(ended), [e["type"] for e in events]
    lost = ended[started[0]]
    assert lost["type"] == "task-failed" and "WorkerLostError" in lost["exception"], lost
    assert lost["hostname"].startswith("tea-dist-driver@")
    assert ended[started[1]]["type"] == "task-succeeded"
