"""What the chaos script started: every process, seen while it was still a descendant.

A process that outlives its parent is re-parented (to PID 1 or a subreaper) and no longer shows
under the process that started it, so the tree of each root is snapshotted often while it runs.
Every child also inherits ``TAG_ENV``: a final sweep finds any process of this session that
escaped the snapshots. Processes are told apart by PID *and* start time (psutil does), so a
reused PID is never taken for one of ours, and only those are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

import psutil

TAG_ENV = "TEA_CHAOS_TAG"


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has ended; only its exit status is left)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def describe(process: psutil.Process) -> str:
    try:
        line = " ".join(process.cmdline())[:110]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        line = "?"
    return f"pid {process.pid} ({line})"


@dataclass
class Tracker:
    """Processes seen under each label (``caller 3``, ``worker flows1-g2``, ``cluster 7``)."""

    tag: str
    seen: dict[tuple[int, float], tuple[psutil.Process, str]] = field(default_factory=dict)

    def snapshot(self, pid: int, label: str) -> None:
        """Record ``pid`` and its current descendants under ``label``."""
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                self.seen.setdefault((process.pid, process.create_time()), (process, label))

    def of(self, label: str) -> list[psutil.Process]:
        return [p for p, seen_as in self.seen.values() if seen_as == label]

    def living(self, label: str | None = None) -> list[psutil.Process]:
        """Processes seen (under ``label``, or any) that still run."""
        seen = self.seen.values()
        return [p for p, seen_as in seen if label in (None, seen_as) and alive(p)]

    def sweep(self) -> list[psutil.Process]:
        """Every live process of this session, by its inherited tag, this one excepted."""
        found = []
        for process in psutil.process_iter():
            if process.pid == os.getpid():
                continue
            try:
                if process.environ().get(TAG_ENV) == self.tag and alive(process):
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found


def wait_gone(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait up to ``timeout`` s for every process to end; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in processes if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


def kill(processes: list[psutil.Process]) -> None:
    """SIGKILL each process (by PID and start time: never a stranger with a reused PID)."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            process.send_signal(signal.SIGKILL)
    wait_gone(processes, 5.0)
