"""Flower against the test Redis: it lists tea_dist tasks of a run, and /metrics answers.

Workers send no task events until Flower attaches and turns them on (issue 16 item 1).
"""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tea_dist.distributed.local_cluster import _stop, free_port
from tea_dist.distributed.worker import spawn_flower, worker_argv
from tests import celery_nodes as cn
from tests.nodes import fan_graph, final_state
from tests.test_task_events import EventCapture, own_worker

pytestmark = [pytest.mark.redis, pytest.mark.celery]
AUTH = "ops:s3cret"


def get(url: str, auth: str | None = AUTH) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except urllib.error.URLError:
        return 0, ""  # not listening yet


@contextmanager
def running_flower(cluster: Any, tmp_path: Path) -> Iterator[str]:
    """Flower for the test cluster, started as ``tea-dist cluster`` starts it; yields its URL."""
    port = free_port()
    proc = spawn_flower(cluster.settings(), port, auth=AUTH, log_path=tmp_path / "flower.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while get(f"{url}/healthcheck", None)[0] != 200:
            log = (tmp_path / "flower.log").read_text()
            assert proc.poll() is None and time.monotonic() < deadline, log
            time.sleep(0.2)
        time.sleep(1.0)  # let it subscribe to task events
        yield url
    finally:
        _stop(proc)


@pytest.fixture
def flower(cluster: Any, tmp_path: Path) -> Iterator[str]:
    with running_flower(cluster, tmp_path) as url:
        yield url


def flower_tasks(url: str, host: str) -> list[dict[str, Any]]:
    """The branch tasks Flower lists from the worker whose name starts ``host``: named
    ``tea_dist.run_flow[graph/branch]`` (Celery's shadow name)."""
    status, body = get(f"{url}/api/tasks")
    tasks = json.loads(body) if status == 200 else {}
    found = [t for t in tasks.values() if str(t.get("worker") or "").startswith(host)]
    assert all(str(t["name"]).startswith("tea_dist.run_flow[") for t in found), found
    return found


def has_branch(args: list[str], branch: str) -> bool:
    return any(f"branch={branch}" in a for a in args)


def test_flower_lists_tea_dist_tasks_of_a_run(cluster: Any, tmp_path: Path) -> None:
    """A worker started without task events shows its tasks in Flower once Flower attaches:
    Flower broadcasts ``enable_events`` (every 5 s) and the worker honours it."""
    from tests.cluster import current_app

    celery_app = current_app()

    settings = cluster.settings()
    assert not settings.task_events and "--task-events" not in worker_argv(settings, "flows")
    with own_worker(cluster, "flowerquiet") as (queue, host):
        app = fan_graph(
            {"alpha": cn.whoami, "beta": cn.whoami},
            config=ParallelConfig(strategy="celery", queue=queue),
            fan_in=cn.collect,
            name="flowergraph",
        ).compile()
        with EventCapture(celery_app, host) as before:  # nobody watches: no task events
            final_state(list(app.invoke({"value": 1})))
        assert before.task_events() == []

        with running_flower(cluster, tmp_path) as flower:
            assert get(f"{flower}/api/tasks", auth=None)[0] == 401  # the API is not open
            deadline = time.monotonic() + 30
            args: list[str] = []
            seen: list[dict[str, Any]] = []
            while not (has_branch(args, "alpha") and has_branch(args, "beta")):
                assert time.monotonic() < deadline, f"Flower saw {args}"
                final_state(list(app.invoke({"value": 1})))  # the first enable_events goes
                time.sleep(1.0)  # out 5 s after Flower starts; runs before it stay unseen
                seen = flower_tasks(flower, host)
                args = [t.get("args") or "" for t in seen]
    assert all("graph=flowergraph" in a and "run=" in a for a in args)
    names = {t["name"] for t in seen}  # the list says which graph and branch a task is
    assert {"tea_dist.run_flow[flowergraph/alpha]", "tea_dist.run_flow[flowergraph/beta]"} <= names


def test_flower_metrics_endpoint_answers(cluster: Any, flower: str) -> None:
    status, body = get(f"{flower}/metrics", auth=None)
    assert status == 200 and "flower_" in body
