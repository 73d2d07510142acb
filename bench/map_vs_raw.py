"""A map of N no-op items on celery, batched and not, against a raw Celery chord and Ray.

Sides, rotated within each repetition (A, B, C, then B, C, A, ...; medians reported), each on
its own prefork ``-c 2`` worker on the same Redis, task events off (both sides' default):

- ``raw chord``: ``chord([noop.s(i) for i in range(N)])(collect.s())`` of the plain Celery app
  a user would write (``bench/rawtasks.py``: JSON, late ack, prefetch 1), waited on the fast way;
- ``tea map``: ``invoke()`` of start -> ``add_parallel_map`` over N items -> fan-in with the
  default settings: the batch size adapts as the map runs (``tea_dist.policies.batching``),
  each item still with its own result;
- ``tea map batch 1``: the same map with ``batch_size=1``, one Celery task per item.

Then, with ``--ray-python PY`` (an interpreter that has ``ray``; it is not a dependency of
tea_dist), Ray on 2 CPUs (``ray.init(num_cpus=2)``) runs ``ray.get([noop.remote(i) for i in
range(N)])`` the same number of times, in a block after the others (its daemons would load
the machine while the other sides run).

Target (N = 1000): the map with default settings in at most 0.4x the raw chord's time.

Run: ``python bench/map_vs_raw.py [--items N] [--reps R] [--ray-python PY] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchnodes as bn
from bench.celery_vs_raw import REDIS_URL, Cluster, _raw_chord, forget, group_cpu
from bench.common import command_line, median, progress, ratio, table
from tea_dist import ParallelConfig, StateGraph

TARGET = 0.4  # map with default settings / raw chord at N = 1000

RAY_SIDE = """
import json, sys, time
import ray
n, reps = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
@ray.remote
def noop(i):
    return i
ray.get([noop.remote(i) for i in range(min(n, 200))])  # warm the workers
for _ in range(reps):
    started = time.perf_counter()
    out = ray.get([noop.remote(i) for i in range(n)])
    assert len(out) == n
    print(json.dumps(time.perf_counter() - started), flush=True)
ray.shutdown()
"""


def bench_map(queue: str, name: str, work: Any = bn.noop, **options: Any) -> StateGraph:
    """start -> ``work`` per item of ``docs`` -> ``count``; ``options`` of the map (none: its
    defaults, what a user who writes a first map gets)."""
    g = StateGraph({"docs": list}, name=name)
    g.add_node("start", run=bn.start)
    g.add_node("work", run=work)
    g.add_fanin_node("merge", run=bn.count)
    config = ParallelConfig(strategy="celery", queue=queue)
    g.add_parallel_map("start", "work", "merge", "docs", config=config, **options)
    g.add_edge("work", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    return g


def tea_map(app: Any, n: int) -> Callable[[], list[str]]:
    def run() -> list[str]:
        events = list(app.invoke({"docs": list(range(n))}))
        if events[-1]["type"] != "final" or events[-1]["state"]["ok"] != n:
            raise RuntimeError(f"tea_dist: {events[-1]}")
        return []

    return run


def header(load_before: float) -> str:
    """The command and the machine, above a bench's tables."""
    return (
        f"command: {command_line()}\nmachine: {os.cpu_count()} cores, Redis {REDIS_URL}, "
        f"load average at start {load_before:.2f}, at end {os.getloadavg()[0]:.2f}\n"
    )


def ray_times(python: str, n: int, reps: int) -> list[float]:
    out = subprocess.run(
        [python, "-c", RAY_SIDE, str(n), str(reps)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--ray-python", default=None, help="an interpreter with ray installed")
    parser.add_argument("--quick", action="store_true", help="N = 200, 2 repetitions")
    args = parser.parse_args()
    n = 200 if args.quick else args.items
    reps = args.reps or (2 if args.quick else 7)

    from bench import rawtasks
    from tests.cluster import configure

    cluster = Cluster()
    configure(cluster.settings)
    rawtasks.configure(cluster.settings.with_overrides(flows_queue=cluster.queue("raw")))
    load_before = os.getloadavg()
    started = time.perf_counter()
    try:
        progress(f"starting 3 workers (tag {cluster.tag})")
        cluster.start([("raw", "raw", 2), ("tea", "tea", 2), ("tea", "one", 2)])
        sides = [
            ("raw chord", "raw", _raw_chord(n, cluster.queue("raw"))),
            ("tea map", "tea", tea_map(bench_map(cluster.queue("tea"), "map").compile(), n)),
            (
                "tea map batch 1",
                "one",
                tea_map(bench_map(cluster.queue("one"), "map1", batch_size=1).compile(), n),
            ),
        ]
        for _, _, side in sides:  # warm: imports and connections on every worker
            forget(rawtasks.app, side())
        times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        cpu: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for rep in range(reps):
            shift = rep % len(sides)
            for name, queue, side in sides[shift:] + sides[:shift]:
                pgid = cluster.pid_of(queue)
                before, caller = group_cpu(pgid), time.process_time()
                t0 = time.perf_counter()
                ids = side()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - caller + group_cpu(pgid) - before)
                forget(rawtasks.app, ids)
            progress(f"repetition {rep + 1}/{reps} done")
    finally:
        cluster.stop()
        deleted = cluster.cleanup()
    if args.ray_python:
        progress("ray on 2 CPUs")
        times["Ray (2 CPUs)"] = ray_times(args.ray_python, n, reps)
    raw = median(times["raw chord"])
    rows = []
    for name, values in times.items():
        verdict = ""
        if name == "tea map":
            verdict = "ok" if median(values) / raw <= TARGET else "MISSED"
        spent = f"{median(cpu[name]) / n * 1e3:.2f}" if name in cpu else "-"
        rows.append(
            [
                name,
                f"{median(values):.3f}",
                f"{min(values):.3f}-{max(values):.3f}",
                ratio(median(values), raw),
                f"{n / median(values):.0f}",
                spent,
                verdict,
            ]
        )
    print(header(load_before[0]))
    print(
        table(
            f"A map of {n} no-op items, {reps} rotating repetitions; medians",
            [
                "side",
                "median s",
                "range s",
                "/ raw chord",
                "items /s",
                "CPU ms/item (caller + worker)",
                f"target <= {TARGET:g}x",
            ],
            rows,
        )
    )
    print(
        f"\ntotal {time.perf_counter() - started:.1f} s; {deleted} Redis keys of this run deleted"
    )


if __name__ == "__main__":
    main()
