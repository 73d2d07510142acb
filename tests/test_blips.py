"""Redis outages during a celery run, on a private Redis server that the tests pause.

A pause (SIGSTOP) is the outage: clients' connections hang, as on a network blip or a
failover. Shorter than ``TEA_DIST_BROKER_GRACE``, the run rides it out; longer, the run ends
with an error naming the redacted URL instead of hanging.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tea_dist.distributed.local_cluster import EmbeddedRedis
from tests import celery_nodes as cn
from tests import cluster as workers
from tests.nodes import fan_graph

pytestmark = pytest.mark.celery


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[EmbeddedRedis, workers.TestCluster]]:
    """A Redis server of its own and one flow worker on it; the test process points there."""
    from tests.cluster import cluster_for

    server = EmbeddedRedis().start()
    cluster = workers.TestCluster(server.url)
    try:
        cluster.start_worker("blip", concurrency=2)
        with cluster_for(cluster.settings()).as_default():
            yield server, cluster
    finally:
        cluster.stop_all()
        server.stop()


@contextmanager
def paused(server: EmbeddedRedis, seconds: float) -> Iterator[None]:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


def _run_in_background(graph: Any, config: dict[str, Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.extend(graph.compile().invoke({}, config)))
    thread.start()
    return thread, out


def _wait_started(markers: Path) -> None:
    deadline = time.monotonic() + 60
    while not all((markers / f"{b}.start").exists() for b in "ab"):
        assert time.monotonic() < deadline, "the branches did not start"
        time.sleep(0.05)


def _graph() -> Any:
    return fan_graph(
        {"a": cn.start_sleep_done, "b": cn.start_sleep_done},
        config=ParallelConfig(strategy="celery"),
        fan_in=cn.collect,
        name="blip",
    )


def test_i10_redis_blip_shorter_than_the_grace_is_ridden_out(private: Any, tmp_path: Path) -> None:
    server, _ = private
    config = {"marker_dir": str(tmp_path), "sleep": {"a": 2, "b": 2}}
    thread, out = _run_in_background(_graph(), config)
    _wait_started(tmp_path)
    with paused(server, 3.0):
        pass
    thread.join(30)
    assert not thread.is_alive()
    assert out[-1]["type"] == "final", out[-1]
    assert out[-1]["state"]["ok"] == [True, True]


def test_i10_redis_outage_past_the_grace_ends_the_run_naming_the_url(
    private: Any, tmp_path: Path
) -> None:
    from tests.cluster import configure, current_settings

    server, cluster = private
    configure(cluster.settings().with_overrides(broker_grace=1.0))
    try:
        config = {"marker_dir": str(tmp_path), "sleep": {"a": 30, "b": 30}}
        thread, out = _run_in_background(_graph(), config)
        _wait_started(tmp_path)
        started = time.monotonic()
        with paused(server, 0):
            thread.join(15)
            ended_after = time.monotonic() - started
    finally:
        configure(cluster.settings())
    assert not thread.is_alive(), "the run hung on a Redis outage"
    assert out[-1]["type"] == "error" and out[-1]["error_type"] == "BrokerError"
    assert f"127.0.0.1:{server.port}" in out[-1]["error"]
    assert out[-1]["node"] is None  # never blamed on the node whose fan-out it was
    assert ended_after < 10
    # once Redis is back, the branches of the ended run stop instead of doing their work
    time.sleep(6)
    assert not list(tmp_path.glob("*.done"))
    assert current_settings().broker_grace == 10.0
