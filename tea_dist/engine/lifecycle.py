"""The one branch lifecycle: admission, attempts, retries, deadlines, fail-fast, one result.

Every strategy lives a branch the same way; they differ only in where an attempt runs and how
it is stopped. The local supervisor, the celery driver and the celery worker task all drive a
``Lifecycle``:

- ``admit``: before an attempt takes a slot, its deadline and its circuit are asked (an open
  circuit resolves the branch with a circuit-open result; nothing runs), then its limits for
  a permit each (``on_limit_waiting`` when refused, ``on_limit_acquired`` with the seconds
  waited, ``on_limit_released`` when the attempt ends, ``on_limit_wait_ended`` when a branch
  stops waiting without a permit);
- ``begin``: an attempt starts, its clock and per-attempt deadline with it;
- ``end``: an attempt ended; the circuit records it, listeners hear of it, and the branch's
  ``RetryPolicy`` decides (``retry_delay``) between a retry after a delay and a final result;
- ``time_out`` / ``cancel_all``: an attempt is stopped by its deadline, a sibling's failure
  (``fail_fast``) or the end of the run;
- ``resolve``: the branch's one result (later ones, e.g. from a redelivered task, are ignored).

An attempt that runs elsewhere (a celery worker) has verbs of its own, for what its driver
hears and the worker decides: ``started_remotely``, ``retry_scheduled_remotely``,
``ended_remotely``, ``lost`` (sent again, or lost too often), ``adopt`` (a branch its
predecessor sent, in a run taken over); on the worker, ``for_message`` (the lifecycle of the
branch a message carries) and ``admitted_elsewhere`` (its driver asked the circuit).

``AttemptState`` is the branch's history across attempts (tenacity's ``RetryCallState``): it
crosses to workers inside the branch message and comes back inside every worker event. Every
result, failed or not, is built by ``build_result``. Durations use the monotonic clock; epoch
seconds only where another process shares the value (``dispatched_at``, result timestamps).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from tea_dist.core.config import ParallelConfig, ResourceLimit, RetryPolicy
from tea_dist.core.results import CircuitState, Outcome, ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, ErrorInfo, Relay
from tea_dist.observe.events import Event, FlowContext
from tea_dist.policies.breaker import Admission
from tea_dist.policies.limits import DEFAULT_LEASE_SECONDS as LEASE_SECONDS
from tea_dist.policies.limits import LimitStore


class Host(Protocol):
    """What a lifecycle asks of the run its branches belong to (``engine.runtime.Runtime``):
    contexts and events, circuit admission and accounting, the store of limit permits."""

    run_id: str

    def context(self, task: BranchTask, config: ParallelConfig, attempt: int = 1) -> FlowContext:
        """The callback context of a branch."""
        ...

    def emit(self, event: Event | str, *args: Any) -> None:
        """Fire a lifecycle event."""
        ...

    def admit(self, ctx: FlowContext, config: ParallelConfig) -> Admission | None:
        """Ask the branch's circuit for admission (None: no breaker configured)."""
        ...

    def record(
        self, ctx: FlowContext, config: ParallelConfig, success: bool, admission: Admission | None
    ) -> CircuitState | None:
        """Record an attempt's outcome on its circuit; the circuit's state after it."""
        ...

    def release(
        self, ctx: FlowContext, config: ParallelConfig, admission: Admission | None
    ) -> None:
        """An admitted attempt ended with no outcome: free its probe slot."""
        ...

    def limit_store(self) -> LimitStore:
        """Where the permits of ``ResourceLimit``s are kept."""
        ...


class Clock(Protocol):
    """Monotonic seconds for durations and epoch seconds for shared timestamps."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clocks."""

    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


SYSTEM_CLOCK = SystemClock()


class AttemptState(BaseModel):
    """A branch's history across attempts, handed to policies, results and workers."""

    model_config = ConfigDict(extra="forbid")

    branch: str
    dispatched_at: float  # epoch seconds: timeout_total runs from here, in every process
    attempts: int = 0  # attempts started so far; the running one is number ``attempts``
    first_start: float | None = None  # epoch seconds
    errors: list[dict[str, Any]] = Field(default_factory=list)  # newest max_stored_errors
    circuit_state: CircuitState | None = None

    @property
    def retry_count(self) -> int:
        """Attempts after the first."""
        return max(self.attempts - 1, 0)

    def note(self, error: ErrorInfo, keep: int) -> None:
        """Add the running attempt's error to the stored ones (at most ``keep``). One error per
        attempt: a second word on the same attempt (its worker's timeout and its caller's
        ``timeout_total`` crossing) replaces the first."""
        record = error.as_record(self.attempts)
        if self.errors and self.errors[-1]["attempt"] == self.attempts:
            self.errors[-1] = record
        else:
            self.errors.append(record)
        del self.errors[: max(len(self.errors) - keep, 0)]


def retry_delay(
    policy: RetryPolicy, state: AttemptState, error: ErrorInfo, deadline: float | None, now: float
) -> float | None:
    """Seconds until the next attempt, or None when the branch is done.

    A ``FinalError`` (the code, the message or the state is what is wrong) is never retried;
    otherwise the policy decides whether the error is retried; a retry that would start past
    the branch's ``deadline`` (monotonic, ``now`` too) is not made.
    """
    retry = state.attempts - 1
    if error.final:
        return None
    if not policy.should_retry(error.names, retry, timeout=error.timeout):
        return None
    delay = policy.delay_for(retry)
    if deadline is not None and now + delay >= deadline:
        return None
    return delay


def stops_siblings(config: ParallelConfig, result: ParallelFlowResult) -> bool:
    """The fail-fast rule: a branch's own failure (not its cancellation) ends the fan-out."""
    return config.fail_fast and result.outcome not in (Outcome.SUCCESS, Outcome.CANCELLED)


def build_result(
    state: AttemptState,
    config: ParallelConfig,
    *,
    error: ErrorInfo | None = None,
    outcome: AttemptOutcome | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> ParallelFlowResult:
    """A branch's result: from its last attempt's ``outcome`` and/or a final ``error``.

    Every kind of failed result (error, timeout, circuit open, cancelled, lost) is made here.
    """
    ended = outcome.ended if outcome is not None else clock.time()
    start = state.first_start or (outcome.started if outcome is not None else ended)
    fields: dict[str, Any] = {
        "branch": state.branch,
        "timing_ms": max(ended - start, 0.0) * 1000.0,
        "start_time": start,
        "end_time": ended,
        "retry_count": state.retry_count,
        "circuit_state": state.circuit_state,
        "worker": (outcome.worker if outcome is not None else None) or None,
    }
    if error is None:  # every value is of its field's type already: not validated again
        state_after = None if outcome is None else outcome.state
        return ParallelFlowResult.built(
            success=True, state=state_after, outcome=Outcome.SUCCESS, **fields
        )
    return ParallelFlowResult(
        success=False,
        outcome=error.outcome,
        error=error.message,
        error_type=error.type_name,
        traceback=error.traceback if config.include_traceback else None,
        timeout=error.timeout,
        attempt_errors=list(state.errors),
        **fields,
    )


def total_deadline(config: ParallelConfig, dispatched_at: float, clock: Clock) -> float | None:
    """The monotonic time by which the whole branch must be done (``timeout_total``)."""
    if config.timeout_total is None:
        return None
    return clock.monotonic() + (dispatched_at + config.timeout_total - clock.time())


@dataclass(eq=False, slots=True)
class BranchRun:
    """One branch of a fan-out as its lifecycle sees it; ``handle`` is the executor's own."""

    index: int
    task: BranchTask
    config: ParallelConfig
    ctx: FlowContext
    state: AttemptState
    deadline: float | None  # monotonic, timeout_total
    admission: Admission | None = None
    started: float | None = None  # monotonic start of the running attempt (None: not running)
    attempt_deadline: float | None = None
    result: ParallelFlowResult | None = None
    handle: Any = None
    permits: tuple[str, tuple[ResourceLimit, ...]] | None = None  # holder id, limits held
    wait: float | None = None  # refused a permit: seconds until asking again
    waiting: tuple[str, float] | None = None  # the limit it waits for, since (monotonic)

    @property
    def done(self) -> bool:
        return self.result is not None

    @property
    def running(self) -> bool:
        return self.started is not None and self.result is None

    def context(self, **changes: Any) -> FlowContext:
        """The callback context of the current attempt."""
        attempt = self.state.attempts or 1  # never negative
        if attempt == self.ctx.attempt and not changes:
            return self.ctx
        return self.ctx.but(attempt=attempt, **changes)


def _ignore(run: BranchRun) -> None:
    """The default ``stop``: nothing runs that could be stopped."""


class Lifecycle:
    """Every branch of one fan-out, from admission to its one result.

    ``stop(run)`` is the executor's way of stopping whatever it holds for a branch that the
    lifecycle ends early (cancel a token, kill a process, revoke a task); a branch waiting for a
    slot or a retry may hold nothing.
    """

    def __init__(
        self,
        runs: Sequence[BranchRun],
        runtime: Host,
        *,
        stop: Callable[[BranchRun], None] = _ignore,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.runs = list(runs)
        self.runtime = runtime
        self.stop = stop
        self.clock = clock
        self.pending = sum(1 for r in self.runs if not r.done)

    @classmethod
    def for_fanout(
        cls,
        tasks: Sequence[BranchTask],
        configs: Sequence[ParallelConfig],
        runtime: Host,
        *,
        stop: Callable[[BranchRun], None] = _ignore,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Lifecycle:
        """A lifecycle for branches dispatched now."""
        now = clock.time()
        runs = [
            BranchRun(
                index=i,
                task=task,
                config=config,
                ctx=runtime.context(task, config),
                state=AttemptState(branch=task.branch, dispatched_at=now),
                deadline=total_deadline(config, now, clock),
            )
            for i, (task, config) in enumerate(zip(tasks, configs, strict=True))
        ]
        for run in runs:  # every branch waits for a slot, a worker or a permit at first
            runtime.emit(Event.FLOW_QUEUED, run.ctx)
        return cls(runs, runtime, stop=stop, clock=clock)

    def results(self) -> list[ParallelFlowResult]:
        """One result per resolved branch, in declaration order."""
        return [r.result for r in self.runs if r.result is not None]

    # -- an attempt's life --

    def admit(self, run: BranchRun, circuit: bool = True, permits: bool = True) -> bool:
        """May an attempt of ``run`` start now? Its deadline, its circuit (unless the caller
        already asked it), then a permit of every limit it names (unless the attempt takes
        them where it runs: a celery worker).

        False: the branch is resolved (past its deadline, an open circuit), or, with ``run.wait``
        set, it must wait that long for a permit, holding nothing meanwhile.
        """
        run.wait = None
        if run.deadline is not None and self.clock.monotonic() >= run.deadline:
            self.time_out(run)
            return False
        if circuit and run.config.circuit_breaker is not None:
            ctx = run.context()
            admission = self.runtime.admit(ctx, run.config)
            if admission is not None and not admission.allowed:
                error = ErrorInfo.circuit_open(ctx.circuit or "")
                run.state.circuit_state = CircuitState.OPEN
                self.resolve(
                    run, build_result(run.state, run.config, error=error, clock=self.clock)
                )
                return False
            run.admission = admission
        wait = self._take_permits(run) if permits else None
        if wait is None:
            return True
        self._release(run)
        left = None if run.deadline is None else run.deadline - self.clock.monotonic()
        run.wait = wait if left is None else max(min(wait, left), 0.0)
        return False

    def _take_permits(self, run: BranchRun) -> float | None:
        """A permit of every limit, taken in name order; none kept when one is refused."""
        if not run.config.limits:
            return None
        limits = sorted(run.config.limits, key=lambda limit: limit.name)
        store = self.runtime.limit_store()
        holder = f"{self.runtime.run_id}:{run.task.branch}:{run.state.attempts + 1}:{id(run):x}"
        for i, limit in enumerate(limits):
            wait = store.acquire(limit, holder, LEASE_SECONDS)
            if wait is not None:
                for taken in limits[:i]:
                    store.release(taken, holder, started=False)
                store.waiting(limit, holder, self.clock.time() + wait)
                if run.waiting is None or run.waiting[0] != limit.name:
                    self.stop_waiting(run)
                    run.waiting = (limit.name, self.clock.monotonic())
                    self.runtime.emit(Event.LIMIT_WAITING, run.context(), limit.name)
                return wait
        run.permits = (holder, tuple(limits))
        waited, run.waiting = run.waiting, None
        ctx = run.context()
        for limit in limits:
            seconds = None
            if waited is not None and waited[0] == limit.name:
                seconds = max(self.clock.monotonic() - waited[1], 0.0)
            self.runtime.emit(Event.LIMIT_ACQUIRED, ctx, limit.name, seconds)
        return None

    def stop_waiting(self, run: BranchRun) -> None:
        """``run`` no longer waits for a permit here without having got it: it ended, or it
        waits elsewhere (a celery branch sent again with a countdown)."""
        if run.waiting is not None:
            (limit, _), run.waiting = run.waiting, None
            self.runtime.emit(Event.LIMIT_WAIT_ENDED, run.context(), limit)

    def renew_permits(self) -> None:
        """Keep the permits of running attempts (a holder that stops renewing loses them)."""
        for run in self.runs:
            if run.permits is not None:
                holder, limits = run.permits
                for limit in limits:
                    self.runtime.limit_store().renew(limit, holder, LEASE_SECONDS)

    def _return_permits(self, run: BranchRun) -> None:
        if run.permits is not None:
            (holder, limits), run.permits = run.permits, None
            for limit in limits:
                self.runtime.limit_store().release(limit, holder)
                self.runtime.emit(Event.LIMIT_RELEASED, run.context(), limit.name)

    def begin(self, run: BranchRun, worker: str | None = None, timed: bool = True) -> None:
        """An attempt of ``run`` starts now (``worker``: where, when not this process).
        ``timed=False``: its ``timeout_seconds`` runs from ``timing``, when the backend says
        the attempt really began (a child process that had to start first)."""
        state = run.state
        state.attempts += 1
        run.started = self.clock.monotonic()
        state.first_start = state.first_start or self.clock.time()
        run.attempt_deadline = run.deadline
        if timed:
            self.timing(run, run.started)
        ctx = run.context(worker=worker) if worker else run.context()
        if state.attempts == 1:
            self.runtime.emit(Event.FLOW_START, ctx)
        self.runtime.emit(Event.ATTEMPT_START, ctx)

    def timing(self, run: BranchRun, began: float) -> None:
        """The running attempt of ``run`` began at ``began`` (monotonic): its
        ``timeout_seconds`` counts from there (``timeout_total`` from dispatch, as ever)."""
        timeout = run.config.timeout_seconds
        if timeout is not None and run.running:
            ends = began + timeout
            run.attempt_deadline = ends if run.deadline is None else min(run.deadline, ends)

    def end(self, run: BranchRun, outcome: AttemptOutcome) -> float | None:
        """An attempt of ``run`` ended: record, tell, decide. Returns the retry delay, or None."""
        if run.done:
            return None
        run.started = None
        self._return_permits(run)
        ctx = run.context(worker=outcome.worker) if outcome.worker else run.context()
        error = outcome.error
        exception = None if error is None else outcome.exception or error.as_exception()
        for event, args in outcome.events:  # its nested fan-outs', from another process
            self.runtime.emit(event, *Relay.replayed(args))
        self.runtime.emit(
            Event.ATTEMPT_END, ctx, exception, max(outcome.ended - outcome.started, 0)
        )
        if error is not None and error.outcome is Outcome.CANCELLED:
            self._release(run)
            self.resolve(run, build_result(run.state, run.config, error=error, outcome=outcome))
            return None
        self._record(run, ctx, outcome.ok)
        if error is None:
            self.resolve(run, build_result(run.state, run.config, outcome=outcome))
            return None
        run.state.note(error, run.config.retry().max_stored_errors)
        if error.timeout:
            self.runtime.emit(Event.FLOW_TIMEOUT, ctx, error.seconds)
        else:
            self.runtime.emit(Event.FLOW_ERROR, ctx, exception, run.state.attempts)
        now = self.clock.monotonic()
        delay = retry_delay(run.config.retry(), run.state, error, run.deadline, now)
        if delay is None:
            self.resolve(run, build_result(run.state, run.config, error=error, outcome=outcome))
            return None
        self.runtime.emit(Event.FLOW_RETRY, ctx, run.state.attempts, delay, exception)
        return delay

    def time_out(self, run: BranchRun) -> float | None:
        """``run`` passed a deadline: stop its attempt and end it as a timeout.

        A branch still waiting (for a slot or a retry) when ``timeout_total`` passes ends
        without a new attempt. Returns the retry delay, or None.
        """
        now = self.clock.monotonic()
        total = run.deadline is not None and now >= run.deadline
        config = run.config
        seconds = config.timeout_total if total else config.timeout_seconds
        error = ErrorInfo.timed_out(seconds, "branch" if total else "attempt")
        self.stop(run)
        if run.running:
            started = self.clock.time() - (now - (run.started or now))
            return self.end(run, AttemptOutcome(False, None, started, self.clock.time(), error))
        errors = run.state.errors
        if not errors or errors[-1]["attempt"] != run.state.attempts:  # not noted by its end
            run.state.note(error, config.retry().max_stored_errors)
        self.runtime.emit(Event.FLOW_TIMEOUT, run.context(), seconds)
        self._release(run)
        self._return_permits(run)
        self.resolve(run, build_result(run.state, config, error=error, clock=self.clock))
        return None

    def resolve(self, run: BranchRun, result: ParallelFlowResult) -> None:
        """Keep the branch's first result; under ``fail_fast`` its failure stops the others."""
        if run.done:
            return
        run.result, run.started = result, None
        self.pending -= 1
        self.stop_waiting(run)
        self.runtime.emit(Event.FLOW_COMPLETE, run.context(), result)
        if stops_siblings(run.config, result):
            self.cancel_all(f"cancelled: fail_fast after branch '{result.branch}' failed")

    def cancel_all(self, reason: str) -> None:
        """Stop every running attempt and resolve every open branch as cancelled.

        A cancelled attempt is neither a success nor a failure of its circuit.
        """
        for run in self.runs:
            if run.done:
                continue
            self.stop(run)
            self._release(run)
            self._return_permits(run)
            error = ErrorInfo.cancelled(reason)
            self.resolve(run, build_result(run.state, run.config, error=error, clock=self.clock))

    # -- attempts elsewhere: the celery driver and worker carry these --

    @classmethod
    def for_message(
        cls,
        index: int,
        task: BranchTask,
        config: ParallelConfig,
        ctx: FlowContext,
        state: AttemptState,
        runtime: Host,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> Lifecycle:
        """A lifecycle of one branch dispatched elsewhere, as the process running its attempt
        sees it (a worker's message): ``state`` as sent, its ``timeout_total`` running from its
        dispatch. ``state`` is copied: the message stays as sent."""
        own = state.model_copy(update={"errors": list(state.errors)})
        deadline = total_deadline(config, own.dispatched_at, clock)
        run = BranchRun(index, task, config, ctx, own, deadline)
        return cls([run], runtime, clock=clock)

    def admitted_elsewhere(self, run: BranchRun, probe: bool) -> None:
        """The attempt's circuit was asked where the branch was dispatched (the caller's
        driver asks a first attempt's) and let it through: ``end`` records its outcome on the
        circuit here, where it ran (``probe``: it was let through as a half-open probe)."""
        run.admission = Admission(True, probe, CircuitState.CLOSED)

    def adopt(self, run: BranchRun, dispatched_at: float) -> None:
        """``run`` was dispatched by a predecessor driving the same run (a durable run taken
        over): its ``timeout_total`` runs from that dispatch (epoch seconds), not from now."""
        run.state.dispatched_at = dispatched_at
        run.deadline = total_deadline(run.config, dispatched_at, self.clock)

    def heard(self, run: BranchRun, state: AttemptState) -> None:
        """A word from where the branch runs: its history as of that word."""
        run.state = state

    def started_remotely(
        self,
        run: BranchRun,
        state: AttemptState,
        worker: str,
        *,
        first: bool,
        at: float | None = None,
    ) -> FlowContext:
        """An attempt of ``run`` started on ``worker`` (at ``at``, monotonic; now by default).
        That worker keeps its circuit's accounts and stops it at its ``timeout_seconds``;
        ``first``: the branch's first start (``on_flow_start`` before ``on_attempt_start``).
        Returns the attempt's context."""
        self.heard(run, state)
        run.started = self.clock.monotonic() if at is None else at
        run.admission = None
        run.attempt_deadline = run.deadline
        ctx = run.context(worker=worker)
        if first:
            self.runtime.emit(Event.FLOW_START, ctx)
        self.runtime.emit(Event.ATTEMPT_START, ctx)
        return ctx

    def retry_scheduled_remotely(
        self,
        run: BranchRun,
        state: AttemptState,
        worker: str,
        delay: float,
        error: BaseException | None,
    ) -> float:
        """The attempt of ``run`` on ``worker`` failed and its worker scheduled the next one
        ``delay`` seconds from now (a task of its own). Returns when it is due (monotonic):
        a retry that never starts by then (and a grace) was lost with the broker's message."""
        self.heard(run, state)
        run.started = None
        ctx = run.context(worker=worker)
        self.runtime.emit(Event.FLOW_RETRY, ctx, state.attempts, delay, error)
        return self.clock.monotonic() + delay

    def ended_remotely(
        self, run: BranchRun, state: AttemptState, worker: str, result: ParallelFlowResult
    ) -> None:
        """``run`` ended where it ran with ``result`` (decided there: retries, its circuit);
        its first result counts, a redelivered branch's later ones do not."""
        if run.done:
            return
        self.heard(run, state)
        run.ctx = run.context(worker=worker) if worker else run.ctx
        self.resolve(run, result)

    def lost(self, run: BranchRun, resends: int, max_resends: int) -> bool:
        """The process holding ``run`` (running or about to run it) is gone. True: send it
        again (its ``resends`` so far are below ``max_resends``); False: it was lost too
        often and ends as lost."""
        run.started = None
        if run.done:
            return False
        if resends >= max_resends:
            error = ErrorInfo.lost(f"the worker running this branch was lost {resends + 1} times")
            self._release(run)
            self.resolve(run, build_result(run.state, run.config, error=error, clock=self.clock))
            return False
        self.runtime.emit(Event.BRANCH_REDISPATCHED, run.context())
        return True

    # -- circuits --

    def _record(self, run: BranchRun, ctx: FlowContext, success: bool) -> None:
        admission, run.admission = run.admission, None
        if admission is None:  # no circuit, or the attempt's worker keeps its accounts
            return
        state = self.runtime.record(ctx, run.config, success, admission)
        if state is not None:
            run.state.circuit_state = state

    def _release(self, run: BranchRun) -> None:
        admission, run.admission = run.admission, None
        if admission is not None:
            self.runtime.release(run.context(), run.config, admission)
