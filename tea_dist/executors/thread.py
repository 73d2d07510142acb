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
from concurrent.futures import CancelledError, Future
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


_ATTEMPTS = threading.Lock()  # guards every ``Attempt``'s state, each for a few instructions


class Attempt(Future[Any]):
    """A job on a pool thread, as light as the supervisor needs: its state, result and done
    callbacks under one shared lock instead of a ``Future``'s own condition (an ``RLock``, a
    ``Condition`` and their bound methods per attempt: a thousand branches made a thousand of
    each). ``result()`` before the job is done waits on an event made on demand.

    Only what the supervisor and the pool call is here; it is not for ``asyncio`` or
    ``concurrent.futures.wait`` (``DaemonPool.submit`` returns a real ``Future`` for those).
    """

    def __init__(self) -> None:  # no Future.__init__: its condition is what this saves
        self._state = "PENDING"
        self._result: Any = None
        self._exception: BaseException | None = None
        self._done_callbacks: list[Callable[[Future[Any]], object]] = []
        self._event: threading.Event | None = None

    def set_running_or_notify_cancel(self) -> bool:
        with _ATTEMPTS:
            if self._state == "CANCELLED":
                return False
            self._state = "RUNNING"
            return True

    def _finish(self, result: Any, exception: BaseException | None) -> None:
        with _ATTEMPTS:
            self._result, self._exception, self._state = result, exception, "FINISHED"
            callbacks, event = self._done_callbacks, self._event
        if event is not None:
            event.set()
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("a done callback of %r raised", self)

    def set_result(self, result: Any) -> None:
        self._finish(result, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception)

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with _ATTEMPTS:
            if self._state not in ("FINISHED", "CANCELLED"):
                self._done_callbacks.append(fn)
                return
        fn(self)

    def cancel(self) -> bool:
        with _ATTEMPTS:
            if self._state == "RUNNING" or self._state == "FINISHED":
                return False
            first, self._state = self._state == "PENDING", "CANCELLED"
            callbacks, event = self._done_callbacks, self._event
        if first:
            if event is not None:
                event.set()
            for callback in callbacks:
                callback(self)
        return True

    def cancelled(self) -> bool:
        return self._state == "CANCELLED"

    def __repr__(self) -> str:
        return f"<Attempt at {id(self):#x} state={self._state.lower()}>"

    def running(self) -> bool:
        return self._state == "RUNNING"

    def done(self) -> bool:
        return self._state in ("FINISHED", "CANCELLED")

    def result(self, timeout: float | None = None) -> Any:
        self._wait(timeout)
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._exception

    def _wait(self, timeout: float | None) -> None:
        with _ATTEMPTS:
            if not self.done() and self._event is None:
                self._event = threading.Event()
            event = self._event
        if event is not None and not event.wait(timeout):
            raise TimeoutError
        if self._state == "CANCELLED":
            raise CancelledError


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

    def submit(self, fn: Callable[[], Any], future: Future[Any] | None = None) -> Future[Any]:
        """Run ``fn`` on a pool thread; its result in ``future`` (a new ``Future`` if none)."""
        future = Future() if future is None else future
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
        attempt = Attempt()
        self.pool.submit(functools.partial(run_attempt, task, runtime.fanout, token), attempt)
        return attempt

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
        self.pool.abandon(future)
