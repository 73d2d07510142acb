"""Liveness of the celery driver: no branch is lost for good, no live caller taken for dead,
no deploy cancels work.

Real Redis, real prefork flow workers and thread-pool run workers (``tests.cluster``); workers
are killed with real signals.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, submit
from tests import celery_nodes as cn
from tests.nodes import fan_graph, final_state, map_graph
from tests.test_durable import Counts, resumed_events, run_worker, submitting_to, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.celery]


@contextlib.contextmanager
def caller_settings(**overrides: Any) -> Iterator[None]:
    """The caller's settings changed inside the block (the workers' stay as they are)."""
    from tests.cluster import configure, current_settings

    settings = current_settings()
    configure(settings.with_overrides(**overrides))
    try:
        yield
    finally:
        configure(settings)


def invoke_in_thread(app: Any, state: dict[str, Any], config: dict[str, Any]) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["events"] = list(app.invoke(state, config=config))
        except BaseException as exc:  # reported by the test, not lost in the thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_i3a_a_branch_lost_before_it_started_is_sent_again(cluster: Any, tmp_path: Path) -> None:
    """SIGKILL of a flow worker's main process right after a fan-out is sent (0.02-0.15 s
    after invoke starts), a second worker alive and the killed one restarted: every run
    finishes, every branch successful, within a bound (no run waits for the broker's
    visibility timeout of an hour)."""
    queue = f"tea.flows.i3a-lost.{cluster.tag}"
    config = ParallelConfig(strategy="celery", queue=queue)
    branches = {f"b{i}": cn.sleep_then_mark for i in range(12)}
    app = fan_graph(branches, config=config, fan_in=cn.collect).compile()
    rng = random.Random(3)
    survivor = cluster.start_worker("i3a-survivor", concurrency=1, flows_queue=queue)
    victim = cluster.start_worker("i3a-victim-0", concurrency=2, flows_queue=queue)
    killed: list[Any] = []
    try:
        for trial in range(12):
            markers = tmp_path / f"trial{trial}"
            markers.mkdir()
            run_config = {"marker_dir": str(markers), "sleep": dict.fromkeys(branches, 0.02)}
            began = time.monotonic()
            thread, box = invoke_in_thread(app, {"value": trial}, run_config)
            time.sleep(rng.uniform(0.02, 0.15))
            os.kill(victim.pid, signal.SIGKILL)  # the main process alone: its pool lives on
            killed.append(victim)
            victim = cluster.start_worker(
                f"i3a-victim-{trial + 1}", concurrency=2, flows_queue=queue
            )
            thread.join(max(1.0, began + 40 - time.monotonic()))
            assert not thread.is_alive(), f"trial {trial}: the run hung"
            assert "error" not in box, f"trial {trial}: {box.get('error')!r}"
            state = final_state(box["events"])
            assert state["ok"] == [True] * len(branches), f"trial {trial}: {state['results']}"
    finally:
        for proc in [*killed, victim, survivor]:
            cluster.kill(proc)  # the process group: a killed main process's pool children too
            with contextlib.suppress(ValueError):
                cluster.workers.remove(proc)


def test_i3a_a_live_caller_is_never_taken_for_dead(cluster: Any) -> None:
    """A map whose sending alone takes longer than the caller's lease (1 s here): workers
    never take the caller for dead, no item is cancelled."""
    queue = f"tea.flows.i3a-lease.{cluster.tag}"
    worker = cluster.start_worker("i3a-lease", concurrency=2, flows_queue=queue)
    items = 4000
    try:
        config = ParallelConfig(strategy="celery", queue=queue)
        app = map_graph(cn.double_item, cn.collect_items, config=config, name="i3a-map").compile()
        with caller_settings(caller_lease=1.0):
            events = list(app.invoke({"docs": list(range(items))}))
    finally:
        cluster.kill(worker)
        cluster.workers.remove(worker)
    final = events[-1]
    assert final["type"] == "final", final
    state = final["state"]
    assert len(state["ok"]) == items
    failed = [b for b, ok in zip(state["branches"], state["ok"], strict=True) if not ok]
    assert not failed, f"{len(failed)} of {items} items did not succeed, e.g. {failed[:3]}"
    assert state["doubled"] == [2 * i for i in range(items)]


def test_i3a_a_submitted_run_survives_its_run_worker_restarting(cluster: Any) -> None:
    """A deploy: SIGTERM of the only run worker while a submitted run's branches run, a new
    one started only after the caller lease (2 s here) would have lapsed. The run resumes and
    every branch succeeds, each run once: its branches waited for the run, not its process."""
    queue = f"tea.runs.i3a-deploy.{cluster.tag}"
    counts = Counts(cluster)
    old = run_worker(cluster, f"i3a-runs-{uuid.uuid4().hex[:4]}", queue, caller_lease="2")
    try:
        with submitting_to(queue):
            run = submit("tests.durable_graphs:held_fanout", {"value": 1}, counts.config)
        wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
        cluster.kill(old, signal.SIGTERM)
        time.sleep(4)  # twice the caller lease: the branches would be orphans by now
        assert run.status() == "running"
        new = run_worker(cluster, f"i3a-runs-{uuid.uuid4().hex[:4]}", queue, caller_lease="2")
        wait_for(lambda: resumed_events(run), 30, "the new run worker to take over")
        counts.release()
        state = run.result(timeout=60)
    finally:
        counts.release()
    assert state["branches"] == ["a", "b"]
    assert state["ok"] == [True, True], state
    assert state["values"] == [20, 20] and state["finished"] is True
    assert (counts["a"], counts["b"], counts["gather"]) == (1, 1, 1)
    cluster.kill(new, signal.SIGTERM)
