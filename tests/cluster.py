"""Real Celery worker processes for integration tests (never eager mode)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TestCluster:
    """Settings shared by the test process and the worker processes it starts."""

    redis_url: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "TEA_DIST_BROKER_URL": self.redis_url,
            "TEA_DIST_KEY_PREFIX": f"tea-test:{self.tag}",
            "TEA_DIST_FLOWS_QUEUE": f"tea.flows.{self.tag}",
            "TEA_DIST_RUNS_QUEUE": f"tea.runs.{self.tag}",
            "TEA_DIST_RESULT_EXPIRES": "600",
        }

    def settings(self):  # type: ignore[no-untyped-def]
        from tea_dist.settings import Settings

        return Settings(**{k.removeprefix("TEA_DIST_").lower(): v for k, v in self.env.items()})

    def start_worker(
        self, name: str, concurrency: int = 2, queues: str | None = None
    ) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "PYTHONPATH": str(ROOT)}
        log = open(ROOT / f".worker-{self.tag}-{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "tea_dist.celery_app",
                "worker",
                "-P",
                "prefork",
                "-c",
                str(concurrency),
                "-Q",
                queues or self.env["TEA_DIST_FLOWS_QUEUE"],
                "-n",
                f"{name}-{self.tag}@%h",
                "--without-mingle",
                "--without-gossip",
                "-E",
                "--loglevel",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.workers.append(proc)
        self._wait_ready(f"{name}-{self.tag}", proc)
        return proc

    def _wait_ready(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        from tea_dist.celery_app import app

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker {name} exited with {proc.returncode}")
            replies = app.control.ping(timeout=0.3)
            if any(name in host for reply in replies for host in reply):
                return
        raise RuntimeError(f"worker {name} did not come up within 30 s")

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        """Kill a worker and its pool children (its own process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    self.kill(proc)
        self.workers.clear()
        for log in ROOT.glob(f".worker-{self.tag}-*.log"):
            log.unlink()
