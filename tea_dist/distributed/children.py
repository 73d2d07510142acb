"""Child processes that never outlive their parent.

Every long-lived child tea_dist starts (Redis, workers, Flower) leads its own process group,
so a stop reaches a worker's pool processes too, and on Linux gets SIGKILL from the kernel when
the thread that forked it ends (``prctl(PR_SET_PDEATHSIG)``). ``on_lasting_thread`` makes that
thread one that lives as long as the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
STOP_GRACE = 3.0  # seconds a child gets after SIGTERM before SIGKILL
PR_SET_PDEATHSIG = 1


@cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` making the child receive SIGKILL when its parent (precisely: the
    thread that forked it) ends, on Linux; elsewhere it does nothing."""
    prctl, parent = _prctl(), os.getpid()

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return preexec


def log_tail(path: Path | None, lines: int = 5) -> str:
    """The last ``lines`` non-empty lines of a log file, joined by `` | `` ('' when none)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 8192))
            text = log.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def stop_groups(procs: list[subprocess.Popen[bytes]], grace: float = STOP_GRACE) -> None:
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


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_GRACE) -> None:
    """Stop one child and its process group (SIGTERM, then SIGKILL after ``timeout``)."""
    stop_groups([proc], timeout)


_jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
_keeper: threading.Thread | None = None
_keeper_lock = threading.Lock()


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
    with _keeper_lock:
        if _keeper is None:
            _keeper = threading.Thread(target=_keep, name="tea-dist-cluster-keeper", daemon=True)
            _keeper.start()
    future: Future[T] = Future()
    _jobs.put((job, future))
    return future.result()
