"""The Celery tasks a flow worker runs: ``tea_dist.run_flow`` and ``tea_dist.collect_flows``.

``run_flow`` runs one attempt of one branch through the same attempt runner as every local
strategy, records the outcome on the branch's circuit, publishes lifecycle events to the run's
Redis stream, and then either re-publishes itself with the retry policy's countdown (the slot
is free while it waits) or returns the final ``ParallelFlowResult`` as JSON. A failure is
returned, never raised, so the chord always completes; an attempt killed at its hard time
limit is reported by the worker's main process at once (``on_failure``).

Redis I/O is batched: one pipeline before the attempt, one after. While a branch runs, the
process's one ``Beater`` thread keeps its heartbeat key alive for the driver and listens for a
cancel request, which it turns into Celery's soft-time-limit exception so the slot is freed
at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Task

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import GraphError
from tea_dist.core.results import ParallelFlowResult
from tea_dist.distributed.breaker_redis import RedisBreakerStore
from tea_dist.distributed.celery_app import app, current_settings
from tea_dist.distributed.connections import redis_for
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.wire import decode_branch
from tea_dist.engine.attempt import (
    AttemptOutcome,
    BranchLedger,
    BranchTask,
    ErrorInfo,
    Finish,
    after_attempt,
    circuit_open_result,
    failed_result,
    run_attempt,
    timeout_outcome,
    worker_id,
)
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.runtime import Runtime

Event = tuple[str, dict[str, Any]]


def publish(pipe: Any, payload: dict[str, Any], events: list[Event]) -> None:
    """Queue this branch's lifecycle ``events`` on the run's stream in ``pipe``."""
    settings = current_settings()
    stream = Keys(settings.key_prefix).events(payload["run"])
    for event, data in events:
        fields: dict[Any, Any] = {
            "event": event,
            "fanout": payload["fanout"],
            "index": payload["index"],
            "branch": payload["branch"],
            "attempt": payload["ledger"]["attempts"] + 1,
            "worker": worker_id(),
            "data": json.dumps(data, default=str),
        }
        pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
    pipe.expire(stream, int(settings.run_expires))


# -- heartbeats and cancel requests: one thread per worker process --


@dataclass
class Watch:
    """The branch running in this process, as the beater sees it."""

    heartbeat: str
    target: str  # "fanout:index", what a cancel request for this branch names
    token: CancelToken = field(default_factory=CancelToken)
    cancelled: bool = False


class Beater:
    """One thread per worker process: keeps the running branch's heartbeat alive and takes
    cancel requests from the process's inbox (the driver knows which process runs a branch
    from its events), so nothing is set up or torn down per branch."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.current: Watch | None = None
        self.pid = 0

    @contextmanager
    def watching(self, watch: Watch) -> Iterator[Watch]:
        with self.lock:
            self.current = watch
            if self.pid != os.getpid():  # first use in this (forked) process
                self.pid = os.getpid()
                threading.Thread(target=self._loop, name="tea-dist-beater", daemon=True).start()
        try:
            yield watch
        finally:
            with self.lock:  # after this, no interrupt can be sent for this branch
                self.current = None

    def _loop(self) -> None:
        settings = current_settings()
        client = redis.Redis.from_url(settings.redis)  # its own connection: BLPOP blocks it
        ttl = int(settings.heartbeat_ttl * 1000)
        inbox = Keys(settings.key_prefix).worker_inbox(worker_id())
        while True:
            try:
                popped = client.blpop([inbox], timeout=settings.heartbeat_seconds)
                watch = self.current
                if popped and watch is not None and _text(popped[1]) == watch.target:
                    self._interrupt(watch)
                elif watch is not None:
                    client.set(watch.heartbeat, worker_id(), px=ttl)
            except redis.RedisError:  # a hiccup: the driver's heartbeat check covers it
                time.sleep(settings.heartbeat_seconds)

    def _interrupt(self, watch: Watch) -> None:
        """Cancel cooperatively, then raise the soft-time-limit exception in the task."""
        with self.lock:
            if self.current is not watch:
                return
            watch.cancelled = True
            watch.token.cancel()
            handler = signal.getsignal(signal.SIGUSR1)
            if callable(handler):  # a prefork child: Celery's soft-limit handler is installed
                os.kill(os.getpid(), signal.SIGUSR1)


BEATER = Beater()


# -- the tasks --


class FlowTask(Task):  # type: ignore[misc]
    """``run_flow``'s task class: reports an attempt killed at its hard time limit."""

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        payload = args[0]
        config = ParallelConfig.model_validate(payload["config"])
        ledger = _ledger(payload, config)
        ledger.attempts += 1
        ledger.note_failure(ErrorInfo.timed_out(config.timeout_seconds))
        message = f"attempt timed out after {config.timeout_seconds:g}s; its process was killed"
        result = failed_result(
            payload["branch"],
            "TimeoutError",
            message,
            ledger=ledger,
            timeout=True,
            worker=worker_id(),
        )
        _finish(payload, result, [("on_flow_timeout", {"seconds": config.timeout_seconds})])


def _ledger(payload: dict[str, Any], config: ParallelConfig) -> BranchLedger:
    """The branch's ledger as carried in the message, on this process's monotonic clock."""
    dispatched = time.monotonic() - (time.time() - payload["dispatched"])
    ledger = BranchLedger(payload["branch"], config, dispatched)
    ledger.attempts = payload["ledger"]["attempts"]
    ledger.errors = list(payload["ledger"]["errors"])
    ledger.first_start = payload["ledger"]["first_start"]
    return ledger


@app.task(
    bind=True,
    base=FlowTask,
    name="tea_dist.run_flow",
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,  # the branch's RetryPolicy decides, not Celery's default of 3
)
def run_flow(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of one branch; return its final result as JSON, or retry."""
    started = time.time()
    settings = current_settings()
    client = redis_for(settings.redis)
    keys = Keys(settings.key_prefix)
    config = ParallelConfig.model_validate(payload["config"])
    ledger = _ledger(payload, config)
    breaker, circuit = config.circuit_breaker, payload.get("circuit")
    store = RedisBreakerStore(client, keys) if breaker and circuit else None
    probe = bool(payload.get("probe"))
    events: list[Event] = []
    if store and breaker and circuit and ledger.attempts > 0:  # a retry asks its circuit again
        admission = store.acquire(circuit, breaker)
        events += _transition(admission.transition)
        if not admission.allowed:
            result = circuit_open_result(payload["branch"], circuit, ledger)
            return _finish(payload, result, events)
        probe = admission.probe
    watch = Watch(
        keys.heartbeat(payload["fanout"], payload["index"]),
        f"{payload['fanout']}:{payload['index']}",
    )
    pipe = client.pipeline(transaction=False)
    pipe.exists(keys.fanout_finished(payload["fanout"]))
    pipe.set(watch.heartbeat, worker_id(), px=int(settings.heartbeat_ttl * 1000))
    # every attempt tells the driver which process runs it (cancel requests go there)
    started_event = "on_flow_start" if ledger.attempts == 0 else "attempt_start"
    publish(pipe, payload, [*events, (started_event, {})])
    if pipe.execute()[0]:
        return _finish(payload, _abandoned(payload), [])
    outcome = _attempt(payload, config, watch, started)
    events = []
    if store and breaker and circuit:
        events += _transition(store.record(circuit, breaker, outcome.ok, probe))
        ledger.circuit_state = store.snapshot(circuit).state
    if outcome.error is not None:
        if outcome.error.timeout:
            events.append(("on_flow_timeout", {"seconds": config.timeout_seconds}))
        else:
            events.append(("on_flow_error", {"error": _error_dict(outcome.error)}))
    decision = after_attempt(ledger, outcome, time.monotonic())
    if isinstance(decision, Finish):
        return _finish(payload, decision.result, events)
    retry = {"delay": decision.delay, "error": _error_dict(outcome.error)}
    pipe = client.pipeline(transaction=False)
    publish(pipe, payload, [*events, ("on_flow_retry", retry)])
    _end_watch(pipe, payload)
    pipe.execute()
    retry_payload = {
        **payload,
        "probe": False,
        "ledger": {
            "attempts": ledger.attempts,
            "errors": ledger.errors,
            "first_start": ledger.first_start,
        },
    }
    raise self.retry(args=(retry_payload,), countdown=decision.delay)


def _attempt(
    payload: dict[str, Any], config: ParallelConfig, watch: Watch, started: float
) -> AttemptOutcome:
    """Run the attempt while the beater watches it; soft limits become timeouts or cancels.

    ``started`` is when the task began: Celery's time limits count from then too.
    """
    try:
        with BEATER.watching(watch):
            spec = decode_branch(payload["graph"], payload["branch"])
            task = BranchTask(
                spec=spec,
                branch=payload["branch"],
                fan_in=payload["fan_in"],
                state=payload["state"],
                run_config=payload.get("run_config") or {},
                include_traceback=config.include_traceback,
                index=payload["index"],
            )
            outcome = run_attempt(task, Runtime(graph_name=spec.name).fanout, watch.token)
    except GraphError as exc:
        error = ErrorInfo.from_exception(exc, node=payload["branch"])
        return AttemptOutcome(False, None, started, time.time(), error=error, worker=worker_id())
    except SoftTimeLimitExceeded:  # raised between nodes, outside the attempt runner
        error = ErrorInfo("SoftTimeLimitExceeded", "")
        outcome = AttemptOutcome(False, None, started, time.time(), error=error)
    if outcome.error is not None and outcome.error.type_name == "SoftTimeLimitExceeded":
        if watch.cancelled:
            error = ErrorInfo("CancelledError", "cancelled by the caller")
            return AttemptOutcome(
                False, None, started, time.time(), error=error, worker=worker_id()
            )
        outcome = timeout_outcome(started, config.timeout_seconds)
        outcome.worker = worker_id()
    return outcome


def _finish(
    payload: dict[str, Any], result: ParallelFlowResult, events: list[Event]
) -> dict[str, Any]:
    """Publish the final result (after ``events``) and drop the heartbeat, in one round trip."""
    data = result.to_dict()
    settings = current_settings()
    pipe = redis_for(settings.redis).pipeline(transaction=False)
    publish(pipe, payload, [*events, ("on_flow_complete", {"result": data})])
    _end_watch(pipe, payload)
    pipe.execute()
    return data


def _end_watch(pipe: Any, payload: dict[str, Any]) -> None:
    """Queue in ``pipe``: drop the branch's heartbeat."""
    pipe.delete(Keys(current_settings().key_prefix).heartbeat(payload["fanout"], payload["index"]))


def _abandoned(payload: dict[str, Any]) -> ParallelFlowResult:
    message = "the run had already finished; branch not run"
    return failed_result(payload["branch"], "CancelledError", message)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _transition(transition: tuple[Any, Any] | None) -> list[Event]:
    if not transition:
        return []
    return [("on_circuit_state_change", {"old": str(transition[0]), "new": str(transition[1])})]


def _error_dict(error: ErrorInfo | None) -> dict[str, Any]:
    if error is None:
        return {}
    return {"type": error.type_name, "message": error.message, "timeout": error.timeout}


@app.task(name="tea_dist.collect_flows")
def collect_flows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chord body: the branch results, in header (declaration) order."""
    return results
