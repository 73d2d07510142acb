"""Issue 14: Prometheus metrics of branches, attempts, retries, circuits, limits and queues.

In-process runs are counted by the caller's listener; a celery branch is counted by the worker
that runs it, whose ``tea-dist worker --metrics-port`` serves what every one of its processes
recorded (Prometheus multiprocess mode).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tea_dist import CircuitBreakerConfig, ParallelConfig, RetryPolicy
from tea_dist.distributed.children import stop_groups
from tea_dist.observe import metrics
from tea_dist.observe.events import Dispatcher
from tests import nodes
from tests.nodes import fan_graph

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_LABELS = {"graph", "branch", "strategy", "outcome", "error_type", "circuit", "state"}
ALLOWED_LABELS |= {"limit", "queue", "le"}


@pytest.fixture
def recording() -> Iterator[None]:
    metrics.enable()
    yield
    metrics.disable()


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, list[Any]]:
    """``/metrics`` on ``port``: sample name -> samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_i14_branch_outcomes_attempts_retries_and_durations(recording: None) -> None:
    retry = RetryPolicy(max_retries=1, base_delay=0.0)
    strategy = "thread"
    graph = fan_graph(
        {"ok": nodes.add_one, "bad": nodes.fail},
        edge_configs={"bad": ParallelConfig(retry_policy=retry)},
        name="metered",
    )
    labels = {"graph": "metered", "strategy": strategy}

    def read() -> dict[str, float]:
        return {
            "ok": value("tea_dist_branches_total", branch="ok", outcome="success", **labels),
            "bad": value("tea_dist_branches_total", branch="bad", outcome="error", **labels),
            "attempts": value(
                "tea_dist_attempts_total",
                branch="bad",
                outcome="error",
                error_type="ValueError",
                **labels,
            ),
            "retries": value("tea_dist_retries_total", branch="bad", **labels),
            "hist": value("tea_dist_branch_duration_seconds_count", branch="ok", **labels),
            "attempt_hist": value(
                "tea_dist_attempt_duration_seconds_count", branch="bad", **labels
            ),
        }

    before = read()
    list(graph.compile().invoke({}))
    after = read()
    assert {k: after[k] - before[k] for k in before} == {
        "ok": 1,
        "bad": 1,
        "attempts": 2,
        "retries": 1,
        "hist": 1,
        "attempt_hist": 2,
    }


def test_i14_success_after_retry_and_circuit_transitions(recording: None, tmp_path: Path) -> None:
    retry = RetryPolicy(max_retries=2, base_delay=0.0)
    breaker = CircuitBreakerConfig(failure_threshold=1, name="metered-circuit")
    graph = fan_graph(
        {"flaky": nodes.flaky, "broken": nodes.fail},
        edge_configs={
            "flaky": ParallelConfig(retry_policy=retry),
            "broken": ParallelConfig(circuit_breaker=breaker),
        },
        name="metered2",
    )
    labels = {"graph": "metered2", "branch": "flaky", "strategy": "thread"}
    before = value("tea_dist_branches_succeeded_after_retry_total", **labels)
    opened = value("tea_dist_circuit_transitions_total", circuit="metered-circuit", state="open")
    app = graph.compile()
    list(app.invoke({}, config={"counter_dir": str(tmp_path), "fail_times": 1}))
    assert value("tea_dist_branches_succeeded_after_retry_total", **labels) == before + 1
    transitions = value(
        "tea_dist_circuit_transitions_total", circuit="metered-circuit", state="open"
    )
    assert transitions == opened + 1
    assert value("tea_dist_circuit_state", circuit="metered-circuit") == 2  # open
    app.reset_circuit("metered-circuit")
    assert value("tea_dist_circuit_state", circuit="metered-circuit") == 0


def test_i14_labels_stay_bounded(recording: None) -> None:
    breaker = CircuitBreakerConfig(failure_threshold=1, scope="invocation")
    graph = fan_graph(
        {"x": nodes.fail}, config=ParallelConfig(circuit_breaker=breaker), name="bounded"
    )
    run_ids = [f"run-{i}" for i in range(3)]
    for run_id in run_ids:
        list(graph.compile().invoke({}, run_id=run_id))
    for family in REGISTRY.collect():
        if not family.name.startswith("tea_dist_"):
            continue
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            assert not any(r in v for r in run_ids for v in sample.labels.values()), sample


def test_i14_limit_permit_metrics(recording: None) -> None:
    held = value("tea_dist_limit_permits_held", limit="gpu")
    metrics.limit_waiting("gpu")
    assert value("tea_dist_limit_permits_waiting", limit="gpu") == 1
    metrics.limit_acquired("gpu", 0.2)
    assert value("tea_dist_limit_permits_waiting", limit="gpu") == 0
    assert value("tea_dist_limit_permits_held", limit="gpu") == held + 1
    assert value("tea_dist_limit_wait_seconds_sum", limit="gpu") >= 0.2
    metrics.limit_released("gpu")
    assert value("tea_dist_limit_permits_held", limit="gpu") == held


def test_i14_no_metrics_listener_when_metrics_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(metrics.PORT_ENV, raising=False)
    metrics.disable()
    assert not any(isinstance(x, metrics.MetricsListener) for x in Dispatcher().listeners)


def test_i14_caller_serves_metrics_on_tea_dist_metrics_port() -> None:
    port = free_port()
    script = textwrap.dedent(
        f"""
        import urllib.request
        from tests import nodes
        from tests.nodes import fan_graph
        list(fan_graph({{"a": nodes.add_one, "b": nodes.add_one}}, name="served").compile()
             .invoke({{}}))
        url = "http://127.0.0.1:{port}/metrics"
        print(urllib.request.urlopen(url, timeout=5).read().decode())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), metrics.PORT_ENV: str(port)}
    env.pop(metrics.MULTIPROC_ENV, None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert (
        'tea_dist_branches_total{branch="a",graph="served",outcome="success",strategy="thread"} 1.0'
        in out.stdout
    )


# -- a celery worker started with --metrics-port --


@pytest.fixture(scope="module")
def metrics_worker(cluster: Any) -> Iterator[tuple[int, str]]:
    from tea_dist.distributed.worker import settings_env, wait_ready

    port, queue = free_port(), f"tea.flows.{cluster.tag}-metrics"
    name = f"metrics-{cluster.tag}@%h"
    env = {**os.environ, **settings_env(cluster.settings()), "PYTHONPATH": str(ROOT)}
    env.pop(metrics.PORT_ENV, None)
    argv = ["worker", "--role", "flows", "--concurrency", "2", "--queues", queue, "--name", name]
    log = open(cluster.log_path("metrics"), "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tea_dist", *argv, "--metrics-port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(cluster.settings(), name, proc, 60)
        yield port, queue
    finally:
        stop_groups([proc], 15)
        cluster.log_path("metrics").unlink(missing_ok=True)


@pytest.mark.celery
def test_i14_celery_worker_metrics_count_every_branch(
    metrics_worker: tuple[int, str], recording: None
) -> None:
    port, queue = metrics_worker
    config = ParallelConfig(strategy="celery", queue=queue)
    branches: dict[str, Any] = {f"ok{i}": nodes.add_one for i in range(5)}
    branches["bad"] = nodes.fail
    caller_before = value(
        "tea_dist_branches_total",
        graph="celery-metered",
        branch="ok0",
        outcome="success",
        strategy="celery",
    )
    events = list(fan_graph(branches, config=config, name="celery-metered").compile().invoke({}))
    assert events[-1]["type"] == "final"

    found = scrape(port)
    counted = [s for s in found["tea_dist_branches_total"] if s.labels["graph"] == "celery-metered"]
    assert sum(s.value for s in counted) == 6
    by_outcome = {
        o: sum(s.value for s in counted if s.labels["outcome"] == o) for o in ("success", "error")
    }
    assert by_outcome == {"success": 5, "error": 1}
    buckets = [
        s
        for s in found["tea_dist_branch_duration_seconds_bucket"]
        if s.labels["graph"] == "celery-metered"
    ]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "1.0", "+Inf"}
    total = [
        s
        for s in found["tea_dist_branch_duration_seconds_count"]
        if s.labels["graph"] == "celery-metered"
    ]
    assert sum(s.value for s in total) == 6
    assert {s.labels["queue"] for s in found["tea_dist_queue_depth"]} == {queue}
    # the caller relayed the same branches and counted none of them again
    caller_after = value(
        "tea_dist_branches_total",
        graph="celery-metered",
        branch="ok0",
        outcome="success",
        strategy="celery",
    )
    assert caller_after == caller_before
