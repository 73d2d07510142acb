"""Enqueueing whole workflows: submit, WorkflowRun, run workers (real Redis, real workers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import WorkflowRun, submit
from tea_dist.core.errors import (
    GraphError,
    RunCancelledError,
    RunFailedError,
    SerializationError,
    TeaDistError,
)
from tea_dist.distributed.apps import RunStatus

pytestmark = [pytest.mark.redis, pytest.mark.celery]
ROOT = Path(__file__).resolve().parent.parent


def watch_statuses(run: WorkflowRun, timeout: float = 30) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run.status()
        if not seen or seen[-1] != status:
            seen.append(str(status))
        if status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"run still {seen[-1]} after {timeout}s")


def test_submit_status_moves_pending_running_succeeded(cluster: Any, tmp_path: Path) -> None:
    run = submit(
        "tests.apps_graphs:two_branches",
        {"value": 1},
        {"marker_dir": str(tmp_path), "sleep": {"a": 0.5, "b": 0.5}},
    )
    seen = watch_statuses(run)
    assert seen[-1] == "succeeded"
    assert "running" in seen
    assert seen[0] in ("pending", "running") and seen.index("running") < seen.index("succeeded")
    state = run.result(timeout=5)
    assert state["branches"] == ["a", "b"] and state["ok"] == [True, True]


def test_submit_from_one_process_result_from_another(cluster: Any) -> None:
    run = submit("tests.apps_graphs:quick", {"value": 2})
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT)}
    code = (
        "import json, sys\n"
        "from tea_dist import WorkflowRun\n"
        "print(json.dumps(WorkflowRun(sys.argv[1]).result(timeout=30)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, run.run_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert '"total": 6' in out.stdout


def test_events_replay_from_the_start(cluster: Any) -> None:
    run = submit("tests.apps_graphs:quick", {"value": 0})
    run.result(timeout=30)
    events = list(WorkflowRun(run.run_id).events())
    graph = [e["type"] for e in events if e["type"] != "branch"]
    assert graph[0] == "state" and graph[-1] == "final"
    branch = [(e["branch"], e["event"]) for e in events if e["type"] == "branch"]
    assert ("a", "on_flow_start") in branch and ("b", "on_flow_complete") in branch


def test_cancel_stops_running_branches(cluster: Any, tmp_path: Path) -> None:
    run = submit(
        "tests.apps_graphs:two_branches",
        {},
        {"marker_dir": str(tmp_path), "sleep": {"a": 3, "b": 3}},
    )
    deadline = time.monotonic() + 20
    while not any(e.get("event") == "on_flow_start" for e in run.events()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    run.cancel()
    with pytest.raises(RunCancelledError):
        run.result(timeout=20)
    assert run.status() == "cancelled"
    time.sleep(3.5)
    assert not list(tmp_path.glob("*.done"))  # the branches' side effects never happened


def test_cancel_pending_run_never_starts(cluster: Any, tmp_path: Path) -> None:
    run = submit(
        "tests.apps_graphs:two_branches",
        {},
        {"marker_dir": str(tmp_path), "sleep": {"a": 0.1, "b": 0.1}},
    )
    run.cancel()
    with pytest.raises(RunCancelledError):
        run.result(timeout=10)
    time.sleep(1)
    assert not list(tmp_path.glob("*.done"))


def test_failed_run_result_raises_with_reason(cluster: Any) -> None:
    run = submit("tests.apps_graphs:failing", {})
    with pytest.raises(RunFailedError, match="ValueError: remote boom"):
        run.result(timeout=30)
    assert run.status() == "failed"


def test_submit_rejects_bad_input_before_sending(cluster: Any) -> None:
    with pytest.raises(GraphError, match=r"cannot import 'tests\.nope:graph': ModuleNotFoundError"):
        submit("tests.nope:graph", {})
    with pytest.raises(SerializationError, match="state key 'f' of the run input"):
        submit("tests.apps_graphs:quick", {"f": object()})


# -- item 9: status changes are atomic; Redis errors are BrokerError -------------------------


def test_item9_a_cancel_landing_after_the_work_never_marks_a_succeeded_run_cancelled(
    cluster: Any, tmp_path: Path
) -> None:
    """Deterministic interleaving: the run's only node finishes its work, then waits until the
    run worker has seen the cancel; the run then ends with its final event. It succeeded."""
    run = submit("tests.ops_nodes:cancelled_at_the_end", {}, {"marker_dir": str(tmp_path)})
    deadline = time.monotonic() + 30
    while not (tmp_path / "work.done").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    # the run is still running: the cancel is requested, but the run ends succeeded, and
    # cancel() says so (it said True here before, for a run that then succeeded)
    assert run.cancel() is False
    assert run.result(timeout=30) == {"saw_cancel": True}  # the node saw the cancel land
    assert run.status() == "succeeded"
    assert not run.client.exists(run.keys.run_cancelled(run.run_id))  # the flag went too


def test_item9_cancel_of_a_finished_run_writes_nothing(cluster: Any) -> None:
    run = submit("tests.apps_graphs:quick", {"value": 1})
    run.result(timeout=30)
    assert run.cancel() is False
    assert run.status() == "succeeded"
    assert not run.client.exists(run.keys.run_cancelled(run.run_id))
    unknown = WorkflowRun("no-such-run")
    with pytest.raises(TeaDistError, match="no run 'no-such-run'"):
        unknown.cancel()
    assert not unknown.client.exists(unknown.keys.run_cancelled("no-such-run"))


def test_item9_redis_errors_are_broker_errors_naming_the_redacted_url(cluster: Any) -> None:
    from tea_dist.core.errors import BrokerError
    from tea_dist.distributed.local_cluster import free_port
    from tests.cluster import configure, current_settings

    settings = current_settings()
    dead = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    configure(settings.with_overrides(broker_url=dead, result_backend=dead, redis_url=dead))
    try:
        for call in (
            lambda: WorkflowRun("some-run").status(),
            lambda: WorkflowRun("some-run").cancel(),
            lambda: list(WorkflowRun("some-run").events()),
            lambda: submit("tests.apps_graphs:quick", {"value": 1}),
        ):
            with pytest.raises(BrokerError) as caught:
                call()
            assert dead.replace("s3cret", "***") in str(caught.value)
            assert "s3cret" not in str(caught.value)
    finally:
        configure(settings)
