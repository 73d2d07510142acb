"""The supervisor shared by the in-process strategies (thread, process, asyncio).

It owns the branch lifecycle: circuit check before a branch takes a slot, at most
``max_workers`` attempts running at once, per-attempt and total deadlines, retries scheduled
on a timer (a waiting retry holds no slot and delays no sibling), fail-fast cancellation, and
every lifecycle event. A ``Backend`` only starts an attempt somewhere (a thread, a child
process, a task on an event loop) and stops it on request.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import (
    AttemptOutcome,
    BranchLedger,
    BranchTask,
    Finish,
    after_attempt,
    cancelled_result,
    circuit_open_result,
    timeout_outcome,
)
from tea_dist.engine.nodes import CancelToken
from tea_dist.observe.events import FlowContext
from tea_dist.policies.breaker import Admission

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime


class Backend(Protocol):
    """Where an in-process strategy runs one attempt, and how it stops one."""

    def start(
        self, task: BranchTask, token: CancelToken, runtime: Runtime
    ) -> Future[AttemptOutcome]:
        """Begin an attempt; the future resolves to its outcome (never raises)."""
        ...

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        """Stop a running attempt (timeout or fail-fast) as hard as the backend can."""
        ...


CANCEL_POLL_SECONDS = 0.25  # how soon a cancelled run stops its running branches


@dataclass
class _Branch:
    index: int
    task: BranchTask
    config: ParallelConfig
    ledger: BranchLedger
    ctx: FlowContext
    token: CancelToken = field(default_factory=CancelToken)  # the running attempt's
    admission: Admission | None = None
    started: float = 0.0  # monotonic start of the running attempt
    attempt_deadline: float | None = None
    result: ParallelFlowResult | None = None


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
        now = time.monotonic()
        self.runtime, self.backend, self.slots = runtime, backend, slots
        self.branches = [
            _Branch(
                i,
                task,
                config,
                BranchLedger(task.branch, config, now),
                runtime.context(task, config),
            )
            for i, (task, config) in enumerate(zip(tasks, configs, strict=True))
        ]
        # only timeout_total bounds a branch that waits for a slot: skip the scans without it
        self.queue_deadlines = any(c.timeout_total is not None for c in configs)
        self.ready: deque[int] = deque(range(len(self.branches)))
        self.timers: list[tuple[float, int]] = []
        self.running: dict[Future[AttemptOutcome], int] = {}
        self.pending = len(self.branches)

    def run(self) -> list[ParallelFlowResult]:
        while self.pending:
            self._start_ready(time.monotonic())
            if not self.pending:
                break
            done, _ = wait(list(self.running), timeout=self._sleep(), return_when=FIRST_COMPLETED)
            now = time.monotonic()
            for future in done:
                index = self.running.pop(future, None)
                if index is not None:  # else a fail-fast failure just before cancelled it
                    self._after(index, future.result(), now)
            self._expire(now)
            if self.pending and self.runtime.cancel_token.is_cancelled():
                self._cancel_all("cancelled: the run was cancelled")
        return [b.result for b in self.branches if b.result is not None]

    # -- scheduling --

    def _sleep(self) -> float | None:
        wakes = [b.attempt_deadline for b in self._running() if b.attempt_deadline is not None]
        if self.timers:
            wakes.append(self.timers[0][0])
        if self.queue_deadlines:
            wakes.extend(
                d for i in self.ready if (d := self.branches[i].ledger.deadline()) is not None
            )
        if not wakes:  # still wake now and then: the run may be cancelled meanwhile
            return CANCEL_POLL_SECONDS if self.running else 0.0
        return max(0.0, min(min(wakes) - time.monotonic(), CANCEL_POLL_SECONDS))

    def _running(self) -> list[_Branch]:
        return [self.branches[i] for i in self.running.values()]

    def _start_ready(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            self.ready.append(heapq.heappop(self.timers)[1])
        while self.ready and len(self.running) < self.slots:
            branch = self.branches[self.ready.popleft()]
            if branch.result is None:
                self._start(branch, now)

    def _start(self, branch: _Branch, now: float) -> None:
        ledger = branch.ledger
        deadline = ledger.deadline()
        if deadline is not None and now >= deadline:
            self._after_timeout(branch, now, waited=True)
            return
        ctx = _with_attempt(branch.ctx, ledger.attempts + 1)
        branch.admission = self.runtime.admit(ctx, branch.config)
        if branch.admission is not None and not branch.admission.allowed:
            self._finish(branch, circuit_open_result(branch.task.branch, ctx.circuit or "", ledger))
            return
        if ledger.attempts == 0:
            self.runtime.emit("on_flow_start", ctx)
        if ledger.attempts:  # a retry: the last attempt's token may have been cancelled
            branch.token = CancelToken()
        future = self.backend.start(branch.task, branch.token, self.runtime)
        # the attempt's clock starts once the backend has it (a process start is not its time)
        branch.started = time.monotonic()
        branch.attempt_deadline = ledger.attempt_deadline(branch.started)
        self.running[future] = branch.index

    def _expire(self, now: float) -> None:
        # A timeout may end the fan-out (fail-fast): each step re-checks what is still pending.
        for future, index in list(self.running.items()):
            branch = self.branches[index]
            due = branch.attempt_deadline is not None and now >= branch.attempt_deadline
            if due and self.running.pop(future, None) is not None:
                self.backend.stop(future, branch.token)
                self._after_timeout(branch, now)
        if not self.queue_deadlines:
            return
        for index in [i for i in self.ready if self._overdue(i, now)]:  # queued past timeout_total
            if index in self.ready:
                self.ready.remove(index)
                self._after_timeout(self.branches[index], now, waited=True)

    def _overdue(self, index: int, now: float) -> bool:
        deadline = self.branches[index].ledger.deadline()
        return deadline is not None and now >= deadline

    def _after_timeout(self, branch: _Branch, now: float, waited: bool = False) -> None:
        ledger, config = branch.ledger, branch.config
        total = ledger.deadline() is not None and now >= (ledger.deadline() or 0)
        seconds = config.timeout_total if total else config.timeout_seconds
        ctx = _with_attempt(branch.ctx, ledger.attempts + 1)
        self.runtime.emit("on_flow_timeout", ctx, seconds)
        started = time.time() - (now - branch.started if not waited else 0.0)
        outcome = timeout_outcome(started, seconds, "branch" if total else "attempt")
        self._after(branch.index, outcome, now, emit_error=False)

    # -- outcomes --

    def _after(
        self, index: int, outcome: AttemptOutcome, now: float, emit_error: bool = True
    ) -> None:
        branch = self.branches[index]
        if branch.result is not None:  # already cancelled by fail-fast
            return
        ctx = _with_attempt(branch.ctx, branch.ledger.attempts + 1)
        state = self.runtime.record(ctx, branch.config, outcome.ok, branch.admission)
        if state is not None:
            branch.ledger.circuit_state = state
        error = None
        if not outcome.ok and outcome.error is not None:
            error = outcome.exception or outcome.error.as_exception()
            if emit_error:
                self.runtime.emit("on_flow_error", ctx, error, ctx.attempt)
        decision = after_attempt(branch.ledger, outcome, now)
        if isinstance(decision, Finish):
            self._finish(branch, decision.result)
            return
        self.runtime.emit("on_flow_retry", ctx, ctx.attempt, decision.delay, error)
        heapq.heappush(self.timers, (now + decision.delay, index))

    def _finish(self, branch: _Branch, result: ParallelFlowResult) -> None:
        branch.result = result
        self.pending -= 1
        self.runtime.emit(
            "on_flow_complete", _with_attempt(branch.ctx, branch.ledger.attempts), result
        )
        if branch.config.fail_fast and not result.success and result.error_type != "CancelledError":
            self._cancel_all(f"cancelled: fail_fast after branch '{branch.task.branch}' failed")

    def _cancel_all(self, reason: str) -> None:
        for future, index in list(self.running.items()):
            self.backend.stop(future, self.branches[index].token)
        self.running.clear()
        self.ready.clear()
        self.timers.clear()
        for branch in self.branches:
            if branch.result is None:
                self._finish(branch, cancelled_result(branch.task.branch, reason, branch.ledger))


def _with_attempt(ctx: FlowContext, attempt: int) -> FlowContext:
    return ctx if ctx.attempt == attempt else replace(ctx, attempt=attempt)
