"""What a flow worker does on its own, whatever its caller or a message does: an orphaned
branch that ignores its interrupt is killed; a result JSON cannot carry fails once; an oversize
message is refused before it is decoded; a message that crashed its process twice is
quarantined. Real Redis, real worker processes (tests/cluster.py), never eager mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from tea_dist import ParallelConfig, RetryPolicy
from tests import celery_nodes as cn
from tests import guard_nodes as gn
from tests.cluster import ROOT
from tests.nodes import fan_graph, final_state

pytestmark = [pytest.mark.redis, pytest.mark.celery]


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def runs(tmp_path: Path, name: str) -> int:
    path = tmp_path / f"{name}.runs"
    return int(path.read_text()) if path.exists() else 0


def serves(queue: str | None = None) -> None:
    """The worker's pool still runs a branch."""
    config = ParallelConfig(strategy="celery", queue=queue, timeout_total=30)
    graph = fan_graph({"a": gn.quick}, config=config, fan_in=cn.collect, name="after")
    (result,) = final_state(list(graph.compile().invoke({"value": 0})))["results"]
    assert result["success"], result


# -- an orphan is stopped, not asked -----------------------------------------------------------


def heartbeats(cluster: Any) -> list[bytes]:
    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    return list(client.scan_iter(match=f"{settings.key_prefix}:fanout:*:hb:*", count=1000))


@pytest.mark.parametrize("kind", ["fan", "map"])
def test_i3a_orphan_ignoring_its_interrupt_is_killed(
    cluster: Any, tmp_path: Path, kind: str
) -> None:
    """SIGKILL the caller of a branch that swallows every exception: once the caller's lease
    lapses the worker interrupts it, and kills it a cancel grace later (a task of its own, or
    a batch item): its side effect, due 12 s after it started, never happens."""
    name = "a" if kind == "fan" else "item0"
    config = {"marker_dir": str(tmp_path), "hold": 12}
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT), "TEA_DIST_CALLER_LEASE": "2"}
    caller = subprocess.Popen(
        [sys.executable, "-m", "tests.guard_nodes", kind, json.dumps(config)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "caller.log", "wb"),
    )
    try:
        wait_for(
            lambda: (tmp_path / f"{name}.start").exists() or caller.poll() is not None,
            30,
            "the branch to start",
        )
        assert caller.poll() is None, (tmp_path / "caller.log").read_text()[-3000:]
        started = time.monotonic()
        caller.kill()
        caller.wait(10)
        wait_for(lambda: not heartbeats(cluster), 10, "the orphan to stop")
        stopped_after = time.monotonic() - started
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()
    time.sleep(max(0.0, 12.5 - (time.monotonic() - started)))
    assert not (tmp_path / f"{name}.done").exists(), "the orphan did its side effect"
    print(f"\norphan ({kind}) stopped {stopped_after:.1f}s after its caller was SIGKILLed")
    assert stopped_after < 8
    serves()


# -- a result that cannot be carried fails once -----------------------------------------------


@pytest.mark.parametrize(("value", "key"), [("set", "tags"), ("object", "handle")])
def test_i3a_result_json_cannot_carry_fails_once(
    cluster: Any, tmp_path: Path, value: str, key: str
) -> None:
    """A node returning a set or an object: the branch fails at once with a
    ``SerializationError`` naming the key and the branch; the node ran once (it was neither
    lost nor sent again, nor retried: another run would return the same)."""
    config = ParallelConfig(
        strategy="celery", retry_policy=RetryPolicy(max_retries=2, base_delay=0.01)
    )
    graph = fan_graph({"a": gn.uncarried}, config=config, fan_in=cn.collect, name="uncarried")
    started = time.monotonic()
    state = final_state(
        list(graph.compile().invoke({"value": 0}, {"marker_dir": str(tmp_path), "value": value}))
    )
    elapsed = time.monotonic() - started
    (result,) = state["results"]
    assert not result["success"] and result["error_type"] == "SerializationError", result
    assert f"'{key}'" in result["error"] and "branch 'a'" in result["error"], result["error"]
    assert runs(tmp_path, "a") == 1
    assert elapsed < 5, elapsed


def test_i3a_publisher_reports_a_result_it_cannot_serialise() -> None:
    """Whatever the attempt's check let through, a result the publisher cannot serialise
    still ends the branch: a failed ``SerializationError`` result goes out in its place."""
    from types import SimpleNamespace

    from tea_dist.core.results import ParallelFlowResult
    from tea_dist.distributed.messages import BranchEvent, BranchMessage
    from tea_dist.distributed.tasks import StreamPublisher
    from tea_dist.engine.lifecycle import AttemptState

    attempt = AttemptState(branch="a", dispatched_at=time.time())
    message = BranchMessage(
        run="r",
        graph_name="g",
        fanout="f",
        index=0,
        branch="a",
        fan_in="m",
        graph={},
        state={},
        run_config={},
        config=ParallelConfig(strategy="celery"),
        attempt=attempt,
    )
    publisher = StreamPublisher(message, SimpleNamespace(state=attempt), "t")  # type: ignore[arg-type]
    result = ParallelFlowResult(branch="a", success=True, state={"handle": object()})
    publisher.on_flow_complete(None, result)  # type: ignore[arg-type]
    (sent,) = [BranchEvent.model_validate_json(e).result for e in publisher.events]
    assert sent is not None and not sent.success and sent.error_type == "SerializationError"
    assert "branch 'a'" in (sent.error or "")


# -- workers enforce the size limit ------------------------------------------------------------


def forged_branch(tmp_path: Path, state: dict[str, Any]) -> Any:
    """A branch message as the driver builds it (node ``a`` marks its start in ``tmp_path``),
    with a live caller's lease; sent by ``send_forged``."""
    from tea_dist.distributed.messages import BranchMessage
    from tea_dist.engine.lifecycle import AttemptState
    from tests.test_security import one_node_graph

    graph = one_node_graph("tests.celery_nodes:start_sleep_done")
    return BranchMessage(
        run=uuid.uuid4().hex,
        graph_name="forged",
        fanout=uuid.uuid4().hex,
        index=0,
        branch="a",
        fan_in="merge",
        graph=graph,
        state=state,
        run_config={"marker_dir": str(tmp_path), "sleep": {"a": 0}},
        config=ParallelConfig(strategy="celery"),
        attempt=AttemptState(branch="a", dispatched_at=time.time()),
    )


def completed(cluster: Any, run: str) -> list[Any]:
    """The ``on_flow_complete`` events on the stream of ``run``."""
    from tea_dist.distributed.keys import Keys
    from tea_dist.distributed.messages import BranchEvent

    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    events = [
        BranchEvent.model_validate_json(fields[b"e"])
        for _id, fields in client.xrange(Keys(settings.key_prefix).events(run))
    ]
    return [e for e in events if e.event == "on_flow_complete" and e.result is not None]


def completions(cluster: Any, run: str) -> list[Any]:
    return [e.result for e in completed(cluster, run)]


def broker_holds(cluster: Any, queue: str, task_id: str) -> int:
    """How many copies of task ``task_id`` the broker holds, queued or delivered unacked."""
    client = redis.Redis.from_url(cluster.settings().broker)
    found = sum(task_id.encode() in entry for entry in client.lrange(queue, 0, -1))
    for _tag, entry in client.hscan_iter("unacked"):
        found += task_id.encode() in entry
    return found


def send_forged(cluster: Any, message: Any, queue: str) -> str:
    """Publish ``message`` straight to ``queue`` with the headers a genuine one carries."""
    from tests.cluster import current_app

    app = current_app()
    from tea_dist.distributed.keys import Keys

    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    client.set(Keys(settings.key_prefix).run_lease(message.run), 1, ex=60)  # a live caller
    task_id = f"{message.fanout}.0.0"
    headers = {
        "tea_run": message.run,
        "tea_fanout": message.fanout,
        "tea_index": message.index,
        "tea_branch": message.branch,
    }
    app.send_task(
        "tea_dist.run_flow",
        args=(message,),
        queue=queue,
        task_id=task_id,
        headers=headers,
        argsrepr="(forged)",
        ignore_result=True,
    )
    return task_id


def test_i3a_oversize_message_is_refused_unread(cluster: Any, tmp_path: Path) -> None:
    """A forged branch message with a 3 MB state (the limit is 1 MB) is not run: its run's
    stream gets one refusal naming the limit and the setting, and the broker keeps nothing of
    it (acknowledged, never delivered again)."""
    queue = cluster.env["TEA_DIST_FLOWS_QUEUE"]
    message = forged_branch(tmp_path, {"blob": "x" * 3_000_000})
    task_id = send_forged(cluster, message, queue)
    wait_for(lambda: completions(cluster, message.run), 30, "the refusal")
    time.sleep(1.5)  # nothing more comes: no redelivery, no second report
    (result,) = completions(cluster, message.run)
    assert not result.success and result.error_type == "StateTooLargeError", result
    assert "TEA_DIST_MAX_STATE_BYTES=1000000" in (result.error or ""), result.error
    assert not (tmp_path / "a.start").exists(), "the worker ran the oversize branch"
    assert broker_holds(cluster, queue, task_id) == 0
    serves()


# -- a message that crashed its process twice is quarantined ----------------------------------


@pytest.mark.parametrize("how", ["exit", "abort"])
def test_i3a_branch_crashing_its_process_is_quarantined(
    cluster: Any, tmp_path: Path, how: str
) -> None:
    """A node that kills its own pool process every time (``os._exit``, ``os.abort``): the
    third start of the branch is not run; the run ends promptly with that branch failed,
    naming the quarantine; the node ran twice (three times when the broker's redelivery of the
    crashed message and its driver's re-send start at once, both before a second crash was
    counted); the worker serves the next branch."""
    config = ParallelConfig(strategy="celery", timeout_total=60)
    graph = fan_graph({"a": gn.crash}, config=config, fan_in=cn.collect, name="crashing")
    run_id, run_config = uuid.uuid4().hex, {"marker_dir": str(tmp_path), "how": how}
    started = time.monotonic()
    state = final_state(list(graph.compile().invoke({"value": 0}, run_config, run_id=run_id)))
    elapsed = time.monotonic() - started
    (result,) = state["results"]
    print(f"\ncrashing branch ({how}) ended after {elapsed:.1f}s, {runs(tmp_path, 'a')} runs")
    assert not result["success"] and result["error_type"] == "QuarantinedError", result
    assert "crashed its worker process twice" in result["error"], result["error"]
    ran = runs(tmp_path, "a")
    assert 2 <= ran <= 3, ran
    assert elapsed < 15, elapsed
    time.sleep(1)  # nothing of it is delivered again
    (reported,) = [
        e for e in completed(cluster, run_id) if e.result.error_type == "QuarantinedError"
    ]
    queue = cluster.env["TEA_DIST_FLOWS_QUEUE"]
    assert broker_holds(cluster, queue, reported.fanout) == 0
    assert runs(tmp_path, "a") == ran  # and nothing ran after its quarantine
    serves()


def test_i3a_branch_crashing_once_still_completes(cluster: Any, tmp_path: Path) -> None:
    """A branch whose process died once (a lost worker, not a bad message) runs again and
    succeeds: the crash count does not blame it."""
    config = ParallelConfig(strategy="celery", timeout_total=60)
    graph = fan_graph({"a": gn.crash}, config=config, fan_in=cn.collect, name="crashed")
    run_config = {"marker_dir": str(tmp_path), "once": True}
    state = final_state(list(graph.compile().invoke({"value": 0}, run_config)))
    (result,) = state["results"]
    assert result["success"] and result["state"]["survived"] == 2, result
    assert runs(tmp_path, "a") == 2


def test_i3a_batch_item_crashing_its_process_is_quarantined(cluster: Any, tmp_path: Path) -> None:
    """The same for an item of a batched map (its batch is not redelivered; its driver sends
    the unfinished items again): the crashing item is quarantined at its third start, the
    other item succeeds."""
    from tests.nodes import map_graph

    config = ParallelConfig(strategy="celery", timeout_total=60)
    graph = map_graph(gn.crash_item, cn.collect, config=config, batch_size=2, name="crashmap")
    started = time.monotonic()
    state = final_state(
        list(graph.compile().invoke({"docs": [0, 1]}, {"marker_dir": str(tmp_path)}))
    )
    elapsed = time.monotonic() - started
    first, second = state["results"]
    print(f"\ncrashing item ended after {elapsed:.1f}s, {runs(tmp_path, 'item0')} runs")
    assert not first["success"] and first["error_type"] == "QuarantinedError", first
    assert second["success"], second
    assert 2 <= runs(tmp_path, "item0") <= 3  # 3: a re-send racing the second crash's count
    assert elapsed < 20, elapsed
