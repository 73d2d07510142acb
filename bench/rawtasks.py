"""Raw Celery: the baseline of ``bench/celery_vs_raw.py``, configured as a user would.

Its own ``Celery`` app with its own plain configuration (not tea_dist's ``celery_config``):
JSON, late acknowledgement paired with reject-on-worker-lost, prefetch 1, and no task events
(Celery's default) unless ``events`` is asked for: then ``worker_send_task_events`` and
``task_send_sent_event``, what a user who watches in Flower switches on. A worker runs it with
``celery -A bench.rawtasks worker`` and the same command line as a tea_dist flow worker (prefork
pool, same concurrency). Only where Redis and the queue are, and whether events are on, come
from the ``TEA_DIST_*`` environment; the benchmark process calls ``configure(settings)``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from celery import Celery

from tea_dist.distributed.settings import Settings


def plain_config(
    broker: str, backend: str | None, queue: str, *, events: bool
) -> dict[str, object]:
    """The configuration a user writes for reliable JSON tasks (on Redis or RabbitMQ)."""
    return {
        "broker_url": broker,
        "result_backend": backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": queue,
        "worker_send_task_events": events,
        "task_send_sent_event": events,
        "broker_connection_retry_on_startup": True,
    }


def config_of(settings: Settings, *, events: bool) -> dict[str, object]:
    """``plain_config`` for ``settings``: its broker, its Redis as the result backend (as on
    tea_dist's side), its flows queue as the default queue."""
    return plain_config(settings.broker, settings.backend, settings.flows_queue, events=events)


def configure(settings: Settings, *, events: bool | None = None) -> Celery:
    """Point the raw app at ``settings`` (its flows queue is where raw tasks go by default);
    task events as ``settings.task_events`` unless ``events`` says otherwise."""
    on = settings.task_events if events is None else events
    app.conf.update(config_of(settings, events=on))
    return app


def caller_app(settings: Settings, *, events: bool) -> Celery:
    """A raw app of its own for a caller that sends by task name (``app.signature``): one per
    broker and events setting, so several run side by side in one process."""
    caller = Celery(f"bench_raw_{settings.flows_queue}", set_as_current=False)
    caller.conf.update(config_of(settings, events=events))
    return caller


app = Celery("bench_raw", set_as_current=False)
configure(Settings())


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
