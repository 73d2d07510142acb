"""Deploys never cancel work: a rolling upgrade performed while submitted runs are in flight.

The deployment is the README's: two flow workers and two run workers, each a real
``tea-dist worker`` process (``--role flows`` / ``--role runs``) on a private queue pair and key
prefix. The test restarts each worker in turn the way the README's rolling-upgrade procedure
does (SIGTERM to the worker's main process, wait for it to exit, start it again, wait until it
answers a ping) while 20 submitted runs, each with four celery branches of 0.5-2 s, are in
flight. Every node counts its executions in Redis, so the test sees what ran twice.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from tea_dist import ParallelConfig, StateGraph, WorkflowRun, submit
from tea_dist.distributed.settings import Settings
from tests.cluster import ROOT, TestCluster

pytestmark = [pytest.mark.redis, pytest.mark.celery]

BRANCHES = ("w0", "w1", "w2", "w3")
RUNS = 20
SHUTDOWN_GRACE = 30.0  # what the README asks of a deploy's termination grace period


# -- the graph: prepare -> four celery branches of 0.5-2 s -> gather -> END --


def _count(config: dict[str, Any], run: int, node: str) -> None:
    client = redis.Redis.from_url(config["redis"])
    client.hincrby(config["counter"], f"{run}:{node}", 1)
    client.expire(config["counter"], 600)


def prepare(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    _count(config, state["run"], "prepare")
    return {"prepared": True}


def work(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    _count(config, state["run"], node)
    time.sleep(float(state["sleep"][node]))
    return {f"{node}_pid": os.getpid()}


def gather(state: dict[str, Any], config: dict[str, Any], parallel_results: Any) -> dict[str, Any]:
    _count(config, state["run"], "gather")
    return {
        "branches": [r.branch for r in parallel_results],
        "ok": [r.success for r in parallel_results],
        "errors": [r.error_type for r in parallel_results],
    }


def rolling() -> StateGraph:
    g = StateGraph({}, name="rolling", parallel_config=ParallelConfig(strategy="celery"))
    g.add_node("prepare", run=prepare)
    g.add_fanin_node("gather", run=gather)
    for branch in BRANCHES:
        g.add_node(branch, run=work)
        g.add_parallel_edge("prepare", branch, "gather")
        g.add_edge(branch, "gather")
    g.set_entry_point("prepare")
    g.set_finish_point("gather")
    return g


# -- the deployment --


@dataclass
class Deployment:
    """``tea-dist worker`` processes by name (``flows-a``, ``runs-a``, ...), restartable."""

    cluster: TestCluster
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    restarts: list[dict[str, float]] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return self.cluster.settings()

    def node(self, name: str) -> str:
        return f"{name}-{self.cluster.tag}@%h"

    def log(self, name: str) -> Any:
        return self.cluster.log_path(name)

    def launch(self, name: str) -> subprocess.Popen[bytes]:
        """``tea-dist worker --role ROLE --name NAME`` (it execs into the Celery worker)."""
        from tea_dist.distributed.children import die_with_parent
        from tea_dist.distributed.worker import settings_env

        role = name.split("-")[0]
        argv = ["worker", "--role", role, "--concurrency", "2" if role == "flows" else "8"]
        env = {**os.environ, **settings_env(self.settings), "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tea_dist", *argv, "--name", self.node(name)],
            env=env,
            stdout=open(self.log(name), "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.procs[name] = proc
        return proc

    def wait_ready(self, name: str) -> None:
        from tea_dist.distributed.worker import wait_ready

        wait_ready(self.settings, self.node(name), self.procs[name], 60, self.log(name))

    def restart(self, name: str) -> dict[str, float]:
        """The README's procedure for one worker: SIGTERM its main process, wait until it has
        exited (warm shutdown), start it again, wait until it answers a ping."""
        proc = self.procs[name]
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(SHUTDOWN_GRACE)
        exited = time.monotonic()
        with contextlib.suppress(ProcessLookupError):  # nothing of it may be left
            os.killpg(proc.pid, signal.SIGKILL)
        self.launch(name)
        self.wait_ready(name)
        figures = {"stop": exited - began, "start": time.monotonic() - exited, "code": code}
        self.restarts.append(figures)
        return figures

    def stop(self) -> None:
        from tea_dist.distributed.children import stop_groups

        stop_groups(list(self.procs.values()), 10)
        for name in self.procs:
            self.log(name).unlink(missing_ok=True)


@contextlib.contextmanager
def deployed(redis_url: str, names: tuple[str, ...]) -> Iterator[Deployment]:
    """The workers ``names`` started (all at once) and ready; everything gone afterwards."""
    from tests.cluster import cluster_for

    test_cluster = TestCluster(redis_url)
    deployed = Deployment(test_cluster)
    try:
        with cluster_for(test_cluster.settings()).as_default():
            for name in names:
                deployed.launch(name)
            for name in names:
                deployed.wait_ready(name)
            yield deployed
    finally:
        deployed.stop()
        client = redis.Redis.from_url(redis_url)
        for pattern in (f"{test_cluster.env['TEA_DIST_KEY_PREFIX']}*", f"*{test_cluster.tag}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)


@pytest.fixture
def deployment(redis_url: str) -> Iterator[Deployment]:
    """The README's deployment: two flow workers and two run workers."""
    with deployed(redis_url, ("flows-a", "flows-b", "runs-a", "runs-b")) as running:
        yield running


def test_i3a_a_stopping_flow_worker_gives_back_the_messages_it_holds(redis_url: str) -> None:
    """Messages a flow worker took but has not started (a retry waiting for its countdown, or
    anything prefetched) go back to the queue when it is stopped with SIGTERM (late ack), at
    once, not after the broker's visibility timeout."""
    from tests.cluster import current_app

    with deployed(redis_url, ("flows-a",)) as running:
        app = current_app()  # the deployment's
        queue = running.settings.flows_queue
        client = redis.Redis.from_url(running.cluster.redis_url)
        for _ in range(3):  # never run: the worker is stopped first; nobody consumes them after
            app.send_task("tea_dist.run_flow", args=[], countdown=120, queue=queue)
        deadline = time.monotonic() + 10
        while client.llen(queue):  # taken by the worker, held unstarted
            assert time.monotonic() < deadline, "the worker did not take the messages"
            time.sleep(0.05)
        proc = running.procs["flows-a"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SHUTDOWN_GRACE) == 0
        assert client.llen(queue) == 3, "messages held by the stopped worker were not given back"


def test_i3a_a_rolling_upgrade_loses_cancels_and_repeats_no_branch(
    deployment: Deployment,
) -> None:
    """Every worker of the deployment restarted in turn while 20 runs are in flight: every run
    succeeds with all four branches successful, each branch ran exactly once, and runs whose
    run worker restarted were handed over (their main-path nodes at most twice)."""
    prefix = deployment.settings.key_prefix
    counter = f"{prefix}:rolling-counts"
    config = {"redis": deployment.cluster.redis_url, "counter": counter}
    rng = random.Random(3)
    began = time.monotonic()
    runs = [
        submit(
            "tests.test_i3a_deploy:rolling",
            {"run": i, "sleep": {b: round(rng.uniform(0.5, 2.0), 2) for b in BRANCHES}},
            config,
        )
        for i in range(RUNS)
    ]
    client = redis.Redis.from_url(deployment.cluster.redis_url)

    def in_flight() -> int:
        return sum(1 for r in runs if r.status() in ("pending", "running"))

    def started() -> int:
        return sum(1 for k in client.hkeys(counter) if k.decode().endswith(":w0"))

    deadline = time.monotonic() + 30
    while started() < 4:  # branches of several runs are running
        assert time.monotonic() < deadline, "no run started its branches"
        time.sleep(0.1)
    busy_at_restart = []
    for name in ("flows-a", "runs-a", "flows-b", "runs-b"):
        busy_at_restart.append(in_flight())
        figures = deployment.restart(name)
        assert figures["code"] == 0, f"{name} exited with {figures['code']} on SIGTERM"
    finished = {r.run_id: r.result(timeout=90) for r in runs}
    took = time.monotonic() - began

    counts = {k.decode(): int(v) for k, v in client.hgetall(counter).items()}
    failures = []
    for i, run in enumerate(runs):
        state = finished[run.run_id]
        if state["ok"] != [True] * len(BRANCHES) or any(state["errors"]):
            failures.append((i, state["errors"]))
    assert not failures, f"branches failed or were cancelled: {failures}"
    twice = {k: n for k, n in counts.items() if n > 1 and k.split(":")[1] in BRANCHES}
    assert not twice, f"branches ran more than once: {twice}"
    assert all(counts[f"{i}:{b}"] == 1 for i in range(RUNS) for b in BRANCHES)
    main_path = {k: n for k, n in counts.items() if k.split(":")[1] in ("prepare", "gather")}
    assert all(1 <= n <= 2 for n in main_path.values()), main_path  # at least once, documented
    handed_over = sum(1 for r in runs if r.handovers())
    assert all(n > 0 for n in busy_at_restart), busy_at_restart  # every restart hit live runs
    assert handed_over > 0, "no run worker restart handed a run over"
    restarts = deployment.restarts
    print(
        f"\nrolling upgrade: {RUNS} runs, {len(restarts)} restarts, "
        f"{sum(1 for r in runs if WorkflowRun(r.run_id).status() == 'succeeded')} succeeded, "
        f"{sum(counts[f'{i}:{b}'] for i in range(RUNS) for b in BRANCHES)} branch executions "
        f"for {RUNS * len(BRANCHES)} branches, {handed_over} runs handed over, "
        f"main-path nodes run twice: {sum(1 for n in main_path.values() if n > 1)}, "
        f"in flight at each restart: {busy_at_restart}, "
        f"stop (s): {[round(r['stop'], 1) for r in restarts]}, "
        f"start (s): {[round(r['start'], 1) for r in restarts]}, total {took:.1f} s"
    )
    assert took < 90
