"""A 100,000-item map on celery: wall time, the caller's memory, Redis's memory, CPU per item.

    python bench/map_scale.py [--items 100000] [--max-workers N] [--concurrency 2]

Starts its own Redis (the embedded one, on a free loopback port) and one prefork flow worker,
runs one map of no-op branches with the default settings (the batch size adapts as the map
runs; ``--max-workers`` adds that bound), samples the caller's RSS and Redis's
``used_memory`` every 0.5 s, and prints the peaks and the growth over the run, the wall time,
and the caller's CPU per item, against the targets (100,000 items: within 3 minutes, caller
peak RSS under 500 MB, Redis peak under 200 MB). Everything it started is stopped by PID at
the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import psutil
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import command_line
from tea_dist import ParallelConfig, StateGraph
from tea_dist.distributed.local_cluster import EmbeddedRedis
from tests import celery_nodes as cn
from tests.cluster import TestCluster, configure

TARGETS = (180.0, 500.0, 200.0)  # wall s, caller peak RSS MB, Redis peak MB (100,000 items)


def graph(max_workers: int | None) -> StateGraph:
    """prepare -> ``double_item`` per item of ``docs`` -> ``collect_items``, default map."""
    g = StateGraph({"docs": list}, name="scale")
    g.add_node("prepare", run=None)
    g.add_node("work", run=cn.double_item)
    g.add_fanin_node("merge", run=cn.collect_items)
    config = ParallelConfig(strategy="celery", max_workers=max_workers)
    g.add_parallel_map("prepare", "work", "merge", "docs", config=config)
    g.add_edge("work", "merge")
    g.set_entry_point("prepare")
    g.set_finish_point("merge")
    return g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--max-workers", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()
    server = EmbeddedRedis().start()
    cluster = TestCluster(server.url)
    me = psutil.Process()
    try:
        cluster.start_worker("scale", concurrency=args.concurrency)
        configure(cluster.settings())
        app = graph(args.max_workers).compile()
        list(app.invoke({"docs": list(range(20))}))  # warm up: imports, connections
        client = redis.Redis.from_url(server.url)
        samples: list[tuple[float, int, int]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                used = int(client.info("memory")["used_memory"])
                samples.append((time.monotonic(), me.memory_info().rss, used))
                done.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu, wall = time.process_time(), time.monotonic()
        events = list(app.invoke({"docs": list(range(args.items))}))
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        done.set()
        sampler.join()
        final = events[-1]
        assert final["type"] == "final", final
        doubled = final["state"]["doubled"]
        assert doubled == [2 * i for i in range(args.items)], "results out of order or lost"
        assert all(final["state"]["ok"]), "some items failed"
        rss = [s[1] for s in samples]
        used = [s[2] for s in samples]
        mb = 1000 * 1000
        print(f"command: {command_line()}")
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        print(
            f"items {args.items}: wall {wall:.1f} s ({args.items / wall:.0f} branches/s), "
            f"caller CPU {cpu:.1f} s = {cpu / args.items * 1e3:.2f} ms per item"
        )
        print(
            f"caller RSS: start {rss[0] / mb:.0f} MB, peak {max(rss) / mb:.0f} MB, "
            f"end {rss[-1] / mb:.0f} MB"
        )
        print(
            f"Redis used_memory: start {used[0] / mb:.0f} MB, peak {max(used) / mb:.0f} MB, "
            f"end {used[-1] / mb:.0f} MB ({len(samples)} samples)"
        )
        figures = (wall, max(rss) / mb, max(used) / mb)
        met = all(f <= t for f, t in zip(figures, TARGETS, strict=True))
        print(
            f"targets at 100,000 items: wall <= {TARGETS[0]:g} s, caller peak <= "
            f"{TARGETS[1]:g} MB, Redis peak <= {TARGETS[2]:g} MB: {'ok' if met else 'MISSED'}"
        )
    finally:
        cluster.stop_all()
        server.stop()


if __name__ == "__main__":
    main()
