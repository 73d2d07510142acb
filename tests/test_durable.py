"""Issue 13: durable runs, a submitted run survives the death of the run worker driving it.

Real run workers (thread pool) are killed with SIGKILL of their process group, or stopped with
SIGTERM, while the celery branches of a run's fan-out run on the session's real flow worker.
Every node counts its executions in Redis (``tests.durable_graphs``), so each test sees which
ran twice; branches hold until the test releases them, so no kill races a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from typer.testing import CliRunner

from tea_dist import WorkflowRun, submit
from tea_dist.core.errors import GraphError, RunCancelledError, RunFailedError
from tea_dist.distributed import durable
from tea_dist.engine.runtime import Detached, Durable
from tea_dist.interfaces.cli import app as cli
from tests import nodes
from tests.cluster import ROOT
from tests.nodes import fan_graph

pytestmark = [pytest.mark.redis, pytest.mark.celery]
GRAPH = "tests.durable_graphs:held_fanout"


# -- helpers --


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


class Counts:
    """The executions of every node of a run, counted in Redis by the nodes themselves."""

    def __init__(self, cluster: Any) -> None:
        self.client = redis.Redis.from_url(cluster.redis_url)
        self.prefix = f"{cluster.env['TEA_DIST_KEY_PREFIX']}:count:{uuid.uuid4().hex[:8]}"
        self.config = {"redis": cluster.redis_url, "counter": self.prefix}

    def __getitem__(self, node: str) -> int:
        return int(self.client.get(f"{self.prefix}:{node}") or 0)

    def release(self) -> None:
        self.client.set(f"{self.prefix}:release", 1)


class Statuses:
    """Every status a run shows, polled on a thread until the run ends."""

    def __init__(self, run: WorkflowRun) -> None:
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._poll, args=(run,), daemon=True)
        self.thread.start()

    def _poll(self, run: WorkflowRun) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            status = str(run.status())
            if not self.seen or self.seen[-1] != status:
                self.seen.append(status)
            if status in ("succeeded", "failed", "cancelled"):
                return
            time.sleep(0.02)


@contextlib.contextmanager
def submitting_to(queue: str) -> Iterator[None]:
    """``submit()`` sends runs to ``queue`` inside the block."""
    from tests.cluster import configure, current_settings

    settings = current_settings()
    configure(settings.with_overrides(runs_queue=queue))
    try:
        yield
    finally:
        configure(settings)


def owner_pid(run: WorkflowRun) -> int:
    return int(run._record()["worker"].rsplit("/", 1)[1])


def resumed_events(run: WorkflowRun) -> list[dict[str, Any]]:
    return [e for e in run.events() if e["type"] == "resumed"]


def resumed_by(run: WorkflowRun, pid: int) -> dict[str, Any] | None:
    return next((e for e in resumed_events(run) if e["worker"].endswith(f"/{pid}")), None)


def run_worker(cluster: Any, name: str, queue: str, **overrides: str) -> subprocess.Popen[bytes]:
    return cluster.start_worker(name, concurrency=2, role="runs", runs_queue=queue, **overrides)


# -- the run survives its run worker --


def test_i13_run_survives_three_sigkills_of_its_run_worker(cluster: Any) -> None:
    """Done when: SIGKILL of the run worker's process group while the fan-out's branches run,
    three times in a row, a fresh run worker each time: the run succeeds, each branch ran
    exactly once, the final state is right, and status() never left ``running``."""
    queue = f"tea.runs.durable3.{cluster.tag}"
    counts = Counts(cluster)
    # a fresh worker process can take many seconds to start on a loaded machine: the caller
    # lease (the branches' fate-sharing) must outlast a kill plus a start, not just a hand-over
    lease = "40"
    worker = run_worker(cluster, "dur-0", queue, caller_lease=lease)
    with submitting_to(queue):
        run = submit(GRAPH, {"value": 1}, counts.config)
    statuses = Statuses(run)
    wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
    for i in range(1, 4):
        assert owner_pid(run) == worker.pid
        cluster.kill(worker)
        worker = run_worker(cluster, f"dur-{i}", queue, caller_lease=lease)
        wait_for(lambda pid=worker.pid: resumed_by(run, pid), 30, f"hand-over {i}")
        assert (counts["a"], counts["b"]) == (1, 1), "a branch was sent again"
    counts.release()
    state = run.result(timeout=60)

    assert state["branches"] == ["a", "b"] and state["ok"] == [True, True]
    assert state["values"] == [20, 20] and state["finished"] is True
    assert {n: counts[n] for n in ("prepare", "a", "b", "gather", "finish")} == {
        "prepare": 1,
        "a": 1,
        "b": 1,
        "gather": 1,
        "finish": 1,
    }
    statuses.thread.join(5)
    assert statuses.seen[-1] == "succeeded" and "failed" not in statuses.seen
    assert statuses.seen[statuses.seen.index("running") :] == ["running", "succeeded"]
    assert run.handovers() == 3
    assert "crashes" not in run._record()  # killed while the run waited on its branches
    resumed = resumed_events(run)
    assert [e["handovers"] for e in resumed] == [1, 2, 3]
    assert all(e["after"] == "prepare" for e in resumed)  # the checkpoint: prepare was done
    out = CliRunner().invoke(cli, ["status", run.run_id])
    assert out.exit_code == 0 and out.stdout.strip() == "succeeded\thandovers=3"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def metered_run_worker(cluster: Any, queue: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``tea-dist worker --role runs --metrics-port PORT`` on ``queue``."""
    from tea_dist.distributed.worker import settings_env, wait_ready

    name = f"dur-metered-{cluster.tag}@%h"
    settings = cluster.settings().with_overrides(runs_queue=queue)
    env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
    argv = ["worker", "--role", "runs", "--concurrency", "2", "--name", name]
    log = cluster.log_path("dur-metered")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tea_dist", *argv, "--metrics-port", str(port)],
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_ready(settings, name, proc, 60)
        yield proc
    finally:
        cluster.kill(proc, signal.SIGTERM)
        log.unlink(missing_ok=True)


def test_i13_another_run_worker_takes_over_within_seconds_and_counts_it(cluster: Any) -> None:
    from tests.test_metrics import scrape

    queue = f"tea.runs.standby.{cluster.tag}"
    counts = Counts(cluster)
    victim = run_worker(cluster, "dur-victim", queue)  # default leases: caller 10 s
    with submitting_to(queue):
        run = submit(GRAPH, {"value": 2}, counts.config)
    wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
    port = _free_port()
    with metered_run_worker(cluster, queue, port):
        cluster.kill(victim)
        killed = time.time()
        event = wait_for(lambda: resumed_events(run), 15, "the standby to take over")[0]
        took = event["at"] - killed
        assert event["previous"].endswith(f"/{victim.pid}")
        counts.release()
        state = run.result(timeout=30)
        samples = scrape(port)["tea_dist_runs_resumed_total"]
    assert took < 5, f"taken over {took:.1f}s after the kill"  # a 2 s lease, looked at twice a s
    assert state["values"] == [30, 30]
    assert (counts["a"], counts["b"], counts["prepare"]) == (1, 1, 1)
    assert [s.value for s in samples if s.labels["graph"] == "durable"] == [1.0]


def test_i13_sigterm_hands_runs_over_at_once(cluster: Any) -> None:
    """A deploy stops a run worker with SIGTERM: its run is taken over at once, not after its
    lease lapses (10 s here), and the worker exits without waiting for the run's branches."""
    queue = f"tea.runs.deploy.{cluster.tag}"
    counts = Counts(cluster)
    slow_lease = {"heartbeat_ttl": "10", "caller_lease": "30"}
    old = run_worker(cluster, "dur-old", queue, **slow_lease)
    with submitting_to(queue):
        run = submit(GRAPH, {"value": 3}, counts.config)
    wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
    new = run_worker(cluster, "dur-new", queue, **slow_lease)
    os.killpg(old.pid, signal.SIGTERM)
    stopped = time.time()
    old.wait(10)  # a warm shutdown that did not wait for the run
    event = wait_for(lambda: resumed_by(run, new.pid), 15, "the new worker to take over")
    assert event["at"] - stopped < 4, "handed over only when the lease lapsed"
    assert run.status() == "running"
    counts.release()
    assert run.result(timeout=30)["values"] == [40, 40]
    assert (counts["a"], counts["b"], counts["prepare"]) == (1, 1, 1)


def test_i16_a_batched_map_survives_its_run_worker_being_replaced(cluster: Any) -> None:
    """A deploy replaces the run worker while two batches of a map run: the new one adopts
    every item (sent in batches it did not send) and none runs twice."""
    queue = f"tea.runs.batched.{cluster.tag}"
    counts = Counts(cluster)
    slow_lease = {"heartbeat_ttl": "10", "caller_lease": "30"}
    old = run_worker(cluster, "dur-map-old", queue, **slow_lease)
    with submitting_to(queue):
        run = submit(
            "tests.durable_graphs:held_batched_map", {"items": [1, 2, 3, 4, 5, 6]}, counts.config
        )
    wait_for(lambda: counts["item-0"] and counts["item-3"], 30, "both batches to start")
    new = run_worker(cluster, "dur-map-new", queue, **slow_lease)
    os.killpg(old.pid, signal.SIGTERM)
    old.wait(10)
    wait_for(lambda: resumed_by(run, new.pid), 15, "the new worker to take over")
    counts.release()
    state = run.result(timeout=60)
    assert state["branches"] == [f"work[{i}]" for i in range(6)]
    assert state["ok"] == [True] * 6
    assert [counts[f"item-{i}"] for i in range(6)] == [1] * 6


@pytest.mark.parametrize("standby", [False, True], ids=["no-run-worker-left", "standby"])
def test_i13_cancel_works_while_the_run_is_handed_over(
    cluster: Any, tmp_path: Path, standby: bool
) -> None:
    """Cancelled between two drivers: with no run worker left, the run ends cancelled once the
    dead driver's lease lapses; with a standby, whichever comes first (that, or the standby
    taking the run over and stopping it). Either way its branches never finish their work."""
    queue = f"tea.runs.cancel{int(standby)}.{cluster.tag}"
    counts = Counts(cluster)
    victim = run_worker(cluster, f"dur-cancel{int(standby)}", queue)
    with submitting_to(queue):
        run = submit(GRAPH, {"value": 4}, {**counts.config, "marker_dir": str(tmp_path)})
    wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
    if standby:
        run_worker(cluster, "dur-cancel-standby", queue)
    cluster.kill(victim)
    run.cancel()
    with pytest.raises(RunCancelledError):  # once its lease lapsed (2 s): no driver to wait for
        run.result(timeout=5)
    time.sleep(3)  # the branches are stopped (their caller's lease went with the cancel)
    counts.release()
    time.sleep(1)
    assert not list(tmp_path.glob("*.done")), "a branch of the cancelled run did its side effect"
    assert (counts["a"], counts["b"]) == (1, 1)
    if not standby:
        run_worker(cluster, "dur-cancel-late", queue)  # a run worker arrives: it leaves it alone
        time.sleep(3)
        assert not resumed_events(run) and run.handovers() == 0
    assert run.status() == "cancelled"


# -- a run that kills its run worker --


def crash_worker(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A main-path node that kills the process driving it (counted first)."""
    client = redis.Redis.from_url(config["redis"])
    client.incr(f"{config['counter']}:crash")
    client.expire(f"{config['counter']}:crash", 600)
    os._exit(3)


def poison() -> Any:
    """prepare -> crash (kills its run worker) -> END."""
    from tea_dist import StateGraph
    from tests import durable_graphs

    g = StateGraph({}, name="poison")
    g.add_node("prepare", run=durable_graphs.prepare)
    g.add_node("crash", run=crash_worker)
    g.add_edge("prepare", "crash")
    g.set_entry_point("prepare")
    g.set_finish_point("crash")
    return g


def test_i3a_a_run_that_crashes_its_run_worker_twice_is_quarantined(cluster: Any) -> None:
    """A node that kills its run worker's process is handed over once (the crash may have been
    anything), then the run fails as quarantined: the third run worker lives on, the node ran
    twice, and nobody resumes the run afterwards."""
    queue = f"tea.runs.poison.{cluster.tag}"
    counts = Counts(cluster)
    workers = [run_worker(cluster, f"dur-poison-{i}", queue) for i in range(3)]
    with submitting_to(queue):
        run = submit("tests.test_durable:poison", {"value": 1}, counts.config)
    wait_for(lambda: run.status() == "failed", 30, "the run to be quarantined")
    error = run._record()["error"]
    assert error.startswith("quarantined: it crashed its run worker twice"), error
    assert "after node 'prepare'" in error and "not resumed again" in error
    with pytest.raises(RunFailedError, match="quarantined"):
        run.result(timeout=1)
    assert counts["crash"] == 2 and counts["prepare"] == 1
    time.sleep(3)  # a lease period and more: nobody takes it over again
    assert counts["crash"] == 2 and run.status() == "failed" and run.handovers() == 1
    dead = [w for w in workers if w.poll() is not None]
    assert len(dead) == 2 and all(w.returncode == 3 for w in dead)


# -- one owner at a time --


def test_i13_a_stale_driver_is_fenced_out(cluster: Any) -> None:
    """Two drivers never write for one run: the one whose lease was taken over has every write
    refused (``Detached``), its outcome is not recorded, and the new owner's is."""
    run = WorkflowRun(uuid.uuid4().hex)
    queue = f"tea.runs.fence.{cluster.tag}"
    run.client.hset(run.key, mapping={"status": "pending", "graph": "g", "queue": queue})
    first = durable.claim(run.cluster, run.run_id, queue, "start")
    assert first is not None and durable.claim(run.cluster, run.run_id, queue, "start") is None
    first.append([{"event": "graph", "data": json.dumps({"type": "state"})}], steps=1)
    assert durable.claim(run.cluster, run.run_id, queue, "resume") is None  # its lease is alive
    run.client.delete(run.keys.run_owner(run.run_id))  # it stalls: its lease lapses
    second = durable.claim(run.cluster, run.run_id, queue, "resume")
    assert second is not None and second.previous == first.worker

    with pytest.raises(Detached):
        first.append([{"event": "graph", "data": json.dumps({"type": "final"})}])
    assert not first.finish({"status": "succeeded", "result": "{}"})
    assert run.status() == "running" and run.handovers() == 1
    second.append([{"event": "graph", "data": json.dumps({"type": "final"})}])
    assert second.finish({"status": "succeeded", "result": "{}"})
    assert run.status() == "succeeded"
    assert [e["type"] for e in run.events()] == ["state", "final"]
    assert durable.claim(run.cluster, run.run_id, queue, "resume") is None  # over: nobody takes it


def test_i13_a_run_worker_that_wakes_up_after_the_hand_over_stops(cluster: Any) -> None:
    """A run worker frozen (SIGSTOP) long enough to lose its lease, then thawed: the run worker
    that took the run over drives it to its end, the thawed one stops at once (its writes are
    refused), so no branch and no node after the fan-out runs twice."""
    queue = f"tea.runs.frozen.{cluster.tag}"
    counts = Counts(cluster)
    frozen = run_worker(cluster, "dur-frozen", queue, caller_lease="30")
    with submitting_to(queue):
        run = submit(GRAPH, {"value": 5}, counts.config)
    wait_for(lambda: counts["a"] and counts["b"], 30, "both branches to start")
    standby = run_worker(cluster, "dur-awake", queue, caller_lease="30")
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: resumed_by(run, standby.pid), 15, "the standby to take over")
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    time.sleep(1.5)  # the thawed driver renews its lease once: refused, it stops
    counts.release()
    assert run.result(timeout=30)["values"] == [60, 60]
    time.sleep(1)
    assert {n: counts[n] for n in ("a", "b", "gather", "finish")} == {
        "a": 1,
        "b": 1,
        "gather": 1,
        "finish": 1,
    }
    finals = [e for e in run.events() if e["type"] == "final"]
    assert len(finals) == 1 and run.handovers() == 1
    assert frozen.poll() is None  # alive and well: it only stopped driving that run


# -- resuming a walk (no Redis) --


class _Owner:
    def check(self) -> None:
        pass

    def append(self, entries: Any) -> None:
        pass


def test_i13_resumed_walk_starts_after_the_checkpoint_node() -> None:
    """The main path goes on after the last completed node with the state it left; nodes before
    it do not run again; the fan-out after it and the fan-in run (a thread fan-out: again)."""
    compiled = fan_graph({"a": nodes.add_one, "b": nodes.add_one}, name="resumable").compile()
    resumed = Durable(_Owner(), after="start", steps=1)
    events = list(compiled.stream({"value": 10}, durable=resumed))
    assert [e["type"] for e in events] == ["parallel_state", "parallel_state", "state", "final"]
    final = events[-1]["state"]
    assert "started" not in final  # the entry node did not run again
    assert final["branches"] == ["a", "b"] and final["total"] == 22
    # resumed after the fan-in, the last node: only the end of the run is left
    after_merge = list(compiled.stream({"value": 7}, durable=Durable(_Owner(), "merge", 2)))
    assert after_merge == [{"type": "final", "state": {"value": 7}}]
    with pytest.raises(GraphError, match="after node 'gone': no such node"):
        list(compiled.stream({}, durable=Durable(_Owner(), "gone", 1)))
