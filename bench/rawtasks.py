"""Raw Celery: the baseline of ``bench/celery_vs_raw.py``.

Its own ``Celery`` app, configured exactly like tea_dist's (``celery_config(settings)``: same
broker and backend, JSON, late ack, reject on worker lost, prefetch 1, task events), with
trivial tasks. A worker runs it with ``celery -A bench.rawtasks worker`` and the same options as
a tea_dist flow worker (prefork pool, same concurrency); its settings come from the same
``TEA_DIST_*`` environment. The benchmark process calls ``configure(settings)``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from celery import Celery

from tea_dist.distributed.celery_app import celery_config
from tea_dist.distributed.settings import Settings

app = Celery("bench_raw", set_as_current=False)
app.conf.update(celery_config(Settings()))


def configure(settings: Settings) -> Celery:
    """Point the raw app at ``settings`` (its flows queue is where raw tasks go by default)."""
    app.conf.update(celery_config(settings))
    return app


def _mark(marker_dir: str, name: str, what: str) -> None:
    from bench.benchnodes import write_mark

    write_mark(marker_dir, name, what)


@app.task(name="bench.noop")
def noop(i: int) -> int:
    return i


@app.task(name="bench.collect")
def collect(results: list[Any]) -> list[Any]:
    """The chord body: the header results, as tea_dist's ``collect_flows`` returns them."""
    return results


@app.task(name="bench.cpu")
def cpu(iterations: int) -> int:
    from bench.benchnodes import spin

    return spin(iterations)


@app.task(name="bench.mark_sleep")
def mark_sleep(marker_dir: str, name: str, seconds: float) -> None:
    """Records its start, then sleeps (a soft time limit interrupts it)."""
    _mark(marker_dir, name, "start")
    time.sleep(seconds)


@app.task(name="bench.stubborn")
def stubborn(marker_dir: str, name: str, seconds: float) -> None:
    """Records its start, then swallows every exception (the soft limit too) until killed."""
    _mark(marker_dir, name, "start")
    end = time.time() + seconds
    while time.time() < end:
        with contextlib.suppress(BaseException):
            time.sleep(0.02)
    _mark(marker_dir, name, "survived")


@app.task(name="bench.fail_after")
def fail_after(marker_dir: str, name: str, seconds: float) -> None:
    """Records its start, sleeps, records the failure time, raises."""
    _mark(marker_dir, name, "start")
    time.sleep(seconds)
    _mark(marker_dir, name, "fail")
    raise RuntimeError("planned failure")


@app.task(name="bench.hold_until")
def hold_until(marker_dir: str, name: str, other: str, seconds: float) -> None:
    """Records its start, then holds its slot until ``other`` has started (at most ``seconds``)."""
    _mark(marker_dir, name, "start")
    end = time.time() + seconds
    while time.time() < end and not Path(marker_dir, f"{other}.start").exists():
        time.sleep(0.005)
