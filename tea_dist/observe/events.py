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

Every event is a member of ``Event``, a ``StrEnum`` whose values are the hook names, so an
emitter may name one by member or by string. The ``Listener`` base class has a no-op method per
``Event`` (dramatiq's ``Middleware``): tea_dist's own listeners subclass it and override the hooks
they care about, and the dispatcher calls only the hooks a listener overrides. A user's
``ParallelFlowCallback`` stays a plain object with whichever of the callback events
(``CALLBACK_EVENTS``) it implements.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import CircuitState, ParallelFlowResult

if TYPE_CHECKING:
    from tea_dist.core.graph import FanOut

logger = logging.getLogger("tea_dist.events")


class Event(StrEnum):
    """Every event the dispatcher carries; its value is the name of the hook that hears it."""

    # a branch's life: the user's callbacks hear these
    FLOW_QUEUED = "on_flow_queued"  # dispatched: it waits for a slot, a worker or a permit
    FLOW_START = "on_flow_start"  # its first attempt starts
    FLOW_COMPLETE = "on_flow_complete"  # its one result
    FLOW_ERROR = "on_flow_error"  # an attempt failed
    FLOW_TIMEOUT = "on_flow_timeout"  # an attempt or the branch timed out
    FLOW_RETRY = "on_flow_retry"  # another attempt follows after a delay
    CIRCUIT_STATE_CHANGE = "on_circuit_state_change"
    # tea_dist's own listeners (logging, tracing, metrics, durable runs) hear these too
    ATTEMPT_START = "on_attempt_start"  # every attempt, with the worker that runs it
    ATTEMPT_END = "on_attempt_end"
    BRANCH_REDISPATCHED = "on_branch_redispatched"  # sent again: its worker was lost
    LIMIT_WAITING = "on_limit_waiting"  # refused a permit: it waits
    LIMIT_ACQUIRED = "on_limit_acquired"
    LIMIT_WAIT_ENDED = "on_limit_wait_ended"  # stopped waiting without a permit
    LIMIT_RELEASED = "on_limit_released"
    FANOUT_START = "on_fanout_start"  # a fan-out's branches are dispatched
    FANOUT_END = "on_fanout_end"  # ... and all resolved
    INVOKE_START = "on_invoke_start"
    INVOKE_END = "on_invoke_end"
    NODE_START = "on_node_start"  # a main-path node
    NODE_END = "on_node_end"


CALLBACK_EVENTS = frozenset(  # the ``ParallelFlowCallback`` protocol
    {
        Event.FLOW_QUEUED,
        Event.FLOW_START,
        Event.FLOW_COMPLETE,
        Event.FLOW_ERROR,
        Event.FLOW_TIMEOUT,
        Event.FLOW_RETRY,
        Event.CIRCUIT_STATE_CHANGE,
    }
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


class Listener:
    """Base class of tea_dist's listeners: a no-op per ``Event``; override the hooks you need.

    The dispatcher calls only the hooks a subclass overrides, in the emitting thread.
    """

    def on_flow_queued(self, ctx: FlowContext) -> None:
        """A branch was dispatched; it waits for a slot, a worker or a permit."""

    def on_flow_start(self, ctx: FlowContext) -> None:
        """A branch's first attempt starts."""

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        """A branch's one result."""

    def on_flow_error(self, ctx: FlowContext, error: BaseException, attempt: int) -> None:
        """An attempt failed (not a timeout)."""

    def on_flow_timeout(self, ctx: FlowContext, timeout_seconds: float | None) -> None:
        """An attempt or a whole branch passed its time limit."""

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException | None
    ) -> None:
        """Another attempt follows ``delay`` seconds from now."""

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        """A circuit changed state."""

    def on_attempt_start(self, ctx: FlowContext) -> None:
        """An attempt starts (``ctx.worker``: where, when not in this process)."""

    def on_attempt_end(self, ctx: FlowContext, error: BaseException | None, seconds: float) -> None:
        """An attempt ended (``error`` None: it succeeded), after ``seconds``."""

    def on_branch_redispatched(self, ctx: FlowContext) -> None:
        """A branch whose worker was lost is sent again."""

    def on_limit_waiting(self, ctx: FlowContext, limit: str) -> None:
        """An attempt was refused a permit of ``limit``: it waits."""

    def on_limit_acquired(self, ctx: FlowContext, limit: str, waited: float | None) -> None:
        """An attempt holds a permit of ``limit`` (``waited``: seconds, when it had to)."""

    def on_limit_wait_ended(self, ctx: FlowContext, limit: str) -> None:
        """A branch stopped waiting for ``limit`` without a permit."""

    def on_limit_released(self, ctx: FlowContext, limit: str) -> None:
        """An attempt gave its permit of ``limit`` back."""

    def on_fanout_start(self, ctx: FlowContext, fan: FanOut) -> None:
        """A fan-out's branches are dispatched."""

    def on_fanout_end(
        self,
        ctx: FlowContext,
        fan: FanOut,
        results: Sequence[ParallelFlowResult],
        error: BaseException | None,
    ) -> None:
        """Every branch of a fan-out is resolved (or ``error`` ended it)."""

    def on_invoke_start(self, ctx: FlowContext) -> None:
        """A run starts."""

    def on_invoke_end(self, ctx: FlowContext, error: BaseException | None) -> None:
        """A run ended (``error``: how it failed)."""

    def on_node_start(self, ctx: FlowContext, node: str) -> None:
        """A main-path node starts."""

    def on_node_end(self, ctx: FlowContext, node: str, error: BaseException | None) -> None:
        """A main-path node ended."""


def _hook(listener: Any, event: Event) -> Callable[..., Any] | None:
    """``listener``'s method for ``event``: a ``Listener``'s only when it overrides the no-op,
    any other object's when it has one."""
    name = event.value
    if isinstance(listener, Listener) and getattr(type(listener), name) is getattr(Listener, name):
        return None
    method = getattr(listener, name, None)
    return method if callable(method) else None


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

    def _route(self, event: Event) -> tuple[list[tuple[Any, Callable[..., Any]]], list[_Lane]]:
        """The listeners' hooks for ``event`` and the lanes of callbacks implementing it."""
        route = self._routes.get(event)
        if route is None:
            methods = [
                (listener, method)
                for listener in self.listeners
                if (method := _hook(listener, event)) is not None
            ]
            lanes = [lane for lane in self._lanes if _hook(lane.listener, event) is not None]
            route = self._routes[event] = (methods, lanes)
        return route

    def emit(self, event: Event | str, *args: Any) -> None:
        """Call ``event`` on every listener, and queue it for every callback implementing it.

        ``event`` is an ``Event`` or its value (a hook name); any other name is a ``ValueError``.
        """
        route = self._routes.get(event)  # an Event hashes as its value
        methods, lanes = route if route is not None else self._route(Event(event))
        for listener, method in methods:
            try:
                method(*args)
            except Exception:
                logger.exception("listener %r failed on %s", listener, str(event))
        if not self._lanes:  # no callbacks (the common case): no lane to watch or feed
            return
        for lane in self._lanes:
            if lane.hung(self.timeout):
                lane.abandon()
        name = str(event)
        for lane in lanes:
            lane.put(name, args)

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
