"""Real Celery worker processes for integration tests (never eager mode)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from celery import Celery

from tea_dist.distributed import defaults
from tea_dist.distributed.children import stop_groups
from tea_dist.distributed.cluster import Cluster
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.worker import spawn_worker

ROOT = Path(__file__).resolve().parent.parent

# Where worker logs go. The test session points it at a folder under pytest's basetemp (kept
# after the run, as pytest keeps its last few basetemps); elsewhere a temporary folder of its
# own, made on first use. Never the repository.
LOG_DIR: Path | None = None
KEEP_LOGS = False  # the test session keeps them; a bench removes its own when it stops


def log_dir() -> Path:
    global LOG_DIR
    if LOG_DIR is None:
        LOG_DIR = Path(tempfile.mkdtemp(prefix="tea-dist-worker-logs-"))
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    return LOG_DIR


_CLUSTERS: dict[Settings, Cluster] = {}  # one Cluster (and Celery app) per settings tried


def cluster_for(settings: Settings) -> Cluster:
    """The test process's ``Cluster`` for ``settings`` (made once)."""
    cluster = _CLUSTERS.get(settings)
    if cluster is None:
        cluster = _CLUSTERS[settings] = Cluster(settings=settings)
    return cluster


def current() -> Cluster:
    """The test process's default cluster (the ``cluster`` fixture's, unless a test changed it)."""
    cluster = Cluster.current_default()
    assert cluster is not None, "no default cluster: use the cluster fixture"
    return cluster


def current_settings() -> Settings:
    return current().settings


def current_app() -> Celery:
    return current().app


def configure(settings: Settings) -> Cluster:
    """Make the cluster of ``settings`` the default one for the rest of the ``as_default()``
    block the test runs in (tests change one setting for a while this way)."""
    cluster = cluster_for(settings)
    with defaults._LOCK:
        if defaults._OPEN:
            defaults._OPEN[-1] = cluster
        else:
            defaults._OPEN.append(cluster)
    return cluster


@dataclass
class TestCluster:
    """Settings shared by the test process and the worker processes it starts."""

    __test__ = False  # not a test class, though test modules import it

    redis_url: str
    agents_dir: str = ""
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: Path = field(default_factory=log_dir)

    @property
    def env(self) -> dict[str, str]:
        return {
            "TEA_DIST_BROKER_URL": self.redis_url,
            "TEA_DIST_KEY_PREFIX": f"tea-test:{self.tag}",
            "TEA_DIST_FLOWS_QUEUE": f"tea.flows.{self.tag}",
            "TEA_DIST_RUNS_QUEUE": f"tea.runs.{self.tag}",
            "TEA_DIST_RESULT_EXPIRES": "600",
            "TEA_DIST_ALLOWED": "tests,bench,examples",
            **({"TEA_DIST_AGENTS_DIR": self.agents_dir} if self.agents_dir else {}),
        }

    def log_path(self, name: str) -> Path:
        """The log file of this cluster's worker ``name`` (under ``logs``, never the repository)."""
        return self.logs / f"worker-{self.tag}-{name}.log"

    def log_files(self) -> list[Path]:
        return sorted(self.logs.glob(f"worker-{self.tag}-*.log"))

    def settings(self) -> Settings:
        return Settings(**{k.removeprefix("TEA_DIST_").lower(): v for k, v in self.env.items()})

    def start_worker(
        self, name: str, concurrency: int = 2, role: str = "flows", **overrides: str
    ) -> subprocess.Popen[bytes]:
        proc = spawn_worker(
            self.settings().with_overrides(**overrides),
            role,
            concurrency=concurrency,
            name=f"{name}-{self.tag}@%h",
            log_path=self.log_path(name),
            extra_env={"PYTHONPATH": str(ROOT)},
        )
        self.workers.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Kill a worker and its pool children (its own process group); one that outlives a
        SIGTERM by 10 s is killed outright, so a failing test leaves nothing behind."""
        if sig == signal.SIGTERM:
            stop_groups([proc], 10)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(10)

    def stop_all(self) -> None:
        stop_groups(self.workers, 10)
        self.workers.clear()
        if not KEEP_LOGS:
            for log in self.log_files():
                log.unlink(missing_ok=True)
