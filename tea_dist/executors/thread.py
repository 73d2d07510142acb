"""The ``thread`` strategy (the default): branches run on threads of this process.

Python cannot kill a thread. A timed-out or fail-fast-cancelled attempt has its
``cancel_token`` set (nodes that name it can return early; the walk itself stops before its
next node) and the supervisor moves on at once, so ``invoke()`` returns on time. A thread that
ignores the signal is abandoned: it is counted and logged, and the pool never holds more than
``MAX_THREADS`` threads, so ignored cancellations cannot pile up threads without bound. Use the
``process`` or ``celery`` strategy when work must really be killed.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from tea_dist.core.config import ParallelConfig
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, run_attempt
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.supervisor import supervise

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime

logger = logging.getLogger("tea_dist.executors.thread")

MAX_THREADS = int(os.environ.get("TEA_DIST_MAX_THREADS", "256"))
IDLE_SECONDS = 5.0
LEAK_GRACE_SECONDS = 0.25  # a stopped node still running after this ignored its cancel token


@functools.cache
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
        self.abandoned: set[Future[Any]] = set()  # stopped, ignored the token, still running
        self._stopping: dict[Future[Any], float] = {}  # stopped, within their grace period
        self._reaping = False

    @property
    def threads(self) -> int:
        """Threads alive in the pool now."""
        return self._threads

    def submit(self, fn: Callable[[], Any]) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._idle:  # reserve a waiting thread: it will take this job
                self._idle -= 1
            elif self._threads < self.max_threads:
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
        self._jobs.put((fn, future))
        return future

    def _work(self) -> None:
        """Run jobs; ``_idle`` counts waiting threads no submit has reserved yet."""
        while True:
            try:
                fn, future = self._jobs.get(timeout=IDLE_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # an unreserved idle thread may leave
                        self._idle -= 1
                        self._threads -= 1
                        return
                continue  # reserved: a job is on its way
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
            with self._lock:
                self.abandoned.discard(future)
                self._stopping.pop(future, None)
                self._idle += 1

    def abandon(self, future: Future[Any]) -> None:
        """Note that nobody waits for ``future`` any more (its cancel token is set).

        A thread still running ``LEAK_GRACE_SECONDS`` later ignored its token: it is counted
        in ``abandoned`` and logged, by one short-lived reaper thread.
        """
        if future.cancel() or future.done():
            return
        with self._lock:
            self._stopping[future] = time.monotonic()
            if self._reaping:
                return
            self._reaping = True
        threading.Thread(target=self._reap, name=f"{self.name}-reaper", daemon=True).start()

    def _reap(self) -> None:
        while True:
            time.sleep(LEAK_GRACE_SECONDS)
            now = time.monotonic()
            with self._lock:
                due = [f for f, t in self._stopping.items() if now - t >= LEAK_GRACE_SECONDS]
                for future in due:
                    del self._stopping[future]
                late = [f for f in due if not f.done()]
                self.abandoned.update(late)
                count, self._reaping = len(self.abandoned), bool(self._stopping)
                again = self._reaping
            if late:
                logger.warning(
                    "%d timed-out branch thread(s) ignored the cancel token and still run "
                    "(%d such threads now); nodes should check cancel_token",
                    len(late),
                    count,
                )
            if not again:
                return


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

    reports_start = False  # an attempt begins when it is started

    def start(
        self,
        task: BranchTask,
        token: CancelToken,
        runtime: Runtime,
        began: Callable[[float], None],
    ) -> Future[AttemptOutcome]:
        return self.pool.submit(lambda: run_attempt(task, runtime.fanout, token))

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
        self.pool.abandon(future)
