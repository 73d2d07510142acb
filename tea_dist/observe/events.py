"""Lifecycle events: the ``ParallelFlowCallback`` protocol and the one dispatcher.

Nothing calls a callback directly: the branch lifecycle ``emit``s events on a ``Dispatcher``,
which hands each one to two kinds of listener (dramatiq's middleware is the model):

- *listeners*, tea_dist's own (logging, and whatever ``add_listener`` installs: tracing,
  metrics, the worker's event publisher), called in the emitting thread, in order; an
  exception in one is logged and swallowed;
- *callbacks*, the user's ``ParallelFlowCallback`` objects, each on its own lane (a serial
  queue and thread). So callbacks see events in order, a slow or hanging callback delays only
  itself (after ``timeout`` seconds its lane is abandoned and a new one carries on), and an
  exception in a callback is logged and swallowed. ``flush()`` waits until every lane has
  caught up; ``invoke()`` calls it before yielding its final event.

A listener implements the ``on_*`` methods it cares about; besides the callback events there
are ``on_attempt_start`` (every attempt, with the worker that runs it), ``on_fanout_start`` and
``on_fanout_end`` (a fan-out's branches are dispatched / all resolved).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import CircuitState, ParallelFlowResult

logger = logging.getLogger("tea_dist.events")

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

    def but(self, **changes: Any) -> FlowContext:
        """A copy with ``changes``: ``dataclasses.replace`` without its per-call checks (a
        branch's context is copied for each attempt and worker)."""
        copied = object.__new__(FlowContext)
        copied.__dict__.update(self.__dict__, **changes)
        return copied


@runtime_checkable
class ParallelFlowCallback(Protocol):
    """Listener of parallel-flow lifecycle events. Every method is optional."""

    def on_flow_queued(self, context: FlowContext) -> None: ...

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


_default_listeners: list[Callable[[], Any]] = []


def add_listener(factory: Callable[[], Any]) -> None:
    """Give every new ``Dispatcher`` a listener made by ``factory`` (tracing, metrics, ...)."""
    if factory not in _default_listeners:
        _default_listeners.append(factory)


class Dispatcher:
    """Fires lifecycle events at listeners and callbacks, isolated from the run."""

    def __init__(
        self,
        callbacks: Iterable[Any] = (),
        timeout: float = 5.0,
        listeners: Iterable[Any] | None = None,
    ) -> None:
        self.timeout = timeout
        made = [factory() for factory in _default_listeners] if listeners is None else listeners
        self.listeners = [listener for listener in made if listener is not None]
        self._lanes = [_Lane(callback) for callback in callbacks]
        self._routes: dict[str, tuple[list[tuple[Any, Callable[..., Any]]], list[_Lane]]] = {}

    def listen(self, listener: Any) -> None:
        """Add a listener to this dispatcher."""
        self.listeners.append(listener)
        self._routes.clear()

    def _route(self, event: str) -> tuple[list[tuple[Any, Callable[..., Any]]], list[_Lane]]:
        """The listeners' methods for ``event`` and the lanes of callbacks implementing it."""
        route = self._routes.get(event)
        if route is None:
            methods = [
                (listener, method)
                for listener in self.listeners
                if (method := getattr(listener, event, None)) is not None
            ]
            lanes = [lane for lane in self._lanes if callable(getattr(lane.listener, event, None))]
            route = self._routes[event] = (methods, lanes)
        return route

    def emit(self, event: str, *args: Any) -> None:
        """Call ``event`` on every listener, and queue it for every callback implementing it."""
        methods, lanes = self._route(event)
        for listener, method in methods:
            try:
                method(*args)
            except Exception:
                logger.exception("listener %r failed on %s", listener, event)
        for lane in self._lanes:
            if lane.hung(self.timeout):
                lane.abandon()
        for lane in lanes:
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
