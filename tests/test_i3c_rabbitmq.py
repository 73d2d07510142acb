"""The celery strategy with RabbitMQ as the broker and Redis holding tea_dist's own state.

Real worker processes (a prefork flow worker and a thread-pool run worker) consume queues of
their own on the ``rabbitmq_url`` fixture's RabbitMQ; runs, heartbeats, circuits, limits and
presence live in the session's Redis under a key prefix of their own. Every graph is compiled
with ``cluster=`` the RabbitMQ cluster (the process's default cluster is left alone). Skipped
where no RabbitMQ answers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tea_dist import (
    CancelToken,
    CircuitBreakerConfig,
    Cluster,
    ParallelConfig,
    ResourceLimit,
    RetryPolicy,
    StateGraph,
    WorkflowRun,
    submit,
)
from tea_dist.core.errors import ConfigError, RunCancelledError
from tea_dist.distributed.settings import Settings
from tests import celery_nodes as cn
from tests.cluster import TestCluster, cluster_for
from tests.nodes import fan_graph, final_state, peak_overlap

CELERY = ParallelConfig(strategy="celery")


def celery_graph(branches: dict[str, Any], config: ParallelConfig = CELERY) -> StateGraph:
    return fan_graph(branches, config=config, fan_in=cn.collect, name="rabbit")


class RabbitCluster(TestCluster):
    """A ``TestCluster`` whose workers take their messages from RabbitMQ."""

    __test__ = False

    def __init__(self, broker: str, redis_url: str) -> None:
        super().__init__(redis_url)
        self.broker = broker
        self.declared: list[str] = []  # the queues to delete at the end

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
    """A flow worker (prefork, 2 slots) and a run worker on RabbitMQ queues of their own."""
    import redis

    cluster = RabbitCluster(rabbitmq_url, redis_url)
    settings = cluster.settings()
    cluster.declared += [settings.flows_queue, settings.runs_queue]
    try:
        cluster.start_worker("flows", concurrency=2)
        cluster.start_worker("runs", concurrency=2, role="runs")
        yield cluster
    finally:
        cluster.stop_all()
        _delete_queues(rabbitmq_url, cluster.declared)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture(scope="module")
def rabbit_cluster(rabbit: RabbitCluster) -> Cluster:
    """The test process's ``Cluster`` of the RabbitMQ workers, passed as ``cluster=``."""
    return cluster_for(rabbit.settings())


@pytest.mark.rabbitmq
def test_i3c_settings_name_the_broker_and_redis_apart(rabbit: RabbitCluster) -> None:
    settings = rabbit.settings()
    assert settings.broker.startswith("amqp://")
    assert settings.redis == rabbit.redis_url
    assert settings.backend == rabbit.redis_url  # the result backend follows Redis, not AMQP


@pytest.mark.rabbitmq
def test_i3c_fan_out_over_rabbitmq_returns_every_branch(rabbit_cluster: Cluster) -> None:
    app = celery_graph({"a": cn.whoami, "b": cn.whoami, "c": cn.whoami}).compile(
        cluster=rabbit_cluster
    )
    state = final_state(list(app.invoke({"value": 1})))
    assert state["branches"] == ["a", "b", "c"] and state["ok"] == [True] * 3
    assert state["total"] == 6
    assert all(r["worker"] for r in state["results"])


@pytest.mark.rabbitmq
def test_i3c_timeout_over_rabbitmq_kills_the_work(rabbit_cluster: Cluster, tmp_path: Path) -> None:
    """A branch that swallows the soft limit is killed at the hard limit, its sibling runs."""
    config = ParallelConfig(strategy="celery", timeout_seconds=0.5)
    app = celery_graph({"stuck": cn.ignore_soft_limit, "fast": cn.whoami}, config).compile(
        cluster=rabbit_cluster
    )
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
def test_i3c_retry_with_backoff_is_published_again(rabbit_cluster: Cluster, tmp_path: Path) -> None:
    """The retry is a message published with a countdown (an ETA message a worker holds
    unacknowledged until it is due); it runs and succeeds."""
    policy = RetryPolicy(max_retries=2, base_delay=1.0, jitter=False)
    config = ParallelConfig(strategy="celery", retry_policy=policy)
    app = celery_graph({"flaky": cn.flaky_file, "sib": cn.whoami}, config).compile(
        cluster=rabbit_cluster
    )
    started = time.monotonic()
    state = final_state(list(app.invoke({}, config={"marker_dir": str(tmp_path), "fail_times": 1})))
    flaky, sib = state["results"]
    assert flaky["success"] is True and flaky["retry_count"] == 1
    assert flaky["state"]["attempts"] == 2 and (tmp_path / "flaky.count").read_text() == "2"
    assert sib["success"] is True
    assert time.monotonic() - started >= 1.0  # the countdown was waited out


@pytest.mark.rabbitmq
def test_i3c_fail_fast_revokes_a_sibling(rabbit_cluster: Cluster, tmp_path: Path) -> None:
    """A sibling that ignores the cooperative interrupt is revoked with terminate, through
    RabbitMQ's broadcast: its side effect never happens."""
    config = ParallelConfig(strategy="celery", fail_fast=True)
    app = celery_graph({"bad": cn.fail, "stuck": cn.ignore_soft_limit}, config).compile(
        cluster=rabbit_cluster
    )
    started = time.monotonic()
    run_config = {"marker_dir": str(tmp_path), "sleep": {"stuck": 3}}
    events = list(app.invoke({}, config=run_config))
    assert events[-1]["type"] == "error" and events[-1]["error_type"] == "ValueError"
    assert "remote boom" in events[-1]["error"]  # the branch's own error, from its worker
    assert time.monotonic() - started < 3
    time.sleep(max(0.0, 3.5 - (time.monotonic() - started)))
    assert not (tmp_path / "stuck.done").exists()


@pytest.mark.rabbitmq
def test_i3c_submitted_run_over_rabbitmq_succeeds(rabbit_cluster: Cluster) -> None:
    run = submit("tests.apps_graphs:quick", {"value": 2}, cluster=rabbit_cluster)
    state = run.result(timeout=30)
    assert state["branches"] == ["a", "b"] and state["ok"] == [True, True]
    assert str(run.status()) == "succeeded"


@pytest.mark.rabbitmq
def test_i3c_a_hold_past_the_consumer_timeout_is_refused_before_sending(
    rabbit: RabbitCluster, tmp_path: Path
) -> None:
    """Retry delay plus time limit at or above RabbitMQ's consumer timeout: the run fails
    before any message is sent, naming the setting."""
    short = cluster_for(rabbit.settings().with_overrides(consumer_timeout=5.0))
    config = ParallelConfig(strategy="celery", timeout_seconds=6.0)
    app = celery_graph({"a": cn.mark_start_then_sleep}, config).compile(cluster=short)
    events = list(app.invoke({}, config={"marker_dir": str(tmp_path)}))
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
    nowhere = Cluster(broker="amqp://guest:guest@127.0.0.1:1//", broker_grace=0.2)
    app = celery_graph({"a": cn.whoami}).compile(cluster=nowhere)
    with pytest.raises(ConfigError, match="TEA_DIST_REDIS_URL"):
        list(app.invoke({"value": 1}))


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


# -- the celery-strategy suite on RabbitMQ -----------------------------------------------------


class Ends:
    """Branch callbacks: the worker (``host/pid``) of each start, and how often each ended."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: dict[str, list[str]] = {}
        self.ended: dict[str, int] = {}

    def on_flow_start(self, ctx: Any) -> None:
        with self.lock:
            self.started.setdefault(ctx.branch, []).append(ctx.worker)

    def on_flow_complete(self, ctx: Any, result: Any) -> None:
        with self.lock:
            self.ended[ctx.branch] = self.ended.get(ctx.branch, 0) + 1


def invoke_in_thread(
    app: Any, state: dict[str, Any], config: dict[str, Any], **options: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["events"] = list(app.invoke(state, config=config, **options))
        except BaseException as exc:  # reported by the test, not lost in the thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for(condition: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := condition()):
        assert time.monotonic() < deadline, f"no {what} within {seconds}s"
        time.sleep(0.05)
    return found


@pytest.mark.rabbitmq
def test_i3c_a_ten_branch_fan_out_with_a_retry_and_a_timeout(
    rabbit_cluster: Cluster, tmp_path: Path
) -> None:
    """Ten branches on RabbitMQ: one fails once and succeeds on its retry (a countdown
    message), one runs past its time limit; every result is right and in branch order."""
    policy = RetryPolicy(max_retries=1, base_delay=0.2, jitter=False)
    config = ParallelConfig(strategy="celery", timeout_seconds=1.0, retry_policy=policy)
    branches: dict[str, Any] = {f"b{i}": cn.whoami for i in range(10)}
    branches["b3"] = cn.flaky_file
    branches["b7"] = cn.mark_start_then_sleep
    app = celery_graph(branches, config).compile(cluster=rabbit_cluster)
    run_config = {"marker_dir": str(tmp_path), "fail_times": 1, "sleep": {"b7": 5.0}}
    started = time.monotonic()
    state = final_state(list(app.invoke({"value": 1}, config=run_config)))
    took = time.monotonic() - started
    assert state["branches"] == list(branches)
    assert state["ok"] == [i != 7 for i in range(10)]
    results = dict(zip(state["branches"], state["results"], strict=True))
    flaky, slow = results.pop("b3"), results.pop("b7")
    assert flaky["retry_count"] == 1 and flaky["state"]["attempts"] == 2
    assert (tmp_path / "b3.count").read_text() == "2"
    assert slow["timeout"] is True and slow["error_type"] == "TimeoutError"
    assert slow["retry_count"] == 0  # a timeout is not retried unless retry_on_timeout
    for branch, result in results.items():
        assert result["retry_count"] == 0 and result["timeout"] is False, branch
        assert result["state"]["value"] == 2 and f"pid_{branch}" in result["state"], branch
        assert result["worker"], branch
    assert flaky["state"]["value"] == 1  # its input, kept by the retried attempt
    assert state["total"] == 8 * 2 + 1  # the timed-out b7 has no state to add
    assert took < 8, f"the fan-out took {took:.1f}s"


@pytest.mark.rabbitmq
def test_i3c_a_worker_sigkilled_mid_branch_loses_nothing(
    rabbit: RabbitCluster, rabbit_cluster: Cluster, tmp_path: Path
) -> None:
    """A second flow worker on the cluster's queue takes branches; SIGKILL of its main
    process while they run (RabbitMQ gives its unacknowledged messages back at once), another
    worker started: every branch ends exactly once, successful, with its own result."""
    import psutil

    victim = rabbit.start_worker("victim", concurrency=2)
    children = {child.pid for child in psutil.Process(victim.pid).children()}
    replacement = None
    ends = Ends()
    branches = {f"b{i}": cn.sleep_then_mark for i in range(8)}
    app = celery_graph(branches).compile(cluster=rabbit_cluster, parallel_callbacks=[ends])
    run_config = {"marker_dir": str(tmp_path), "sleep": dict.fromkeys(branches, 1.0)}
    try:
        thread, box = invoke_in_thread(app, {"value": 1}, run_config)

        def on_victim() -> list[str]:
            with ends.lock:
                return [
                    b
                    for b, workers in ends.started.items()
                    if any(int(w.rsplit("/", 1)[1]) in children for w in workers)
                ]

        hit = wait_for(on_victim, 20, "branch started on the victim")
        os.kill(victim.pid, signal.SIGKILL)  # the main process alone, mid-branch
        replacement = rabbit.start_worker("replacement", concurrency=2)
        thread.join(60)
        assert not thread.is_alive(), "the run hung"
        assert "error" not in box, repr(box.get("error"))
    finally:
        for proc in (victim, replacement):
            if proc is not None:
                rabbit.kill(proc)  # its process group: the killed main process's children too
                rabbit.workers.remove(proc)
    state = final_state(box["events"])
    assert hit
    assert state["branches"] == list(branches)
    assert state["ok"] == [True] * len(branches), state["results"]
    for branch, result in zip(state["branches"], state["results"], strict=True):
        assert result["state"][f"done_{branch}"] is True, branch
    assert ends.ended == dict.fromkeys(branches, 1)  # each ended once, none twice or lost


@pytest.mark.rabbitmq
def test_i3c_cancel_stops_a_running_fan_out(rabbit_cluster: Cluster, tmp_path: Path) -> None:
    """The caller's cancel token stops a fan-out running on RabbitMQ workers: the run ends
    at once, in error, and no branch's side effect happens."""
    token = CancelToken()
    branches = {"a": cn.start_sleep_done, "b": cn.start_sleep_done}
    app = celery_graph(branches).compile(cluster=rabbit_cluster)
    run_config = {"marker_dir": str(tmp_path), "sleep": {"a": 2.5, "b": 2.5}}
    started = time.monotonic()
    thread, box = invoke_in_thread(app, {}, run_config, cancel_token=token)
    wait_for(lambda: len(list(tmp_path.glob("*.start"))) == 2, 15, "two branches started")
    token.cancel("stop")
    cancelled = time.monotonic()
    thread.join(10)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    assert box["events"][-1]["type"] == "error"
    assert time.monotonic() - cancelled < 2
    time.sleep(max(0.0, started + 3.5 - time.monotonic()))
    assert not list(tmp_path.glob("*.done"))  # both were stopped in their worker


@pytest.mark.rabbitmq
def test_i3c_cancel_stops_a_submitted_run(rabbit_cluster: Cluster, tmp_path: Path) -> None:
    """``WorkflowRun.cancel()`` of a run on a RabbitMQ run worker: it ends cancelled, seen
    from a handle made by id, and its branches' side effects never happen."""
    config = {"marker_dir": str(tmp_path), "sleep": {"a": 2.5, "b": 2.5}}
    run = submit("tests.apps_graphs:two_branches", {}, config, cluster=rabbit_cluster)
    started = time.monotonic()
    wait_for(
        lambda: any(e.get("event") == "on_flow_start" for e in run.events()),
        20,
        "branch start",
    )
    assert run.cancel() is True
    with pytest.raises(RunCancelledError):
        run.result(timeout=10)
    assert WorkflowRun(run.run_id, cluster=rabbit_cluster).status() == "cancelled"
    time.sleep(max(0.0, started + 3.5 - time.monotonic()))
    assert not list(tmp_path.glob("*.done"))


@pytest.mark.rabbitmq
def test_i3c_a_queue_no_worker_consumes_fails_the_run_naming_it(
    rabbit: RabbitCluster, rabbit_cluster: Cluster
) -> None:
    queue = f"tea.nobody.{rabbit.tag}"
    rabbit.declared.append(queue)  # declared by the send; deleted with the module's queues
    config = ParallelConfig(strategy="celery", queue=queue)
    app = celery_graph({"a": cn.whoami}, config).compile(cluster=rabbit_cluster)
    started = time.monotonic()
    events = list(app.invoke({"value": 0}))
    took = time.monotonic() - started
    assert events[-1]["type"] == "error" and events[-1]["error_type"] == "NoWorkerError"
    assert f"no live worker consumes queue '{queue}'" in events[-1]["error"]
    assert f"tea-dist worker --queues {queue}" in events[-1]["error"]
    assert 4 < took < 12, f"the run ended after {took:.1f}s"


@pytest.mark.rabbitmq
def test_i3c_a_resource_limit_holds_across_branches(
    rabbit: RabbitCluster, rabbit_cluster: Cluster, tmp_path: Path
) -> None:
    """``max_concurrent=1`` on a worker with two slots: the three branches run one at a
    time (a refused one waits in the broker), every one successful."""
    limit = ResourceLimit(name=f"rabbit-one-{rabbit.tag}", max_concurrent=1)
    config = ParallelConfig(strategy="celery", limits=(limit,))
    branches = {b: cn.record_interval for b in ("a", "b", "c")}
    app = celery_graph(branches, config).compile(cluster=rabbit_cluster)
    state = final_state(list(app.invoke({}, config={"marker_dir": str(tmp_path), "hold": 0.4})))
    assert state["ok"] == [True] * 3
    spans = []
    for path in tmp_path.glob("*.interval"):
        start, end = path.read_text().split()
        spans.append((float(start), float(end)))
    assert len(spans) == 3
    assert peak_overlap(spans) == 1, sorted(spans)


@pytest.mark.rabbitmq
def test_i3c_a_circuit_opens_and_is_shared(
    rabbit: RabbitCluster, rabbit_cluster: Cluster, tmp_path: Path
) -> None:
    """Two failures on RabbitMQ workers open a named circuit (its state in Redis); a graph
    compiled apart, with a ``Cluster`` object of its own on the same settings, is refused
    before sending, and a reset from it closes the circuit for the first."""
    name = f"rabbit-svc-{rabbit.tag}"
    breaker = CircuitBreakerConfig(failure_threshold=2, reset_timeout=60, name=name)
    config = ParallelConfig(strategy="celery", circuit_breaker=breaker)
    run_config = {"marker_dir": str(tmp_path)}
    first = celery_graph({"bad1": cn.mark_and_fail, "bad2": cn.mark_and_fail}, config)
    first_app = first.compile(cluster=rabbit_cluster)
    state = final_state(list(first_app.invoke({}, config=run_config)))
    assert [r["error_type"] for r in state["results"]] == ["RuntimeError"] * 2
    assert first_app.get_circuit_states()[name] == "open"

    other = Cluster(settings=rabbit.settings())
    second = fan_graph({"bad3": cn.mark_and_fail}, config=config, fan_in=cn.collect, name="b")
    second_app = second.compile(cluster=other)
    (refused,) = final_state(list(second_app.invoke({}, config=run_config)))["results"]
    assert refused["error_type"] == "CircuitOpenError" and refused["circuit_state"] == "open"
    assert not (tmp_path / "bad3.count").exists()  # never sent, never ran
    second_app.reset_circuit(name)
    assert first_app.get_circuit_states()[name] == "closed"
