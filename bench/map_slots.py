"""Maps of long items with the default batch size: does every worker slot get work?

    python bench/map_slots.py [--reps 3] [--quick]

Two cases, each on its own queue, each side alternated with the other within a repetition
(medians reported):

- 640 items that each sleep 1 s on two prefork workers with ``-c 32`` each (64 slots; ideal
  10 s): the map with default settings (target: at most 12 s) against ``batch_size=1``;
- 16 items of 1 s on one worker with ``-c 4`` (ideal 4 s; target: at most 4.6 s), the same two
  sides.

The default batch size starts with one item per task, measures the items (1 s: long) and
keeps them one per task, two tasks outstanding per slot: every slot stays busy and no item
waits behind another (``tea_dist.policies.batching``). Workers are stopped by PID at the end,
and the keys of the run deleted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchnodes as bn
from bench.celery_vs_raw import Cluster
from bench.common import median, progress, ratio, table
from bench.map_vs_raw import bench_map, header

CASES = (  # (label, queue, items, item seconds, slots, target seconds)
    ("640 x 1 s on 2 workers -c 32", "s64", 640, 1.0, 64, 12.0),
    ("16 x 1 s on 1 worker -c 4", "s4", 16, 1.0, 4, 4.6),
)


def timed(app: Any, items: int, seconds: float) -> float:
    """Seconds a map of ``items`` items of ``seconds`` each (``mark_sleep``) takes."""
    with tempfile.TemporaryDirectory(prefix="map-slots-") as marks:
        config = {"marker_dir": marks, "sleep": {"work": seconds}}
        started = time.perf_counter()
        events = list(app.invoke({"docs": list(range(items))}, config))
        took = time.perf_counter() - started
    if events[-1]["type"] != "final" or events[-1]["state"]["ok"] != items:
        raise RuntimeError(f"the map did not finish: {events[-1]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the small case only, once")
    args = parser.parse_args()
    cases = CASES[1:] if args.quick else CASES
    reps = 1 if args.quick else args.reps

    from tests.cluster import configure

    cluster = Cluster()
    configure(cluster.settings)
    load_before = os.getloadavg()
    rows = []
    try:
        specs = [("tea", "s4", 4)] if args.quick else [("tea", "s64", 32)] * 2 + [("tea", "s4", 4)]
        progress(f"starting {len(specs)} workers (tag {cluster.tag})")
        cluster.start(specs)
        for label, queue, items, seconds, slots, target in cases:
            sides = [
                (
                    "default",
                    bench_map(cluster.queue(queue), f"{queue}-default", bn.mark_sleep).compile(),
                ),
                (
                    "batch 1",
                    bench_map(
                        cluster.queue(queue), f"{queue}-one", bn.mark_sleep, batch_size=1
                    ).compile(),
                ),
            ]
            times: dict[str, list[float]] = {name: [] for name, _ in sides}
            for rep in range(reps):
                for name, app in sides if rep % 2 == 0 else sides[::-1]:
                    times[name].append(timed(app, items, seconds))
                progress(f"{label}: repetition {rep + 1}/{reps} done")
            ideal = items / slots * seconds
            for name, values in times.items():
                verdict = ""
                if name == "default":
                    verdict = "ok" if median(values) <= target else "MISSED"
                rows.append(
                    [
                        label,
                        name,
                        f"{median(values):.2f}",
                        f"{min(values):.2f}-{max(values):.2f}",
                        ratio(median(values), ideal),
                        f"<= {target:g} s: {verdict}" if verdict else "",
                    ]
                )
    finally:
        cluster.stop()
        deleted = cluster.cleanup()
    print(header(load_before[0]))
    print(
        table(
            f"Maps of 1 s items, {reps} alternated repetitions; medians",
            ["case", "batch size", "median s", "range s", "/ ideal", "target"],
            rows,
        )
    )
    print(f"\n{deleted} Redis keys of this run deleted")


if __name__ == "__main__":
    main()
