"""Prometheus metrics: branch lifecycle events as counters, histograms and gauges.

On when ``TEA_DIST_METRICS_PORT`` is set (or after ``enable()``): this process then serves
``/metrics`` on that port, unless ``PROMETHEUS_MULTIPROC_DIR`` is set, in which case it only
writes its samples there for the process that serves the directory (``serve_directory``;
``tea-dist worker --metrics-port P`` does this for its prefork children). Off, no listener is
made and ``prometheus_client`` is not imported (``pip install tea-dist[metrics]``).

Names are stable; labels stay bounded (graph, branch: the branch's target node, strategy,
outcome, error type, circuit, limit, queue; never a run id or an item index):

- ``tea_dist_branches_total{graph,branch,strategy,outcome}``: branches resolved; outcome is
  the result's ``outcome``: success, error, timeout, circuit_open, cancelled or lost;
- ``tea_dist_branch_duration_seconds{graph,branch,strategy}``: histogram, dispatch to result;
- ``tea_dist_attempts_total{graph,branch,strategy,outcome,error_type}`` and
  ``tea_dist_attempt_duration_seconds{graph,branch,strategy}``: every attempt;
- ``tea_dist_retries_total`` and ``tea_dist_branches_succeeded_after_retry_total``
  ``{graph,branch,strategy}``;
- ``tea_dist_branches_redispatched_total{graph,branch}``: celery branches sent again because
  their worker was lost;
- ``tea_dist_circuit_state{circuit}`` (0 closed, 1 half-open, 2 open) and
  ``tea_dist_circuit_transitions_total{circuit,state}`` (state: the new one);
- ``tea_dist_limit_permits_held{limit}``, ``tea_dist_limit_permits_waiting{limit}`` and
  ``tea_dist_limit_wait_seconds{limit}`` (every permit taken, 0 when it was free at once):
  the lifecycle's ``on_limit_*`` events, where the permits are taken (the caller for
  in-process strategies, the worker for celery), through ``limit_waiting``,
  ``limit_acquired``, ``limit_wait_ended`` and ``limit_released``;
- ``tea_dist_runs_resumed_total{graph}``: submitted runs taken over by a run worker after the
  one driving them stopped (``run_resumed``, called by the worker that resumes the run);
- ``tea_dist_queue_depth{queue}``: messages waiting in a worker's queues (served by the worker,
  see ``tea_dist.distributed.worker``).

A celery branch's events reach both the worker that runs it and, relayed, its caller: each is
counted once, where the attempt ran (the worker). The caller counts only what no worker saw: a
branch its circuit refused at dispatch, a branch lost with its worker, a redispatch.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tea_dist.core.errors import BranchTimeoutError
from tea_dist.core.processes import pid_alive
from tea_dist.core.results import CircuitState, Outcome, ParallelFlowResult
from tea_dist.observe.events import FlowContext, Listener

logger = logging.getLogger("tea_dist.metrics")

PORT_ENV = "TEA_DIST_METRICS_PORT"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
QUEUE_DEPTH = "tea_dist_queue_depth"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
BRANCH = ("graph", "branch", "strategy")
CIRCUIT_VALUES = {CircuitState.CLOSED: 0, CircuitState.HALF_OPEN: 1, CircuitState.OPEN: 2}
CALLER_OUTCOMES = (Outcome.CIRCUIT_OPEN, Outcome.LOST)  # celery outcomes no worker reports


@dataclass(frozen=True)
class Metrics:
    """tea_dist's metric objects, in one registry."""

    branches: Any
    branch_seconds: Any
    attempts: Any
    attempt_seconds: Any
    retries: Any
    succeeded_after_retry: Any
    redispatched: Any
    circuit_state: Any
    circuit_transitions: Any
    permits_held: Any
    permits_waiting: Any
    permit_wait_seconds: Any
    runs_resumed: Any


def build(registry: Any) -> Metrics:
    """Create every metric in ``registry``."""
    from prometheus_client import Counter, Gauge, Histogram

    def counter(name: str, text: str, labels: Iterable[str]) -> Any:
        return Counter(name, text, list(labels), registry=registry)

    def histogram(name: str, text: str, labels: Iterable[str]) -> Any:
        return Histogram(name, text, list(labels), registry=registry, buckets=BUCKETS)

    def gauge(name: str, text: str, labels: Iterable[str], mode: Any) -> Any:
        return Gauge(name, text, list(labels), registry=registry, multiprocess_mode=mode)

    return Metrics(
        branches=counter("tea_dist_branches", "Branches resolved", [*BRANCH, "outcome"]),
        branch_seconds=histogram(
            "tea_dist_branch_duration_seconds", "Branch time from dispatch to result", BRANCH
        ),
        attempts=counter(
            "tea_dist_attempts", "Branch attempts, by outcome", [*BRANCH, "outcome", "error_type"]
        ),
        attempt_seconds=histogram(
            "tea_dist_attempt_duration_seconds", "Time of one branch attempt", BRANCH
        ),
        retries=counter("tea_dist_retries", "Retries scheduled", BRANCH),
        succeeded_after_retry=counter(
            "tea_dist_branches_succeeded_after_retry", "Branches that succeeded on a retry", BRANCH
        ),
        redispatched=counter(
            "tea_dist_branches_redispatched",
            "Celery branches sent again after their worker was lost",
            ["graph", "branch"],
        ),
        circuit_state=gauge(
            "tea_dist_circuit_state",
            "Circuit state: 0 closed, 1 half-open, 2 open",
            ["circuit"],
            "mostrecent",
        ),
        circuit_transitions=counter(
            "tea_dist_circuit_transitions", "Circuit transitions (state: new)", ["circuit", "state"]
        ),
        permits_held=gauge(
            "tea_dist_limit_permits_held", "Permits of a limit held now", ["limit"], "livesum"
        ),
        permits_waiting=gauge(
            "tea_dist_limit_permits_waiting", "Branches waiting for a permit", ["limit"], "livesum"
        ),
        permit_wait_seconds=histogram(
            "tea_dist_limit_wait_seconds", "Time waited for a permit", ["limit"]
        ),
        runs_resumed=counter(
            "tea_dist_runs_resumed",
            "Submitted runs resumed by another run worker after their driver stopped",
            ["graph"],
        ),
    )


# -- on, off, and the process's metrics --

_lock = threading.Lock()
_switch: bool | None = None  # enable()/disable(); None: the environment decides
_metrics: Metrics | None = None
_served_pid = 0


def enabled() -> bool:
    """Whether this process records metrics."""
    return _switch if _switch is not None else bool(os.environ.get(PORT_ENV))


def enable(port: int | None = None) -> None:
    """Record metrics in this process from now on, and serve them on ``port`` if given."""
    global _switch
    _switch = True
    if port:
        _serve(port)


def disable() -> None:
    """Stop recording (what was recorded stays, and is still served)."""
    global _switch
    _switch = False


def current() -> Metrics | None:
    """The process's metrics when they are on, else None."""
    global _metrics
    if not enabled():
        return None
    if _metrics is None:
        with _lock:
            if _metrics is None:
                from prometheus_client import REGISTRY

                _metrics = build(REGISTRY)
        port = os.environ.get(PORT_ENV)
        if port and not os.environ.get(MULTIPROC_ENV):
            _serve(int(port))
    return _metrics


def _serve(port: int) -> None:
    """Serve the process's registry on ``port`` (once per process)."""
    global _served_pid
    with _lock:
        if _served_pid == os.getpid():
            return
        _served_pid = os.getpid()
        from prometheus_client import start_http_server

        try:
            start_http_server(port)
        except OSError as exc:
            logger.warning("cannot serve metrics on port %d: %s", port, exc)


def serve_directory(port: int, directory: str, collectors: Iterable[Any] = ()) -> Any:
    """Serve on ``port`` what every process recorded in ``directory`` (multiprocess mode),
    plus ``collectors``; returns the HTTP server (it runs on a daemon thread)."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    class Aggregate(MultiProcessCollector):  # type: ignore[misc]
        """Drops the live gauges of processes that died (a killed prefork child)."""

        def collect(self) -> Any:
            for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
                pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
                if not pid_alive(pid):
                    mark_process_dead(pid, directory)
            return super().collect()

    registry = CollectorRegistry()
    Aggregate(registry, directory)
    for collector in collectors:
        registry.register(collector)
    server, _thread = start_http_server(port, registry=registry)
    return server


# -- limits (ResourceLimit): what its permit holder calls --


def limit_waiting(limit: str) -> None:
    """A branch starts waiting for a permit of ``limit``."""
    if (m := current()) is not None:
        m.permits_waiting.labels(limit).inc()


def limit_acquired(limit: str, waited_seconds: float, waited: bool = True) -> None:
    """A branch got a permit of ``limit`` after ``waited_seconds`` (``waited``: it was
    ``limit_waiting``; else it got the permit at once, and waited 0 s)."""
    if (m := current()) is not None:
        if waited:
            m.permits_waiting.labels(limit).dec()
        m.permits_held.labels(limit).inc()
        m.permit_wait_seconds.labels(limit).observe(waited_seconds)


def limit_wait_ended(limit: str) -> None:
    """A branch that was ``limit_waiting`` stopped waiting without a permit."""
    if (m := current()) is not None:
        m.permits_waiting.labels(limit).dec()


def limit_released(limit: str) -> None:
    """A permit of ``limit`` was given back."""
    if (m := current()) is not None:
        m.permits_held.labels(limit).dec()


# -- durable runs: what the run worker that takes a run over calls --


def run_resumed(graph: str) -> None:
    """A submitted run of ``graph`` was taken over and resumed in this process."""
    if (m := current()) is not None:
        m.runs_resumed.labels(graph).inc()


# -- the listener --

_HOST = socket.gethostname()


def _here() -> str:
    return f"{_HOST}/{os.getpid()}"  # as ``engine.attempt.worker_id`` names a process


def counted_here(ctx: FlowContext, result: ParallelFlowResult | None = None) -> bool:
    """Whether this process counts an event of ``ctx``'s branch (see the module docstring)."""
    if ctx.config is None or ctx.config.strategy != "celery":
        return True
    worker = ctx.worker or (result.worker if result is not None else None)
    if worker:
        return worker == _here()
    return result is not None and result.outcome in CALLER_OUTCOMES


def relayed(ctx: FlowContext) -> bool:
    """An event of a celery branch that its worker published and this caller relays."""
    return bool(
        ctx.config is not None
        and ctx.config.strategy == "celery"
        and ctx.worker
        and ctx.worker != _here()
    )


def _labels(ctx: FlowContext) -> tuple[str, str, str]:
    return ctx.graph_name, ctx.branch, ctx.config.strategy if ctx.config else ""


def _circuit(ctx: FlowContext) -> str:
    """The circuit's name without the run id of a per-invocation circuit."""
    name, run = ctx.circuit or "", f"{ctx.run_id}/"
    return name.removeprefix(run) if ctx.run_id else name


class MetricsListener(Listener):
    """Counts one dispatcher's events (see the module docstring)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def on_attempt_end(self, ctx: FlowContext, error: BaseException | None, seconds: float) -> None:
        if not counted_here(ctx):
            return
        labels = _labels(ctx)
        if error is None:
            kind, error_type = Outcome.SUCCESS, ""
        else:
            error_type = getattr(error, "error_type", None) or type(error).__name__
            timeout = isinstance(error, BranchTimeoutError)
            kind = Outcome.implied(False, error_type, timeout)
        self.m.attempts.labels(*labels, kind.value, error_type).inc()
        self.m.attempt_seconds.labels(*labels).observe(seconds)

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException | None
    ) -> None:
        if counted_here(ctx):
            self.m.retries.labels(*_labels(ctx)).inc()

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        if not counted_here(ctx, result):
            return
        labels = _labels(ctx)
        self.m.branches.labels(*labels, result.outcome.value).inc()
        self.m.branch_seconds.labels(*labels).observe(result.timing_ms / 1000.0)
        if result.success and result.retry_count:
            self.m.succeeded_after_retry.labels(*labels).inc()

    def on_limit_waiting(self, ctx: FlowContext, limit: str) -> None:
        limit_waiting(limit)

    def on_limit_acquired(self, ctx: FlowContext, limit: str, waited: float | None) -> None:
        limit_acquired(limit, waited or 0.0, waited=waited is not None)

    def on_limit_wait_ended(self, ctx: FlowContext, limit: str) -> None:
        limit_wait_ended(limit)

    def on_limit_released(self, ctx: FlowContext, limit: str) -> None:
        limit_released(limit)

    def on_branch_redispatched(self, ctx: FlowContext) -> None:
        self.m.redispatched.labels(ctx.graph_name, ctx.branch).inc()

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        if relayed(ctx):  # its worker counted it
            return
        name = _circuit(ctx)
        self.m.circuit_transitions.labels(name, str(new)).inc()
        self.m.circuit_state.labels(name).set(CIRCUIT_VALUES[new])


def listener() -> MetricsListener | None:
    """A new dispatcher's metrics listener (None while metrics are off); ``tea_dist``
    installs it on every ``Dispatcher`` (``add_listener``)."""
    metrics = current()
    return None if metrics is None else MetricsListener(metrics)
