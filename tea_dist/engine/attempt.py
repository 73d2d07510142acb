"""The one branch-attempt runner, and the pure decisions taken after each attempt.

Every strategy runs a branch attempt the same way (``run_attempt`` / ``arun_attempt``: walk
from the branch's first node to its fan-in on a private copy of the state, catching the
failure as data) and decides what follows the same way (``after_attempt``: retry with a
delay, or finish with a ``ParallelFlowResult``). Strategies differ only in where the attempt
runs and how it is stopped.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback as tb
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tea_dist.core.config import ParallelConfig, exception_names
from tea_dist.core.errors import BranchTimeoutError, CircuitOpenError
from tea_dist.core.graph import GraphSpec
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.walk import Cursor, FanOutRunner, awalk, walk


@dataclass(frozen=True)
class ErrorInfo:
    """An exception as data: what crosses processes instead of the exception itself."""

    type_name: str
    message: str
    names: tuple[str, ...] = ()
    traceback: str | None = None
    timeout: bool = False
    node: str = ""

    @classmethod
    def from_exception(
        cls, exc: BaseException, *, include_traceback: bool = False, node: str = ""
    ) -> ErrorInfo:
        """Capture ``exc``; the traceback (without local variables) only when asked."""
        text = "".join(tb.format_exception(exc)) if include_traceback else None
        return cls(
            type_name=getattr(exc, "error_type", None) or type(exc).__name__,
            message=str(exc) or type(exc).__name__,
            names=exception_names(type(exc)),
            traceback=text,
            timeout=isinstance(exc, BranchTimeoutError),
            node=node,
        )

    @classmethod
    def timed_out(cls, seconds: float | None, what: str = "attempt") -> ErrorInfo:
        """The error of an attempt or branch stopped by its timeout."""
        limit = f" after {seconds:g}s" if seconds else ""
        return cls(
            type_name="TimeoutError",
            message=f"{what} timed out{limit}",
            names=exception_names(BranchTimeoutError),
            timeout=True,
        )

    def as_exception(self) -> BaseException:
        """An exception to hand to callbacks when the original is not at hand."""
        from tea_dist.core.errors import RemoteError

        cls = BranchTimeoutError if self.timeout else RemoteError
        return cls(self.message, error_type=self.type_name)

    def as_record(self, attempt: int) -> dict[str, Any]:
        """The ``attempt_errors`` entry for this error."""
        return {
            "attempt": attempt,
            "error": self.message,
            "error_type": self.type_name,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class BranchTask:
    """Everything needed to run one attempt of one branch; picklable when the graph is."""

    spec: GraphSpec
    branch: str
    fan_in: str
    state: dict[str, Any]
    run_config: Mapping[str, Any] = field(default_factory=dict)
    include_traceback: bool = False
    index: int = 0


@dataclass
class AttemptOutcome:
    """What one attempt produced. ``exception`` stays in the process that raised it."""

    ok: bool
    state: dict[str, Any] | None
    started: float
    ended: float
    error: ErrorInfo | None = None
    exception: BaseException | None = None
    worker: str = ""

    def __getstate__(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["exception"] = None  # exceptions cross processes as ErrorInfo only
        return data


def worker_id() -> str:
    """``hostname/pid`` of the process running an attempt."""
    return f"{socket.gethostname()}/{os.getpid()}"


def run_attempt(
    task: BranchTask, fanout: FanOutRunner, cancel_token: CancelToken | None = None
) -> AttemptOutcome:
    """Run one attempt of a branch synchronously, catching its failure as data."""
    started, cursor = time.time(), Cursor()
    steps = walk(
        task.spec,
        task.branch,
        task.fan_in,
        copy.deepcopy(task.state),
        fanout=fanout,
        run_config=task.run_config,
        cancel_token=cancel_token,
        cursor=cursor,
    )
    try:
        while True:
            next(steps)
    except StopIteration as stop:
        return AttemptOutcome(True, stop.value, started, time.time(), worker=worker_id())
    except Exception as exc:
        return _failed(task, exc, cursor, started)


async def arun_attempt(
    task: BranchTask, fanout: FanOutRunner, cancel_token: CancelToken | None = None
) -> AttemptOutcome:
    """``run_attempt`` on a running event loop (the asyncio strategy)."""
    started, cursor = time.time(), Cursor()
    state = copy.deepcopy(task.state)
    try:
        async for step in awalk(
            task.spec,
            task.branch,
            task.fan_in,
            state,
            fanout=fanout,
            run_config=task.run_config,
            cancel_token=cancel_token,
            cursor=cursor,
        ):
            state = step.state
    except Exception as exc:
        return _failed(task, exc, cursor, started)
    return AttemptOutcome(True, state, started, time.time(), worker=worker_id())


def _failed(task: BranchTask, exc: Exception, cursor: Cursor, started: float) -> AttemptOutcome:
    error = ErrorInfo.from_exception(
        exc, include_traceback=task.include_traceback, node=cursor.node
    )
    return AttemptOutcome(
        False, None, started, time.time(), error=error, exception=exc, worker=worker_id()
    )


# -- after an attempt: the pure decisions shared by every strategy --


@dataclass
class BranchLedger:
    """A branch's history across attempts: what policies and results are computed from."""

    branch: str
    config: ParallelConfig
    dispatched: float  # monotonic clock at dispatch, for timeout_total
    first_start: float | None = None  # epoch seconds of the first attempt's start
    attempts: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    circuit_state: CircuitState | None = None

    def deadline(self) -> float | None:
        """Monotonic time by which the whole branch must be done (``timeout_total``)."""
        total = self.config.timeout_total
        return None if total is None else self.dispatched + total

    def attempt_deadline(self, started: float) -> float | None:
        """Monotonic time by which an attempt started at ``started`` must end."""
        limits = [d for d in (self.deadline(),) if d is not None]
        if self.config.timeout_seconds is not None:
            limits.append(started + self.config.timeout_seconds)
        return min(limits) if limits else None

    def note_failure(self, error: ErrorInfo) -> None:
        keep = self.config.retry().max_stored_errors
        self.errors.append(error.as_record(self.attempts))
        if len(self.errors) > keep:
            del self.errors[: len(self.errors) - keep]


@dataclass(frozen=True)
class Retry:
    """Decision: run another attempt after ``delay`` seconds."""

    delay: float


@dataclass(frozen=True)
class Finish:
    """Decision: the branch is done with ``result``."""

    result: ParallelFlowResult


def after_attempt(ledger: BranchLedger, outcome: AttemptOutcome, now: float) -> Retry | Finish:
    """Retry or finish after an attempt, given the branch's ledger; ``now`` is monotonic."""
    ledger.attempts += 1
    if ledger.first_start is None:
        ledger.first_start = outcome.started
    if outcome.ok:
        return Finish(_result(ledger, outcome, None))
    error = outcome.error or ErrorInfo("Error", "unknown failure")
    ledger.note_failure(error)
    policy = ledger.config.retry()
    retry_number = ledger.attempts - 1
    if retry_number < policy.max_retries and policy.matches(error.names, error.timeout):
        delay = policy.delay_for(retry_number)
        deadline = ledger.deadline()
        if deadline is None or now + delay < deadline:
            return Retry(delay)
    return Finish(_result(ledger, outcome, error))


def _result(
    ledger: BranchLedger, outcome: AttemptOutcome, error: ErrorInfo | None
) -> ParallelFlowResult:
    start = ledger.first_start or outcome.started
    return ParallelFlowResult(
        branch=ledger.branch,
        success=error is None,
        state=outcome.state,
        error=error.message if error else None,
        error_type=error.type_name if error else None,
        traceback=error.traceback if error and ledger.config.include_traceback else None,
        timeout=bool(error and error.timeout),
        timing_ms=(outcome.ended - start) * 1000.0,
        start_time=start,
        end_time=outcome.ended,
        retry_count=max(ledger.attempts - 1, 0),
        circuit_state=ledger.circuit_state,
        attempt_errors=list(ledger.errors) if error else [],
        worker=outcome.worker or None,
    )


def timeout_outcome(started: float, seconds: float | None, what: str = "attempt") -> AttemptOutcome:
    """The outcome of an attempt that was stopped by its timeout."""
    return AttemptOutcome(
        False, None, started, time.time(), error=ErrorInfo.timed_out(seconds, what)
    )


def failed_result(
    branch: str,
    error_type: str,
    error: str,
    *,
    ledger: BranchLedger | None = None,
    start: float | None = None,
    timeout: bool = False,
    circuit_state: CircuitState | None = None,
    worker: str | None = None,
) -> ParallelFlowResult:
    """A failed result built without an attempt outcome (refused, cancelled, lost, killed).

    Timing runs from ``start`` (else the ledger's first attempt, else now) to now; retries and
    attempt errors come from the ledger when there is one.
    """
    now = time.time()
    start = start or (ledger.first_start if ledger is not None else None) or now
    return ParallelFlowResult(
        branch=branch,
        success=False,
        error=error,
        error_type=error_type,
        timeout=timeout,
        timing_ms=(now - start) * 1000.0,
        start_time=start,
        end_time=now,
        retry_count=max(ledger.attempts - 1, 0) if ledger is not None else 0,
        circuit_state=circuit_state,
        attempt_errors=list(ledger.errors) if ledger is not None else [],
        worker=worker,
    )


def circuit_open_result(
    branch: str, circuit: str, ledger: BranchLedger | None = None
) -> ParallelFlowResult:
    """The result of a branch refused by an open circuit (nothing was run).

    With a ledger of earlier attempts (a refused retry), their errors and count are kept.
    """
    result = failed_result(
        branch,
        CircuitOpenError.__name__,
        f"circuit '{circuit}' is open",
        circuit_state=CircuitState.OPEN,
    )
    if ledger is None or not ledger.attempts:
        return result
    return result.model_copy(
        update={"attempt_errors": list(ledger.errors), "retry_count": ledger.attempts}
    )


def cancelled_result(
    branch: str, reason: str, ledger: BranchLedger | None = None
) -> ParallelFlowResult:
    """The result of a branch stopped because a sibling failed (``fail_fast``) or the run ended."""
    return failed_result(branch, "CancelledError", reason, ledger=ledger)
