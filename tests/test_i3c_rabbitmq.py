"""The celery strategy with RabbitMQ as the broker and Redis holding tea_dist's own state.

Real worker processes (a prefork flow worker and a thread-pool run worker) consume queues of
their own on the ``rabbitmq_url`` fixture's RabbitMQ; runs, heartbeats, circuits and presence
live in the session's Redis under a key prefix of their own. Skipped where no RabbitMQ answers.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, RetryPolicy, StateGraph, submit
from tea_dist.core.errors import ConfigError
from tea_dist.distributed.settings import Settings
from tests import celery_nodes as cn
from tests.cluster import TestCluster
from tests.nodes import fan_graph, final_state

CELERY = ParallelConfig(strategy="celery")


def celery_graph(branches: dict[str, Any], config: ParallelConfig = CELERY) -> StateGraph:
    return fan_graph(branches, config=config, fan_in=cn.collect, name="rabbit")


class RabbitCluster(TestCluster):
    """A ``TestCluster`` whose workers take their messages from RabbitMQ."""

    __test__ = False

    def __init__(self, broker: str, redis_url: str) -> None:
        super().__init__(redis_url)
        self.broker = broker

    def settings(self) -> Settings:
        return (
            super()
            .settings()
            .with_overrides(broker_url=self.broker, redis_url=self.redis_url, result_backend=None)
        )


def _delete_queues(broker: str, names: list[str]) -> None:
    """Delete the queues (and the exchanges of the same names) these tests declared."""
    from kombu import Connection

    with Connection(broker, connect_timeout=5) as connection:
        for name in names:
            with contextlib.suppress(Exception):
                channel = connection.channel()
                channel.queue_delete(name)
                channel.exchange_delete(name)
                channel.close()


@pytest.fixture(scope="module")
def rabbit(rabbitmq_url: str, redis_url: str) -> Iterator[RabbitCluster]:
    import redis

    from tests.cluster import configure, current_settings

    cluster = RabbitCluster(rabbitmq_url, redis_url)
    previous = current_settings()
    configure(cluster.settings())
    try:
        cluster.start_worker("flows", concurrency=2)
        cluster.start_worker("runs", concurrency=2, role="runs")
        yield cluster
    finally:
        cluster.stop_all()
        configure(previous)
        settings = cluster.settings()
        _delete_queues(rabbitmq_url, [settings.flows_queue, settings.runs_queue])
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.mark.rabbitmq
def test_i3c_settings_name_the_broker_and_redis_apart(rabbit: RabbitCluster) -> None:
    settings = rabbit.settings()
    assert settings.broker.startswith("amqp://")
    assert settings.redis == rabbit.redis_url
    assert settings.backend == rabbit.redis_url  # the result backend follows Redis, not AMQP


@pytest.mark.rabbitmq
def test_i3c_fan_out_over_rabbitmq_returns_every_branch(rabbit: RabbitCluster) -> None:
    app = celery_graph({"a": cn.whoami, "b": cn.whoami, "c": cn.whoami}).compile()
    state = final_state(list(app.invoke({"value": 1})))
    assert state["branches"] == ["a", "b", "c"] and state["ok"] == [True] * 3
    assert state["total"] == 6
    assert all(r["worker"] for r in state["results"])


@pytest.mark.rabbitmq
def test_i3c_timeout_over_rabbitmq_kills_the_work(rabbit: RabbitCluster, tmp_path: Path) -> None:
    """A branch that swallows the soft limit is killed at the hard limit, its sibling runs."""
    config = ParallelConfig(strategy="celery", timeout_seconds=0.5)
    app = celery_graph({"stuck": cn.ignore_soft_limit, "fast": cn.whoami}, config).compile()
    started = time.monotonic()
    run_config = {"marker_dir": str(tmp_path), "sleep": {"stuck": 3}}
    state = final_state(list(app.invoke({}, config=run_config)))
    stuck, fast = state["results"]
    assert stuck["timeout"] is True and stuck["error_type"] == "TimeoutError"
    assert fast["success"] is True
    assert time.monotonic() - started < 3
    assert (tmp_path / "stuck.start").exists()
    time.sleep(3.5 - (time.monotonic() - started))
    assert not (tmp_path / "stuck.done").exists()  # its process was killed, not abandoned


@pytest.mark.rabbitmq
def test_i3c_retry_with_backoff_is_published_again(rabbit: RabbitCluster, tmp_path: Path) -> None:
    """The retry is a message published with a countdown (an ETA message a worker holds
    unacknowledged until it is due); it runs and succeeds."""
    policy = RetryPolicy(max_retries=2, base_delay=1.0, jitter=False)
    config = ParallelConfig(strategy="celery", retry_policy=policy)
    app = celery_graph({"flaky": cn.flaky_file, "sib": cn.whoami}, config).compile()
    started = time.monotonic()
    state = final_state(list(app.invoke({}, config={"marker_dir": str(tmp_path), "fail_times": 1})))
    flaky, sib = state["results"]
    assert flaky["success"] is True and flaky["retry_count"] == 1
    assert flaky["state"]["attempts"] == 2 and (tmp_path / "flaky.count").read_text() == "2"
    assert sib["success"] is True
    assert time.monotonic() - started >= 1.0  # the countdown was waited out


@pytest.mark.rabbitmq
def test_i3c_fail_fast_revokes_a_sibling(rabbit: RabbitCluster, tmp_path: Path) -> None:
    """A sibling that ignores the cooperative interrupt is revoked with terminate, through
    RabbitMQ's broadcast: its side effect never happens."""
    config = ParallelConfig(strategy="celery", fail_fast=True)
    app = celery_graph({"bad": cn.fail, "stuck": cn.ignore_soft_limit}, config).compile()
    started = time.monotonic()
    run_config = {"marker_dir": str(tmp_path), "sleep": {"stuck": 3}}
    events = list(app.invoke({}, config=run_config))
    assert events[-1]["type"] == "error" and events[-1]["error_type"] == "ValueError"
    assert "remote boom" in events[-1]["error"]  # the branch's own error, from its worker
    assert time.monotonic() - started < 3
    time.sleep(max(0.0, 3.5 - (time.monotonic() - started)))
    assert not (tmp_path / "stuck.done").exists()


@pytest.mark.rabbitmq
def test_i3c_submitted_run_over_rabbitmq_succeeds(rabbit: RabbitCluster) -> None:
    run = submit("tests.apps_graphs:quick", {"value": 2})
    state = run.result(timeout=30)
    assert state["branches"] == ["a", "b"] and state["ok"] == [True, True]
    assert str(run.status()) == "succeeded"


@pytest.mark.rabbitmq
def test_i3c_a_hold_past_the_consumer_timeout_is_refused_before_sending(
    rabbit: RabbitCluster, tmp_path: Path
) -> None:
    """Retry delay plus time limit at or above RabbitMQ's consumer timeout: the run fails
    before any message is sent, naming the setting."""
    from tests.cluster import configure

    configure(rabbit.settings().with_overrides(consumer_timeout=5.0))
    try:
        config = ParallelConfig(strategy="celery", timeout_seconds=6.0)
        app = celery_graph({"a": cn.mark_start_then_sleep}, config).compile()
        events = list(app.invoke({}, config={"marker_dir": str(tmp_path)}))
    finally:
        configure(rabbit.settings())
    assert events[-1]["type"] == "error"
    assert "TEA_DIST_CONSUMER_TIMEOUT" in events[-1]["error"]
    time.sleep(1.0)
    assert not (tmp_path / "a.start").exists()  # nothing was sent


# -- settings: which URL is Redis (no service needed) ------------------------------------------


def test_i3c_redis_url_follows_a_redis_broker_only() -> None:
    redis_broker = Settings(broker_url="redis://h:6379/3")
    assert redis_broker.redis == redis_broker.backend == "redis://h:6379/3"
    amqp = Settings(broker_url="amqp://guest:guest@h:5672//")
    with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
        _ = amqp.redis
    given = amqp.with_overrides(redis_url="redis://r:6379/1")
    assert given.redis == given.backend == "redis://r:6379/1"
    assert given.broker == "amqp://guest:guest@h:5672//"


def test_i3c_unix_and_rediss_brokers_are_redis() -> None:
    for url in ("rediss://h:6380/0", "unix:///tmp/redis.sock?db=2"):
        assert Settings(broker_url=url).redis == url


def test_i3c_explicit_result_backend_is_kept() -> None:
    settings = Settings(
        broker_url="amqp://h//", redis_url="redis://r/1", result_backend="redis://b/2"
    )
    assert settings.backend == "redis://b/2" and settings.redis == "redis://r/1"


def test_i3c_redis_password_goes_into_redis_urls_only() -> None:
    settings = Settings(
        broker_url="amqp://rabbit-host//", redis_url="redis://r/1", redis_password="p@ss"
    )
    assert settings.broker == "amqp://rabbit-host//"
    assert settings.redis == settings.backend == "redis://:p%40ss@r/1"


def test_i3c_celery_config_has_no_redis_options_for_amqp() -> None:
    from tea_dist.distributed.celery_app import celery_config

    config = celery_config(Settings(broker_url="amqp://h//", redis_url="redis://r/1"))
    assert config["result_backend"] == "redis://r/1"
    assert "visibility_timeout" not in dict(config["broker_transport_options"])  # type: ignore[call-overload]
    redis_config = celery_config(Settings(broker_url="redis://r/1"))
    assert dict(redis_config["broker_transport_options"])["visibility_timeout"] == 3600.0  # type: ignore[call-overload]


def test_i3c_amqp_broker_without_redis_fails_before_sending(tmp_path: Path) -> None:
    """No TEA_DIST_REDIS_URL with an AMQP broker: the invoke fails at its start naming it,
    before anything is sent (the broker here does not even exist)."""
    from tests.cluster import configure, current_settings

    previous = current_settings()
    configure(Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", broker_grace=0.2))
    try:
        app = celery_graph({"a": cn.whoami}).compile()
        with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
            list(app.invoke({"value": 1}))
    finally:
        configure(previous)


def test_i3c_unknown_consumer_timeout_setting_is_validated() -> None:
    with pytest.raises(ValueError):
        Settings(consumer_timeout=0)
    assert Settings().consumer_timeout == 1800.0


def test_i3c_worker_refuses_an_amqp_broker_without_redis() -> None:
    from tea_dist.distributed.worker import worker_argv

    with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
        worker_argv(Settings(broker_url="amqp://h//"), "flows")


def test_i3c_each_broker_names_its_own_hold_limit() -> None:
    redis_hold = Settings(broker_url="redis://h/0").hold_limit()
    assert redis_hold is not None and redis_hold[:2] == (3600.0, "TEA_DIST_VISIBILITY_TIMEOUT")
    amqp = Settings(broker_url="amqp://h//", redis_url="redis://r/1", consumer_timeout=900)
    amqp_hold = amqp.hold_limit()
    assert amqp_hold is not None and amqp_hold[:2] == (900.0, "TEA_DIST_CONSUMER_TIMEOUT")
    assert Settings(broker_url="memory://", redis_url="redis://r/1").hold_limit() is None
    sentinel = Settings(broker_url="sentinel://s:26379", redis_url="redis://r/1")
    assert sentinel.hold_limit() is not None  # kombu's Redis transport, not a redis-py URL
    with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
        _ = Settings(broker_url="sentinel://s:26379").redis


def test_i3c_unreachable_amqp_broker_is_a_broker_error_within_seconds() -> None:
    from tea_dist.core.errors import BrokerError
    from tea_dist.distributed.connections import check_broker

    started = time.monotonic()
    with pytest.raises(BrokerError, match=r"amqp://guest:\*\*\*@127.0.0.1:1//"):
        check_broker("amqp://guest:secret@127.0.0.1:1//")
    assert time.monotonic() - started < 5


@pytest.mark.rabbitmq
def test_i3c_queue_depth_reads_rabbitmq_queues(rabbit: RabbitCluster) -> None:
    from tea_dist.distributed.connections import check_broker, queue_depths

    settings = rabbit.settings()
    check_broker(settings.broker)
    missing = f"tea.absent.{rabbit.tag}"
    depths = queue_depths(settings.broker, [missing, settings.flows_queue, settings.runs_queue])
    assert depths == {settings.flows_queue: 0, settings.runs_queue: 0}
