"""Lifecycle events: the ``ParallelFlowCallback`` protocol and the one dispatcher.

Executors never call callbacks: they ``emit`` events on a ``Dispatcher``, which logs each
event once and hands it to every listener on that listener's own lane (a serial queue and
thread). So callbacks see events in order, a slow or hanging callback delays only itself
(after ``timeout`` seconds its lane is abandoned and a new one carries on), and an exception
in a callback is logged and swallowed. ``flush()`` waits until every lane has caught up;
``invoke()`` calls it before yielding its final event.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import CircuitState, ParallelFlowResult

logger = logging.getLogger("tea_dist.observe.events")

EVENTS = (
    "on_flow_start",
    "on_flow_complete",
    "on_flow_error",
    "on_flow_timeout",
    "on_flow_retry",
    "on_circuit_state_change",
)


@dataclass(frozen=True)
class FlowContext:
    """What a callback learns about the branch an event belongs to."""

    branch: str
    fan_in_node: str = ""
    state_snapshot: dict[str, Any] = field(default_factory=dict)
    start_time: float = 0.0
    config: ParallelConfig | None = None
    graph_name: str = ""
    run_id: str = ""
    attempt: int = 0
    circuit: str | None = None
    worker: str | None = None


@runtime_checkable
class ParallelFlowCallback(Protocol):
    """Listener of parallel-flow lifecycle events. Every method is optional."""

    def on_flow_start(self, context: FlowContext) -> None: ...

    def on_flow_complete(self, context: FlowContext, result: ParallelFlowResult) -> None: ...

    def on_flow_error(self, context: FlowContext, error: BaseException, attempt: int) -> None: ...

    def on_flow_timeout(self, context: FlowContext, timeout_seconds: float) -> None: ...

    def on_flow_retry(
        self, context: FlowContext, attempt: int, delay: float, error: BaseException
    ) -> None: ...

    def on_circuit_state_change(
        self, context: FlowContext, old_state: CircuitState, new_state: CircuitState
    ) -> None: ...


class _Lane:
    """One listener's serial queue, drained by a daemon thread that exits when idle."""

    IDLE_EXIT_SECONDS = 2.0
    STOP = ("", ())  # queued by ``stop``: the thread exits when it reaches it

    def __init__(self, listener: Any) -> None:
        self.listener = listener
        self.queue: queue.Queue[tuple[str, tuple[Any, ...]]] = queue.Queue()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.busy_since: float | None = None
        self.busy_with = ""

    def put(self, event: str, args: tuple[Any, ...]) -> None:
        self.queue.put((event, args))
        with self.lock:
            if self.thread is None or not self.thread.is_alive():
                self._start()

    def _start(self) -> None:
        name = f"tea-dist-callbacks-{type(self.listener).__name__}"
        self.thread = threading.Thread(target=self._drain, name=name, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        me = threading.current_thread()
        while True:
            try:
                event, args = self.queue.get(timeout=self.IDLE_EXIT_SECONDS)
            except queue.Empty:
                with self.lock:
                    if self.queue.empty() and self.thread is me:
                        self.thread = None
                        return
                continue
            if not event:  # STOP
                with self.lock:
                    self.queue.task_done()
                    if self.queue.empty() and self.thread is me:
                        self.thread = None
                        return
                continue
            self.busy_since, self.busy_with = time.monotonic(), event
            try:
                getattr(self.listener, event)(*args)
            except Exception:
                logger.exception(
                    "callback %s.%s raised; ignored", type(self.listener).__name__, event
                )
            with self.lock:
                if self.thread is not me:  # abandoned while hanging: a new thread took over
                    return
                self.busy_since = None
                self.queue.task_done()

    def stop(self) -> None:
        """Let the thread exit once it has drained the queue (a later ``put`` starts another)."""
        with self.lock:
            if self.thread is not None:
                self.queue.put(self.STOP)

    def hung(self, timeout: float) -> bool:
        since = self.busy_since
        return since is not None and time.monotonic() - since > timeout

    def abandon(self) -> None:
        """Leave the hung thread behind and carry on with a fresh one."""
        logger.warning(
            "callback %s.%s has run for more than its time limit; its later events go on "
            "without waiting for it",
            type(self.listener).__name__,
            self.busy_with,
        )
        with self.lock:
            self.busy_since = None
            self.queue.task_done()  # the hung item will never report done
            self._start()


class Dispatcher:
    """Fires lifecycle events at listeners, isolated from the run and from each other."""

    def __init__(self, listeners: Iterable[Any] = (), timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._lanes = [_Lane(listener) for listener in listeners]

    def emit(self, event: str, *args: Any) -> None:
        """Log ``event`` and queue it for every listener that implements it."""
        _log(event, args)
        for lane in self._lanes:
            if lane.hung(self.timeout):
                lane.abandon()
            if callable(getattr(lane.listener, event, None)):
                lane.put(event, args)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every listener has handled every event emitted so far.

        A callback that hangs is abandoned after the dispatcher's timeout; ``timeout``
        bounds the whole wait.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else 4 * self.timeout + 1)
        for lane in self._lanes:
            done = lane.queue.all_tasks_done  # notified when the lane catches up
            while lane.queue.unfinished_tasks and time.monotonic() < deadline:
                if lane.hung(self.timeout):
                    lane.abandon()
                with done:
                    if lane.queue.unfinished_tasks:
                        done.wait(0.05)

    def close(self, timeout: float | None = None) -> None:
        """``flush``, then let every listener's thread exit: the run emits nothing more.

        Without it each run's lanes would idle for ``IDLE_EXIT_SECONDS``, one thread per
        listener per run, and fast repeated invocations would pile threads up.
        """
        self.flush(timeout)
        for lane in self._lanes:
            lane.stop()


def _log(event: str, args: tuple[Any, ...]) -> None:
    """The logging listener: one record per lifecycle event, naming its run and branch.

    Records carry ``event``, ``run_id``, ``branch``, ``attempt`` and ``circuit`` as
    attributes, for handlers and formatters that correlate a run's events.
    """
    if not args or not isinstance(args[0], FlowContext):
        return
    ctx: FlowContext = args[0]
    extra = {
        "event": event,
        "run_id": ctx.run_id,
        "branch": ctx.branch,
        "attempt": ctx.attempt,
        "circuit": ctx.circuit,
    }
    where = f"run {ctx.run_id} branch {ctx.branch}" if ctx.run_id else f"branch {ctx.branch}"
    if event == "on_flow_retry":
        attempt, delay, error = args[1], args[2], args[3]
        logger.warning(
            "%s: attempt %d failed (%s: %s); retry %d in %.3fs",
            where,
            attempt,
            _error_name(error),
            error,
            attempt,
            delay,
            extra=extra,
        )
    elif event == "on_flow_error":
        error = args[1]
        logger.info(
            "%s: attempt %d failed (%s: %s)", where, args[2], _error_name(error), error, extra=extra
        )
    elif event == "on_flow_timeout":
        logger.warning("%s: timed out after %ss", where, args[1], extra=extra)
    elif event == "on_circuit_state_change":
        by = f" ({where})" if ctx.branch else ""  # a reset names no branch
        logger.warning("circuit %s%s: %s -> %s", ctx.circuit, by, args[1], args[2], extra=extra)
    elif event == "on_flow_complete":
        result = args[1]
        outcome = "succeeded" if result.success else f"failed ({result.error_type})"
        logger.debug("%s: %s in %.1f ms", where, outcome, result.timing_ms, extra=extra)
    else:
        logger.debug("%s: %s", where, event, extra=extra)


def _error_name(error: BaseException) -> str:
    """The user-facing type name: the original one for errors carried across processes."""
    return getattr(error, "error_type", None) or type(error).__name__
