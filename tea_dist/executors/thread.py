"""The ``thread`` strategy (the default): branches run on threads of this process.

Python cannot kill a thread. A timed-out or fail-fast-cancelled attempt has its
``cancel_token`` set (nodes that name it can return early; the walk itself stops before its
next node) and the supervisor moves on at once, so ``invoke()`` returns on time. A thread that
ignores the signal is abandoned: it is counted and logged, and the pool never holds more than
``MAX_THREADS`` threads, so ignored cancellations cannot pile up threads without bound. Use the
``process`` or ``celery`` strategy when work must really be killed.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from ..attempt import AttemptOutcome, BranchTask, run_attempt
from ..config import ParallelConfig
from ..graph import FanOut, GraphSpec
from ..nodes import CancelToken
from ..results import ParallelFlowResult
from .local import supervise

if TYPE_CHECKING:
    from ..runtime import Runtime

logger = logging.getLogger("tea_dist.executors.thread")

MAX_THREADS = int(os.environ.get("TEA_DIST_MAX_THREADS", "256"))
IDLE_SECONDS = 5.0


def default_workers() -> int:
    """``concurrent.futures``' default: min(32, cpu count + 4)."""
    return min(32, (os.cpu_count() or 1) + 4)


class DaemonPool:
    """A pool of reusable daemon threads (a hung node never blocks interpreter exit).

    Threads are created on demand up to ``max_threads`` and exit after ``IDLE_SECONDS`` idle.
    """

    def __init__(self, max_threads: int = MAX_THREADS, name: str = "tea-dist-branch") -> None:
        self.max_threads = max_threads
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self.abandoned: set[Future[Any]] = set()

    @property
    def threads(self) -> int:
        """Threads alive in the pool now."""
        return self._threads

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self._jobs.put((fn, future))
        with self._lock:
            if self._jobs.qsize() > self._idle:
                if self._threads < self.max_threads:
                    self._threads += 1
                    name = f"{self.name}-{self._threads}"
                    threading.Thread(target=self._work, name=name, daemon=True).start()
                else:
                    logger.error(
                        "thread pool at its limit of %d threads (%d abandoned after a timeout "
                        "still running); work waits for a free thread",
                        self.max_threads,
                        len(self.abandoned),
                    )
        return future

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                fn, future = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._jobs.qsize() == 0:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            with self._lock:
                self.abandoned.discard(future)

    def abandon(self, future: Future[Any]) -> None:
        """Note that nobody waits for ``future`` any more; log it while its thread still runs."""
        if future.cancel() or future.done():
            return
        with self._lock:
            self.abandoned.add(future)
            count = len(self.abandoned)
        logger.warning(
            "a timed-out branch thread ignored its cancel token and is still running "
            "(%d such threads now); nodes should check cancel_token",
            count,
        )


class ThreadExecutor:
    """Branches on threads, supervised by the shared local supervisor."""

    def __init__(self) -> None:
        self.pool = DaemonPool()

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Threads run any graph."""

    def execute(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> list[ParallelFlowResult]:
        slots = max((c.max_workers or default_workers() for c in configs), default=1)
        return supervise(tasks, configs, runtime, self, slots)

    # -- Backend --

    def start(
        self, task: BranchTask, token: CancelToken, runtime: Runtime
    ) -> Future[AttemptOutcome]:
        return self.pool.submit(lambda: run_attempt(task, runtime.fanout, token))

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
        self.pool.abandon(future)
