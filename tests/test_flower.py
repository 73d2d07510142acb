"""Flower against the test Redis: it lists tea_dist tasks of a run, and /metrics answers."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tea_dist.distributed.local_cluster import _stop, free_port
from tea_dist.distributed.worker import spawn_flower
from tests import celery_nodes as cn
from tests.nodes import fan_graph, final_state

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


@pytest.fixture
def flower(cluster: Any, tmp_path: Path) -> Any:
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


def test_flower_lists_tea_dist_tasks_of_a_run(cluster: Any, flower: str) -> None:
    app = fan_graph(
        {"alpha": cn.whoami, "beta": cn.whoami},
        config=ParallelConfig(strategy="celery"),
        fan_in=cn.collect,
        name="flowergraph",
    ).compile()
    final_state(list(app.invoke({"value": 1})))
    assert get(f"{flower}/api/tasks", auth=None)[0] == 401  # the API is not open
    deadline = time.monotonic() + 15
    while True:
        status, body = get(f"{flower}/api/tasks?taskname=tea_dist.run_flow")
        tasks = json.loads(body) if status == 200 else {}
        args = [t.get("args", "") for t in tasks.values()]
        if any("branch=alpha" in a for a in args) and any("branch=beta" in a for a in args):
            break
        assert time.monotonic() < deadline, f"Flower saw {args}"
        time.sleep(0.3)
    assert all("graph=flowergraph" in a and "run=" in a for a in args if "flowergraph" in a)
    assert all(t["name"] == "tea_dist.run_flow" for t in tasks.values())


def test_flower_metrics_endpoint_answers(cluster: Any, flower: str) -> None:
    status, body = get(f"{flower}/metrics", auth=None)
    assert status == 200 and "flower_" in body
