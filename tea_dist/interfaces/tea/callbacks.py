"""The Edge Agent's callback manager and cancellation token, on tea_dist's dispatcher.

``CallbackManager`` fires lifecycle events at its callbacks through tea_dist's ``Dispatcher``
(each callback on its own lane, exceptions logged and swallowed, a hanging callback left behind
after ``timeout`` seconds) and, as TEA's did, returns once the callbacks have handled the event.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tea_dist.core.errors import ConfigError
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.engine.nodes import CancelToken
from tea_dist.observe.events import Dispatcher, FlowContext

ParallelFlowContext = FlowContext
"""TEA's name for the context a callback receives."""


class CancellationToken(CancelToken):
    """A ``CancelToken`` that can be reset for reuse (TEA's ``CancellationToken``)."""

    def reset(self) -> None:
        """Clear the cancellation, so the token can be used again."""
        self._cancelled = False
        if self._event is not None:
            self._event.clear()


class CallbackManager:
    """Fires parallel-flow events at callbacks; a callback's failure never reaches the caller.

    Only ``error_policy="log"`` (TEA's default) is offered: an exception in a callback is
    logged and ignored, as every tea_dist callback is.
    """

    def __init__(
        self, callbacks: Iterable[Any] = (), timeout: float = 5.0, error_policy: str = "log"
    ) -> None:
        if error_policy != "log":
            raise ConfigError(
                f"error_policy {error_policy!r} is not supported: callbacks' exceptions are "
                "logged and ignored ('log')"
            )
        if timeout <= 0:
            raise ConfigError(f"timeout must be > 0, got {timeout}")
        self.timeout = timeout
        self.error_policy = error_policy
        self.callbacks = list(callbacks)
        self._dispatcher = Dispatcher(self.callbacks, timeout)

    def add_callback(self, callback: Any) -> None:
        self.callbacks.append(callback)
        self._dispatcher = Dispatcher(self.callbacks, self.timeout)

    def remove_callback(self, callback: Any) -> None:
        if callback in self.callbacks:
            self.callbacks.remove(callback)
            self._dispatcher = Dispatcher(self.callbacks, self.timeout)

    def fire_event(self, method_name: str, *args: Any) -> None:
        """Call ``method_name(*args)`` on every callback that has it; wait for them (a callback
        running longer than ``timeout`` is left behind)."""
        self._dispatcher.emit(method_name, *args)
        self._dispatcher.flush(self.timeout * (len(self.callbacks) + 1))

    def fire_flow_start(self, context: FlowContext) -> None:
        self.fire_event("on_flow_start", context)

    def fire_flow_complete(self, context: FlowContext, result: ParallelFlowResult) -> None:
        self.fire_event("on_flow_complete", context, result)

    def fire_flow_error(self, context: FlowContext, error: BaseException, attempt: int) -> None:
        self.fire_event("on_flow_error", context, error, attempt)

    def fire_flow_timeout(self, context: FlowContext, timeout_seconds: float) -> None:
        self.fire_event("on_flow_timeout", context, timeout_seconds)

    def fire_flow_retry(
        self, context: FlowContext, attempt: int, delay: float, error: BaseException
    ) -> None:
        self.fire_event("on_flow_retry", context, attempt, delay, error)

    def fire_circuit_state_change(
        self, context: FlowContext, old_state: CircuitState, new_state: CircuitState
    ) -> None:
        self.fire_event("on_circuit_state_change", context, old_state, new_state)
