"""A 10,000-item map on celery: the caller's memory, Redis's memory and the driver's CPU per item.

    python bench/map_scale.py [--items 10000] [--max-workers 200] [--concurrency 2]

Starts its own Redis (the embedded one, on a free loopback port) and one prefork flow worker,
runs one map of no-op branches with ``max_workers`` (so at most that many branch messages are
ever in the broker), samples the caller's RSS and Redis's ``used_memory`` every 0.5 s, and
prints the peak and the growth over the run, the wall time, and the caller's CPU per item.
Everything it started is stopped by PID at the end.
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

from tea_dist import ParallelConfig, StateGraph
from tea_dist.distributed.local_cluster import EmbeddedRedis
from tests import celery_nodes as cn
from tests.cluster import TestCluster, configure
from tests.nodes import map_graph


def graph(max_workers: int) -> StateGraph:
    config = ParallelConfig(strategy="celery", max_workers=max_workers)
    return map_graph(cn.double_item, cn.collect_items, config=config, name="scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--max-workers", type=int, default=200)
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
        assert len(final["state"]["doubled"]) == args.items
        rss = [s[1] for s in samples]
        used = [s[2] for s in samples]
        mb = 1024 * 1024
        print(
            f"command: python bench/map_scale.py --items {args.items} "
            f"--max-workers {args.max_workers} --concurrency {args.concurrency}"
        )
        print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        print(
            f"items {args.items}: wall {wall:.1f} s ({args.items / wall:.0f} branches/s), "
            f"caller CPU {cpu:.1f} s = {cpu / args.items * 1e3:.2f} ms per item"
        )
        print(
            f"caller RSS: start {rss[0] / mb:.1f} MiB, peak {max(rss) / mb:.1f} MiB, "
            f"end {rss[-1] / mb:.1f} MiB"
        )
        print(
            f"Redis used_memory: start {used[0] / mb:.1f} MiB, peak {max(used) / mb:.1f} MiB, "
            f"end {used[-1] / mb:.1f} MiB ({len(samples)} samples)"
        )
    finally:
        cluster.stop_all()
        server.stop()


if __name__ == "__main__":
    main()
