"""TD.13-E2E-005: sustained load with a circuit breaker cycling, for as long as you like.

A graph with a flapping service branch (down for 20 invocations, up for 20, ...) and two
healthy branches is invoked back to back. The service's circuit (threshold 2, reset 0.05 s)
cycles closed → open → half_open → closed all along. Every minute (or ``--every``) the script
prints invocations/s, outcomes, circuit transitions, live threads and traced memory; at the end
it checks that every invocation got exactly one result per branch, in order, and that threads
and memory stayed flat.

    python bench/soak.py --seconds 3600            # the one-hour soak of the test design
    python bench/soak.py --seconds 60 --every 10   # a quick look
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchnodes as bn
from bench.common import command_line, fan_graph, final_state, table
from tea_dist import CircuitBreakerConfig, ParallelConfig


class Transitions:
    """Counts circuit transitions (a ParallelFlowCallback)."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()

    def on_circuit_state_change(self, ctx: Any, old: Any, new: Any) -> None:
        self.seen[f"{old}->{new}"] += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--every", type=float, default=60.0)
    parser.add_argument("--strategy", default="thread")
    args = parser.parse_args()

    logging.getLogger("tea_dist").setLevel(logging.ERROR)  # a transition every few runs
    transitions = Transitions()
    breaker = CircuitBreakerConfig(failure_threshold=2, reset_timeout=0.05)
    app = fan_graph(
        3,
        bn.noop,
        ParallelConfig(strategy=args.strategy, circuit_breaker=breaker),
        fan_in=bn.results,
        branches=[("svc", bn.flapping_service), ("a", bn.noop), ("b", bn.noop)],
    ).compile(parallel_callbacks=[transitions])
    tracemalloc.start()
    threads0 = threading.active_count()
    memory0 = tracemalloc.get_traced_memory()[0]
    outcomes: collections.Counter[str] = collections.Counter()
    rows, runs, bad = [], 0, 0
    started = time.monotonic()
    next_report = started + args.every
    while (now := time.monotonic()) < started + args.seconds:
        down = (runs // 20) % 2 == 0
        results = final_state(list(app.invoke({}, config={"down": down})))["results"]
        if [r["branch"] for r in results] != ["svc", "a", "b"] or not results[1]["success"]:
            bad += 1
        svc = results[0]
        outcomes["ok" if svc["success"] else svc["error_type"]] += 1
        runs += 1
        if now >= next_report:
            next_report += args.every
            rows.append(_row(now - started, runs, outcomes, transitions, threads0, memory0))
            print(table("soak so far", HEADER, rows[-1:]), flush=True)
    rows.append(_row(time.monotonic() - started, runs, outcomes, transitions, threads0, memory0))
    print(command_line())
    print(table(f"soak: {args.strategy}, {args.seconds:g} s", HEADER, rows))
    print(f"invocations with a missing, extra or misplaced result: {bad}")
    return 1 if bad else 0


HEADER = [
    "elapsed s",
    "invocations",
    "inv/s",
    "ok",
    "ConnectionError",
    "CircuitOpenError",
    "closed->open",
    "half_open->closed",
    "threads +",
    "memory + KiB",
]


def _row(
    elapsed: float, runs: int, outcomes: Any, transitions: Transitions, threads0: int, memory0: int
) -> list[Any]:
    return [
        f"{elapsed:.0f}",
        runs,
        f"{runs / elapsed:.0f}",
        outcomes["ok"],
        outcomes["ConnectionError"],
        outcomes["CircuitOpenError"],
        transitions.seen["closed->open"],
        transitions.seen["half_open->closed"],
        threading.active_count() - threads0,
        (tracemalloc.get_traced_memory()[0] - memory0) // 1024,
    ]


if __name__ == "__main__":
    raise SystemExit(main())
