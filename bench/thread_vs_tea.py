"""The thread strategy's per-branch cost beside TEA's own thread engine and a bare pool.

One run alternates three sides (A, B, C, A, B, C, ...) and reports, per side, the median
wall time of a fan-out of N no-op branches and the cost per branch (total / N):

- ``tea_dist thread``: ``invoke()`` of start -> N no-op branches -> fan-in count -> END with
  ``ParallelConfig(strategy="thread")``, compiled beforehand, in this process.
- ``TEA thread``: the same graph built with The Edge Agent's ``StateGraph`` (its default
  thread engine), compiled beforehand and invoked in a child process running the Python of a
  separate virtualenv (TEA is never a dependency of tea_dist). The child times each invoke
  itself and answers on a pipe, so process start-up and the pipe are not counted.
- ``bare ThreadPoolExecutor``: N no-op calls submitted to a warm ``ThreadPoolExecutor``, then
  their results collected.

Every side is warmed once before the timed repetitions. Setting up TEA's virtualenv::

    git --git-dir=/path/to/the_edge_agent.git archive f507cd9 python | tar -x -C /tmp/tea-src
    python3 -m venv /tmp/tea-venv && /tmp/tea-venv/bin/pip install /tmp/tea-src/python

Run: ``python bench/thread_vs_tea.py [--tea-python /tmp/tea-venv/bin/python] [--n 1000]
[--reps 15]``.

This file is also the child (``--tea-child``): in that mode it imports only the standard
library and ``the_edge_agent``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

DEFAULT_TEA_PYTHON = "/tmp/tea-venv/bin/python"


# -- the child: TEA's engine, in TEA's virtualenv --


def _tea_noop(state: dict[str, Any]) -> dict[str, Any]:
    return {}


def _tea_count(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    ok = sum(1 for r in parallel_results if getattr(r, "success", True))
    return {"ok": ok, "n": len(parallel_results)}


def tea_child(n: int) -> None:
    """Build the fan-out with TEA's StateGraph; time one invoke per line read on stdin."""
    from the_edge_agent import StateGraph  # type: ignore[import-not-found]

    g = StateGraph({})
    g.add_node("start", run=_tea_noop)
    g.add_fanin_node("merge", run=_tea_count)
    for i in range(n):
        g.add_node(f"b{i}", run=_tea_noop)
        g.add_parallel_edge("start", f"b{i}", "merge")
        g.add_edge(f"b{i}", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    app = g.compile()
    for _ in sys.stdin:
        started = time.perf_counter()
        events = list(app.invoke({}))
        elapsed = time.perf_counter() - started
        final = events[-1]
        ok = final.get("state", {}).get("ok") if final.get("type") == "final" else None
        print(json.dumps({"seconds": elapsed, "ok": ok}), flush=True)


class TeaSide:
    """The child process, driven one invoke at a time."""

    def __init__(self, python: str, n: int) -> None:
        self.n = n
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--tea-child", "--n", str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )

    def run(self) -> float:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("TEA's child exited")
        answer = json.loads(line)
        if answer["ok"] != self.n:
            raise RuntimeError(f"TEA: {answer['ok']} of {self.n} branches succeeded")
        return float(answer["seconds"])

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- the parent --


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tea-python", default=DEFAULT_TEA_PYTHON, help="TEA venv's python")
    parser.add_argument("--n", type=int, default=1000, help="branches per fan-out")
    parser.add_argument("--reps", type=int, default=15, help="alternating repetitions")
    parser.add_argument("--tea-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tea_child:
        tea_child(args.n)
        return

    import concurrent.futures as cf
    import multiprocessing
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import benchnodes
    from bench.common import command_line, fan_graph, final_state, median, progress, table
    from tea_dist import ParallelConfig

    n, reps = args.n, args.reps
    load = os.getloadavg()[0]
    app = fan_graph(n, benchnodes.noop, ParallelConfig(strategy="thread")).compile()

    def tea_dist_side() -> float:
        started = time.perf_counter()
        final = final_state(list(app.invoke({})))
        elapsed = time.perf_counter() - started
        if final["ok"] != n:
            raise RuntimeError(f"tea_dist: {final['ok']} of {n} branches succeeded")
        return elapsed

    tea = TeaSide(args.tea_python, n)
    with cf.ThreadPoolExecutor() as pool:

        def bare_side() -> float:
            started = time.perf_counter()
            for f in [pool.submit(benchnodes.noop, {}) for _ in range(n)]:
                f.result()
            return time.perf_counter() - started

        sides = [
            ("tea_dist thread", tea_dist_side),
            ("TEA thread", tea.run),
            ("bare ThreadPoolExecutor", bare_side),
        ]
        for _, side in sides:  # warm
            side()
        times: dict[str, list[float]] = {name: [] for name, _ in sides}
        try:
            for rep in range(reps):
                for name, side in sides:
                    times[name].append(side())
                progress(f"repetition {rep + 1}/{reps} done")
        finally:
            tea.close()

    rows = []
    per_branch = {name: median(ts) / n * 1e6 for name, ts in times.items()}
    for name, ts in times.items():
        spread = f"{min(ts) / n * 1e6:.0f}..{max(ts) / n * 1e6:.0f}"
        rows.append([name, f"{median(ts):.4f}", f"{per_branch[name]:.1f}", spread])
    print(f"command: {command_line()}")
    print(
        f"machine: {multiprocessing.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}\n"
    )
    print(
        table(
            f"Fan-out of {n} no-op branches, {reps} alternating repetitions (median)",
            ["side", "s", "us/branch", "min..max us"],
            rows,
        )
    )
    tea_dist_us, tea_us = per_branch["tea_dist thread"], per_branch["TEA thread"]
    print(f"\ntea_dist / TEA: {tea_dist_us / tea_us:.2f}x")
    print(f"tea_dist / bare pool: {tea_dist_us / per_branch['bare ThreadPoolExecutor']:.1f}x")


if __name__ == "__main__":
    main()
