"""The one branch-attempt runner: what an attempt is, wherever it runs.

Every strategy runs a branch attempt the same way (``run_attempt`` / ``arun_attempt``: walk
from the branch's first node to its fan-in on a private copy of the state, catching the
failure as data, an ``ErrorInfo``). What follows an attempt is decided in
``tea_dist.engine.lifecycle``.

An attempt that runs outside the process that made its task (the ``process`` strategy's
workers) relays the events of the fan-outs nested in it (``Relay``): its process's runtime
takes the caller's run id and collects them instead of firing them there, they return with the
outcome, and the caller's lifecycle fires them on the run's dispatcher when the attempt ends.
So the caller's callbacks hear a nested branch under the caller's run id, wherever the branch
that holds it ran (an attempt killed at its timeout brings none back).
"""

from __future__ import annotations

import contextvars
import copy
import os
import socket
import time
import traceback as tb
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tea_dist.core.config import exception_names
from tea_dist.core.errors import BranchTimeoutError, CircuitOpenError, FinalError
from tea_dist.core.graph import GraphSpec
from tea_dist.core.results import Outcome
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.walk import Cursor, FanOutRunner, Walk, awalk, walk


@dataclass(frozen=True)
class ErrorInfo:
    """An exception as data: what crosses processes instead of the exception itself."""

    type_name: str
    message: str
    names: tuple[str, ...] = ()
    traceback: str | None = None
    timeout: bool = False
    node: str = ""
    seconds: float | None = None  # the limit that a timeout passed
    outcome: Outcome = Outcome.ERROR  # what a branch ending with this error ended as

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
            outcome=Outcome.TIMEOUT if isinstance(exc, BranchTimeoutError) else Outcome.ERROR,
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
            seconds=seconds,
            outcome=Outcome.TIMEOUT,
        )

    @classmethod
    def circuit_open(cls, circuit: str) -> ErrorInfo:
        """A branch refused by its open circuit (nothing ran)."""
        message = f"circuit '{circuit}' is open"
        return cls(CircuitOpenError.__name__, message, outcome=Outcome.CIRCUIT_OPEN)

    @classmethod
    def cancelled(cls, reason: str) -> ErrorInfo:
        """An attempt stopped by the caller, a sibling's failure or the end of the run."""
        return cls("CancelledError", reason, outcome=Outcome.CANCELLED)

    @classmethod
    def lost(cls, reason: str) -> ErrorInfo:
        """An attempt that ended without a word (its process died, its task vanished)."""
        return cls("WorkerLostError", reason, outcome=Outcome.LOST)

    @property
    def final(self) -> bool:
        """A ``FinalError``: another attempt would only repeat it (known by the names of its
        classes, which cross processes with it)."""
        return FinalError.__name__ in self.names

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
    node: str = ""  # the node it starts at, when ``branch`` is a map's ``target[i]``
    batch: int = 1  # a map's items per celery task (``MapItems.batch_for``)
    run_id: str = ""  # the run it belongs to, that nested fan-outs relay their events to
    origin: int = field(default_factory=os.getpid)  # the process that made it

    @property
    def start(self) -> str:
        """The node the branch starts at."""
        return self.node or self.branch

    def but(self, **changes: Any) -> BranchTask:
        """A copy with ``changes``: ``dataclasses.replace`` without its per-field checks (a
        fan-out's tasks are copies of one, a thousand at a time)."""
        copied = object.__new__(BranchTask)
        copied.__dict__.update(self.__dict__, **changes)
        return copied


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
    events: Sequence[tuple[str, tuple[Any, ...]]] = ()  # relayed

    def __getstate__(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["exception"] = None  # exceptions cross processes as ErrorInfo only
        return data


@dataclass(frozen=True)
class Raised:
    """An exception in a relayed event's arguments, carried as data."""

    error: ErrorInfo


class Relay:
    """Collects the events of an attempt's nested fan-outs, as picklable data, for the run
    whose id it carries (a listener of every event)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.events: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.events.append((name, tuple(map(_portable, args))))

    @staticmethod
    def replayed(args: tuple[Any, ...]) -> tuple[Any, ...]:
        """A relayed event's arguments, exceptions as exceptions again."""
        return tuple(a.error.as_exception() if isinstance(a, Raised) else a for a in args)


def _portable(value: Any) -> Any:
    return Raised(ErrorInfo.from_exception(value)) if isinstance(value, BaseException) else value


RELAY: contextvars.ContextVar[Relay | None] = contextvars.ContextVar("tea_dist_relay", default=None)


def _relay(task: BranchTask) -> Relay | None:
    """The relay of an attempt outside the process that made its task (None: in it)."""
    return Relay(task.run_id) if task.run_id and task.origin != os.getpid() else None


_HOST = socket.gethostname()
_WORKER = [f"{_HOST}/{os.getpid()}"]  # made again in a forked child


def _forked() -> None:
    _WORKER[0] = f"{_HOST}/{os.getpid()}"


os.register_at_fork(after_in_child=_forked)


def worker_id() -> str:
    """``hostname/pid`` of the process running an attempt."""
    return _WORKER[0]


_IMMUTABLE = frozenset({str, int, float, bool, bytes, type(None)})


def private_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``state`` that an attempt may change freely: a plain dict whose keys and
    values are all immutable scalars is copied shallowly, anything else deeply."""
    if type(state) is not dict:
        return copy.deepcopy(state)
    for key, value in state.items():  # a loop, not all() over a generator: most are small
        if type(key) not in _IMMUTABLE or type(value) not in _IMMUTABLE:
            return copy.deepcopy(state)
    return dict(state)


def _walk_of(
    task: BranchTask, fanout: FanOutRunner, cancel_token: CancelToken | None, cursor: Cursor
) -> Walk:
    """The walk of one attempt: from the branch's first node to its fan-in, on its own copy."""
    return Walk(
        task.spec,
        task.start,
        task.fan_in,
        private_copy(task.state),
        fanout=fanout,
        run_config=task.run_config,
        cancel_token=cancel_token,
        cursor=cursor,
    )


def run_attempt(
    task: BranchTask, fanout: FanOutRunner, cancel_token: CancelToken | None = None
) -> AttemptOutcome:
    """Run one attempt of a branch synchronously, catching its failure as data."""
    started, cursor = time.time(), Cursor()
    run = _walk_of(task, fanout, cancel_token, cursor)
    relay = _relay(task)
    # nested fan-outs relay to ``relay``; none is set already on a pool's thread: set nothing
    reset = RELAY.set(relay) if relay is not None or RELAY.get() is not None else None
    try:
        for _step in walk(run):
            pass
    except Exception as exc:
        outcome = _failed(task, exc, cursor, started)
    else:
        outcome = AttemptOutcome(True, run.state, started, time.time(), worker=_WORKER[0])
    finally:
        if reset is not None:
            RELAY.reset(reset)
    if relay is not None:
        outcome.events = relay.events
    return outcome


async def arun_attempt(
    task: BranchTask, fanout: FanOutRunner, cancel_token: CancelToken | None = None
) -> AttemptOutcome:
    """``run_attempt`` on a running event loop (the asyncio strategy)."""
    started, cursor = time.time(), Cursor()
    run = _walk_of(task, fanout, cancel_token, cursor)
    try:
        async for _step in awalk(run):
            pass
    except Exception as exc:
        return _failed(task, exc, cursor, started)
    return AttemptOutcome(True, run.state, started, time.time(), worker=worker_id())


def _failed(task: BranchTask, exc: Exception, cursor: Cursor, started: float) -> AttemptOutcome:
    error = ErrorInfo.from_exception(
        exc, include_traceback=task.include_traceback, node=cursor.node
    )
    return AttemptOutcome(
        False, None, started, time.time(), error=error, exception=exc, worker=worker_id()
    )
