"""Starting workers: the one place that knows a worker's command line.

Two roles: ``flows`` runs branch tasks (queue ``tea.flows``, prefork pool: a timeout or a
cancel really kills the work) and ``runs`` runs whole submitted workflows (queue ``tea.runs``,
thread pool: the driver mostly waits on chords, and must never take a branch slot).
``tea-dist worker``, the local cluster and the test fixtures all start workers from here.

Every child started here leads its own process group and dies with its parent (``children``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.children import die_with_parent, log_tail
from tea_dist.distributed.settings import Settings
from tea_dist.observe.metrics import MULTIPROC_ENV, PORT_ENV, QUEUE_DEPTH, serve_directory

Role = Literal["flows", "runs"]
ROLES: dict[str, tuple[str, int]] = {
    "flows": ("prefork", os.cpu_count() or 2),
    "runs": ("threads", 8),
}


def worker_argv(
    settings: Settings,
    role: str,
    *,
    concurrency: int | None = None,
    name: str | None = None,
    queues: str | None = None,
    loglevel: str = "INFO",
) -> list[str]:
    """``celery worker`` arguments for a role (``-A tea_dist.distributed.worker_app`` included)."""
    if role not in ROLES:
        raise ConfigError(f"unknown worker role '{role}'; roles: {', '.join(ROLES)}, all")
    _ = settings.redis  # a worker keeps tea_dist's state in Redis: ConfigError if none is named
    pool, default_concurrency = ROLES[role]
    queue = queues or (settings.flows_queue if role == "flows" else settings.runs_queue)
    return [
        "-A",
        "tea_dist.distributed.worker_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency or default_concurrency),
        "--queues",
        queue,
        "--hostname",
        name or f"{role}@%h",
        # Task events only when asked for; Flower's ``enable_events`` switches them on later.
        # That needs the worker's event dispatcher, which its heartbeats keep enabled: never
        # add ``--without-heartbeat`` here.
        *(["--task-events"] if settings.task_events else []),
        # a run worker takes a run only when a thread is free to start it at once: a run it
        # held back unstarted would wait out the visibility timeout if the worker were killed
        *(["--disable-prefetch"] if role == "runs" else []),
        "--without-mingle",
        "--without-gossip",
        "--loglevel",
        loglevel,
    ]


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``TEA_DIST_*`` environment that gives another process these settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, tuple):
            value = ",".join(value)
        env[f"TEA_DIST_{name.upper()}"] = str(value)
    return env


def spawn_worker(
    settings: Settings,
    role: str,
    *,
    concurrency: int | None = None,
    name: str,
    log_path: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    ready_timeout: float = 60.0,
) -> subprocess.Popen[bytes]:
    """Start a worker process in its own process group and wait until it answers a ping."""
    env = {**os.environ, **settings_env(settings), **(extra_env or {})}
    argv = worker_argv(settings, role, concurrency=concurrency, name=name)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", *argv],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )
    wait_ready(settings, name, proc, ready_timeout, log_path)
    return proc


class QueueDepth:
    """A Prometheus collector: ``tea_dist_queue_depth{queue}``, the messages waiting in each of
    a worker's queues (a Redis broker's lists, another broker's queue counts), read when
    scraped."""

    def __init__(self, settings: Settings, queues: list[str]) -> None:
        self.broker, self.queues = settings.broker, queues

    def describe(self) -> list[Any]:
        return [self._family()]

    def _family(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        return GaugeMetricFamily(QUEUE_DEPTH, "Messages waiting in a queue", labels=["queue"])

    def collect(self) -> list[Any]:
        from tea_dist.distributed.connections import queue_depths

        family = self._family()
        try:
            depths = queue_depths(self.broker, self.queues)
        except Exception:
            return []  # the broker is away: no sample rather than a wrong one
        for queue, depth in depths.items():
            family.add_metric([queue], depth)
        return [family]


def serve_metrics(settings: Settings, role: str, port: int, queues: str | None) -> dict[str, str]:
    """Serve ``/metrics`` on ``port`` from this process for the worker processes it starts
    (and their prefork children): the environment to start them with."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--metrics-port needs prometheus-client: tea-dist[metrics]") from exc
    directory = tempfile.mkdtemp(prefix="tea-dist-metrics-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    names = {"flows": settings.flows_queue, "runs": settings.runs_queue}
    served = queues.split(",") if queues else [names[r] for r in names if role in (r, "all")]
    try:
        serve_directory(port, directory, [QueueDepth(settings, served)])
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc.strerror or exc}") from exc
    return {MULTIPROC_ENV: directory, PORT_ENV: str(port)}


def spawn_flower(
    settings: Settings, port: int, *, auth: str | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start Flower for ``settings`` on 127.0.0.1:``port`` in its own process group.

    ``auth`` (``user:password``, several separated by commas) reaches Flower through its own
    ``FLOWER_BASIC_AUTH`` environment variable, never its command line, which every user of
    the machine can read with ``ps``; the broker URL travels in the environment as well.
    """
    argv = [sys.executable, "-m", "celery", "-A", "tea_dist.distributed.worker_app", "flower"]
    argv += [f"--port={port}", "--address=127.0.0.1"]
    env = {**os.environ, **settings_env(settings)}
    if auth:
        env["FLOWER_BASIC_AUTH"] = auth
    return subprocess.Popen(
        argv,
        env=env,
        stdout=open(log_path, "ab") if log_path else subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent(),
    )


def wait_ready(
    settings: Settings,
    name: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    log_path: Path | None = None,
) -> None:
    """Block until the worker ``name`` answers a ping (``TeaDistError`` if it dies or is slow)."""
    from tea_dist.distributed.celery_app import make_app

    probe = make_app(settings)
    deadline = time.monotonic() + timeout
    host = name.split("@")[0]
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_tail(log_path)
                raise TeaDistError(
                    f"worker '{name}' exited with code {proc.returncode} while starting"
                    + (f"; its log ends: {tail}" if tail else "")
                )
            replies = probe.control.ping(timeout=0.3)
            if any(host in worker for reply in replies for worker in reply):
                return
        raise TeaDistError(f"worker '{name}' did not answer within {timeout:g}s")
    finally:
        probe.close()
