"""Issue 16 item 1: Celery task events are paid for only while someone watches.

Workers and callers send no task events by default; ``TEA_DIST_TASK_EVENTS=1`` keeps them on;
Flower switches them on in running workers when it attaches (``tests/test_flower.py``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tea_dist.distributed.celery_app import celery_config
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.worker import settings_env, worker_argv
from tests import celery_nodes as cn
from tests.nodes import fan_graph, final_state

BRANCHES = ("a", "b", "c")


# -- configuration (no server) --


def test_task_events_are_off_by_default_for_workers_and_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TEA_DIST_TASK_EVENTS", raising=False)
    settings = Settings()
    config = celery_config(settings)
    assert config["worker_send_task_events"] is False
    assert config["task_send_sent_event"] is False
    assert not config.get("task_track_started")  # tea_dist's own started events suffice
    for role in ("flows", "runs"):
        assert "--task-events" not in worker_argv(settings, role)


def test_tea_dist_task_events_env_turns_them_on_for_workers_and_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEA_DIST_TASK_EVENTS", "1")
    settings = Settings()
    assert settings.task_events is True
    config = celery_config(settings)
    assert config["worker_send_task_events"] is True
    assert config["task_send_sent_event"] is True
    for role in ("flows", "runs"):
        assert "--task-events" in worker_argv(settings, role)
    # a worker spawned with these settings reads the same value back from its environment
    monkeypatch.setenv("TEA_DIST_TASK_EVENTS", settings_env(settings)["TEA_DIST_TASK_EVENTS"])
    assert Settings().task_events is True


def test_task_events_setting_rejects_a_non_boolean(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("TEA_DIST_TASK_EVENTS", "sometimes")
    with pytest.raises(ValidationError, match="task_events"):
        Settings()


# -- real workers: what goes over the broker --


class EventCapture:
    """Celery events seen on the broker from one worker and from this process, while open.

    Entering waits until the worker's own heartbeat arrives (worker events are always on), so
    the receiver is known to be listening and to see that worker before anything is sent.
    """

    def __init__(self, app: Any, worker_prefix: str) -> None:
        self.app = app
        self.worker_prefix = worker_prefix
        self.events: list[dict[str, Any]] = []
        self.listening = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._capture, daemon=True)

    def _on_event(self, event: dict[str, Any]) -> None:
        from_worker = str(event.get("hostname", "")).startswith(self.worker_prefix)
        if from_worker or event.get("pid") == os.getpid():
            self.events.append(event)
        if from_worker and event["type"] == "worker-heartbeat":
            self.listening.set()

    def _capture(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self._on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=True)

    def __enter__(self) -> EventCapture:
        self.thread.start()
        assert self.listening.wait(20), "the worker's heartbeat never arrived"
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(1.5)  # the last branch's events, if any are sent, arrive well within this
        self.receiver.should_stop = True
        self.thread.join(10)

    def task_events(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"].startswith("task-")]


@contextmanager
def own_worker(cluster: Any, name: str, **overrides: Any) -> Iterator[tuple[str, str]]:
    """A flow worker of its own on its own queue: (queue, hostname prefix)."""
    queue = f"tea.flows.{name}.{cluster.tag}"
    proc = cluster.start_worker(name, concurrency=2, flows_queue=queue, **overrides)
    try:
        yield queue, f"{name}-{cluster.tag}@"
    finally:
        cluster.kill(proc)


def run_branches(queue: str) -> None:
    app = fan_graph(
        {branch: cn.whoami for branch in BRANCHES},
        config=ParallelConfig(strategy="celery", queue=queue),
        fan_in=cn.collect,
        name="eventsgraph",
    ).compile()
    final_state(list(app.invoke({"value": 1})))


@pytest.mark.redis
@pytest.mark.celery
def test_default_worker_and_caller_send_no_task_events_without_flower(cluster: Any) -> None:
    from tests.cluster import current_app

    app = current_app()

    with own_worker(cluster, "quiet") as (queue, host), EventCapture(app, host) as capture:
        run_branches(queue)
    assert capture.task_events() == [], [e["type"] for e in capture.task_events()]


@pytest.mark.redis
@pytest.mark.celery
def test_tea_dist_task_events_1_sends_task_events_from_worker_and_caller(cluster: Any) -> None:
    from tests.cluster import configure, current_app, current_settings

    app = current_app()

    previous = current_settings()
    with own_worker(cluster, "loud", task_events=True) as (queue, host):
        configure(previous.with_overrides(task_events=True))
        try:
            with EventCapture(app, host) as capture:
                run_branches(queue)
        finally:
            configure(previous)
    events = capture.task_events()

    def branch_task(event: dict[str, Any]) -> bool:  # named run_flow[graph/branch] (shadow)
        return str(event.get("name", "")).startswith("tea_dist.run_flow[eventsgraph/")

    sent = [e for e in events if e["type"] == "task-sent" and e["name"] == "tea_dist.run_flow"]
    assert len(sent) == len(BRANCHES) and all(e["pid"] == os.getpid() for e in sent)
    received = [e for e in events if e["type"] == "task-received"]
    ids = {e["uuid"] for e in received if branch_task(e)}
    assert ids == {e["uuid"] for e in sent}
    for kind in ("task-started", "task-succeeded"):
        assert ids <= {e["uuid"] for e in events if e["type"] == kind}, kind
