"""Enqueue whole workflows from apps and come back for them: ``submit`` and ``WorkflowRun``.

``submit(graph_ref, state)`` checks everything it can first (the graph resolves and compiles
here, the state is JSON and within the size limit), records the run as ``pending`` and sends
``tea_dist.run_workflow`` to the run queue. A run worker (thread pool) drives the run exactly
as ``invoke()`` does, appending every graph event to the run's Redis stream, where branch
workers append theirs. ``WorkflowRun(run_id)`` re-attaches from any process.

Delivery: a run is executed at most once (its message is acknowledged when a run worker takes
it); a run worker that dies mid-run leaves a ``running`` run without a heartbeat, which
``status()`` reports as ``failed`` with that reason. Branches inside the run are delivered at
least once (see the celery strategy).

Every change of a run's status is one Lua script (claim, finish, cancel, the orphan check), so
a cancel racing the end of a run never marks a succeeded run cancelled, and a cancel of an
unknown or finished run writes nothing. Redis and broker errors leave this module as
``BrokerError`` naming the server's redacted URL. With no broker configured, the advertised
``tea-dist cluster`` is used (``client_settings``); nothing here starts a cluster.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis
from kombu.exceptions import OperationalError

from tea_dist.core.errors import (
    BrokerError,
    GraphError,
    RunCancelledError,
    RunFailedError,
    TeaDistError,
)
from tea_dist.core.graph import StateGraph
from tea_dist.distributed.celery_app import app
from tea_dist.distributed.connections import redis_for
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.local_cluster import client_settings
from tea_dist.distributed.settings import Settings, redact
from tea_dist.distributed.trust import Allowlist, agent_path, agent_ref, worker_allowlist
from tea_dist.distributed.wire import check_json_state, import_callable, yaml_uses_modules
from tea_dist.engine.nodes import CancelToken
from tea_dist.observe import tracing

# KEYS[1] run hash, KEYS[2] run heartbeat; ARGV: error, now. Returns the status (nil: unknown).
STATUS = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'running' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'ended', ARGV[2])
  return 'failed'
end
return status
"""

# KEYS[1] run hash, KEYS[2] run heartbeat; ARGV: now, heartbeat ttl (ms). 1 if claimed.
CLAIM = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[1])
redis.call('SET', KEYS[2], 1, 'PX', ARGV[2])
return 1
"""

# KEYS[1] run hash, KEYS[2] cancel flag, KEYS[3] event stream; ARGV: stream ttl, field, value...
FINISH = """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[3], ARGV[1])
return 1
"""

# KEYS[1] run hash, KEYS[2] cancel flag; ARGV: flag ttl, now. Returns the status found.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'pending' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'ended', ARGV[2])
elseif status == 'running' then
  redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
end
return status
"""


class RunStatus(StrEnum):
    """Where a submitted run is."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}


def resolve_graph(graph_ref: str, allowlist: Allowlist | None = None) -> StateGraph:
    """A ``StateGraph`` from ``"pkg.module:attr"`` (a graph or a factory) or a YAML path.

    With ``allowlist`` (a run worker resolving a submitted ref), nothing is imported unless
    it allows the ref's module, and a YAML ref is found under the agents directory with its
    ``uses:`` modules allowed: a refused ref raises ``NotAllowedError`` naming it.
    """
    if graph_ref.endswith((".yaml", ".yml")) or (allowlist is None and Path(graph_ref).is_file()):
        from tea_dist.core.yaml_loader import load_yaml

        if allowlist is None:
            return load_yaml(str(Path(graph_ref).resolve()))
        path = agent_path(graph_ref)
        for module in sorted(yaml_uses_modules(path.read_bytes()) if path.is_file() else ()):
            allowlist.check(module, f" (a 'uses:' of the YAML agent '{graph_ref}')")
        return load_yaml(str(path))
    module_name, sep, attr = graph_ref.partition(":")
    if not sep or not module_name or not attr:
        raise GraphError(f"graph reference '{graph_ref}' must be 'pkg.module:attr' or a YAML path")
    if allowlist is not None:
        allowlist.check(graph_ref, " (a submitted graph)")
    try:
        obj: Any = import_callable(graph_ref)
    except GraphError as exc:
        raise GraphError(f"cannot import graph '{graph_ref}': {exc.__cause__}") from exc
    if callable(obj) and not isinstance(obj, StateGraph):
        obj = obj()
    if not isinstance(obj, StateGraph):
        raise GraphError(f"'{graph_ref}' is not a StateGraph or a factory returning one")
    return obj


@contextmanager
def translated(settings: Settings) -> Iterator[None]:
    """Raise Redis and broker errors as ``BrokerError`` naming the redacted URL."""
    try:
        yield
    except (redis.RedisError, OperationalError) as exc:
        url = redact(settings.redis)
        raise BrokerError(f"Redis at {url} failed: {type(exc).__name__}: {exc}") from exc


def submit(
    graph_ref: str, state: Mapping[str, Any], config: Mapping[str, Any] | None = None
) -> WorkflowRun:
    """Enqueue a whole workflow run; returns its handle at once.

    With no broker configured, uses the advertised ``tea-dist cluster`` (``ConfigError`` when
    none runs); ``BrokerError`` when Redis cannot be reached.
    """
    settings = client_settings()
    resolve_graph(graph_ref).compile()  # a bad graph fails here, before anything is sent
    check_json_state(state, "the run input", settings.max_state_bytes)
    check_json_state(dict(config or {}), "the run config", settings.max_state_bytes)
    if graph_ref.endswith((".yaml", ".yml")) or Path(graph_ref).is_file():
        graph_ref = agent_ref(graph_ref)  # run workers find it under their agents directory
    run = WorkflowRun(uuid.uuid4().hex)
    now = time.time()
    with translated(settings):
        pipe = run.client.pipeline()
        pipe.hset(
            run.key, mapping={"status": RunStatus.PENDING, "graph": graph_ref, "created": now}
        )
        pipe.expire(run.key, int(settings.run_expires))
        pipe.execute()
        run_workflow.apply_async(
            (run.run_id, graph_ref, dict(state), dict(config or {})),
            {"trace": tracing.carrier()},  # the run joins the submitter's trace
            task_id=run.run_id,
            queue=settings.runs_queue,
            argsrepr=f"(run={run.run_id[:8]}, graph={graph_ref})",
            kwargsrepr="{}",
        )
    return run


class WorkflowRun:
    """A submitted run, re-attachable by id from any process.

    Every method raises ``BrokerError`` (naming the redacted URL) when Redis fails, and
    ``TeaDistError`` for a run id that is unknown or expired.
    """

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.settings = client_settings()
        self.keys = Keys(self.settings.key_prefix)
        self.client = redis_for(self.settings.redis)
        self.key = self.keys.run(run_id)

    def __repr__(self) -> str:
        return f"WorkflowRun({self.run_id!r})"

    def _unknown(self) -> TeaDistError:
        return TeaDistError(f"no run '{self.run_id}' (unknown, or expired)")

    def _record(self) -> dict[str, str]:
        with translated(self.settings):
            data = self.client.hgetall(self.key)
        if not data:
            raise self._unknown()
        return {_text(k): _text(v) for k, v in data.items()}

    def status(self) -> RunStatus:
        """pending, running, succeeded, failed or cancelled."""
        with translated(self.settings):
            status = self.client.eval(
                STATUS,
                2,
                self.key,
                self.keys.run_heartbeat(self.run_id),
                "the run worker stopped (its heartbeat lapsed) during the run; "
                "the run was not retried",
                time.time(),
            )
        if status is None:
            raise self._unknown()
        return RunStatus(_text(status))

    def result(self, timeout: float | None = None) -> dict[str, Any]:
        """The final state; waits up to ``timeout`` seconds (forever when None).

        Raises ``RunFailedError`` (with the reason) or ``RunCancelledError``, and
        ``TimeoutError`` when the run is not done in time.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.02
        while (status := self.status()) not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"run {self.run_id} is still {status} after {timeout}s")
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)
        record = self._record()
        if status is RunStatus.CANCELLED:
            raise RunCancelledError(f"run {self.run_id} was cancelled")
        if status is RunStatus.FAILED:
            raise RunFailedError(
                f"run {self.run_id} failed: {record.get('error', 'unknown error')}"
            )
        return json.loads(record["result"])  # type: ignore[no-any-return]

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event of the run so far, from the start: graph events and branch events."""
        with translated(self.settings):
            entries: Any = self.client.xrange(self.keys.events(self.run_id))
        for _id, fields in entries:
            data = {_text(k): _text(v) for k, v in fields.items()}
            if "e" in data:  # a BranchEvent published by a flow worker
                yield {"type": "branch", **json.loads(data["e"])}
            else:
                yield json.loads(data.get("data") or "{}")

    def cancel(self) -> bool:
        """Stop the run: queued, it never starts; running, its branches are stopped.

        Returns False, writing nothing, when the run had already ended; raises
        ``TeaDistError`` for an unknown run.
        """
        with translated(self.settings):
            status = self.client.eval(
                CANCEL,
                2,
                self.key,
                self.keys.run_cancelled(self.run_id),
                int(self.settings.run_expires),
                time.time(),
            )
            if status is None:
                raise self._unknown()
            if _text(status) == RunStatus.PENDING:
                app.control.revoke(self.run_id)
        return _text(status) in (RunStatus.PENDING, RunStatus.RUNNING)

    # -- the run worker's side --

    def claim(self) -> bool:
        """Move a pending run to running (its heartbeat set); False if it is not pending."""
        with translated(self.settings):
            return bool(
                self.client.eval(
                    CLAIM,
                    2,
                    self.key,
                    self.keys.run_heartbeat(self.run_id),
                    time.time(),
                    int(self.settings.heartbeat_ttl * 1000),
                )
            )

    def finish(self, outcome: Mapping[str, Any]) -> bool:
        """Record a running run's outcome (and let its event stream expire); False if the
        run is no longer running (declared orphaned meanwhile)."""
        fields = [str(v) for kv in {**outcome, "ended": time.time()}.items() for v in kv]
        with translated(self.settings):
            return bool(
                self.client.eval(
                    FINISH,
                    3,
                    self.key,
                    self.keys.run_cancelled(self.run_id),
                    self.keys.events(self.run_id),
                    int(self.settings.run_expires),
                    *fields,
                )
            )


class _RunWatch:
    """While a run worker drives a run: keep its heartbeat, and turn a cancel into a token."""

    def __init__(self, run: WorkflowRun) -> None:
        self.run, self.token = run, CancelToken()
        self.every, self.ttl = run.settings.heartbeat_seconds, run.settings.heartbeat_ttl
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tea-dist-run-watch", daemon=True)

    def __enter__(self) -> CancelToken:
        self._beat()
        self._thread.start()
        return self.token

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(self.every * 2 + 1)
        self.run.client.delete(self.run.keys.run_heartbeat(self.run.run_id))

    def _beat(self) -> None:
        key = self.run.keys.run_heartbeat(self.run.run_id)
        pipe = self.run.client.pipeline()
        pipe.set(key, 1, px=int(self.ttl * 1000))
        pipe.exists(self.run.keys.run_cancelled(self.run.run_id))
        if pipe.execute()[1]:
            self.token.cancel()

    def _watch(self) -> None:
        while not self._done.wait(self.every):
            try:
                self._beat()
            except Exception:  # a Redis hiccup: the next beat tries again
                continue


@app.task(bind=True, name="tea_dist.run_workflow", acks_late=False)
def run_workflow(
    self: Any,
    run_id: str,
    graph_ref: str,
    state: dict[str, Any],
    config: dict[str, Any],
    trace: dict[str, str] | None = None,
) -> str:
    """Drive one submitted run on a run worker; the outcome goes to the run's record."""
    run = WorkflowRun(run_id)
    if not run.claim():  # cancelled while queued (or delivered twice)
        return "skipped"
    stream = run.keys.events(run_id)
    outcome: dict[str, Any] = {
        "status": RunStatus.FAILED,
        "error": "the run ended without a final event",
    }
    with _RunWatch(run) as token, tracing.attached(trace):
        try:
            graph = resolve_graph(graph_ref, worker_allowlist()).compile()
            for event in graph.stream(state, config, run_id=run_id, cancel_token=token):
                pipe = run.client.pipeline(transaction=False)
                pipe.xadd(stream, {"event": "graph", "data": json.dumps(event, default=_jsonable)})
                pipe.expire(stream, int(run.settings.run_expires))  # even if this worker dies
                pipe.execute()
                if event["type"] == "final":
                    outcome = {
                        "status": RunStatus.SUCCEEDED,
                        "result": json.dumps(event["state"], default=str),
                    }
                elif event["type"] == "error":
                    outcome = {
                        "status": RunStatus.FAILED,
                        "error": f"{event.get('error_type')}: {event['error']}",
                    }
        except Exception as exc:
            outcome = {"status": RunStatus.FAILED, "error": f"{type(exc).__name__}: {exc}"}
        # a cancel that lands after the final event changes nothing: the run succeeded
        if token.is_cancelled() and outcome["status"] != RunStatus.SUCCEEDED:
            outcome = {"status": RunStatus.CANCELLED}
        run.finish(outcome)  # while the heartbeat still beats, so status() never sees a gap
    return str(outcome["status"])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _jsonable(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)
