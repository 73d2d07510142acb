"""The Celery tasks a flow worker runs: ``tea_dist.run_flow`` and ``tea_dist.collect_flows``.

``run_flow`` runs one attempt of one branch through the same attempt runner as every local
strategy, publishes lifecycle events to the run's Redis stream, records the outcome on the
branch's circuit, and then either re-publishes itself with the retry policy's countdown (the
slot is free while it waits) or returns the final ``ParallelFlowResult`` as JSON. A failure is
returned, never raised, so the chord always completes. While it runs, a heartbeat thread keeps
a key alive for the driver and listens for a cancel request, which it turns into Celery's soft
time limit exception so the slot is freed at once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from .attempt import (
    AttemptOutcome,
    BranchLedger,
    BranchTask,
    ErrorInfo,
    Finish,
    after_attempt,
    circuit_open_result,
    timeout_outcome,
    worker_id,
)
from .breaker_redis import RedisBreakerStore
from .celery_app import app, current_settings
from .config import ParallelConfig
from .connections import redis_for
from .errors import GraphError
from .keys import Keys
from .nodes import CancelToken
from .results import ParallelFlowResult
from .runtime import Runtime
from .wire import decode_branch


def publish(payload: dict[str, Any], event: str, **data: Any) -> None:
    """Append a lifecycle event of this branch to the run's event stream."""
    settings = current_settings()
    keys = Keys(settings.key_prefix)
    client = redis_for(settings.redis)
    stream = keys.events(payload["run"])
    fields: dict[Any, Any] = {
        "event": event,
        "fanout": payload["fanout"],
        "index": payload["index"],
        "branch": payload["branch"],
        "attempt": payload["ledger"]["attempts"] + 1,
        "worker": worker_id(),
        "data": json.dumps(data, default=str),
    }
    pipe = client.pipeline(transaction=False)
    pipe.xadd(stream, fields, maxlen=100_000, approximate=True)
    pipe.expire(stream, int(settings.run_expires))
    pipe.execute()


class Heartbeat:
    """Keeps ``heartbeat`` alive while a branch runs; a cancel request interrupts the branch."""

    def __init__(self, payload: dict[str, Any]) -> None:
        settings = current_settings()
        keys = Keys(settings.key_prefix)
        self.client = redis_for(settings.redis)
        self.key = keys.heartbeat(payload["fanout"], payload["index"])
        self.cancel_key = keys.cancel(payload["fanout"], payload["index"])
        self.every, self.ttl = settings.heartbeat_seconds, settings.heartbeat_ttl
        self.token = CancelToken()
        self.cancelled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="tea-dist-heartbeat", daemon=True)
        self._main = threading.main_thread().ident

    def __enter__(self) -> Heartbeat:
        self.client.set(self.key, worker_id(), px=int(self.ttl * 1000))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()  # the thread notices within one beat; nobody waits for it
        self.client.delete(self.key)

    def _beat(self) -> None:
        while True:
            try:
                cancelled = self.client.blpop([self.cancel_key], timeout=self.every)
                if self._done.is_set():
                    return
                if cancelled:
                    self._interrupt()
                    return
                self.client.set(self.key, worker_id(), px=int(self.ttl * 1000))
            except Exception:  # Redis hiccup: the driver's heartbeat check covers us
                if self._done.wait(self.every):
                    return

    def _interrupt(self) -> None:
        """Cancel cooperatively, then raise the soft-time-limit exception in the task."""
        self.cancelled = True
        self.token.cancel()
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler) and not self._done.is_set():
            os.kill(os.getpid(), signal.SIGUSR1)


def _ledger(payload: dict[str, Any], config: ParallelConfig) -> BranchLedger:
    """The branch's ledger as carried in the message, on this process's monotonic clock."""
    dispatched = time.monotonic() - (time.time() - payload["dispatched"])
    ledger = BranchLedger(payload["branch"], config, dispatched)
    ledger.attempts = payload["ledger"]["attempts"]
    ledger.errors = list(payload["ledger"]["errors"])
    ledger.first_start = payload["ledger"]["first_start"]
    return ledger


@app.task(bind=True, name="tea_dist.run_flow", acks_late=True, reject_on_worker_lost=True)
def run_flow(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one attempt of one branch; return its final result as JSON, or retry."""
    settings = current_settings()
    client = redis_for(settings.redis)
    keys = Keys(settings.key_prefix)
    config = ParallelConfig.model_validate(payload["config"])
    ledger = _ledger(payload, config)
    breaker, circuit = config.circuit_breaker, payload.get("circuit")
    store = RedisBreakerStore(client, keys) if breaker and circuit else None
    probe = bool(payload.get("probe"))
    if client.exists(keys.fanout_finished(payload["fanout"])):
        return _finish(payload, _abandoned(payload))
    if store and breaker and circuit and ledger.attempts > 0:  # a retry asks its circuit again
        admission = store.acquire(circuit, breaker)
        _transition(payload, admission.transition)
        if not admission.allowed:
            result = circuit_open_result(payload["branch"], circuit).model_copy(
                update={"attempt_errors": ledger.errors, "retry_count": ledger.attempts}
            )
            return _finish(payload, result)
        probe = admission.probe
    if ledger.attempts == 0:
        publish(payload, "on_flow_start")
    outcome = _attempt(payload, config)
    if store and breaker and circuit:
        _transition(payload, store.record(circuit, breaker, outcome.ok, probe))
        ledger.circuit_state = store.snapshot(circuit).state
    if outcome.error is not None:
        if outcome.error.timeout:
            publish(payload, "on_flow_timeout", seconds=config.timeout_seconds)
        else:
            publish(payload, "on_flow_error", error=_error_dict(outcome.error))
    decision = after_attempt(ledger, outcome, time.monotonic())
    if isinstance(decision, Finish):
        return _finish(payload, decision.result)
    publish(payload, "on_flow_retry", delay=decision.delay, error=_error_dict(outcome.error))
    retry_payload = {
        **payload,
        "probe": False,
        "ledger": {
            "attempts": ledger.attempts,
            "errors": ledger.errors,
            "first_start": ledger.first_start,
        },
    }
    raise self.retry(args=(retry_payload,), countdown=decision.delay, max_retries=None)


def _attempt(payload: dict[str, Any], config: ParallelConfig) -> AttemptOutcome:
    started = time.time()
    heartbeat = Heartbeat(payload)
    try:
        with heartbeat:
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
            outcome = _run(task, heartbeat)
    except GraphError as exc:
        error = ErrorInfo.from_exception(exc, node=payload["branch"])
        return AttemptOutcome(False, None, started, time.time(), error=error, worker=worker_id())
    except SoftTimeLimitExceeded:  # raised between nodes, outside the attempt runner
        outcome = AttemptOutcome(
            False, None, started, time.time(), error=ErrorInfo("SoftTimeLimitExceeded", "")
        )
    if outcome.error is not None and outcome.error.type_name == "SoftTimeLimitExceeded":
        if heartbeat.cancelled:
            error = ErrorInfo("CancelledError", "cancelled by the caller")
            return AttemptOutcome(
                False, None, started, time.time(), error=error, worker=worker_id()
            )
        outcome = timeout_outcome(outcome.started, config.timeout_seconds)
        outcome.worker = worker_id()
    return outcome


def _run(task: BranchTask, heartbeat: Heartbeat) -> AttemptOutcome:
    from .attempt import run_attempt

    runtime = Runtime(graph_name=task.spec.name)
    return run_attempt(task, runtime.fanout, heartbeat.token)


def _finish(payload: dict[str, Any], result: ParallelFlowResult) -> dict[str, Any]:
    data = result.to_dict()
    publish(payload, "on_flow_complete", result=data)
    return data


def _abandoned(payload: dict[str, Any]) -> ParallelFlowResult:
    now = time.time()
    return ParallelFlowResult(
        branch=payload["branch"],
        success=False,
        error="the run had already finished; branch not run",
        error_type="CancelledError",
        start_time=now,
        end_time=now,
    )


def _transition(payload: dict[str, Any], transition: tuple[Any, Any] | None) -> None:
    if transition:
        publish(payload, "on_circuit_state_change", old=str(transition[0]), new=str(transition[1]))


def _error_dict(error: ErrorInfo | None) -> dict[str, Any]:
    if error is None:
        return {}
    return {"type": error.type_name, "message": error.message, "timeout": error.timeout}


@app.task(name="tea_dist.collect_flows")
def collect_flows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chord body: the branch results, in header (declaration) order."""
    return results
