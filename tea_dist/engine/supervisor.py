"""The scheduler shared by the in-process strategies (thread, process, asyncio, inline).

It drives a fan-out's ``Lifecycle`` on a ``Backend``: at most ``slots`` attempts running at
once, a waiting retry on a timer (it holds no slot and delays no sibling), attempts stopped at
their deadline, the run's cancellation noticed within ``CANCEL_POLL_SECONDS``. What a branch's
life is (admission, retries, results, fail-fast) is the lifecycle's; a ``Backend`` only starts
an attempt somewhere (a thread, a child process, a task on an event loop) and stops it.
"""

from __future__ import annotations

import heapq
import queue
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import TYPE_CHECKING, Protocol

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask
from tea_dist.engine.lifecycle import BranchRun, Lifecycle
from tea_dist.engine.nodes import CancelToken

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime


class Backend(Protocol):
    """Where an in-process strategy runs one attempt, and how it stops one."""

    # Whether ``start`` calls its ``began`` when the attempt really begins (a child process
    # that must start first): its timeout then counts from there, not from ``start``.
    reports_start: bool

    def start(
        self,
        task: BranchTask,
        token: CancelToken,
        runtime: Runtime,
        began: Callable[[float], None],
    ) -> Future[AttemptOutcome]:
        """Begin an attempt; the future resolves to its outcome (never raises). A backend
        that ``reports_start`` calls ``began(time.monotonic())``, from any thread, once the
        attempt runs."""
        ...

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        """Stop a running attempt (timeout or fail-fast) as hard as the backend can."""
        ...


CANCEL_POLL_SECONDS = 0.25  # how soon a cancelled run stops its running branches
RENEW_SECONDS = 1.0  # how often the permits of running attempts are renewed


def supervise(
    tasks: Sequence[BranchTask],
    configs: Sequence[ParallelConfig],
    runtime: Runtime,
    backend: Backend,
    slots: int,
) -> list[ParallelFlowResult]:
    """Run every branch to a result on ``backend`` with at most ``slots`` attempts at once."""
    return _Supervisor(tasks, configs, runtime, backend, max(1, slots)).run()


class _Supervisor:
    def __init__(
        self,
        tasks: Sequence[BranchTask],
        configs: Sequence[ParallelConfig],
        runtime: Runtime,
        backend: Backend,
        slots: int,
    ) -> None:
        self.runtime, self.backend, self.slots = runtime, backend, slots
        self.running: dict[Future[AttemptOutcome], BranchRun] = {}
        # the lifecycle's ``stop`` holds the running attempts, not the supervisor: no cycle
        # (supervisor -> lifecycle -> supervisor) keeps a fan-out's objects for the slow,
        # full garbage collection after the run
        stop = _Stopper(self.running, backend)
        self.life = Lifecycle.for_fanout(tasks, configs, runtime, stop=stop)
        # only timeout_total bounds a branch that waits for a slot: skip the scans without it
        self.queue_deadlines = any(c.timeout_total is not None for c in configs)
        self.ready: deque[BranchRun] = deque(self.life.runs)
        self.timers: list[tuple[float, int, BranchRun]] = []
        self.finished: queue.SimpleQueue[Future[AttemptOutcome]] = queue.SimpleQueue()
        self.finished_put = self.finished.put  # one bound method, not one per attempt
        self.began: queue.SimpleQueue[tuple[BranchRun, int, float]] = queue.SimpleQueue()
        self.limited = any(c.limits for c in configs)
        self.next_renewal = time.monotonic() + RENEW_SECONDS

    def run(self) -> list[ParallelFlowResult]:
        try:
            return self._run()
        except BaseException:  # the caller went away (Ctrl-C, an exception): stop everything
            self.life.cancel_all("cancelled: the caller went away")
            raise

    def _run(self) -> list[ParallelFlowResult]:
        life, cancel = self.life, self.runtime.cancel_token
        while life.pending:
            self._start_ready(time.monotonic())
            if not life.pending:
                break
            timeout = self._sleep()
            if self.running:
                done = self._finished(timeout)
            else:  # only retries wait: sleep until the first is due (or the run is cancelled)
                cancel.wait(timeout)
                done = []
            for future in done:
                run = self.running.pop(future, None)
                if run is not None:  # else a deadline or fail-fast stopped it just before
                    self._retry_later(run, life.end(run, future.result()))
            if self.backend.reports_start:
                self._time_began()
            self._expire(time.monotonic())
            if self.limited and time.monotonic() >= self.next_renewal:
                self.next_renewal = time.monotonic() + RENEW_SECONDS
                life.renew_permits()
            if life.pending and cancel.is_cancelled():
                life.cancel_all(cancel.why("cancelled: the run was cancelled"))
        return life.results()

    # -- scheduling --

    def _sleep(self) -> float:
        wakes = [r.attempt_deadline for r in self.running.values() if r.attempt_deadline]
        if self.timers:
            wakes.append(self.timers[0][0])
        if self.queue_deadlines:
            wakes.extend(r.deadline for r in self.ready if r.deadline is not None)
        if not wakes:  # still wake now and then: the run may be cancelled meanwhile
            return CANCEL_POLL_SECONDS
        return max(0.0, min(min(wakes) - time.monotonic(), CANCEL_POLL_SECONDS))

    def _finished(self, timeout: float) -> list[Future[AttemptOutcome]]:
        """Attempts that ended: the first within ``timeout``, then all that ended meanwhile."""
        try:
            done = [self.finished.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.finished.empty():  # this thread alone takes from it
            done.append(self.finished.get_nowait())
        return done

    def _start_ready(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            self.ready.append(heapq.heappop(self.timers)[2])
        reports = self.backend.reports_start
        while self.ready and len(self.running) < self.slots:
            run = self.ready.popleft()
            if run.done or not self.life.admit(run):
                if not run.done and run.wait is not None:  # waits for a permit, holding no slot
                    self._retry_later(run, run.wait)
                continue
            token = CancelToken()
            began = partial(self._began, run, run.state.attempts + 1) if reports else _unheard
            future = self.backend.start(run.task, token, self.runtime, began)
            # the attempt's clock starts once the backend has it, or (a child process that
            # must start first) once it says the attempt began: a pool's start is not its time
            self.life.begin(run, timed=not reports)
            run.handle = (future, token)
            self.running[future] = run
            future.add_done_callback(self.finished_put)

    def _began(self, run: BranchRun, attempt: int, at: float) -> None:
        self.began.put((run, attempt, at))  # any thread: timed in the supervisor's own

    def _time_began(self) -> None:
        """Attempts that began in their process since the last look: timed from then."""
        while True:
            try:
                run, attempt, at = self.began.get_nowait()
            except queue.Empty:
                return
            if run.state.attempts == attempt:  # not a later attempt's by now
                self.life.timing(run, at)

    def _retry_later(self, run: BranchRun, delay: float | None) -> None:
        if delay is not None:
            heapq.heappush(self.timers, (time.monotonic() + delay, run.index, run))

    def _expire(self, now: float) -> None:
        # A timeout may end the fan-out (fail-fast): each step re-checks what is still open.
        for run in list(self.running.values()):
            if run.running and run.attempt_deadline is not None and now >= run.attempt_deadline:
                self._retry_later(run, self.life.time_out(run))
        if self.queue_deadlines:
            for run in [r for r in self.ready if r.deadline is not None and now >= r.deadline]:
                self.ready.remove(run)
                self.life.time_out(run)


def _unheard(at: float) -> None:
    """The ``began`` of a backend that does not report starts (its attempts are timed from
    ``start``)."""


class _Stopper:
    """The lifecycle's ``stop``: end a running attempt on the backend."""

    def __init__(self, running: dict[Future[AttemptOutcome], BranchRun], backend: Backend) -> None:
        self.running, self.backend = running, backend

    def __call__(self, run: BranchRun) -> None:
        if run.handle is None:
            return
        future, token = run.handle
        if self.running.pop(future, None) is not None:
            self.backend.stop(future, token)
