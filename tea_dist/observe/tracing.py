"""OpenTelemetry tracing: the lifecycle events of a run as spans of one trace.

    tea_dist.invoke              one ``invoke()``/``stream()``, in the caller
    ├── tea_dist.node            each node of the run, while it runs
    └── tea_dist.fanout          each fan-out
        └── tea_dist.branch      each branch, from dispatch to its one result
            └── tea_dist.attempt each attempt, where it runs (a celery worker's own)

A listener of the ``Dispatcher`` (``pip install tea-dist[otel]``, the API only; the SDK and its
exporters are the application's). It is made for a dispatcher only when a tracer provider is
configured (``opentelemetry.trace.set_tracer_provider``, ``opentelemetry-instrument``, or
``set_tracer_provider`` here for tea_dist's spans alone); otherwise nothing is made, nothing is
imported, nothing costs.

Parents. The invoke span is a child of the caller's current span; nodes and fan-outs are
children of the invoke span. A node's span is the current span while the node runs, so spans
the node makes (an HTTP client's, a database's) are its children. A fan-out starts one branch
span per branch and is the current context in the thread that drives it while it runs: the
lifecycle's events, emitted in that thread, find their branch there. An attempt of an
in-process strategy is traced by the caller from those events (for ``process``, the child
process reports nothing itself). A celery attempt is traced by the worker that runs it: the
driver puts its branch span's context in the ``BranchMessage`` (``carrier``), the worker attaches
it around the task (``attached``) and its attempt span, current while the attempt runs, joins
the caller's trace. A fan-out nested in a branch is a child of the invoke span (thread, asyncio)
or of the attempt span (celery).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tea_dist.core.errors import BranchTimeoutError
from tea_dist.core.graph import FanOut
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.observe.events import FlowContext, Listener

_FANOUT = "tea_dist.fanout"  # the context key of the running fan-out's ``_Fanout``
_provider: Any = None  # set_tracer_provider's: tea_dist's spans go there instead of the global


def set_tracer_provider(provider: Any) -> None:
    """Send tea_dist's spans to ``provider`` (None: back to OpenTelemetry's global provider)."""
    global _provider
    _provider = provider


def _tracer() -> Any:
    """A tracer when tracing is configured, else None (without importing OpenTelemetry)."""
    if _provider is not None:
        return _provider.get_tracer("tea_dist")
    if "opentelemetry.trace" not in sys.modules:  # nobody configured anything
        return None
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    return provider.get_tracer("tea_dist")


# -- trace context across processes --


def carrier(branch: str | None = None) -> dict[str, str]:
    """The current trace context as W3C headers, for a message to another process.

    ``branch``: the span of that branch of the fan-out running in this thread, when there is
    one. ``{}`` when nothing is traced.
    """
    if "opentelemetry.trace" not in sys.modules:
        return {}
    from opentelemetry import propagate, trace

    context = None
    state = _running_fanout()
    if branch is not None and state is not None and branch in state.branches:
        context = trace.set_span_in_context(state.branches[branch])
    elif not trace.get_current_span().get_span_context().is_valid:
        return {}  # no trace here: no headers, and no propagator's cost for every item
    headers: dict[str, str] = {}
    propagate.inject(headers, context=context)
    return headers


def attach(headers: Mapping[str, str] | None) -> object | None:
    """Make the context of ``headers`` (from ``carrier``) current; the token for ``detach``."""
    if not headers or "opentelemetry.trace" not in sys.modules:
        return None
    from opentelemetry import context, propagate

    return context.attach(propagate.extract(dict(headers)))


def detach(token: object | None) -> None:
    """Undo ``attach``."""
    if token is not None:
        from opentelemetry import context

        context.detach(token)  # type: ignore[arg-type]


@contextmanager
def attached(headers: Mapping[str, str] | None) -> Iterator[None]:
    """The context of ``headers`` is current inside the block."""
    token = attach(headers)
    try:
        yield
    finally:
        detach(token)


# -- the listener --


@dataclass
class _Fanout:
    """A running fan-out's spans, reachable from its context."""

    span: Any
    token: Any
    branches: dict[str, Any] = field(default_factory=dict)  # open branch spans
    attempts: dict[str, Any] = field(default_factory=dict)  # running attempt spans


def _running_fanout() -> _Fanout | None:
    if "opentelemetry.context" not in sys.modules:
        return None
    from opentelemetry import context

    state = context.get_value(_FANOUT)
    return state if isinstance(state, _Fanout) else None


def _base(ctx: FlowContext) -> dict[str, Any]:
    attributes: dict[str, Any] = {"tea_dist.graph": ctx.graph_name, "tea_dist.run_id": ctx.run_id}
    if ctx.branch:
        attributes["tea_dist.branch"] = ctx.branch
    if ctx.config is not None:
        attributes["tea_dist.strategy"] = ctx.config.strategy
    return attributes


def _error_type(error: BaseException) -> str:
    return getattr(error, "error_type", None) or type(error).__name__


class TracingListener(Listener):
    """Turns one dispatcher's events into spans (see the module docstring)."""

    def __init__(self, tracer: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Status, StatusCode

        self.tracer, self.trace, self.context = tracer, trace, context
        self.error = lambda text: Status(StatusCode.ERROR, text)
        self.invoke: Any = None
        self.node: tuple[Any, Any] | None = None
        self.attempts: dict[str, tuple[Any, Any]] = {}  # attached here: a worker's attempts

    def _start(self, name: str, parent: Any, attributes: dict[str, Any]) -> Any:
        context = None if parent is None else self.trace.set_span_in_context(parent)
        return self.tracer.start_span(name, context=context, attributes=attributes)

    def _fail(self, span: Any, error_type: str, message: str = "") -> None:
        span.set_attribute("tea_dist.error_type", error_type)
        span.set_status(self.error(f"{error_type}: {message}" if message else error_type))

    # -- the run and its nodes (the runner) --

    def on_invoke_start(self, ctx: FlowContext) -> None:
        self.invoke = self._start("tea_dist.invoke", None, _base(ctx))

    def on_invoke_end(self, ctx: FlowContext, error: BaseException | None) -> None:
        span, self.invoke = self.invoke, None
        if span is not None:
            if error is not None:
                self._fail(span, _error_type(error), str(error))
            span.end()

    def on_node_start(self, ctx: FlowContext, node: str) -> None:
        span = self._start("tea_dist.node", self.invoke, {**_base(ctx), "tea_dist.node": node})
        self.node = (span, self.context.attach(self.trace.set_span_in_context(span)))

    def on_node_end(self, ctx: FlowContext, node: str, error: BaseException | None) -> None:
        if self.node is None:
            return
        (span, token), self.node = self.node, None
        self.context.detach(token)
        if error is not None:
            span.record_exception(error)
            self._fail(span, _error_type(error), str(error))
        span.end()

    # -- fan-outs and their branches (the runtime) --

    def on_fanout_start(self, ctx: FlowContext, fan: FanOut) -> None:
        parent = self.invoke or self.trace.get_current_span()
        strategies = sorted({c.strategy for c in fan.configs})
        span = self._start(
            "tea_dist.fanout",
            parent,
            {
                **_base(ctx),
                "tea_dist.node": fan.source,
                "tea_dist.fan_in": fan.fan_in,
                "tea_dist.branches": len(fan.branches),
                "tea_dist.strategy": ",".join(strategies),
            },
        )
        state = _Fanout(span, None)
        for branch, config in zip(fan.branches, fan.configs, strict=True):
            attributes = {**_base(ctx), "tea_dist.branch": branch}
            attributes["tea_dist.strategy"] = config.strategy
            state.branches[branch] = self._start("tea_dist.branch", span, attributes)
        context = self.context.set_value(_FANOUT, state, self.trace.set_span_in_context(span))
        state.token = self.context.attach(context)

    def on_fanout_end(
        self,
        ctx: FlowContext,
        fan: FanOut,
        results: Sequence[ParallelFlowResult],
        error: BaseException | None,
    ) -> None:
        state = _running_fanout()
        if state is None:
            return
        self.context.detach(state.token)
        for span in [*state.attempts.values(), *state.branches.values()]:  # never resolved
            self._fail(span, _error_type(error) if error else "NotRun")
            span.end()
        failed = sum(1 for r in results if not r.success)
        state.span.set_attribute("tea_dist.failed", failed)
        if error is not None:
            self._fail(state.span, _error_type(error), str(error))
        state.span.end()

    # -- attempts and results (the lifecycle) --

    def on_attempt_start(self, ctx: FlowContext) -> None:
        attributes = {**_base(ctx), "tea_dist.attempt": ctx.attempt}
        if ctx.worker:
            attributes["tea_dist.worker"] = ctx.worker
        state = _running_fanout()
        if state is None:  # a celery worker: the caller's branch span is current
            span = self._start("tea_dist.attempt", self.trace.get_current_span(), attributes)
            token = self.context.attach(self.trace.set_span_in_context(span))
            self.attempts[ctx.branch] = (span, token)
        elif ctx.config is None or ctx.config.strategy != "celery":  # celery: its worker's
            parent = state.branches.get(ctx.branch, state.span)
            state.attempts[ctx.branch] = self._start("tea_dist.attempt", parent, attributes)

    def on_attempt_end(self, ctx: FlowContext, error: BaseException | None, seconds: float) -> None:
        span = self._pop_attempt(ctx.branch)
        if span is None:
            return
        if ctx.worker:
            span.set_attribute("tea_dist.worker", ctx.worker)
        span.set_attribute("tea_dist.success", error is None)
        if error is not None:
            span.set_attribute("tea_dist.timeout", isinstance(error, BranchTimeoutError))
            self._fail(span, _error_type(error), str(error))
        span.end()

    def _pop_attempt(self, branch: str) -> Any:
        if branch in self.attempts:
            span, token = self.attempts.pop(branch)
            self.context.detach(token)
            return span
        state = _running_fanout()
        return None if state is None else state.attempts.pop(branch, None)

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException | None
    ) -> None:
        state = _running_fanout()
        span = None if state is None else state.branches.get(ctx.branch)
        if span is not None:
            error_type = _error_type(error) if error is not None else ""
            span.add_event(
                "retry", {"tea_dist.attempt": attempt, "delay": delay, "error_type": error_type}
            )

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        state = _running_fanout()
        span = None if state is None else state.branches.get(ctx.branch)
        if span is None:
            span = self.trace.get_current_span()
        span.add_event("circuit", {"circuit": ctx.circuit or "", "from": old, "to": new})

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        attempt = self._pop_attempt(ctx.branch)  # stopped without an end (cancelled)
        if attempt is not None:
            self._fail(attempt, result.error_type or "CancelledError")
            attempt.end()
        state = _running_fanout()
        span = None if state is None else state.branches.pop(ctx.branch, None)
        if span is None:  # a worker: the branch span is the caller's
            return
        span.set_attributes(
            {
                "tea_dist.success": result.success,
                "tea_dist.outcome": result.outcome.value,
                "tea_dist.timeout": result.timeout,
                "tea_dist.retry_count": result.retry_count,
            }
        )
        if result.circuit_state is not None:
            span.set_attribute("tea_dist.circuit_state", str(result.circuit_state))
        if result.worker:
            span.set_attribute("tea_dist.worker", result.worker)
        if not result.success:
            self._fail(span, result.error_type or "Error", result.error or "")
        span.end()


def listener() -> TracingListener | None:
    """A new dispatcher's tracing listener (None while nothing is traced); ``tea_dist``
    installs it on every ``Dispatcher`` (``add_listener``)."""
    tracer = _tracer()
    return None if tracer is None else TracingListener(tracer)
