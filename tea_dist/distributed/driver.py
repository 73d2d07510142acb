"""The ``celery`` strategy: each branch is a ``tea_dist.run_flow`` task on a flow worker.

The driver (this module, in the caller's process) checks everything before sending anything
(JSON state, size limit, importable code, visibility timeout), asks each branch's circuit in
Redis for admission (an open circuit sends no task), sends the branches as a chord whose body
collects their results in declaration order, and then watches the run's event stream: it
relays worker events to the callbacks, keeps one result per branch (a redelivered branch
counts once), enforces ``timeout_total``, cancels siblings under ``fail_fast`` (a cooperative
interrupt first, ``revoke(terminate=True)`` after a grace period), and notices a branch whose
worker died (its heartbeat key lapsed) and sends it again.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import chord
from celery.result import AsyncResult

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError, GraphError, RemoteError, SerializationError
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.distributed.wire import check_fanout, check_json_state, encode_branch
from tea_dist.engine.attempt import (
    BranchLedger,
    BranchTask,
    ErrorInfo,
    cancelled_result,
    circuit_open_result,
    failed_result,
)
from tea_dist.policies.breaker import BreakerStore

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime

MAX_REDISPATCH = 3


class CeleryExecutor:
    """Branches as Celery tasks; see the module docstring."""

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Importable callables and no nested celery fan-out (``GraphError`` naming the node)."""
        check_fanout(spec, fanout)

    def shared_breakers(self) -> BreakerStore:
        """Circuits of celery branches live in Redis, shared by every worker and caller."""
        from tea_dist.distributed.breaker_redis import RedisBreakerStore
        from tea_dist.distributed.keys import Keys
        from tea_dist.distributed.local_cluster import driver_settings

        settings = driver_settings()
        return RedisBreakerStore(settings.redis, Keys(settings.key_prefix))

    def check_breakers(self, graph: str, store: BreakerStore) -> None:
        """Workers record circuit outcomes in Redis: a store elsewhere would not see them."""
        from tea_dist.distributed.breaker_redis import RedisBreakerStore

        if not isinstance(store, RedisBreakerStore):
            raise GraphError(
                f"graph '{graph}' has celery branches, whose workers record circuit "
                f"outcomes in Redis: pass a RedisBreakerStore, not {type(store).__name__}"
            )

    def execute(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> list[ParallelFlowResult]:
        driver = _Driver(tasks, configs, runtime)
        driver.validate()
        try:
            driver.dispatch()
            driver.wait()
        finally:
            driver.cleanup()
        return [r for r in driver.results if r is not None]


class _Driver:
    def __init__(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> None:
        from tea_dist.distributed.celery_app import app
        from tea_dist.distributed.connections import redis_for
        from tea_dist.distributed.keys import Keys
        from tea_dist.distributed.local_cluster import driver_settings

        self.app = app
        self.settings = driver_settings()
        self.client = redis_for(self.settings.redis)
        self.keys = Keys(self.settings.key_prefix)
        self.tasks, self.configs, self.runtime = list(tasks), list(configs), runtime
        self.fanout_id = uuid.uuid4().hex
        n = len(self.tasks)
        self.results: list[ParallelFlowResult | None] = [None] * n
        self.unresolved = n
        self.bounded = [i for i, c in enumerate(self.configs) if c.timeout_total is not None]
        self.payloads: list[dict[str, Any] | None] = [None] * n
        self.task_ids: list[str | None] = [None] * n
        self.started = [False] * n
        self.workers: list[str | None] = [None] * n  # host/pid running each branch's attempt
        self.silent_since: list[float | None] = [None] * n
        self.redispatched = [0] * n
        self.stopping: dict[int, float] = {}  # branch -> time its cooperative cancel was sent
        self.chord_result: AsyncResult | None = None
        self.chord_consumed = False
        self.contexts = [
            runtime.context(t, c) for t, c in zip(self.tasks, self.configs, strict=True)
        ]
        # what the driver learns of each branch's attempts from the event stream
        self.ledgers = [
            BranchLedger(t.branch, c, time.monotonic())
            for t, c in zip(self.tasks, self.configs, strict=True)
        ]
        self.graphs: dict[str, Any] = {}

    # -- before anything is sent --

    def validate(self) -> None:
        """Every check that must pass before the first message is published."""
        for task, config in zip(self.tasks, self.configs, strict=True):
            check_json_state(task.state, f"branch '{task.branch}'", self.settings.max_state_bytes)
            try:
                json.dumps(dict(task.run_config))
            except (TypeError, ValueError) as exc:
                raise SerializationError(
                    f"the run config of branch '{task.branch}' cannot be sent as JSON: {exc}"
                ) from exc
            worst = self._longest_hold(config)
            if worst >= self.settings.visibility_timeout:
                raise ConfigError(
                    f"branch '{task.branch}' may hold a message for {worst:g}s (retry delay plus "
                    f"time limit), not below the broker visibility timeout of "
                    f"{self.settings.visibility_timeout:g}s: it would be delivered twice; raise "
                    "TEA_DIST_VISIBILITY_TIMEOUT or lower max_delay"
                )
            key = f"{task.branch}->{task.fan_in}"
            if key not in self.graphs:
                self.graphs[key] = encode_branch(task.spec, task.branch, task.fan_in)

    def _longest_hold(self, config: ParallelConfig) -> float:
        policy = config.retry()
        delay = policy.delay_for(policy.max_retries - 1) if policy.max_retries else 0.0
        limit = (config.timeout_seconds or 0.0) + self.settings.hard_limit_grace
        return delay + limit

    # -- sending --

    def dispatch(self) -> None:
        from tea_dist.distributed.tasks import collect_flows, run_flow

        now = time.time()
        signatures = []
        for i, (task, config) in enumerate(zip(self.tasks, self.configs, strict=True)):
            ctx = self.contexts[i]
            admission = self.runtime.admit(ctx, config)
            if admission is not None and not admission.allowed:
                self._resolve(i, circuit_open_result(task.branch, ctx.circuit or ""))
                continue
            payload = {
                "run": self.runtime.run_id,
                "fanout": self.fanout_id,
                "index": i,
                "branch": task.branch,
                "fan_in": task.fan_in,
                "graph": self.graphs[f"{task.branch}->{task.fan_in}"],
                "state": task.state,
                "run_config": dict(task.run_config),
                "config": config.model_dump(mode="json"),
                "dispatched": now,
                "circuit": ctx.circuit,
                "probe": bool(admission and admission.probe),
                "ledger": {"attempts": 0, "errors": [], "first_start": None},
            }
            self.payloads[i] = payload
            signatures.append(run_flow.signature((payload,), **self._options(i, config, now)))
        if signatures:
            body = collect_flows.signature(queue=self.configs[0].queue or self.settings.flows_queue)
            self.chord_result = chord(signatures)(body)

    def _options(self, i: int, config: ParallelConfig, now: float) -> dict[str, Any]:
        task_id = uuid.uuid4().hex
        self.task_ids[i] = task_id
        options: dict[str, Any] = {
            "task_id": task_id,
            "queue": config.queue or self.settings.flows_queue,
            "argsrepr": f"(run={self.runtime.run_id[:8]}, graph={self.runtime.graph_name}, "
            f"branch={self.tasks[i].branch})",
            "kwargsrepr": "{}",
        }
        if config.timeout_seconds is not None:
            options["soft_time_limit"] = config.timeout_seconds
            options["time_limit"] = config.timeout_seconds + self.settings.hard_limit_grace
        if config.timeout_total is not None:
            options["expires"] = now + config.timeout_total
        return options

    # -- watching --

    def wait(self) -> None:
        stream, last = self.keys.events(self.runtime.run_id), "0-0"
        next_check = time.monotonic() + self.settings.heartbeat_seconds
        while self.unresolved:
            reply: Any = self.client.xread({stream: last}, count=1000, block=100)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    self._on_event({_s(k): _s(v) for k, v in fields.items()})
            self._check_deadlines()
            if self.runtime.cancel_token.is_cancelled():
                self._cancel_all("cancelled: the run was cancelled")
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.heartbeat_seconds
                self._check_chord()
                self._check_tasks()
        self._kill_stragglers()

    def _on_event(self, fields: dict[str, str]) -> None:
        if fields.get("fanout") != self.fanout_id:
            return
        i, event = int(fields["index"]), fields["event"]
        data = json.loads(fields.get("data") or "{}")
        ctx = self._ctx(i, int(fields.get("attempt", 1)), fields.get("worker"))
        ledger = self.ledgers[i]
        if event in ("on_flow_start", "attempt_start"):
            self.started[i] = True
            self.workers[i] = ctx.worker  # where a cancel request for this attempt goes
            ledger.first_start = ledger.first_start or time.time()
            if event == "on_flow_start":
                self.runtime.emit(event, ctx)
        elif event == "on_flow_error":
            ledger.attempts = ctx.attempt
            error = data["error"]
            ledger.note_failure(ErrorInfo(error.get("type", "Error"), error.get("message", "")))
            self.runtime.emit(event, ctx, _remote(error), ctx.attempt)
        elif event == "on_flow_timeout":
            ledger.attempts = ctx.attempt
            ledger.note_failure(ErrorInfo.timed_out(data.get("seconds")))
            self.runtime.emit(event, ctx, data.get("seconds"))
        elif event == "on_flow_retry":
            self.runtime.emit(event, ctx, ctx.attempt, data["delay"], _remote(data["error"]))
        elif event == "on_circuit_state_change":
            self.runtime.emit(event, ctx, CircuitState(data["old"]), CircuitState(data["new"]))
        elif event == "on_flow_complete":
            self._resolve(i, ParallelFlowResult.from_dict(data["result"]), ctx)

    def _ctx(self, i: int, attempt: int = 1, worker: str | None = None) -> Any:
        from dataclasses import replace

        return replace(self.contexts[i], attempt=attempt, worker=worker)

    def _resolve(self, i: int, result: ParallelFlowResult, ctx: Any = None) -> None:
        """Keep the first result of a branch; later ones (redeliveries) are ignored."""
        if self.results[i] is not None:
            return
        self.results[i] = result
        self.unresolved -= 1
        self.runtime.emit("on_flow_complete", ctx or self._ctx(i), result)
        config = self.configs[i]
        if config.fail_fast and not result.success and result.error_type != "CancelledError":
            self._cancel_all(f"cancelled: fail_fast after branch '{result.branch}' failed")

    def _cancel_all(self, reason: str) -> None:
        for j, other in enumerate(self.results):
            if other is None:
                self._stop(j)
                self._resolve(j, cancelled_result(self.tasks[j].branch, reason))

    def _check_deadlines(self) -> None:
        now = time.time()
        for i in self.bounded:
            config, payload = self.configs[i], self.payloads[i]
            if self.results[i] is not None or config.timeout_total is None or payload is None:
                continue
            if now >= payload["dispatched"] + config.timeout_total:
                self._stop(i)
                ledger = self.ledgers[i]
                ledger.attempts += 1  # the attempt running (or about to) when time ran out
                ledger.note_failure(ErrorInfo.timed_out(config.timeout_total, "branch"))
                ctx = self._ctx(i, ledger.attempts)
                self.runtime.emit("on_flow_timeout", ctx, config.timeout_total)
                message = f"branch timed out after {config.timeout_total:g}s (timeout_total)"
                result = failed_result(
                    self.tasks[i].branch,
                    "TimeoutError",
                    message,
                    ledger=ledger,
                    timeout=True,
                    start=ledger.first_start or payload["dispatched"],
                )
                self._resolve(i, result, ctx)

    def _check_chord(self) -> None:
        """The chord body's result, when it arrives, is the authoritative ordered list."""
        if self.chord_result is None or self.chord_consumed or not self.chord_result.ready():
            return
        if self.chord_result.successful():
            header = [i for i, p in enumerate(self.payloads) if p is not None]
            for i, data in zip(header, self.chord_result.result, strict=True):
                self._resolve(i, ParallelFlowResult.from_dict(data))
        self.chord_consumed = True

    def _check_tasks(self) -> None:
        """Branches the stream is silent about: ended hard, revoked or expired, or lost.

        One MGET of the result-backend keys and one of the heartbeat keys per check.
        """
        open_ = [i for i, t in enumerate(self.task_ids) if t and self.results[i] is None]
        if not open_:
            return
        backend = self.app.backend
        raw = backend.client.mget([backend.get_key_for_task(self.task_ids[i]) for i in open_])
        beats = self.client.mget([self.keys.heartbeat(self.fanout_id, i) for i in open_])
        now = time.monotonic()
        for i, meta_raw, beat in zip(open_, raw, beats, strict=True):
            meta = backend.decode_result(meta_raw) if meta_raw else {}
            status, branch = meta.get("status"), self.tasks[i].branch
            if status == "FAILURE":
                self._resolve(i, _hard_failure(branch, meta.get("result"), self.configs[i]))
            elif status == "REVOKED":
                message = "the branch task was revoked or expired before it finished"
                self._resolve(
                    i, failed_result(branch, "CancelledError", message, ledger=self.ledgers[i])
                )
            elif status == "SUCCESS" and isinstance(meta.get("result"), dict):
                self._resolve(i, ParallelFlowResult.from_dict(meta["result"]))
            elif self.started[i] and beat is None and status in (None, "STARTED", "PENDING"):
                since = self.silent_since[i] = self.silent_since[i] or now
                if now - since > self.settings.heartbeat_ttl:
                    self._redispatch(i)
            else:
                self.silent_since[i] = None

    def _redispatch(self, i: int) -> None:
        """The worker running branch ``i`` is gone: send the branch again."""
        from tea_dist.distributed.tasks import run_flow

        old = self.task_ids[i]
        self.silent_since[i] = None
        self.started[i] = False
        self.workers[i] = None
        if self.redispatched[i] >= MAX_REDISPATCH:
            message = f"the worker running this branch was lost {self.redispatched[i] + 1} times"
            self._resolve(i, failed_result(self.tasks[i].branch, "WorkerLostError", message))
            return
        self.redispatched[i] += 1
        if old:
            self.app.control.revoke(old, terminate=True, signal="SIGKILL")
        options = self._options(i, self.configs[i], time.time())
        run_flow.apply_async((self.payloads[i],), **options)

    # -- stopping --

    def _stop(self, i: int) -> None:
        """Interrupt branch ``i`` cooperatively now; it is killed if still running after a grace."""
        task_id = self.task_ids[i]
        if task_id is None or i in self.stopping:
            return
        worker = self.workers[i]
        if worker is not None:  # running: its process's beater interrupts it
            inbox = self.keys.worker_inbox(worker)
            pipe = self.client.pipeline(transaction=False)
            pipe.rpush(inbox, f"{self.fanout_id}:{i}")
            pipe.expire(inbox, 60)
            pipe.execute()
        else:
            self.app.control.revoke(task_id)  # still queued: workers discard it
        self.stopping[i] = time.monotonic()

    def _kill_stragglers(self) -> None:
        """Branches that ignored the interrupt are revoked with terminate after the grace."""
        if not self.stopping:
            return
        deadline = max(self.stopping.values()) + self.settings.cancel_grace
        pending = dict(self.stopping)
        while pending and time.monotonic() < deadline:
            beats = self.client.mget([self.keys.heartbeat(self.fanout_id, i) for i in pending])
            pending = {
                i: t
                for (i, t), beat in zip(pending.items(), beats, strict=True)
                if beat is not None
            }
            if pending:
                time.sleep(0.05)
        ids = [self.task_ids[i] for i in pending if self.task_ids[i]]
        if ids:
            self.app.control.revoke(ids, terminate=True, signal="SIGKILL")

    def cleanup(self) -> None:
        """Tell late deliveries the fan-out is over and forget consumed results."""
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.keys.fanout_finished(self.fanout_id), 1, ex=int(self.settings.run_expires))
        backend = self.app.backend
        ids = [t for t in self.task_ids if t]
        if self.chord_result is not None:
            ids.append(self.chord_result.id)
        for task_id in ids:
            pipe.delete(backend.get_key_for_task(task_id))
        pipe.execute()
        _unsubscribe(backend, ids)


def _unsubscribe(backend: Any, ids: Sequence[str]) -> None:
    """Drop the result subscriptions that sending made (the stream carried the results).

    Celery's Redis backend subscribes the sender to every task's result channel; left alone,
    a long-lived caller (a run worker) would accumulate one per branch ever sent.
    """
    consumer = getattr(backend, "result_consumer", None)
    for mapping in getattr(backend, "_pending_results", ()):
        for task_id in ids:
            mapping.pop(task_id, None)
    if consumer is not None:
        for task_id in ids:
            with contextlib.suppress(Exception):
                consumer.cancel_for(task_id)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _remote(error: dict[str, Any]) -> RemoteError:
    return RemoteError(error.get("message", ""), error_type=error.get("type"))


def _hard_failure(branch: str, exc: Any, config: ParallelConfig) -> ParallelFlowResult:
    """A task that died without returning: hard time limit, or a crash the worker saw."""
    name = type(exc).__name__ if isinstance(exc, BaseException) else "WorkerError"
    if name == "TimeLimitExceeded":
        message = f"attempt timed out after {config.timeout_seconds}s; its process was killed"
        return failed_result(branch, "TimeoutError", message, timeout=True)
    return failed_result(branch, name, f"{name}: {exc}")
