"""Slot refill after a kill: raw Celery against raw Celery plus the ``PromptRefill`` bootstep.

One worker slot (``-c 1``) per side; the two sides alternate (A, B, A, B, ...):

- hard time limit: a task swallowing the soft limit (soft 0.5 s, hard 1.5 s, as tea_dist sets
  for ``timeout_seconds=0.5``) with a marker task queued behind it; latency = marker start -
  (stuck task start + 1.5 s);
- revoke: a task sleeping 10 s is revoked with ``terminate=True, signal="SIGKILL"`` (what
  tea_dist's fail-fast sends to a branch that ignored its cooperative cancel) 0.2 s after it
  started, with a marker task queued behind it; latency = marker start - the revoke call.

The bootstep (``bench/refill_bootstep.py``) is the proposed fix for the 1-5 s tail of these
latencies. Same Redis, tags and cleanup rules as ``bench/celery_vs_raw.py``.

Run: ``python bench/refill_probe.py [--quick] [--reps R]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rawtasks
from bench.celery_vs_raw import Cluster, Measure, forget, mark, release_pending_results, wait_for
from bench.common import command_line, median, progress, table

HARD, SOFT = 1.5, 0.5


def hard_limit(measure: Measure, side: str, queue: str) -> None:
    d = tempfile.mkdtemp(prefix="bench-refill-")
    try:
        stuck = rawtasks.stubborn.apply_async(
            (d, "b0", 6.0), queue=queue, soft_time_limit=SOFT, time_limit=HARD
        )
        nxt = rawtasks.mark_sleep.apply_async((d, "b1", 0.0), queue=queue)
        nxt.get(timeout=20, disable_sync_subtasks=False)
        measure.add(side, hard=mark(d, "b1")[0] - (mark(d, "b0")[0] + HARD))
        forget(rawtasks.app, [stuck.id, nxt.id])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def revoke(measure: Measure, side: str, queue: str) -> None:
    d = tempfile.mkdtemp(prefix="bench-refill-")
    try:
        long = rawtasks.mark_sleep.apply_async((d, "b0", 10.0), queue=queue)
        nxt = rawtasks.mark_sleep.apply_async((d, "b1", 0.0), queue=queue)
        wait_for((d, "b0"))
        time.sleep(0.2)
        sent = time.time()
        rawtasks.app.control.revoke(long.id, terminate=True, signal="SIGKILL")
        nxt.get(timeout=20, disable_sync_subtasks=False)
        measure.add(side, revoke=mark(d, "b1")[0] - sent)
        forget(rawtasks.app, [long.id, nxt.id])
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 30 s run (2 repetitions)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 6)")
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 6)
    started = time.perf_counter()
    cluster = Cluster()
    rawtasks.configure(cluster.settings)
    sides = {"raw Celery": cluster.queue("plain"), "raw + PromptRefill": cluster.queue("refill")}
    measure = Measure()
    load = os.getloadavg()[0]
    try:
        cluster.start([("raw", "plain", 1), ("refill", "refill", 1)])
        for rep in range(reps):
            for probe in (hard_limit, revoke):
                for side, queue in sides.items():
                    probe(measure, side, queue)
            progress(f"refill: repetition {rep + 1}/{reps} done")
    finally:
        release_pending_results()
        cluster.stop()
        deleted = cluster.cleanup()
    rows = []
    for side in sides:
        values = measure.values.get(side, {})
        row: list[str] = [side]
        for key in ("hard", "revoke"):
            got = values.get(key, [])
            row += [f"{median(got):.3f}", f"{min(got):.3f}", f"{max(got):.3f}"]
        rows.append(row)
    print(f"command: {command_line()}")
    print(f"machine: {os.cpu_count()} cores, load average at start {load:.2f}\n")
    print(
        table(
            f"Slot refill, -c 1 worker per side, {reps} alternating repetitions (seconds)",
            [
                "side",
                "hard limit -> next (med)",
                "min",
                "max",
                "revoke SIGKILL -> next (med)",
                "min",
                "max",
            ],
            rows,
        )
    )
    elapsed = time.perf_counter() - started
    print(f"\ntotal {elapsed:.1f} s; {deleted} Redis keys of this run deleted")


if __name__ == "__main__":
    main()
