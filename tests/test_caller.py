"""The caller going away cancels its run (issue: never hang, never orphan, never leak).

Real caller processes get real signals while their celery branches run on the session's real
workers; in-process strategies are driven the same way from this process. Each test asserts
what a user sees: no branch side effect after the caller went away, workers free again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from tea_dist import CircuitBreakerConfig, ParallelConfig, RetryPolicy
from tests import celery_nodes as cn
from tests import nodes
from tests.cluster import ROOT
from tests.nodes import fan_graph


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _heartbeats(cluster: Any) -> list[bytes]:
    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    return list(client.scan_iter(match=f"{settings.key_prefix}:fanout:*:hb:*", count=1000))


@pytest.mark.celery
@pytest.mark.parametrize(
    "sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name
)
def test_i10_caller_signal_stops_its_celery_branches(
    cluster: Any, tmp_path: Path, sig: signal.Signals
) -> None:
    config = {"marker_dir": str(tmp_path), "sleep": {"a": 15, "b": 15}}
    env = {
        **os.environ,
        **cluster.env,
        "PYTHONPATH": str(ROOT),
        "TEA_DIST_CALLER_LEASE": "3",  # how long a silent (SIGKILLed) caller keeps its branches
    }
    caller = subprocess.Popen(
        [sys.executable, "-m", "tests.caller_script", "celery", json.dumps(config)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(
            lambda: all((tmp_path / f"{b}.start").exists() for b in "ab"), 30, "branches to start"
        )
        sent = time.monotonic()
        caller.send_signal(sig)
        _wait_or_dump(caller, 15)
        assert caller.returncode != 0
        # the branches end (their heartbeats go) long before their 15 s of work would
        _wait_for(lambda: not _heartbeats(cluster), 10, "the branches to stop")
        stopped_after = time.monotonic() - sent
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    time.sleep(0.5)
    assert not list(tmp_path.glob("*.done")), "a branch of a cancelled run did its side effect"
    assert stopped_after < (8 if sig == signal.SIGKILL else 4)
    if sig == signal.SIGTERM:
        assert caller.returncode == 128 + signal.SIGTERM  # the conventional status, after cleanup


def _wait_or_dump(caller: subprocess.Popen[bytes], seconds: float) -> None:
    """Wait for ``caller`` to exit; one still running is asked for its threads' stacks
    (``caller_script`` dumps them on SIGUSR2) and the test fails showing them."""
    try:
        caller.wait(seconds)
    except subprocess.TimeoutExpired:
        caller.send_signal(signal.SIGUSR2)
        time.sleep(1)
        caller.kill()
        _out, err = caller.communicate()
        raise AssertionError(
            f"the caller still ran {seconds}s after its signal:\n{err.decode()[-6000:]}"
        ) from None


def test_i10_abandoned_stream_flushes_callbacks(tmp_path: Path) -> None:
    seen: list[str] = []

    class Recorder:
        def on_flow_complete(self, ctx: Any, result: Any) -> None:
            time.sleep(0.2)  # a slow callback: still flushed when the stream is abandoned
            seen.append(ctx.branch)

    graph = fan_graph({"a": nodes.add_one, "b": nodes.add_one}, name="abandoned")
    events = graph.compile(parallel_callbacks=[Recorder()]).stream({"value": 1})
    for event in events:
        if event["type"] == "parallel_state":
            break
    events.close()  # the caller walks away mid-run
    assert sorted(seen) == ["a", "b"]


@pytest.mark.celery
def test_i10_abandoned_stream_forgets_per_invocation_circuits(cluster: Any) -> None:
    config = ParallelConfig(
        strategy="celery", circuit_breaker=CircuitBreakerConfig(scope="invocation")
    )
    graph = fan_graph({"a": cn.whoami, "b": cn.whoami}, config=config, name="forgetful")
    compiled = graph.compile()
    events = compiled.stream({"value": 1}, run_id="abandoned-run")
    next(e for e in events if e["type"] == "parallel_state")
    events.close()
    assert not [c for c in compiled.get_circuit_states() if c.startswith("abandoned-run/")]


@pytest.mark.celery
def test_i10_queue_nobody_reads_ends_the_run_naming_it(cluster: Any) -> None:
    config = ParallelConfig(strategy="celery", queue="tea.nobody-reads-this")
    graph = fan_graph({"a": cn.whoami}, config=config, fan_in=cn.collect, name="unread")
    started = time.monotonic()
    events = list(graph.compile().invoke({"value": 0}))
    took = time.monotonic() - started
    assert events[-1]["type"] == "error"
    assert events[-1]["error_type"] == "NoWorkerError"
    assert "tea.nobody-reads-this" in events[-1]["error"]
    assert events[-1]["node"] is None  # not blamed on the node before the fan-out
    assert took < 10


@pytest.mark.celery
@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:1/0", "redis://nosuchuser:s3cret-pass@127.0.0.1:6379/14"],
    ids=["dead", "wrong-password"],
)
def test_i10_unusable_broker_fails_fast_naming_its_url(cluster: Any, url: str) -> None:
    from tests.cluster import configure, current_settings

    previous = current_settings()
    configure(previous.with_overrides(broker_url=url, redis_url=url, result_backend=url))
    try:
        graph = fan_graph(
            {"a": cn.whoami}, config=ParallelConfig(strategy="celery"), fan_in=cn.collect
        )
        compiled = graph.compile(breaker_store=None)
        started = time.monotonic()
        events = list(compiled.invoke({"value": 0}))
        took = time.monotonic() - started
    finally:
        configure(previous)
    error = events[-1]
    assert error["type"] == "error" and error["error_type"] == "BrokerError"
    assert "127.0.0.1" in error["error"] and "s3cret" not in error["error"]
    assert "node" not in error["error"]  # not blamed on the node before the fan-out
    assert took < 5


def test_i10_fail_fast_crosses_strategy_groups(tmp_path: Path) -> None:
    graph = fan_graph(
        {"bad": nodes.fail, "slow": nodes.async_sleep_then_mark},
        config=ParallelConfig(fail_fast=True),
        edge_configs={"slow": ParallelConfig(strategy="asyncio", fail_fast=True)},
        name="mixed",
    )
    config = {"marker_dir": str(tmp_path), "sleep": 1.5}
    started = time.monotonic()
    events = list(graph.compile().invoke({"value": 1}, config))
    assert events[-1]["type"] == "error"
    assert time.monotonic() - started < 1.2
    time.sleep(1.8)
    assert not (tmp_path / "slow.done").exists(), "the other group's branch did its side effect"


@pytest.mark.parametrize("strategy", ["thread", "asyncio", "inline"])
def test_i10_waiting_for_a_retry_does_not_spin_a_cpu(strategy: str, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=1, base_delay=1.0)
    graph = fan_graph(
        {"flaky": nodes.flaky}, config=ParallelConfig(strategy=strategy, retry_policy=policy)
    )
    cpu, wall = time.process_time(), time.monotonic()
    config = {"counter_dir": str(tmp_path), "fail_times": 1}
    events = list(graph.compile().invoke({"value": 1}, config))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    assert events[-1]["type"] == "final" and wall >= 1.0
    assert cpu < 0.3, f"{cpu:.2f}s of CPU while waiting {wall:.2f}s for a retry"


@pytest.mark.celery
def test_i10_retry_countdown_lost_with_its_worker_is_sent_again(
    cluster: Any, tmp_path: Path
) -> None:
    queue = f"tea.victim.{cluster.tag}"
    victim = cluster.start_worker("victim", concurrency=1, flows_queue=queue)
    policy = RetryPolicy(max_retries=1, base_delay=4.0)
    config = ParallelConfig(strategy="celery", queue=queue, retry_policy=policy, timeout_total=40)
    graph = fan_graph({"flaky": cn.flaky_file}, config=config, fan_in=cn.collect, name="lost")
    out: list[Any] = []
    run = {"marker_dir": str(tmp_path), "fail_times": 1}
    thread = threading.Thread(target=lambda: out.extend(graph.compile().invoke({}, run)))
    started = time.monotonic()
    thread.start()
    _wait_for(lambda: (tmp_path / "flaky.count").exists(), 20, "the first attempt")
    time.sleep(0.5)  # the victim now holds the retry's countdown
    cluster.kill(victim)
    cluster.start_worker("rescuer", concurrency=1, flows_queue=queue)
    thread.join(40)
    assert out[-1]["type"] == "final", out[-1]
    result = out[-1]["state"]["results"][0]
    assert result["success"] and result["retry_count"] == 1
    assert (tmp_path / "flaky.count").read_text() == "2"
    assert time.monotonic() - started < 25  # not the broker's one-hour visibility timeout
