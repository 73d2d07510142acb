"""Explicit clusters: two in one process side by side, a user's own Celery app serving its own
tasks and tea_dist's branches on one worker, and no environment variable written on the way.

Real worker processes, real Redis (and RabbitMQ where one answers); nothing is mocked.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tea_dist import Cluster, ParallelConfig, StateGraph, WorkflowRun, submit
from tea_dist.core.errors import ConfigError
from tea_dist.distributed.children import die_with_parent, stop_group
from tests import celery_nodes as cn
from tests.cluster import ROOT, TestCluster
from tests.nodes import fan_graph, final_state

CELERY = ParallelConfig(strategy="celery")


def where_graph(name: str = "where") -> StateGraph:
    return fan_graph({"a": cn.where, "b": cn.where}, config=CELERY, fan_in=cn.collect, name=name)


@pytest.fixture
def two(redis_url: str) -> Iterator[tuple[TestCluster, TestCluster]]:
    first, second = TestCluster(redis_url), TestCluster(redis_url)
    try:
        for test_cluster in (first, second):
            test_cluster.start_worker("flows", concurrency=1)
        yield first, second
    finally:
        for test_cluster in (first, second):
            test_cluster.stop_all()


def test_i3c_two_clusters_in_one_process_each_branch_on_its_own_clusters_worker(
    two: tuple[TestCluster, TestCluster],
) -> None:
    clusters = [Cluster(settings=t.settings()) for t in two]
    assert clusters[0].app is not clusters[1].app
    graphs = [where_graph().compile(cluster=c) for c in clusters]
    for test_cluster, graph in zip(two, graphs, strict=True):
        state = final_state(list(graph.invoke({"value": 0})))
        assert state["ok"] == [True, True]
        for branch, result in zip(("a", "b"), state["results"], strict=True):
            assert f"flows-{test_cluster.tag}@" in result["state"][f"argv_{branch}"]


def test_i3c_os_environ_unchanged_after_building_invoking_submitting_and_waiting(
    cluster: TestCluster,
) -> None:
    before = dict(os.environ)
    own = Cluster(settings=cluster.settings())
    graph = where_graph("environ").compile(cluster=own)
    assert final_state(list(graph.invoke({"value": 0})))["ok"] == [True, True]
    run = submit("tests.apps_graphs:quick", {"value": 2}, cluster=own)
    assert WorkflowRun(run.run_id, cluster=own).result(timeout=60)["total"] == 6
    assert dict(os.environ) == before


def test_i3c_cluster_settings_are_keywords_and_a_typo_is_named() -> None:
    cluster = Cluster(
        broker="amqp://guest:guest@127.0.0.1:5672//",
        redis="redis://127.0.0.1:6379/13",
        key_prefix="mine",
        flows_queue="my.flows",
    )
    assert cluster.settings.redis == "redis://127.0.0.1:6379/13"
    assert cluster.settings.key_prefix == "mine"
    assert cluster.app.conf.broker_url.startswith("amqp://")
    with pytest.raises(ConfigError, match="'flow_queue'"):
        Cluster(broker="redis://127.0.0.1:6379/13", flow_queue="x")


def test_i3c_a_cluster_made_in_code_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEA_DIST_KEY_PREFIX", "from-env")
    assert Cluster(broker="redis://127.0.0.1:6379/13").settings.key_prefix == "tea"
    assert Cluster.from_env(broker="redis://127.0.0.1:6379/13").settings.key_prefix == "from-env"


def test_i3c_a_rabbitmq_cluster_without_redis_fails_before_sending() -> None:
    cluster = Cluster(broker="amqp://guest:guest@127.0.0.1:5672//")
    graph = where_graph("no-redis").compile(cluster=cluster)
    with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
        list(graph.invoke({"value": 0}, raise_exceptions=True))


# -- a user's own Celery app -------------------------------------------------------------------

USER_APP = """
from celery import Celery

from tea_dist import Cluster

app = Celery("userapp", broker={broker!r}, backend={backend!r})
app.conf.task_default_queue = {own_queue!r}
cluster = Cluster(
    app=app,
    redis={redis!r},
    key_prefix={prefix!r},
    flows_queue={flows_queue!r},
    allowed=("tests",),
)


@app.task
def add(x, y):
    return x + y
"""


@pytest.fixture(params=["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def user_app(request: pytest.FixtureRequest, redis_url: str, tmp_path: Path) -> Iterator[Any]:
    tag = uuid.uuid4().hex[:8]
    broker = redis_url if request.param == "redis" else request.getfixturevalue("rabbitmq_url")
    module = f"userapp_{tag}"
    (tmp_path / f"{module}.py").write_text(
        USER_APP.format(
            broker=broker,
            backend=redis_url,
            redis=redis_url,
            prefix=f"tea-user:{tag}",
            own_queue=f"user.{tag}",
            flows_queue=f"user.flows.{tag}",
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    for name in [n for n in env if n.startswith("TEA_DIST_")]:
        del env[name]  # the app's module says everything
    log = tmp_path / "worker.log"
    queues = f"user.{tag},user.flows.{tag}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            module,
            "worker",
            "-Q",
            queues,
            "-c",
            "2",
            "-n",
            f"user-{tag}@%h",
            "--prefetch-multiplier",
            "1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    sys.path.insert(0, str(tmp_path))
    try:
        user = importlib.import_module(module)
        deadline = time.monotonic() + 60
        while not user.app.control.ping(timeout=0.5, destination=None):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the user's worker did not answer"
        yield user
    finally:
        sys.path.remove(str(tmp_path))
        stop_group(proc)
        with contextlib.suppress(Exception):
            user.app.close()


def test_i3c_a_users_celery_app_runs_its_own_task_and_tea_dist_branches_on_one_worker(
    user_app: Any,
) -> None:
    assert user_app.add.delay(2, 3).get(timeout=30) == 5
    graph = where_graph("user").compile(cluster=user_app.cluster)
    state = final_state(list(graph.invoke({"value": 0})))
    assert state["ok"] == [True, True]
    for branch, result in zip("ab", state["results"], strict=True):
        assert "-A userapp_" in result["state"][f"argv_{branch}"]
    registered = user_app.app.control.inspect(timeout=2).registered() or {}
    names = {task for tasks in registered.values() for task in tasks}
    assert {f"{user_app.__name__}.add", "tea_dist.run_flow"} <= names
    # tea_dist's options travel with its tasks; the app's own stay as the user set them
    assert user_app.app.conf.task_acks_late is False
    assert user_app.app.tasks["tea_dist.run_flow"].acks_late is True


def test_i3c_a_broker_given_over_the_environment_takes_redis_along(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The environment names no Redis URL: a broker given in code is the Redis it follows,
    not the default broker's; a Redis URL the environment names is kept."""
    monkeypatch.delenv("TEA_DIST_REDIS_URL", raising=False)
    monkeypatch.delenv("TEA_DIST_RESULT_BACKEND", raising=False)
    cluster = Cluster.from_env(broker="redis://10.0.0.9:6379/2")
    assert cluster.settings.redis == "redis://10.0.0.9:6379/2"
    assert cluster.settings.backend == "redis://10.0.0.9:6379/2"
    monkeypatch.setenv("TEA_DIST_REDIS_URL", "redis://10.0.0.8:6379/3")
    rabbit = Cluster.from_env(broker="amqp://guest:guest@127.0.0.1:5672//")
    assert rabbit.settings.redis == "redis://10.0.0.8:6379/3"
