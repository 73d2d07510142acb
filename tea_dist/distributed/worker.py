"""Starting workers: the one place that knows a worker's command line.

Two roles: ``flows`` runs branch tasks (queue ``tea.flows``, prefork pool: a timeout or a
cancel really kills the work) and ``runs`` runs whole submitted workflows (queue ``tea.runs``,
thread pool: the driver mostly waits on chords, and must never take a branch slot).
``tea-dist worker``, the local cluster and the test fixtures all start workers from here.

Every child started here leads its own process group and dies with its parent (``children``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.children import die_with_parent, log_tail
from tea_dist.distributed.settings import Settings

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
    """``celery worker`` arguments for a role (``-A tea_dist.distributed.celery_app`` included)."""
    if role not in ROLES:
        raise ConfigError(f"unknown worker role '{role}'; roles: {', '.join(ROLES)}, all")
    pool, default_concurrency = ROLES[role]
    queue = queues or (settings.flows_queue if role == "flows" else settings.runs_queue)
    return [
        "-A",
        "tea_dist.distributed.celery_app",
        "worker",
        "--pool",
        pool,
        "--concurrency",
        str(concurrency or default_concurrency),
        "--queues",
        queue,
        "--hostname",
        name or f"{role}@%h",
        "--task-events",
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


def spawn_flower(
    settings: Settings, port: int, *, auth: str | None = None, log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start Flower for ``settings`` on 127.0.0.1:``port`` in its own process group."""
    argv = [sys.executable, "-m", "celery", "-A", "tea_dist.distributed.celery_app", "flower"]
    argv += [f"--port={port}", "--address=127.0.0.1"]
    if auth:
        argv.append(f"--basic-auth={auth}")
    return subprocess.Popen(
        argv,
        env={**os.environ, **settings_env(settings)},
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
