"""Enqueue whole workflows from apps and come back for them: ``submit`` and ``WorkflowRun``.

``submit(graph_ref, state)`` checks everything it can first (the graph resolves and compiles
here, the state is JSON and within the size limit), records the run as ``pending`` (with its
input, for a run worker that may have to resume it) and sends ``tea_dist.run_workflow`` to the
run queue. A run worker (thread pool) drives the run exactly as ``invoke()`` does, appending
every graph event to the run's Redis stream, where branch workers append theirs.
``WorkflowRun(run_id)`` re-attaches from any process.

Delivery: a run is durable (``tea_dist.distributed.durable``). If the run worker driving it
stops, another run worker takes it over within seconds and resumes it from its last checkpoint:
``status()`` stays ``running``, ``events()`` shows a ``resumed`` event. Main-path nodes after the
checkpoint run again (at least once); celery branches already sent are re-attached, not sent
again.

Every change of a run's status is one Lua script (the lease's claim, writes and finish here and
in ``durable``, the cancel below), so a cancel racing the end of a run never marks a succeeded
run cancelled, and a cancel of an unknown or finished run writes nothing. Redis and broker
errors leave this module as ``BrokerError`` naming the server's redacted URL. With no broker
configured, the advertised ``tea-dist cluster`` is used (``client_cluster``); nothing here
starts a cluster.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any

import redis
from celery import shared_task, signals
from kombu.exceptions import OperationalError

from tea_dist.core.errors import (
    BrokerError,
    GraphError,
    RunCancelledError,
    RunFailedError,
    TeaDistError,
)
from tea_dist.core.graph import DEFAULT_NAME, StateGraph
from tea_dist.core.references import resolve
from tea_dist.distributed import durable
from tea_dist.distributed.cluster import ATTRIBUTE, Cluster, cluster_of
from tea_dist.distributed.durable import RunLease
from tea_dist.distributed.local_cluster import client_cluster
from tea_dist.distributed.settings import Settings, redact
from tea_dist.distributed.signing import SignatureError, sign, verify
from tea_dist.distributed.tasks import end_revoked
from tea_dist.distributed.trust import Allowlist, agent_path, agent_ref, worker_allowlist
from tea_dist.distributed.wire import check_json_state, yaml_uses_modules
from tea_dist.engine.runtime import Detached, Durable
from tea_dist.observe import metrics, tracing

logger = logging.getLogger("tea_dist.runs")


class RunStatus(StrEnum):
    """Where a submitted run is."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}

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


def resolve_graph(
    graph_ref: str, allowlist: Allowlist | None = None, settings: Settings | None = None
) -> StateGraph:
    """A ``StateGraph`` from ``"pkg.module:attr"`` (a graph or a factory) or a YAML path.

    With ``allowlist`` (a run worker of ``settings`` resolving a submitted ref), nothing is
    imported unless it allows the ref's module, and a YAML ref is found under the agents
    directory with its ``uses:`` modules allowed: a refused ref raises ``NotAllowedError``
    naming it.
    """
    if graph_ref.endswith((".yaml", ".yml")) or (allowlist is None and Path(graph_ref).is_file()):
        from tea_dist.core.yaml_loader import load_yaml

        if allowlist is None:
            return load_yaml(str(Path(graph_ref).resolve()))
        path = agent_path(graph_ref, settings or Settings())
        for module in sorted(yaml_uses_modules(path.read_bytes()) if path.is_file() else ()):
            allowlist.check(module, f" (a 'uses:' of the YAML agent '{graph_ref}')")
        return load_yaml(str(path))
    if ":" not in graph_ref:
        raise GraphError(f"graph reference '{graph_ref}' must be 'pkg.module:attr' or a YAML path")
    check = None if allowlist is None else partial(allowlist.check, context=" (a submitted graph)")
    obj: Any = resolve(graph_ref, check=check, instances=(StateGraph,))
    if callable(obj) and not isinstance(obj, StateGraph):
        obj = obj()
    if not isinstance(obj, StateGraph):
        raise GraphError(f"'{graph_ref}' is not a StateGraph or a factory returning one")
    if obj.name == DEFAULT_NAME:  # unnamed: named by where it comes from, in Flower and metrics
        obj.name = graph_ref
    return obj


@contextlib.contextmanager
def translated(settings: Settings) -> Iterator[None]:
    """Raise Redis and broker errors as ``BrokerError`` naming the redacted URL."""
    try:
        yield
    except (redis.RedisError, OperationalError) as exc:
        url = redact(settings.redis)
        raise BrokerError(f"Redis at {url} failed: {type(exc).__name__}: {exc}") from exc


def submit(
    graph_ref: str,
    state: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    *,
    cluster: Cluster | None = None,
) -> WorkflowRun:
    """Enqueue a whole workflow run on ``cluster`` (the default one: the environment's, else
    the advertised ``tea-dist cluster``); returns its handle at once."""
    cluster = cluster or client_cluster()
    settings = cluster.settings
    resolve_graph(graph_ref).compile()  # a bad graph fails here, before anything is sent
    check_json_state(state, "the run input", settings.max_state_bytes)
    check_json_state(dict(config or {}), "the run config", settings.max_state_bytes)
    if graph_ref.endswith((".yaml", ".yml")) or Path(graph_ref).is_file():
        graph_ref = agent_ref(graph_ref, settings)  # run workers find it in their agents dir
    run = WorkflowRun(uuid.uuid4().hex, cluster=cluster)
    trace = tracing.carrier()  # the run joins the submitter's trace
    body = run_body(run.run_id, graph_ref, dict(state), dict(config or {}), trace)
    signature = sign(body, settings.secret) if settings.secret is not None else ""
    record: dict[Any, Any] = {
        "status": RunStatus.PENDING,
        "graph": graph_ref,
        "created": time.time(),
        "queue": settings.runs_queue,
        # what a run worker taking the run over before its first checkpoint starts from
        "input": json.dumps(dict(state)),
        "config": json.dumps(dict(config or {})),
        "trace": json.dumps(trace),
        "signature": signature,  # a run worker resuming the run checks the record with it
    }
    with translated(settings):
        index = run.keys.runs_index()
        pipe = run.client.pipeline()
        pipe.hset(run.key, mapping=record)
        pipe.expire(run.key, int(settings.run_expires))
        pipe.zadd(index, {run.run_id: record["created"]})
        pipe.zremrangebyscore(index, 0, record["created"] - settings.run_expires)
        pipe.expire(index, int(settings.run_expires))
        pipe.execute()
        cluster.send(
            RUN_TASK,
            (run.run_id, graph_ref, dict(state), dict(config or {})),
            kwargs={"trace": trace, "signature": signature},
            task_id=run.run_id,
            queue=settings.runs_queue,
            argsrepr=f"(run={run.run_id[:8]}, graph={graph_ref})",
            kwargsrepr="{}",
        )
    return run


class WorkflowRun:
    """A submitted run, re-attachable by id from any process."""

    def __init__(self, run_id: str, *, cluster: Cluster | None = None) -> None:
        self.run_id = run_id
        self.cluster = cluster or client_cluster()
        self.settings = self.cluster.settings
        self.keys = self.cluster.keys
        self.client = self.cluster.client
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
        """pending, running, succeeded, failed or cancelled (``running`` through a hand-over
        from one run worker to another)."""
        with translated(self.settings):  # asked to cancel, and nobody drives it: cancelled now
            durable.cancel_unowned(self.client, self.keys, self.run_id)
        return RunStatus(self._record()["status"])

    def handovers(self) -> int:
        """How many times another run worker took the run over."""
        return int(self._record().get("handovers") or 0)

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

    def events(self, follow: bool = False) -> Iterator[dict[str, Any]]:
        """Every event of the run so far, from the start: graph events and branch events;
        with ``follow``, then every new one as it comes, until the run has ended.

        After a hand-over, a ``{"type": "resumed", "worker": ...}`` event; the graph events from
        the checkpoint on are then published again by the run worker that resumed the run.
        """
        stream, last = self.keys.events(self.run_id), "0-0"
        while True:
            ended = follow and self.status() in TERMINAL  # read before the last entries
            with translated(self.settings):
                if follow:
                    reply: Any = self.client.xread({stream: last}, count=500, block=500)
                    entries = reply[0][1] if reply else []
                else:
                    entries = self.client.xrange(stream)
            for entry_id, fields in entries:
                last = entry_id
                data = {_text(k): _text(v) for k, v in fields.items()}
                if "e" in data:  # a BranchEvent published by a flow worker
                    yield {"type": "branch", **json.loads(data["e"])}
                else:
                    yield json.loads(data.get("data") or "{}")
            if not follow or (ended and not entries):
                return

    def cancel(self, wait: float = 10.0) -> bool:
        """Stop the run: queued, it never starts; running, its branches are stopped. A run
        being handed over (its run worker stopped) ends ``cancelled`` once its lease lapses,
        or is stopped by the run worker that takes it over, whichever comes first.

        Returns True only if the run ended ``cancelled`` within ``wait`` seconds: False when
        it had already ended (nothing is written then), when it ended otherwise (it finished
        before its driver saw the cancel), or is still stopping; raises ``TeaDistError`` for
        an unknown run.
        """
        if not self._request_cancel():
            return False
        deadline = time.monotonic() + wait
        while (status := self.status()) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.05)
        return status is RunStatus.CANCELLED

    def _request_cancel(self) -> bool:
        """Ask for the cancel; False (nothing written) when the run had already ended."""
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
                self.cluster.app.control.revoke(self.run_id)
            elif _text(status) == RunStatus.RUNNING:  # its driver sees the flag; between two
                durable.cancel_unowned(self.client, self.keys, self.run_id)  # drivers, here
        return _text(status) in (RunStatus.PENDING, RunStatus.RUNNING)


RUN_TASK = "tea_dist.run_workflow"


@shared_task(bind=True, name=RUN_TASK, acks_late=False, throws=(RunFailedError,))
def run_workflow(
    self: Any,
    run_id: str,
    graph_ref: str,
    state: dict[str, Any],
    config: dict[str, Any],
    trace: dict[str, str] | None = None,
    signature: str = "",
) -> str:
    """Drive one submitted run on a run worker; the outcome goes to the run's record. With
    ``TEA_DIST_SECRET`` set, a message not signed by a submitter holding it is refused before
    anything it names is resolved."""
    cluster = cluster_of(self.app)
    run = WorkflowRun(run_id, cluster=cluster)
    try:
        record = run._record()
    except TeaDistError:  # no record: a forged message, or one that outlived its run
        record = {}
    queue = record.get("queue") or cluster.settings.runs_queue
    try:
        body = run_body(run_id, graph_ref, state, config, trace)
        check_run_signature(body, signature, cluster.settings)
    except SignatureError as exc:
        return _refused(run, record, queue, exc)
    lease = durable.claim(cluster, run_id, queue, "start")
    if lease is None:  # cancelled while queued, or already taken
        return "skipped"
    status = _drive(run, lease, _Work(graph_ref, state, config, trace), Durable(lease))
    # the task's Celery state (what Flower shows) is the run's outcome
    if status == RunStatus.FAILED:
        raise RunFailedError(f"run {run_id} failed: {run._record().get('error', '?')}")
    if status == RunStatus.CANCELLED:
        end_revoked(self)
    return status


def run_body(
    run_id: str,
    graph_ref: str,
    state: Mapping[str, Any],
    config: Mapping[str, Any],
    trace: Mapping[str, str] | None,
) -> dict[str, Any]:
    """What the signature of a submitted run covers: its id, graph, input, config, trace."""
    return {
        "run": run_id,
        "graph": graph_ref,
        "input": dict(state),
        "config": dict(config),
        "trace": dict(trace or {}),
    }


def check_run_signature(body: Mapping[str, Any], signature: str, settings: Settings) -> None:
    """``SignatureError`` unless ``body`` carries the signature of the secret of ``settings``
    (a run worker's; nothing to check without a secret)."""
    secret = settings.secret
    if secret is not None:
        verify(body, signature or None, secret)


def _record_body(run_id: str, record: Mapping[str, str]) -> dict[str, Any]:
    """The signed body of a run as its record keeps it."""
    return run_body(
        run_id,
        record.get("graph", ""),
        json.loads(record.get("input") or "{}"),
        json.loads(record.get("config") or "{}"),
        json.loads(record.get("trace") or "{}"),
    )


def _refused(run: WorkflowRun, record: Mapping[str, str], queue: str, exc: Exception) -> str:
    """A ``run_workflow`` message whose signature fails is acknowledged and logged. A genuine
    pending run (its record verifies) is left for its genuine message; a run whose record
    fails too (its submitter has another secret, or none) ends ``failed`` saying why, so
    that nobody waits for it."""
    logger.warning("refused a run_workflow message for run %s: %s", run.run_id, exc)
    if not record:
        return "refused"
    try:
        signature = record.get("signature", "")
        check_run_signature(_record_body(run.run_id, record), signature, run.settings)
        return "refused"  # a forged message naming a genuine run
    except SignatureError:
        pass
    lease = durable.claim(run.cluster, run.run_id, queue, "start")
    if lease is not None:
        with lease:
            why = f"{type(exc).__name__}: {exc}"
            lease.finish({"status": RunStatus.FAILED, "error": why, "ended": time.time()})
    return "refused"


def resume_run(lease: RunLease) -> str:
    """Drive on a run this process took over (``lease``), from its last checkpoint."""
    run = WorkflowRun(lease.run_id, cluster=lease.cluster)
    record = run._record()
    state, node, steps = json.loads(record.get("input") or "null"), "", 0
    if record.get("checkpoint"):  # the state after the last main-path node done
        stream = run.keys.events(run.run_id)
        entries: Any = run.client.xrange(stream, record["checkpoint"], record["checkpoint"])
        if entries:
            event = json.loads(entries[0][1][b"data"])
            state, node, steps = event["state"], event["node"], int(record.get("steps") or 0)
        else:
            state = None
    why = ""
    if state is None:  # nothing to resume from (a run submitted by an older version)
        why = "its run worker stopped and its checkpoint is gone; it cannot be resumed"
    try:  # its record is what a resumed run trusts: signed by its submitter
        signature = record.get("signature", "")
        check_run_signature(_record_body(lease.run_id, record), signature, run.settings)
    except SignatureError as exc:
        why = f"{type(exc).__name__}: its record is not signed by its submitter: {exc}"
    if why:
        with lease:
            lease.finish({"status": RunStatus.FAILED, "error": why, "ended": time.time()})
        return str(RunStatus.FAILED)
    resumed = {
        "type": "resumed",
        "worker": lease.worker,
        "previous": lease.previous,
        "handovers": int(record.get("handovers") or 0),
        "after": node,
        "at": time.time(),
    }
    config = json.loads(record.get("config") or "{}")
    trace = json.loads(record.get("trace") or "{}")
    how = Durable(lease, node, steps)
    return _drive(run, lease, _Work(record["graph"], state, config, trace), how, resumed)


def recent_runs(limit: int = 20, *, cluster: Cluster | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` submitted runs of ``cluster``, newest first: id, graph, status,
    created and ended (epoch seconds, ended None while it runs) and hand-overs."""
    cluster = cluster or client_cluster()
    settings, client, keys = cluster.settings, cluster.client, cluster.keys
    with translated(settings):
        newest: Any = client.zrevrange(keys.runs_index(), 0, max(limit, 1) - 1)
        ids = [_text(i) for i in newest]
        pipe = client.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(keys.run(run_id), "graph", "status", "created", "ended", "handovers")
        rows = pipe.execute() if ids else []
    runs = []
    for run_id, (graph, status, created, ended, handovers) in zip(ids, rows, strict=True):
        if status is None:
            continue  # expired
        runs.append(
            {
                "id": run_id,
                "graph": _text(graph or b""),
                "status": _text(status),
                "created": float(created or 0),
                "ended": float(ended) if ended else None,
                "handovers": int(handovers or 0),
            }
        )
    return runs


@dataclass(frozen=True)
class _Work:
    """What a run worker drives: the graph, its input and config, the submitter's trace."""

    graph_ref: str
    state: dict[str, Any]
    config: dict[str, Any]
    trace: dict[str, str] | None


def _drive(
    run: WorkflowRun,
    lease: RunLease,
    work: _Work,
    how: Durable,
    resumed: dict[str, Any] | None = None,
) -> str:
    """Run the graph while holding ``lease``: every event appended to the run's stream (fenced),
    the outcome recorded at the end. A run taken over or handed over meanwhile just stops.
    ``resumed``: the event saying which worker took the run over, published first."""
    outcome: dict[str, Any] = {
        "status": RunStatus.FAILED,
        "error": "the run ended without a final event",
    }
    steps = how.steps
    with lease, tracing.attached(work.trace):
        try:
            lease.check()
            if resumed is not None:
                lease.append([{"event": "graph", "data": json.dumps(resumed)}])
            allowlist = worker_allowlist(run.settings)
            graph = resolve_graph(work.graph_ref, allowlist, run.settings).compile(
                cluster=run.cluster
            )
            if resumed is not None:
                metrics.run_resumed(graph.name)
            events: Any = graph.stream(  # a generator: closed if a write is refused
                work.state, work.config, run_id=run.run_id, cancel_token=lease.cancel, durable=how
            )
            with contextlib.closing(events):
                for event in events:
                    checkpoint = None
                    if event["type"] == "state":
                        steps = checkpoint = steps + 1
                    data = json.dumps(event, default=_jsonable)
                    lease.append([{"event": "graph", "data": data}], steps=checkpoint)
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
        except Detached:
            return "handed over"
        except Exception as exc:
            outcome = {"status": RunStatus.FAILED, "error": f"{type(exc).__name__}: {exc}"}
        if lease.cancel.is_cancelled() and outcome["status"] != RunStatus.SUCCEEDED:
            outcome = {"status": RunStatus.CANCELLED}  # (a cancel after the work: it stands)
        # recorded while the lease is held, so the run is never seen without a driver
        if not lease.finish({**outcome, "ended": time.time()}):
            return "handed over"
    return str(outcome["status"])


@signals.worker_ready.connect
def _take_over_runs(sender: Any = None, **_: Any) -> None:
    """A run worker (one that consumes the runs queue) takes over the runs whose driver
    stopped, as long as it runs."""
    consumer = getattr(sender, "task_consumer", None)
    cluster = getattr(getattr(sender, "app", None), ATTRIBUTE, None)
    if consumer is None or not isinstance(cluster, Cluster):
        return  # not a worker of a tea_dist cluster's app
    queue = cluster.settings.runs_queue
    if queue in {q.name for q in consumer.queues}:
        durable.start_adopter(cluster, [queue], resume_run)


@signals.worker_shutting_down.connect
def _leaving(**_: Any) -> None:
    """A warm or cold shutdown (SIGTERM on a deploy): hand the runs over at once (called in a
    signal handler: it only sets a flag, the adopter thread does the rest)."""
    durable.LEAVING.set()


@signals.worker_shutdown.connect
def _left(**_: Any) -> None:
    durable.stop_adopter(durable.LEAVE_GRACE + 1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _jsonable(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else str(value)
