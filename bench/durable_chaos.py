"""Durable runs under chaos: submitted runs while run workers are SIGKILLed at random.

``--runs`` (100) runs are submitted at once. Each is ``prepare -> 3 celery branches (each
holding ~``--branch-seconds``) -> gather -> finish``, every node counting its executions in
Redis. ``--run-workers`` (3) run workers (thread pool, ``-c 8``) drive them; one prefork flow
worker (``-c --flow-slots``) runs the branches. Every ``--every`` seconds (jittered ±50%) a
random run worker is SIGKILLed (its whole process group) and a fresh one started in its place,
so 2 to 3 run workers are up at any time, until every run has ended.

Reported: runs succeeded / failed / lost (not ended within ``--timeout``), branch results
duplicated in a fan-in (a branch twice in one run's results), branch executions duplicated (a
branch node ran more than once), main-path node re-executions (at least once, by design),
hand-overs, and the time from a kill to each run it held being resumed by another worker
(median, max; the ``resumed`` event's time minus the kill's). Exit status 1 if a run was lost
or failed, or a branch result was duplicated.

Redis db 12 (``BENCH_REDIS_URL``), queues and keys under a fresh ``bench-<tag>``; only the
keys of this run are deleted and only the workers it started are stopped.

    python bench/durable_chaos.py                      # 100 runs, a kill every ~4 s
    python bench/durable_chaos.py --runs 20 --every 3  # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, command_line, progress, table

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
BRANCHES = ("b0", "b1", "b2")


# -- the graph (imported by the workers as bench.durable_chaos) --


def _count(config: dict[str, Any], node: str) -> None:
    import redis

    client = redis.Redis.from_url(config["redis"])
    client.hincrby(config["executions"], f"{config['run']}/{node}", 1)


def prepare(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    _count(config, "prepare")
    return {"value": state["value"] + 1}


def branch(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    _count(config, node)
    time.sleep(float(config["branch_seconds"]) * random.uniform(0.5, 1.5))
    return {f"{node}_value": state["value"] * 10}


def gather(state: dict[str, Any], config: dict[str, Any], parallel_results: Any) -> dict[str, Any]:
    _count(config, "gather")
    return {
        "branches": [r.branch for r in parallel_results],
        "ok": [r.success for r in parallel_results],
        "values": [(r.state or {}).get(f"{r.branch}_value") for r in parallel_results],
    }


def finish(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    _count(config, "finish")
    return {"finished": True}


def chaos_graph() -> Any:
    from tea_dist import ParallelConfig, StateGraph

    g = StateGraph({}, name="chaos", parallel_config=ParallelConfig(strategy="celery"))
    g.add_node("prepare", run=prepare)
    g.add_fanin_node("gather", run=gather)
    for name in BRANCHES:
        g.add_node(name, run=branch)
        g.add_parallel_edge("prepare", name, "gather")
        g.add_edge(name, "gather")
    g.add_node("finish", run=finish)
    g.add_edge("gather", "finish")
    g.set_entry_point("prepare")
    g.set_finish_point("finish")
    return g


# -- the cluster --


class Cluster:
    """One flow worker and the run workers, under one tag; only they are ever stopped."""

    def __init__(self, flow_slots: int) -> None:
        import redis

        from tea_dist.distributed.settings import Settings

        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"bench-{self.tag}"
        self.settings = Settings(
            broker_url=REDIS_URL,
            key_prefix=self.prefix,
            flows_queue=f"{self.prefix}.flows",
            runs_queue=f"{self.prefix}.runs",
            allowed=("bench",),
        )
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.logs = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        self.flow_slots = flow_slots
        self.processes: list[subprocess.Popen[bytes]] = []
        self.run_workers: list[subprocess.Popen[bytes]] = []
        self.started = 0

    def start(self, role: str, concurrency: int) -> subprocess.Popen[bytes]:
        from tea_dist.distributed.worker import spawn_worker

        self.started += 1
        name = f"{role}-{self.started}-{self.tag}@%h"
        proc = spawn_worker(
            self.settings,
            role,
            concurrency=concurrency,
            name=name,
            log_path=self.logs / f"{role}-{self.started}.log",
            extra_env={"PYTHONPATH": str(ROOT)},
            ready_timeout=120,
        )
        self.processes.append(proc)
        if role == "runs":
            self.run_workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        self.run_workers.remove(proc)

    def stop(self) -> None:
        from tea_dist.distributed.children import stop_groups

        stop_groups(self.processes, 15)

    def cleanup(self) -> None:
        """Delete every key of this run (they all carry its tag)."""
        doomed = list(self.redis.scan_iter(match=f"*{self.tag}*", count=1000))
        for i in range(0, len(doomed), 500):
            self.redis.delete(*doomed[i : i + 500])
        for key in self.redis.scan_iter(match="_kombu.binding.*", count=1000):
            mine = [m for m in self.redis.smembers(key) if self.tag.encode() in m]
            if mine:
                self.redis.srem(key, *mine)
        shutil.rmtree(self.logs, ignore_errors=True)


# -- the chaos --


class Chaos:
    """Every ``every`` seconds (±50%), SIGKILL a random run worker and start a fresh one (a
    kill waits for the previous replacement to be up: 2 to 3 run workers at any time)."""

    def __init__(self, cluster: Cluster, every: float) -> None:
        self.cluster, self.every = cluster, every
        self.kills: dict[int, float] = {}  # pid -> epoch seconds of its SIGKILL
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        due = time.monotonic()
        while True:  # a kill every ``every`` s on average, the replacement's start included
            due += self.every * random.uniform(0.5, 1.5)
            if self.stop.wait(max(due - time.monotonic(), 0.0)):
                return
            victim = random.choice(self.cluster.run_workers)
            self.kills[victim.pid] = time.time()
            self.cluster.kill(victim)
            progress(f"killed run worker {victim.pid} ({len(self.kills)} kills)")
            if not self.stop.is_set():
                self.cluster.start("runs", 8)


# -- the run --


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--every", type=float, default=4.0, help="seconds between kills")
    parser.add_argument("--run-workers", type=int, default=3)
    parser.add_argument("--flow-slots", type=int, default=4)
    parser.add_argument("--branch-seconds", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    from tea_dist import WorkflowRun, submit
    from tests.cluster import configure

    cluster = Cluster(args.flow_slots)
    chaos = Chaos(cluster, args.every)
    try:
        configure(cluster.settings)
        progress("starting workers")
        cluster.start("flows", args.flow_slots)
        for _ in range(args.run_workers):
            cluster.start("runs", 8)
        executions = f"{cluster.prefix}:executions"
        runs: list[WorkflowRun] = []
        started = time.monotonic()
        for i in range(args.runs):
            config = {
                "redis": REDIS_URL,
                "executions": executions,
                "run": i,
                "branch_seconds": args.branch_seconds,
            }
            runs.append(submit("bench.durable_chaos:chaos_graph", {"value": i}, config))
        progress(f"{args.runs} runs submitted")
        chaos.thread.start()
        ended = wait_all(runs, started + args.timeout)
        chaos.stop.set()
        chaos.thread.join(150)
        elapsed = time.monotonic() - started
        report(args, runs, ended, cluster.redis.hgetall(executions), chaos.kills, elapsed)
        return 0 if ended.count("succeeded") == args.runs and not DUPLICATED else 1
    finally:
        chaos.stop.set()
        cluster.stop()
        cluster.cleanup()


def wait_all(runs: list[Any], deadline: float) -> list[str]:
    statuses = ["pending"] * len(runs)
    while time.monotonic() < deadline:
        for i, run in enumerate(runs):
            if statuses[i] not in ("succeeded", "failed", "cancelled"):
                statuses[i] = str(run.status())
        done = sum(s in ("succeeded", "failed", "cancelled") for s in statuses)
        if done == len(runs):
            break
        progress(f"{done}/{len(runs)} runs ended")
        time.sleep(2)
    return statuses


DUPLICATED: list[str] = []  # runs whose fan-in got a branch twice


def report(
    args: Any,
    runs: list[Any],
    statuses: list[str],
    executions: dict[bytes, bytes],
    kills: dict[int, float],
    elapsed: float,
) -> None:
    counts = {k.decode(): int(v) for k, v in executions.items()}
    wrong, delays, handovers = 0, [], 0
    for i, (run, status) in enumerate(zip(runs, statuses, strict=True)):
        if status == "succeeded":
            state = run.result(timeout=1)
            if len(state["branches"]) != len(set(state["branches"])):
                DUPLICATED.append(run.run_id)
            if state["branches"] != list(BRANCHES) or state["values"] != [(i + 1) * 10] * 3:
                wrong += 1
        handovers += run.handovers()
        for event in run.events():
            if event["type"] == "resumed":
                pid = int(event["previous"].rsplit("/", 1)[1]) if event["previous"] else 0
                if pid in kills:
                    delays.append(event["at"] - kills[pid])
    branch_runs = [counts.get(f"{i}/{b}", 0) for i in range(len(runs)) for b in BRANCHES]
    main_runs = [
        counts.get(f"{i}/{n}", 0) for i in range(len(runs)) for n in ("prepare", "gather", "finish")
    ]
    lost = sum(s not in ("succeeded", "failed", "cancelled") for s in statuses)
    print(command_line())
    print(
        table(
            f"durable runs under chaos: {len(runs)} runs, {args.run_workers} run workers, "
            f"a SIGKILL every ~{args.every:g} s, load {os.getloadavg()[0]:.1f}",
            ["measure", "value"],
            [
                ["wall time s", f"{elapsed:.0f}"],
                ["run workers SIGKILLed", len(kills)],
                ["runs succeeded", statuses.count("succeeded")],
                ["runs failed", statuses.count("failed")],
                ["runs lost (not ended in time)", lost],
                ["runs with a wrong final state", wrong],
                ["branch results duplicated in a fan-in", len(DUPLICATED)],
                ["branch executions duplicated", sum(max(c - 1, 0) for c in branch_runs)],
                ["branches never executed", sum(c == 0 for c in branch_runs)],
                ["main-path node re-executions", sum(max(c - 1, 0) for c in main_runs)],
                ["hand-overs", handovers],
                ["kill -> resumed: resumes measured", len(delays)],
                ["kill -> resumed: median s", _seconds(statistics.median, delays)],
                ["kill -> resumed: max s", _seconds(max, delays)],
            ],
        )
    )
    if DUPLICATED:
        print("runs with a duplicated branch result:", json.dumps(DUPLICATED))


def _seconds(of: Any, values: list[float]) -> str:
    return f"{of(values):.2f}" if values else "-"


if __name__ == "__main__":
    raise SystemExit(main())
