"""In-process strategies: speed-ups and per-branch overhead, measured side by side.

Three sections, each alternating its sides (A, B, C, A, B, C, ...) within one run and
reporting median wall times (``time.perf_counter``) and ratios:

1. CPU-bound: 4 branches of ~0.3 s of pure-Python work (calibrated on this machine) with
   ``strategy="process"``, ``strategy="thread"``, a bare ``ProcessPoolExecutor`` doing the same
   4 calls, and the 4 calls one after another in a plain loop. On 2 cores expect process ~2x
   and thread ~1x (the GIL) over sequential.
2. asyncio: 4 ``async def`` branches each ``await asyncio.sleep(0.1)`` with
   ``strategy="asyncio"`` against the same 4 coroutines awaited one after another
   (seed 004 target: >= 2x).
3. Per-branch overhead: a fan-out of N no-op branches (N = 100, 1000) per strategy against the
   bare pool doing N no-op calls (submit, then result): ``ThreadPoolExecutor`` for thread,
   ``ProcessPoolExecutor`` (forkserver, 2 workers, like the process strategy) for process, and
   N ``run_coroutine_threadsafe`` calls on an event loop thread for asyncio (what the asyncio
   strategy does per branch). A tea_dist time is the whole ``invoke()`` (start node, fan-out,
   fan-in node), compiled beforehand; per-branch = total / N. Every pool is warmed first.

4. With ``--observe``: the cost of tracing and metrics. The same N no-op fan-outs per strategy
   with both off, tracing on (an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` whose
   exporter drops the spans: what tea_dist pays, not what a collector costs), metrics on (in
   this process's registry, not served), and both, alternated within one run.

Run: ``python bench/local_strategies.py [--quick] [--reps R] [--observe]``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchnodes
from bench.common import (
    alternate,
    command_line,
    fan_graph,
    final_state,
    median,
    progress,
    ratio,
    table,
)
from tea_dist import ParallelConfig


def bare_noop(i: int) -> int:
    return i


async def bare_anoop() -> None:
    return None


def invoker(graph: object, state: dict[str, object], expect: int):  # type: ignore[no-untyped-def]
    app = graph.compile()  # type: ignore[attr-defined]

    def run() -> None:
        final = final_state(list(app.invoke(state)))
        if final["ok"] != expect:
            raise RuntimeError(f"{final['ok']} of {expect} branches succeeded")

    return run


def cpu_section(reps: int, seconds: float, pool: cf.ProcessPoolExecutor) -> str:
    iterations = benchnodes.calibrate(seconds)
    state = {"iterations": iterations}
    branches = 4
    process = invoker(
        fan_graph(branches, benchnodes.cpu, ParallelConfig(strategy="process")), state, branches
    )
    thread = invoker(
        fan_graph(branches, benchnodes.cpu, ParallelConfig(strategy="thread")), state, branches
    )

    def bare_process() -> None:
        for f in [pool.submit(benchnodes.spin, iterations) for _ in range(branches)]:
            f.result()

    def sequential() -> None:
        for _ in range(branches):
            benchnodes.spin(iterations)

    process()  # warm: starts the process strategy's workers
    bare_process()
    times = alternate(
        [
            ("sequential (plain loop)", sequential),
            ("tea_dist process", process),
            ("tea_dist thread", thread),
            ("bare ProcessPoolExecutor(2)", bare_process),
        ],
        reps,
        "cpu",
    )
    base = median(times["sequential (plain loop)"])
    rows = [
        [name, f"{median(t):.3f}", f"{min(t):.3f}", ratio(base, median(t))]
        for name, t in times.items()
    ]
    return table(
        f"CPU-bound: {branches} branches x ~{seconds:g} s pure Python "
        f"({iterations} iterations each), {reps} alternating repetitions",
        ["side", "median s", "min s", "speed-up vs sequential"],
        rows,
    )


def asyncio_section(reps: int) -> str:
    state = {"sleep": 0.1}
    branches = 4
    tea = invoker(
        fan_graph(branches, benchnodes.async_sleep, ParallelConfig(strategy="asyncio")),
        state,
        branches,
    )

    async def one_after_another() -> None:
        for _ in range(branches):
            await benchnodes.async_sleep(state)

    def sequential() -> None:
        asyncio.run(one_after_another())

    tea()  # warm: starts the strategy's event loop thread
    times = alternate(
        [("sequential (awaited in turn)", sequential), ("tea_dist asyncio", tea)], reps, "asyncio"
    )
    base = median(times["sequential (awaited in turn)"])
    rows = [
        [name, f"{median(t):.3f}", f"{min(t):.3f}", ratio(base, median(t))]
        for name, t in times.items()
    ]
    return table(
        f"asyncio: {branches} branches x await asyncio.sleep(0.1), {reps} alternating "
        "repetitions (seed 004 target: speed-up >= 2x)",
        ["side", "median s", "min s", "speed-up vs sequential"],
        rows,
    )


class LoopThread:
    """An event loop in a daemon thread (the bare asyncio baseline)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run_n(self, n: int) -> None:
        futures = [asyncio.run_coroutine_threadsafe(bare_anoop(), self.loop) for _ in range(n)]
        for f in futures:
            f.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def overhead_section(
    reps: int, sizes: list[int], threads: cf.ThreadPoolExecutor, procs: cf.ProcessPoolExecutor
) -> str:
    loop = LoopThread()
    rows = []
    try:
        for n in sizes:
            tea = {
                "thread": invoker(
                    fan_graph(n, benchnodes.noop, ParallelConfig(strategy="thread")), {}, n
                ),
                "process": invoker(
                    fan_graph(n, benchnodes.noop, ParallelConfig(strategy="process")), {}, n
                ),
                "asyncio": invoker(
                    fan_graph(n, benchnodes.anoop, ParallelConfig(strategy="asyncio")), {}, n
                ),
            }

            def bare_pool(pool: cf.Executor, n: int = n):  # type: ignore[no-untyped-def]
                def run() -> None:
                    for f in [pool.submit(bare_noop, i) for i in range(n)]:
                        f.result()

                return run

            bare = {
                "thread": ("bare ThreadPoolExecutor", bare_pool(threads)),
                "process": ("bare ProcessPoolExecutor(2)", bare_pool(procs)),
                "asyncio": ("bare run_coroutine_threadsafe", lambda n=n: loop.run_n(n)),
            }
            sides = []
            for strategy in ("thread", "process", "asyncio"):
                tea[strategy]()  # warm
                bare[strategy][1]()
                sides += [(f"tea_dist {strategy}", tea[strategy]), bare[strategy]]
            times = alternate(sides, reps, f"overhead N={n}")
            for strategy in ("thread", "process", "asyncio"):
                t_tea = median(times[f"tea_dist {strategy}"])
                t_bare = median(times[bare[strategy][0]])
                rows.append(
                    [
                        f"N={n} {strategy}",
                        f"{t_tea:.4f}",
                        f"{t_tea / n * 1e6:.0f}",
                        bare[strategy][0],
                        f"{t_bare:.4f}",
                        f"{t_bare / n * 1e6:.0f}",
                        ratio(t_tea, t_bare),
                    ]
                )
    finally:
        loop.close()
    return table(
        f"Per-branch overhead: N no-op branches, {reps} alternating repetitions (median)",
        [
            "fan-out",
            "tea_dist s",
            "us/branch",
            "bare baseline",
            "bare s",
            "us/call",
            "tea/bare",
        ],
        rows,
    )


class Observability:
    """Tracing and metrics, switched per side (a Dispatcher takes its listeners at invoke)."""

    MODES = ("off", "tracing", "metrics", "tracing+metrics")

    def __init__(self) -> None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )

        class Drop(SpanExporter):  # type: ignore[misc]
            def export(self, spans: object) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        self.provider = TracerProvider()
        self.provider.add_span_processor(BatchSpanProcessor(Drop()))

    def set(self, mode: str) -> None:
        from tea_dist.observe import metrics, tracing

        tracing.set_tracer_provider(self.provider if "tracing" in mode else None)
        (metrics.enable if "metrics" in mode else metrics.disable)()

    def side(self, mode: str, run):  # type: ignore[no-untyped-def]
        def observed() -> None:
            self.set(mode)
            run()

        return observed


def observe_section(reps: int, sizes: list[int]) -> str:
    obs = Observability()
    rows = []
    for n in sizes:
        for strategy, node in (
            ("thread", benchnodes.noop),
            ("process", benchnodes.noop),
            ("asyncio", benchnodes.anoop),
        ):
            run = invoker(fan_graph(n, node, ParallelConfig(strategy=strategy)), {}, n)
            run()  # warm
            sides = [(mode, obs.side(mode, run)) for mode in Observability.MODES]
            times = alternate(sides, reps, f"observe N={n} {strategy}")
            off = median(times["off"])
            row = [f"N={n} {strategy}", f"{off / n * 1e6:.0f}"]
            for mode in Observability.MODES[1:]:
                t = median(times[mode])
                row += [f"{t / n * 1e6:.0f}", f"{(t - off) / n * 1e6:+.0f} ({t / off - 1:+.0%})"]
            rows.append(row)
    obs.set("off")
    obs.provider.shutdown()
    return table(
        f"Observability overhead: N no-op branches, {reps} alternating repetitions (median "
        "us per branch; the cost over off in us and %)",
        ["fan-out", "off", "tracing", "cost", "metrics", "cost", "both", "cost"],
        rows,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 30 s run (smaller, fewer reps)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per section")
    parser.add_argument(
        "--observe", action="store_true", help="add the tracing and metrics overhead section"
    )
    args = parser.parse_args()
    reps = args.reps or (3 if args.quick else 5)
    cpu_seconds = 0.1 if args.quick else 0.3
    sizes = [100, 300] if args.quick else [100, 1000]
    started = time.perf_counter()
    load = os.getloadavg()[0]
    context = multiprocessing.get_context("forkserver")
    outputs = []
    with (
        cf.ThreadPoolExecutor() as threads,
        cf.ProcessPoolExecutor(2, mp_context=context) as procs,
    ):
        outputs.append(cpu_section(reps, cpu_seconds, procs))
        outputs.append(asyncio_section(max(reps, 5)))
        outputs.append(overhead_section(reps, sizes, threads, procs))
        if args.observe:
            outputs.append(observe_section(reps, sizes))
    from tea_dist.core.strategies import get_executor

    get_executor("process").shutdown()  # type: ignore[attr-defined]
    print(f"command: {command_line()}")
    print(
        f"machine: {multiprocessing.cpu_count()} cores, Python {sys.version.split()[0]}, "
        f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}\n"
    )
    print("\n\n".join(outputs))
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    progress("done")


if __name__ == "__main__":
    main()
