"""Correctness of the distributed path (issue: run only what is allowed, leak nothing, count
right), on real workers: signed messages, refused messages told to their caller, a crashed
child re-sent rather than timed out, retry history kept, the same breaker accounting on every
strategy, no branch state in logs or Flower, no key left without a TTL."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tea_dist import CircuitBreakerConfig, ParallelConfig, RetryPolicy
from tea_dist.distributed.signing import SignatureError
from tests import celery_nodes as cn
from tests import nodes
from tests.nodes import fan_graph, final_state

SECRET_MARKER = "tok-" + uuid.uuid4().hex  # a branch state value that must never leak


@pytest.fixture
def own_queue(cluster: Any) -> Any:
    """A worker of its own (for settings the session worker does not have)."""
    started: list[Any] = []

    def start(name: str, **overrides: str) -> str:
        queue = f"tea.{name}.{cluster.tag}"
        started.append(cluster.start_worker(name, concurrency=2, flows_queue=queue, **overrides))
        return queue

    yield start


@pytest.mark.celery
def test_i11_signed_messages_run_and_unsigned_ones_are_refused(
    cluster: Any, own_queue: Any
) -> None:
    from tests.cluster import configure

    queue = own_queue("signed", secret="worker-and-caller-share-this")
    graph = fan_graph({"a": cn.whoami}, config=ParallelConfig(strategy="celery", queue=queue))
    try:
        configure(cluster.settings().with_overrides(secret="worker-and-caller-share-this"))
        state = final_state(list(graph.compile().invoke({"value": 1})))
        assert state["results"][0]["success"]
        configure(cluster.settings().with_overrides(secret="another-secret"))  # a forger's
        forged = final_state(list(graph.compile().invoke({"value": 1})))["results"][0]
        configure(cluster.settings())  # no secret: unsigned
        unsigned = final_state(list(graph.compile().invoke({"value": 1})))["results"][0]
    finally:
        configure(cluster.settings())
    for result in (forged, unsigned):
        assert not result["success"] and result["error_type"] == SignatureError.__name__
    assert "unsigned" in unsigned["error"] or "no signature" in unsigned["error"]


@pytest.mark.celery
def test_i11_a_pickle_message_is_refused_and_its_caller_told(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tea_dist.distributed import tasks

    options = tasks.message_options
    # a caller misconfigured (or someone else) sends its branch messages as pickle
    monkeypatch.setattr(
        tasks, "message_options", lambda m, s: {**options(m, s), "serializer": "pickle"}
    )
    graph = fan_graph({"a": cn.whoami}, config=ParallelConfig(strategy="celery"))
    started = time.monotonic()
    result = final_state(list(graph.compile().invoke({"value": 1})))["results"][0]
    assert not result["success"] and "refused" in result["error"]
    assert result["error_type"] == "ContentDisallowed"
    assert time.monotonic() - started < 10  # told, not left waiting


@pytest.mark.celery
def test_i11_a_dead_worker_child_is_a_lost_attempt_never_a_timeout(
    cluster: Any, tmp_path: Path
) -> None:
    # A child that dies within about two heartbeats (1 s) of its hard time limit cannot be
    # told from one killed at it; these die at least 1.5 s before theirs (3.5 s).
    config = ParallelConfig(strategy="celery", timeout_seconds=3.0)
    graph = fan_graph({"dies": cn.die_once}, config=config, fan_in=cn.collect)
    for trial in range(3):
        markers = tmp_path / str(trial)
        markers.mkdir()
        run = {"marker_dir": str(markers), "before_death": 0.2 + 0.5 * trial}
        result = final_state(list(graph.compile().invoke({}, run)))["results"][0]
        assert result["success"], result
        assert not result["timeout"] and (markers / "dies.died").exists()


@pytest.mark.celery
def test_i11_hard_killed_then_retried_keeps_its_history(cluster: Any, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=1, base_delay=0.1, retry_on_timeout=True)
    config = ParallelConfig(strategy="celery", timeout_seconds=0.5, retry_policy=policy)
    graph = fan_graph({"stuck": cn.ignore_soft_limit}, config=config, fan_in=cn.collect)
    run = {"marker_dir": str(tmp_path), "sleep": {"stuck": 30}}
    result = final_state(list(graph.compile().invoke({}, run)))["results"][0]
    assert not result["success"] and result["timeout"]
    assert result["retry_count"] == 1
    assert [e["attempt"] for e in result["attempt_errors"]] == [1, 2]
    assert all(e["timeout"] for e in result["attempt_errors"])


def _fail_fast_graph(strategy: str, name: str) -> Any:
    breaker = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60)
    config = ParallelConfig(strategy=strategy, fail_fast=True, circuit_breaker=breaker)
    return fan_graph({"bad": nodes.fail, "slow": nodes.sleep_node}, config=config, name=name)


def test_i11_fail_fast_is_no_failure_of_the_stopped_siblings_circuit(strategy: str) -> None:
    name = f"ff-{strategy}-{uuid.uuid4().hex[:6]}"
    compiled = _fail_fast_graph(strategy, name).compile()
    events = list(compiled.invoke({"sleep": 3.0}))
    assert events[-1]["type"] == "error"
    states = compiled.get_circuit_states()
    assert states[f"{name}:bad"] == "open"
    assert states.get(f"{name}:slow", "closed") == "closed"


def test_i11_a_cancelled_run_is_no_failure_of_its_circuits(strategy: str) -> None:
    from tea_dist.engine.nodes import CancelToken

    breaker = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60)
    name = f"cx-{strategy}-{uuid.uuid4().hex[:6]}"
    graph = fan_graph(
        {"slow": nodes.sleep_node},
        config=ParallelConfig(strategy=strategy, circuit_breaker=breaker),
        name=name,
    )
    compiled = graph.compile()
    token = CancelToken()
    out: list[Any] = []
    import threading

    thread = threading.Thread(
        target=lambda: out.extend(compiled.invoke({"sleep": 5.0}, cancel_token=token))
    )
    thread.start()
    time.sleep(1.5)
    token.cancel()
    thread.join(15)
    assert compiled.get_circuit_states().get(f"{name}:slow", "closed") == "closed"


def test_i11_a_timed_out_attempt_is_a_failure_of_its_circuit(strategy: str) -> None:
    breaker = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60)
    name = f"to-{strategy}-{uuid.uuid4().hex[:6]}"
    graph = fan_graph(
        {"slow": nodes.sleep_node},
        config=ParallelConfig(strategy=strategy, timeout_seconds=0.5, circuit_breaker=breaker),
        name=name,
    )
    compiled = graph.compile()
    list(compiled.invoke({"sleep": 5.0}))
    assert compiled.get_circuit_states()[f"{name}:slow"] == "open"


@pytest.mark.celery
def test_i11_no_branch_state_in_worker_logs(cluster: Any, tmp_path: Path) -> None:
    state = {"secret_token": SECRET_MARKER}
    policy = RetryPolicy(max_retries=1, base_delay=0.1)
    config = ParallelConfig(strategy="celery", retry_policy=policy)
    graph = fan_graph({"echo": cn.echo_secret}, config=config, fan_in=cn.collect)
    for run in ({"fail_times": 1}, {"always_fail": True}, {}):  # retried, failed, succeeded
        markers = tmp_path / uuid.uuid4().hex[:6]
        markers.mkdir()
        final_state(list(graph.compile().invoke(state, {**run, "marker_dir": str(markers)})))
    time.sleep(0.5)
    logs = cluster.log_files()
    assert logs
    for log in logs:
        assert SECRET_MARKER not in log.read_text(errors="replace"), log.name


@pytest.mark.celery
def test_i11_every_key_a_run_makes_expires(cluster: Any) -> None:
    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    graph = fan_graph({"a": cn.whoami, "b": cn.whoami}, config=ParallelConfig(strategy="celery"))
    compiled = graph.compile()
    task_ids: list[str] = []
    for i in range(50):
        run_id = f"keys-{cluster.tag}-{i}"
        final_state(list(compiled.invoke({"value": i}, run_id=run_id)))
        stream = f"{settings.key_prefix}:run:{run_id}:events"
        for _id, fields in client.xrange(stream):
            if b"e" in fields:
                task_ids.append(json.loads(fields[b"e"])["task_id"])
    families = ("run", "runs", "fanout", "inbox", "queue", "limit", "limits")  # tea_dist's own
    forever = [
        key.decode()
        for family in families
        for key in client.scan_iter(match=f"{settings.key_prefix}:{family}*", count=1000)
        if client.ttl(key) == -1  # shared circuits (":circuit") persist by design: not listed
    ]
    assert forever == []
    stored = [t for t in set(task_ids) if client.exists(f"celery-task-meta-{t}")]
    assert stored == []  # branch results travel on the run's stream only
