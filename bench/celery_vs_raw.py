"""The celery strategy against raw Celery on the same Redis and worker settings.

Four sections, each alternating its sides within one run (A, B, A, B, ...; medians reported):

1. overhead: a tea_dist fan-out of N no-op celery branches (``invoke()`` of start -> N
   branches -> fan-in; compiled beforehand) against a raw ``chord([noop.s(i) ...])(collect.s())``
   of N no-op tasks waited on with ``get(timeout=..., disable_sync_subtasks=False,
   follow_parents=False)`` (the fast way to wait, design §6), N = 200 and 1000, each side on its
   own prefork worker with ``-c 2``. The raw app is what a user would write
   (``bench/rawtasks.py``: its own plain configuration, JSON, late ack, prefetch 1). Two pairs,
   four sides rotated within each repetition (at least 5): task events off on both sides
   (tea_dist's default against the plain raw app), and task events on on both sides
   (``TEA_DIST_TASK_EVENTS=1`` against the raw app with ``-E`` and ``task_send_sent_event``,
   what a Flower user runs). Both ratios are printed; target: at most 1.05x at N = 200. The raw
   side's result keys are deleted after its timer stops (tea_dist deletes its own inside
   ``invoke()``: a small advantage to raw).
2. cpu: 4 branches of ~0.5 s of pure-Python work: sequential in this process, one worker
   ``-c 1``, one worker ``-c 2``, and two workers ``-c 1`` each (horizontal scale-out).
3. timeout: one worker slot (``-c 1``). Branch 1 runs into ``timeout_seconds=0.5``, branch 2 is
   queued behind it and records ``time.time()`` when it starts. Latency = start of branch 2 -
   (start of branch 1 + 0.5 s): the deadline to the freed slot starting the next branch.
   ``stubborn`` swallows the soft limit (only the hard limit at 0.5 s + ``hard_limit_grace``
   stops it), ``cooperative`` is a plain ``time.sleep`` that the soft limit interrupts; tea_dist
   runs once with the default grace (1 s) and once with 0.3 s. Raw Celery runs the same tasks
   with the same limits (soft 0.5, hard 1.5), and with only a hard limit of 0.5 s. Also shown:
   deadline -> the caller holding the timed-out result.
4. fail-fast: one worker with two slots. Branch A fails 0.3 s after it starts, branch B
   sleeps 10 s (``cooperative``: plain sleep; ``stubborn``: swallows every exception). Once B
   has started, two probe branches P1 and P2 are queued (tea_dist: a second ``invoke()`` from
   a thread; raw: two tasks). When A fails, P1 takes A's slot at once and holds it until P2 has
   started (at most 8 s); so P2 can only start on the slot B held, and P2's start time is the
   moment B's slot was freed (and refilled, if B's process was killed). Latency = P2 start - the
   moment the cancel was decided (tea_dist: the caller's ``on_flow_complete`` callback for A's
   failure, i.e. the driver's decision; raw: the caller's ``AsyncResult(A).get()`` returning,
   just before it calls ``revoke(B, terminate=True)``). Also shown: from A raising (on the
   worker) to P2 start, and from the decision to ``invoke()`` returning.

Everything lives in Redis db 12 under a fresh tag (queues ``bench-<tag>.*``, key prefix
``bench-<tag>``); only keys this run created are deleted at the end, and only the worker
processes this script started are stopped (by process group).

Brokers: ``--broker redis,rabbitmq`` runs the overhead section on each broker named, side by
side in one run (every side of every broker in the same rotation, each broker with its own
workers and tag); the other sections run on the first. ``redis`` is Redis db 12
(``BENCH_REDIS_URL``), ``rabbitmq`` the machine's RabbitMQ (``BENCH_RABBITMQ_URL``, default
``amqp://guest:guest@127.0.0.1:5672//``), or an ``amqp://`` URL. On RabbitMQ the queues are the
run's own (``bench-<tag>.*``, deleted with their exchanges at the end); tea_dist's state and
both sides' results stay in Redis db 12.

5. observe (only with ``--observe``): the overhead section's tea_dist fan-out with tracing and
   metrics off, against the same on a second ``-c 2`` worker that has both on (this module is
   its ``-A`` app: an SDK ``TracerProvider`` with a ``BatchSpanProcessor`` dropping the spans,
   metrics in Prometheus multiprocess mode) and the caller tracing and counting too.

Run: ``python bench/celery_vs_raw.py [--quick] [--reps R] [--sizes N,N] [--only SECTIONS]
[--observe] [--broker redis,rabbitmq]``.
``--quick`` (a smoke run, ~30 s): N = 50 and 200, 2 repetitions; 0.1 s CPU branches on
``-c 1`` and ``-c 2`` only; one repetition of tea_dist's two timeout paths and of one
fail-fast pair.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tea_dist
from bench import benchnodes as bn
from bench.common import (
    ROOT,
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
from tea_dist.distributed.children import stop_groups
from tea_dist.distributed.settings import Settings, redact
from tea_dist.distributed.worker import settings_env, wait_ready, worker_argv

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12")
RABBITMQ_URL = os.environ.get("BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BROKER_NAMES = {"redis": REDIS_URL, "rabbitmq": RABBITMQ_URL}
SECTIONS = ("overhead", "cpu", "timeout", "failfast")
WORKER_APPS = {  # worker kind -> the -A module it runs
    "tea": "tea_dist.distributed.worker_app",
    "observed": "bench.celery_vs_raw",  # tracing and metrics on: see the end of this module
    "raw": "bench.rawtasks",
    "refill": "bench.refill_bootstep",
}
TIMEOUT = 0.5  # timeout_seconds of the timeout section


def broker_url(name: str) -> str:
    """``redis``, ``rabbitmq`` or a broker URL, as a URL."""
    url = BROKER_NAMES.get(name, name)
    if "://" not in url:
        raise ValueError(f"unknown broker {name!r}: redis, rabbitmq or a URL")
    return url


class Cluster:
    """The workers of one benchmark run on one broker, each on its own queue, under one tag."""

    def __init__(self, broker: str = "redis") -> None:
        import redis

        self.label = broker if broker in BROKER_NAMES else redact(broker)
        self.tag = uuid.uuid4().hex[:8]
        self.prefix = f"bench-{self.tag}"
        self.settings = Settings(
            broker_url=broker_url(broker),
            redis_url=REDIS_URL,
            key_prefix=self.prefix,
            flows_queue=self.queue("tea"),
            runs_queue=self.queue("runs"),
            result_expires=600,
            allowed=("bench",),  # the benchmark's node modules
        )
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.keys_before = set(self.redis.scan_iter(count=1000))
        self.workers: list[subprocess.Popen[bytes]] = []
        self.names: dict[str, int] = {}
        self.logs = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-logs-"))
        self.teas: dict[Settings, tea_dist.Cluster] = {}
        self.raws: dict[bool, Any] = {}

    def tea(self, **overrides: Any) -> tea_dist.Cluster:
        """The caller's tea_dist cluster of these workers (``overrides``: one of its own)."""
        settings = self.settings.with_overrides(**overrides) if overrides else self.settings
        if settings not in self.teas:
            self.teas[settings] = tea_dist.Cluster(settings=settings)
        return self.teas[settings]

    def raw(self, events: bool) -> Any:
        """The caller's raw Celery app on this broker, task-sent events on or off."""
        from bench import rawtasks

        if events not in self.raws:
            settings = self.settings.with_overrides(flows_queue=self.queue("raw"))
            self.raws[events] = rawtasks.caller_app(settings, events=events)
        return self.raws[events]

    def pid_of(self, queue: str) -> int:
        """The pid (= process group) of the first worker started on ``queue``."""
        return self.names[queue]

    def queue(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def start(
        self, specs: list[tuple[str, str, int]], events: Collection[str] = frozenset()
    ) -> None:
        """Start workers ``(kind, queue name, concurrency)`` at once; wait until all answer.

        Workers on the queues named in ``events`` send task events (``TEA_DIST_TASK_EVENTS``,
        which gives ``--task-events`` and the raw app's events configuration too).
        """
        pending = []
        for n, (kind, queue, concurrency) in enumerate(specs):
            settings = self.settings.with_overrides(
                flows_queue=self.queue(queue), task_events=queue in events
            )
            name = f"{kind}-{queue}-{n}-{self.tag}@%h"
            argv = worker_argv(settings, "flows", concurrency=concurrency, name=name)
            argv[argv.index("tea_dist.distributed.worker_app")] = WORKER_APPS[kind]
            env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
            if kind == "observed":
                metrics_dir = self.logs / "metrics"
                metrics_dir.mkdir(exist_ok=True)
                env |= {"BENCH_OBSERVED": "1", "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
                env["TEA_DIST_METRICS_PORT"] = "9464"  # recorded, not served (multiprocess)
            log = open(self.logs / f"{kind}-{queue}-{n}.log", "ab")
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.workers.append(proc)
            self.names.setdefault(queue, proc.pid)
            pending.append((settings, name, proc))
        for settings, name, proc in pending:
            wait_ready(settings, name, proc, 90)

    def stop(self) -> None:
        stop_groups(self.workers, 10)
        self.workers.clear()

    def delete_queues(self) -> int:
        """A broker other than Redis: delete the run's queues and their exchanges (named
        ``bench-<tag>.*``, as Celery declares them for a queue)."""
        from kombu import Connection

        if self.settings.broker == REDIS_URL:
            return 0
        deleted = 0
        with Connection(self.settings.broker, connect_timeout=5) as connection:
            for name in sorted(self.names):
                queue = self.queue(name)
                with contextlib.suppress(Exception):
                    channel = connection.channel()
                    channel.queue_delete(queue)
                    channel.exchange_delete(queue)
                    channel.close()
                    deleted += 1
        return deleted

    def cleanup(self) -> int:
        """Delete the keys this run created (its tag, or Celery keys that are new since start)."""
        celery_like = (
            b"celery-task-meta-",
            b"celery-taskset-meta-",
            b"chord-unlock-",
            b"_kombu.",
            b"unacked",
        )
        tag = self.tag.encode()
        doomed = []
        for key in self.redis.scan_iter(count=1000):
            new = key not in self.keys_before
            if tag in key or (
                new and (key.startswith(celery_like) or key.endswith((b".j", b".t", b".pidbox")))
            ):
                doomed.append(key)
            elif key.startswith(b"_kombu.binding."):  # a set from before: drop our members
                mine = [m for m in self.redis.smembers(key) if tag in m]
                if mine:
                    self.redis.srem(key, *mine)
        for i in range(0, len(doomed), 500):
            self.redis.delete(*doomed[i : i + 500])
        shutil.rmtree(self.logs, ignore_errors=True)
        return len(doomed)


def group_cpu(pgid: int) -> float:
    """CPU seconds used so far by a process group (reaped children included), from /proc."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # utime, stime, cutime, cstime
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def forget(app: Any, ids: list[str]) -> None:
    """Delete raw result keys (outside the timed region)."""
    if app is None or not ids:
        return
    backend = app.backend
    client = backend.client
    for i in range(0, len(ids), 500):
        client.delete(*[backend.get_key_for_task(t) for t in ids[i : i + 500]])


# -- 1. overhead --


OVERHEAD_TARGET = 1.05  # tea_dist / raw at N = 200, events off and events on alike
VARIANTS = (  # (label, raw queue, tea queue, task events on both sides)
    ("off", "raw", "tea", False),
    ("on", "raw-ev", "tea-ev", True),
)


@dataclass
class Side:
    """One side of the overhead comparison: its worker's process group, its timed run."""

    name: str
    pgid: int
    run: Callable[[], list[str]]  # timed: returns the raw task ids to forget afterwards
    app: Any = None  # the raw app whose results those are


def overhead_section(clusters: list[Cluster], sizes: list[int], reps: int) -> str:
    rows = []
    warm = min(sizes)
    for n in sizes:
        sides = []
        for cluster in clusters:
            for label, raw_q, tea_q, events in VARIANTS:
                raw_app = cluster.raw(events)
                sides.append(
                    Side(
                        f"{cluster.label} raw/{label}",
                        cluster.pid_of(raw_q),
                        _raw_chord(n, cluster.queue(raw_q), raw_app),
                        raw_app,
                    )
                )
                graph = fan_graph(
                    n,
                    bn.noop,
                    ParallelConfig(strategy="celery", queue=cluster.queue(tea_q)),
                    name=f"noop{n}-{label}",
                )
                compiled = graph.compile(cluster=cluster.tea(task_events=events))
                sides.append(
                    Side(
                        f"{cluster.label} tea/{label}",
                        cluster.pid_of(tea_q),
                        _tea_fanout(compiled, n),
                    )
                )
        if n == warm:  # warm every side once (connections, imports on the workers)
            for side in sides:
                forget(side.app, side.run())
        times: dict[str, list[float]] = {side.name: [] for side in sides}
        caller: dict[str, list[float]] = {side.name: [] for side in sides}
        workers: dict[str, list[float]] = {side.name: [] for side in sides}
        for rep in range(reps):
            shift = rep % len(sides)  # rotate the order: no side always runs first or last
            for side in sides[shift:] + sides[:shift]:
                worker_cpu, cpu = group_cpu(side.pgid), time.process_time()
                started = time.perf_counter()
                raw_ids = side.run()
                times[side.name].append(time.perf_counter() - started)
                caller[side.name].append(time.process_time() - cpu)
                workers[side.name].append(group_cpu(side.pgid) - worker_cpu)
                forget(side.app, raw_ids)
            progress(f"overhead N={n}: repetition {rep + 1}/{reps} done")
        for cluster, (label, *_) in itertools.product(clusters, VARIANTS):
            raw, tea = f"{cluster.label} raw/{label}", f"{cluster.label} tea/{label}"
            t_raw, t_tea = median(times[raw]), median(times[tea])
            verdict = "-"
            if n == 200:
                verdict = "ok" if t_tea / t_raw <= OVERHEAD_TARGET else "MISSED"
            rows.append(
                [
                    f"N={n}",
                    cluster.label,
                    label,
                    f"{t_raw:.3f}",
                    f"{t_tea:.3f}",
                    ratio(t_tea, t_raw),
                    f"{n / t_raw:.0f}",
                    f"{n / t_tea:.0f}",
                    f"{median(caller[raw]) / n * 1e3:.2f}",
                    f"{median(caller[tea]) / n * 1e3:.2f}",
                    f"{median(workers[raw]) / n * 1e3:.2f}",
                    f"{median(workers[tea]) / n * 1e3:.2f}",
                    verdict,
                ]
            )
    return table(
        "Overhead: N no-op branches vs a raw chord of N no-op tasks, one prefork -c 2 worker "
        f"each, {reps} rotating repetitions of all {4 * len(clusters)} sides; medians",
        [
            "fan-out",
            "broker",
            "task events",
            "raw med s",
            "tea med s",
            "tea/raw",
            "raw /s",
            "tea /s",
            "caller CPU ms/task raw",
            "tea",
            "worker CPU ms/task raw",
            "tea",
            f"N=200 target <={OVERHEAD_TARGET:g}x",
        ],
        rows,
    ) + (
        "\ntask events off: tea_dist's defaults against a raw app with a plain configuration "
        "(JSON, late ack,\nprefetch 1, no events); on: both with worker task events and "
        "task-sent events (TEA_DIST_TASK_EVENTS=1;\nraw: -E and task_send_sent_event), what "
        "a Flower user runs. CPU columns: median CPU seconds per\nbranch of this process and "
        "of the worker's process group, from /proc; all share 2 cores with Redis."
    )


def _raw_chord(n: int, raw_queue: str, app: Any = None) -> Callable[[], list[str]]:
    """A raw ``chord`` of ``n`` no-op tasks sent by ``app`` (``rawtasks.app`` by default),
    waited on the fast way; returns its task ids."""
    from celery import chord
    from celery.exceptions import TimeoutError as ResultTimeout

    from bench import rawtasks

    app = app or rawtasks.app

    def run() -> list[str]:
        header = [app.signature("bench.noop", (i,), queue=raw_queue) for i in range(n)]
        result = chord(header)(app.signature("bench.collect", queue=raw_queue))
        wait = 30 + n * 0.05  # ~10x what a healthy chord of n no-op tasks takes here
        try:
            values = result.get(timeout=wait, disable_sync_subtasks=False, follow_parents=False)
        except ResultTimeout as exc:
            done = sum(r.ready() for r in result.parent.results)
            raise RuntimeError(
                f"raw chord of {n} on {redact(app.conf.broker_url)}: its body did not run "
                f"within {wait:g} s ({done} of {n} header tasks done)"
            ) from exc
        if len(values) != n:
            raise RuntimeError(f"raw: {len(values)} of {n} results")
        return [r.id for r in result.parent.results] + [result.id]

    return run


def _tea_fanout(app: Any, n: int) -> Callable[[], list[str]]:
    """``invoke()`` of a compiled fan-out of ``n`` no-op branches."""

    def run() -> list[str]:
        final = final_state(list(app.invoke({})))
        if final["ok"] != n:
            raise RuntimeError(f"tea_dist: {final['ok']} of {n} branches succeeded")
        return []

    return run


# -- 2. cpu --


def cpu_section(cluster: Cluster, seconds: float, reps: int, quick: bool) -> str:
    iterations = bn.calibrate(seconds)
    state = {"iterations": iterations}

    def tea(queue: str) -> Callable[[], None]:
        config = ParallelConfig(strategy="celery", queue=cluster.queue(queue))
        app = fan_graph(4, bn.cpu, config, name=f"cpu-{queue}").compile(cluster=cluster.tea())

        def run() -> None:
            final = final_state(list(app.invoke(state)))
            if final["ok"] != 4:
                raise RuntimeError(f"cpu on {queue}: {final['ok']} of 4 branches succeeded")

        return run

    def sequential() -> None:
        for _ in range(4):
            bn.spin(iterations)

    sides = [
        ("sequential (this process)", sequential),
        ("1 worker -c 1", tea("c1")),
        ("1 worker -c 2", tea("tea")),
        ("2 workers -c 1 (scale-out)", tea("w2")),
    ]
    if quick:  # two workers fewer to start
        sides = sides[:3]
    for _, fn in sides[1:]:
        fn()  # warm
    times = alternate(sides, reps, "cpu")
    seq, one = median(times[sides[0][0]]), median(times[sides[1][0]])
    rows = [
        [name, f"{median(t):.3f}", f"{min(t):.3f}", ratio(seq, median(t)), ratio(one, median(t))]
        for name, t in times.items()
    ]
    return table(
        f"CPU-bound: 4 celery branches x ~{seconds:g} s pure Python ({iterations} iterations), "
        f"{reps} alternating repetitions",
        ["side", "median s", "min s", "speed-up vs sequential", "speed-up vs 1 process"],
        rows,
    )


# -- helpers for the cancellation sections --


def wait_for(path_node: tuple[str, str], what: str = "start", timeout: float = 20.0) -> float:
    """Poll a marker file; its time (``TimeoutError`` if it never shows up)."""
    marker_dir, node = path_node
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mark = bn.read_mark(marker_dir, node, what)
        if mark is not None:
            return mark[0]
        time.sleep(0.005)
    raise TimeoutError(f"{node}.{what} never appeared")


def mark(marker_dir: str, node: str, what: str = "start") -> tuple[float, int]:
    found = bn.read_mark(marker_dir, node, what)
    if found is None:
        raise RuntimeError(f"{node} never recorded '{what}'")
    return found


class Measure:
    """One measured quantity per variant, over the repetitions."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}
        self.notes: dict[str, list[str]] = {}

    def add(self, variant: str, **values: float) -> None:
        for name, value in values.items():
            self.values.setdefault(variant, {}).setdefault(name, []).append(value)

    def note(self, variant: str, text: str) -> None:
        self.notes.setdefault(variant, []).append(text)


# -- 3. timeout --


def timeout_section(cluster: Cluster, reps: int, quick: bool) -> str:
    from bench import rawtasks

    tea_queue, raw_queue = cluster.queue("c1"), cluster.queue("rc1")
    config = ParallelConfig(strategy="celery", queue=tea_queue, timeout_seconds=TIMEOUT)
    stubborn_app = fan_graph(
        0, bn.noop, config, name="t-stubborn", branches=[("b0", bn.stubborn), ("b1", bn.mark_sleep)]
    )
    coop_app = fan_graph(
        0, bn.noop, config, name="t-coop", branches=[("b0", bn.mark_sleep), ("b1", bn.mark_sleep)]
    )
    measure = Measure()
    grace_default = cluster.settings.hard_limit_grace

    def tea(graph: Any, grace: float) -> Callable[[], None]:
        app = graph.compile(cluster=cluster.tea(hard_limit_grace=grace))

        def run() -> None:
            d = tempfile.mkdtemp(prefix=f"{cluster.prefix}-t-")
            try:
                final = final_state(
                    list(app.invoke({}, config={"marker_dir": d, "sleep": {"b0": 6, "b1": 0}}))
                )
                returned = time.time()
                r0, r1 = final["ok"], final["n"]
                start0, start1 = mark(d, "b0")[0], mark(d, "b1")[0]
                deadline = start0 + TIMEOUT
                measure.add("", next_start=start1 - deadline, caller_result=returned - deadline)
                if r0 != 1 or r1 != 2:
                    measure.note("", f"unexpected: {r0} of {r1} branches succeeded")
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return run

    def raw(task: Any, soft: float | None, hard: float) -> Callable[[], None]:
        def run() -> None:
            d = tempfile.mkdtemp(prefix=f"{cluster.prefix}-rt-")
            try:
                limits: dict[str, Any] = {"time_limit": hard}
                if soft is not None:
                    limits["soft_time_limit"] = soft
                first = task.apply_async((d, "b0", 6.0), queue=raw_queue, **limits)
                nxt = rawtasks.mark_sleep.apply_async((d, "b1", 0.0), queue=raw_queue)
                with contextlib.suppress(Exception):
                    first.get(timeout=20, propagate=False, disable_sync_subtasks=False)
                returned = time.time()
                nxt.get(timeout=20, disable_sync_subtasks=False)
                start0, start1 = mark(d, "b0")[0], mark(d, "b1")[0]
                deadline = start0 + (soft if soft is not None else hard)
                measure.add("", next_start=start1 - deadline, caller_result=returned - deadline)
                forget(rawtasks.app, [first.id, nxt.id])
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return run

    sides = [
        (
            f"tea_dist stubborn, grace {grace_default:g} s (default)",
            tea(stubborn_app, grace_default),
        ),
        ("raw stubborn, soft 0.5 + hard 1.5", raw(rawtasks.stubborn, TIMEOUT, 1.5)),
        ("tea_dist stubborn, grace 0.3 s", tea(stubborn_app, 0.3)),
        ("raw stubborn, hard 0.5 only", raw(rawtasks.stubborn, None, TIMEOUT)),
        ("tea_dist cooperative (soft limit)", tea(coop_app, grace_default)),
        ("raw cooperative, soft 0.5 + hard 1.5", raw(rawtasks.mark_sleep, TIMEOUT, 1.5)),
    ]
    if quick:  # a smoke run: tea_dist's two paths only
        sides = [sides[0], sides[4]]
    alternate([(name, _rename(fn, name, measure)) for name, fn in sides], reps, "timeout")
    return _latency_table(
        f"Timeout path: -c 1 worker, timeout_seconds={TIMEOUT}; latency = next branch start - "
        f"(timed-out branch start + {TIMEOUT} s), {reps} alternating repetitions",
        measure,
        [name for name, _ in sides],
        [
            ("next_start", "deadline -> next branch starts (med s)"),
            ("caller_result", "deadline -> caller has the result (med s)"),
        ],
    )


def _rename(fn: Callable[[], None], name: str, measure: Measure) -> Callable[[], None]:
    """Run ``fn`` (its runners record under the variant "") and file its values under ``name``.

    A repetition that fails is noted in the table, not fatal.
    """

    def run() -> None:
        try:
            fn()
        except Exception as exc:
            measure.note(name, f"error: {type(exc).__name__}: {exc}")
        for key, values in measure.values.pop("", {}).items():
            measure.values.setdefault(name, {}).setdefault(key, []).extend(values)
        for text in measure.notes.pop("", []):
            measure.note(name, text)

    return run


def _latency_table(
    title: str, measure: Measure, variants: list[str], columns: list[tuple[str, str]]
) -> str:
    first = columns[0][0]
    header = ["variant", *[label for _, label in columns], "min/max of 1st", "target <1 s"]
    rows = []
    for variant in variants:
        values = measure.values.get(variant, {})
        cells: list[str] = [variant]
        for key, _ in columns:
            got = values.get(key, [])
            cells.append(f"{median(got):.3f}" if got else "n/a")
        got = values.get(first, [])
        cells.append(f"{min(got):.3f}/{max(got):.3f}" if got else "n/a")
        cells.append(("ok" if median(got) < 1.0 else "MISSED") if got else "n/a")
        rows.append(cells)
    text = table(title, header, rows)
    notes = [f"  {v}: {n}" for v in variants for n in measure.notes.get(v, [])]
    return text + ("\nnotes:\n" + "\n".join(notes) if notes else "")


# -- 4. fail-fast --


class FailureClock:
    """A callback that records when the caller learns that branch 'a' failed."""

    def __init__(self) -> None:
        self.at: float | None = None

    def on_flow_complete(self, ctx: Any, result: Any) -> None:
        if ctx.branch == "a" and not result.success and self.at is None:
            self.at = time.time()


def failfast_section(cluster: Cluster, reps: int, quick: bool) -> str:
    from bench import rawtasks

    tea_queue, raw_queue = cluster.queue("tea"), cluster.queue("raw")
    config = ParallelConfig(strategy="celery", queue=tea_queue, fail_fast=True)
    probe_app = fan_graph(
        0,
        bn.noop,
        ParallelConfig(strategy="celery", queue=tea_queue),
        name="probe",
        branches=[("p1", bn.hold_until), ("p2", bn.mark_sleep)],
    ).compile(cluster=cluster.tea())
    measure = Measure()
    sleeps = {"a": 0.3, "b": 10.0, "p1": 8.0, "p2": 0.0}

    def tea(long_node: Callable[..., Any]) -> Callable[[], None]:
        graph = fan_graph(
            0, bn.noop, config, name="ff", branches=[("a", bn.fail_after), ("b", long_node)]
        )

        def run() -> None:
            d = tempfile.mkdtemp(prefix=f"{cluster.prefix}-f-")
            clock = FailureClock()
            app = graph.compile(parallel_callbacks=[clock], cluster=cluster.tea())
            run_config = {"marker_dir": d, "sleep": sleeps, "release": {"p1": "p2"}}
            probe_done: list[Any] = []

            def probe() -> None:
                wait_for((d, "b"))
                probe_done.append(final_state(list(probe_app.invoke({}, config=run_config))))

            thread = threading.Thread(target=probe, daemon=True)
            thread.start()
            try:
                events = list(app.invoke({}, config=run_config))
                returned = time.time()
                thread.join(30)
                if events[-1]["type"] != "error" or not probe_done:
                    raise RuntimeError(f"unexpected: {events[-1]['type']}, probe {probe_done}")
                _record_failfast(measure, d, clock.at, returned)
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return run

    def raw(sig: str) -> Callable[[], None]:
        def run() -> None:
            d = tempfile.mkdtemp(prefix=f"{cluster.prefix}-rf-")
            try:
                a = rawtasks.fail_after.apply_async((d, "a", sleeps["a"]), queue=raw_queue)
                b = rawtasks.mark_sleep.apply_async((d, "b", sleeps["b"]), queue=raw_queue)
                wait_for((d, "b"))
                probes = [
                    rawtasks.hold_until.apply_async((d, "p1", "p2", sleeps["p1"]), queue=raw_queue),
                    rawtasks.mark_sleep.apply_async((d, "p2", sleeps["p2"]), queue=raw_queue),
                ]
                a.get(timeout=20, propagate=False, disable_sync_subtasks=False)
                decided = time.time()
                rawtasks.app.control.revoke(b.id, terminate=True, signal=sig)
                returned = time.time()
                for p in probes:
                    p.get(timeout=30, disable_sync_subtasks=False)
                _record_failfast(measure, d, decided, returned)
                forget(rawtasks.app, [a.id, b.id, *(p.id for p in probes)])
            finally:
                shutil.rmtree(d, ignore_errors=True)

        return run

    sides = [
        ("tea_dist fail_fast, B cooperative", tea(bn.mark_sleep)),
        ("raw revoke(terminate=True) SIGTERM", raw("SIGTERM")),
        ("tea_dist fail_fast, B stubborn", tea(bn.stubborn)),
        ("raw revoke(terminate=True) SIGKILL", raw("SIGKILL")),
    ]
    if quick:
        sides = [sides[0], sides[3]]
    alternate([(name, _rename(fn, name, measure)) for name, fn in sides], reps, "fail-fast")
    return _latency_table(
        "Fail-fast path: -c 2 worker, A fails after 0.3 s while B holds the other slot; "
        f"latency = B's slot starts the next branch - cancel decided, {reps} alternating "
        "repetitions",
        measure,
        [name for name, _ in sides],
        [
            ("slot", "decided -> freed slot starts next (med s)"),
            ("from_fail", "A raised -> freed slot starts next (med s)"),
            ("returned", "decided -> caller returns (med s)"),
            ("decide", "A raised -> decided (med s)"),
        ],
    ) + _same_process_note(measure, [name for name, _ in sides])


def _record_failfast(measure: Measure, d: str, decided: float | None, returned: float) -> None:
    if decided is None:
        raise RuntimeError("the failure of branch a was never reported to the caller")
    failed = mark(d, "a", "fail")[0]
    p1, late = mark(d, "p1"), mark(d, "p2")
    b_pid = mark(d, "b")[1]
    if late[1] == p1[1]:
        waited = late[0] - p1[0]
        measure.note("", f"P2 ran after P1 in A's slot: B's slot not freed within {waited:.1f} s")
    measure.add(
        "",
        slot=late[0] - decided,
        from_fail=late[0] - failed,
        returned=returned - decided,
        decide=decided - failed,
        same_process=1.0 if late[1] == b_pid else 0.0,
    )


def _same_process_note(measure: Measure, variants: list[str]) -> str:
    parts = []
    for v in variants:
        same = measure.values.get(v, {}).get("same_process", [])
        if same:
            parts.append(f"  {v}: next branch ran in B's own process {int(sum(same))}/{len(same)}")
    return "\nslot reuse (the process that held B ran the next branch, i.e. not killed):\n" + (
        "\n".join(parts)
    )


def release_pending_results(clusters: Collection[Cluster] = ()) -> None:
    """Drop the AsyncResults the celery backends still track, while Redis still answers.

    tea_dist never waits on its branch tasks' results, so every branch task it sent stays
    subscribed and pending in the caller's result consumer (reported, not fixed here); left
    alone they unsubscribe from ``__del__`` at interpreter exit and print tracebacks.
    """
    from bench import rawtasks

    default = tea_dist.Cluster.current_default()
    apps = [rawtasks.app, *([default.app] if default is not None else [])]
    for cluster in clusters:
        apps += [tea.app for tea in cluster.teas.values()] + list(cluster.raws.values())
    for app in apps:
        for mapping in getattr(app.backend, "_pending_results", ()):
            mapping.clear()
    gc.collect()


def observe_section(cluster: Cluster, sizes: list[int], reps: int) -> str:
    """N no-op branches: tracing and metrics off, against on (caller and worker)."""
    obs = ObservedSide()
    rows = []
    for n in sizes:
        runs = {}
        for mode, queue in (("off", "tea"), ("on", "obs")):
            config = ParallelConfig(strategy="celery", queue=cluster.queue(queue))
            app = fan_graph(n, bn.noop, config, name=f"obs{n}").compile(cluster=cluster.tea())

            def run(app: Any = app, n: int = n, mode: str = mode) -> None:
                obs.set(mode == "on")
                final = final_state(list(app.invoke({})))
                if final["ok"] != n:
                    raise RuntimeError(f"observe {mode}: {final['ok']} of {n} branches succeeded")

            run()  # warm
            runs[mode] = run
        times = alternate(list(runs.items()), reps, f"observe N={n}")
        off, on = median(times["off"]), median(times["on"])
        rows.append(
            [
                f"N={n}",
                f"{off:.3f}",
                f"{on:.3f}",
                f"{off / n * 1e3:.2f}",
                f"{on / n * 1e3:.2f}",
                f"{(on - off) / n * 1e3:+.2f}",
                f"{on / off - 1:+.0%}",
            ]
        )
    obs.set(False)
    return table(
        f"Observability: N no-op celery branches, tracing and metrics off vs on (caller and "
        f"worker), prefork -c 2 each, {reps} alternating repetitions",
        ["fan-out", "off med s", "on med s", "off ms/branch", "on", "cost ms/branch", "cost %"],
        rows,
    )


class ObservedSide:
    """The caller's tracing (spans dropped by a batch processor) and metrics, on or off."""

    def __init__(self) -> None:
        self.provider = dropping_provider()

    def set(self, on: bool) -> None:
        from tea_dist.observe import metrics, tracing

        tracing.set_tracer_provider(self.provider if on else None)
        (metrics.enable if on else metrics.disable)()


def dropping_provider() -> Any:
    """An SDK tracer provider whose batch processor drops every span (no collector's cost)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Drop(SpanExporter):  # type: ignore[misc]
        def export(self, spans: object) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a < 30 s run (smaller, fewer reps)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per section")
    parser.add_argument(
        "--sizes", default=None, help="fan-out sizes of the overhead section (default 200,1000)"
    )
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    parser.add_argument(
        "--observe", action="store_true", help="add the tracing and metrics overhead section"
    )
    parser.add_argument(
        "--broker",
        default="redis",
        help="comma-separated brokers of the overhead section, side by side: redis (default), "
        "rabbitmq (the machine's), or amqp:// URLs; the other sections run on the first",
    )
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    brokers = [b.strip() for b in args.broker.split(",") if b.strip()]
    for broker in brokers:
        try:
            broker_url(broker)
        except ValueError as exc:
            parser.error(str(exc))
    reps = args.reps or (2 if args.quick else 3)
    overhead_reps = args.reps or (2 if args.quick else 5)
    sizes = [50, 200] if args.quick else [200, 1000]
    if args.sizes:
        sizes = [int(n) for n in args.sizes.split(",")]
    started = time.perf_counter()

    from bench import rawtasks

    clusters = [Cluster(broker) for broker in brokers]
    cluster = clusters[0]  # the other sections' broker
    rawtasks.configure(cluster.settings.with_overrides(flows_queue=cluster.queue("raw")))
    specs: list[tuple[str, str, int]] = []
    if {"overhead", "cpu", "failfast"} & set(only):
        specs.append(("tea", "tea", 2))
    if {"overhead", "failfast"} & set(only):
        specs.append(("raw", "raw", 2))
    if "overhead" in only:  # the same pair with task events on
        specs += [("tea", "tea-ev", 2), ("raw", "raw-ev", 2)]
    if {"cpu", "timeout"} & set(only):
        specs.append(("tea", "c1", 1))
    if "cpu" in only and not args.quick:
        specs += [("tea", "w2", 1), ("tea", "w2", 1)]
    if "timeout" in only:
        specs.append(("raw", "rc1", 1))
    if args.observe:
        specs += [("tea", "tea", 2)] if ("tea", "tea", 2) not in specs else []
        specs.append(("observed", "obs", 2))
    overhead_specs = [
        ("tea", "tea", 2),
        ("raw", "raw", 2),
        ("tea", "tea-ev", 2),
        ("raw", "raw-ev", 2),
    ]
    outputs = []
    load_before = os.getloadavg()
    deleted = queues = 0
    try:
        for n, each in enumerate(clusters):
            its = specs if n == 0 else (overhead_specs if "overhead" in only else [])
            progress(f"starting {len(its)} workers on {each.label} (tag {each.tag})")
            each.start(its, events={"tea-ev", "raw-ev"})
        progress(f"workers ready after {time.perf_counter() - started:.1f} s")
        if "overhead" in only:
            outputs.append(overhead_section(clusters, sizes, overhead_reps))
        if "cpu" in only:
            cpu_reps = 1 if args.quick else reps
            outputs.append(cpu_section(cluster, 0.1 if args.quick else 0.5, cpu_reps, args.quick))
        if "timeout" in only:
            outputs.append(timeout_section(cluster, 1 if args.quick else reps, args.quick))
        if "failfast" in only:
            outputs.append(failfast_section(cluster, 1 if args.quick else reps, args.quick))
        if args.observe:
            outputs.append(observe_section(cluster, sizes, reps))
    finally:
        release_pending_results(clusters)
        for each in clusters:
            each.stop()
            queues += each.delete_queues()
            deleted += each.cleanup()
    print(f"command: {command_line()}")
    print(
        f"machine: {os.cpu_count()} cores, Redis {REDIS_URL}, brokers "
        f"{', '.join(f'{c.label} ({redact(c.settings.broker)})' for c in clusters)}, load "
        f"average at start {load_before[0]:.2f}, at end {os.getloadavg()[0]:.2f}\n"
    )
    print("\n\n".join(outputs))
    elapsed = time.perf_counter() - started
    print(
        f"\ntotal {elapsed:.1f} s; {deleted} Redis keys and {queues} broker queues of this run "
        "deleted"
    )


if os.environ.get("BENCH_OBSERVED"):  # this module as the observed worker's -A app
    from opentelemetry import trace

    from tea_dist.distributed.worker_app import app  # noqa: F401 - the worker's app

    trace.set_tracer_provider(dropping_provider())

if __name__ == "__main__":
    main()
