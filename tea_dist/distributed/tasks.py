"""The Celery task a flow worker runs: ``tea_dist.run_flow``, one attempt of one branch.

The task drives the branch's ``Lifecycle`` (the same one every strategy uses) over the
``AttemptState`` the message carries: a retry asks its circuit again, the attempt runs through
the one attempt runner, the circuit records it, and the policy decides. Every lifecycle event
becomes a ``BranchEvent`` on the run's Redis stream (``StreamPublisher``, a listener of the
worker's dispatcher beside the logging one); the final result is one more event. A retry is
re-published with the policy's countdown (the slot is free while it waits). The task stores no
result in Celery's backend: the stream is the one channel.

An attempt killed at its hard time limit (or failing outside the attempt runner) is reported
by the worker's main process (``BranchCeleryTask.on_failure``) through the same lifecycle.

``tea_dist.run_batch`` runs a batched map's items one after another through the same
``run_branch``, each under its own id; an item's last events ride with the next item's first
pipeline (``Batch.hold``), and the beater enforces each item's ``timeout_seconds``.

Redis I/O is batched: one pipeline before the attempt, one after. While a branch runs, the
process's one ``Beater`` thread keeps its heartbeat key alive for the driver, stops the attempt
at its ``timeout_seconds`` and listens for a stop request (cancel, or the branch's
``timeout_total``), which it turns into Celery's soft-time-limit exception so the slot is freed
at once. The exception is raised only inside the attempt: Celery's own soft limit is not used
(it would also fire in tea_dist's bookkeeping around the attempt, mid-way through a Redis
round trip); Celery's hard limit stays, as the backstop that kills the process.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NoReturn

import redis
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import Task, shared_task, signals
from celery.exceptions import Ignore
from celery.worker.request import Request

from tea_dist.core.errors import GraphError, QuarantinedError, SerializationError
from tea_dist.core.graph import GraphSpec
from tea_dist.core.results import Outcome, ParallelFlowResult
from tea_dist.distributed.beater import BEATER, Watch
from tea_dist.distributed.cluster import Cluster, cluster_of
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.messages import BranchMessage
from tea_dist.distributed.publisher import StreamPublisher
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.signing import SignatureError
from tea_dist.distributed.wire import first_unjsonable
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, ErrorInfo, run_attempt, worker_id
from tea_dist.engine.lifecycle import (
    BranchRun,
    Lifecycle,
    build_result,
)
from tea_dist.engine.runtime import Runtime
from tea_dist.observe import tracing
from tea_dist.observe.events import Dispatcher

logger = logging.getLogger("tea_dist.worker")

PERMIT_RECHECK_SECONDS = 0.5  # a branch waiting for a permit is re-published at most this often
FLOW_TASK, BATCH_TASK = "tea_dist.run_flow", "tea_dist.run_batch"


@dataclass
class WorkerBranch:
    """One branch message's lifecycle on this worker, and where its events go."""

    cluster: Cluster
    message: BranchMessage
    life: Lifecycle
    run: BranchRun
    publisher: StreamPublisher
    keys: Keys
    client: Any
    batch: Batch | None = None  # its events go out with those its batch still holds

    @classmethod
    def of(
        cls, cluster: Cluster, message: BranchMessage, task_id: str, batch: Batch | None = None
    ) -> WorkerBranch:
        stores = cluster.stores
        client, keys, breakers, limits = stores.client, stores.keys, stores.breakers, stores.limits
        dispatcher = Dispatcher()
        runtime = Runtime(
            graph_name=message.graph_name,
            dispatcher=dispatcher,
            shared_breakers=breakers,
            run_id=message.run,
            limits=lambda: limits,
        )
        spec = GraphSpec(message.graph_name, {}, {}, {}, {}, message.branch)  # decoded later
        task = BranchTask(
            spec,
            message.branch,
            message.fan_in,
            message.state,
            message.run_config,
            node=message.node,
        )
        ctx = replace(runtime.context(task, message.config), circuit=message.circuit)
        # the message stays as sent (a branch waiting for a permit is sent again as it came)
        life = Lifecycle.for_message(
            message.index, task, message.config, ctx, message.attempt, runtime
        )
        run = life.runs[0]
        publisher = StreamPublisher(message, run, task_id, batch.id if batch else "")
        dispatcher.listen(publisher)
        return cls(cluster, message, life, run, publisher, keys, client, batch)

    def again(self, delay: float) -> Again:
        """This branch's next attempt, to be published ``delay`` from now."""
        secret = self.cluster.settings.secret
        return Again(self.cluster, self.message.retried(self.run.state, secret), delay)

    def child_died(self) -> bool:
        """Whether the process that ran this branch's attempt stopped beating more than two
        beats before now: a killed or crashed child, not one stuck at its time limit."""
        settings = self.cluster.settings
        heartbeat = self.keys.heartbeat(self.message.fanout, self.message.index)
        left = self.client.pttl(heartbeat)  # -2: gone (the beats stopped a TTL ago)
        lapse = (settings.heartbeat_ttl - 2 * settings.heartbeat_seconds) * 1000
        return bool(left < 0 or left < lapse)

    def send(self, *before: tuple[str, tuple[Any, ...]], end: bool = True) -> list[Any]:
        """Publish the collected events in one pipeline, riding out a Redis outage shorter than
        ``TEA_DIST_BROKER_GRACE``. ``before``: commands (name, args) to run first, whose
        replies are returned; ``end``: the attempt is over, drop its heartbeat. The last item
        its batch held back (``Batch.hold``) goes first, in the same pipeline."""
        settings = self.cluster.settings
        held = self.batch.take() if self.batch else None

        def once() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for name, args in before:
                getattr(pipe, name)(*args)
            for branch in (held, self) if held else (self,):
                branch.publisher.queue(pipe, self.keys, self.message.run, int(settings.run_expires))
            if held is not None:
                pipe.delete(self.keys.heartbeat(held.message.fanout, held.message.index))
            if end:
                pipe.delete(self.keys.heartbeat(self.message.fanout, self.message.index))
            return list(pipe.execute())[: len(before)]

        replies = self.cluster.ride_out(once)
        self.publisher.events.clear()
        return replies


# -- the task -------------------------------------------------------------------------------


class BranchFailed(Exception):
    """Raised by a branch task after its failed result went to the run's stream, so that the
    task's Celery state (what Flower shows) is its outcome: ``FAILURE`` with the error's type
    and message, never the state. Expected (``Task.throws``): logged without a traceback."""


def end_revoked(task: Any) -> NoReturn:
    """End ``task`` as ``REVOKED`` for Flower, though it stopped by itself (a cancelled
    branch, a cancelled run): a ``task-revoked`` event, then ``Ignore`` (acknowledged, and no
    success or failure event after the revoked one)."""
    task.send_event("task-revoked", terminated=False, signum=None, expired=False)
    raise Ignore()


def report(task: Any, results: Sequence[ParallelFlowResult | None]) -> None:
    """End a branch task in the Celery state of its branches' outcome (already published):
    ``SUCCESS`` when every one succeeded; ``REVOKED`` (a ``task-revoked`` event) when they were
    cancelled; ``FAILURE`` (``BranchFailed``) when one failed or timed out."""
    ended = [r for r in results if r is not None and not r.success]
    if not ended:
        return
    failed = [r for r in ended if r.outcome is not Outcome.CANCELLED]
    if not failed:
        end_revoked(task)
    first = failed[0]
    message = " ".join(str(first.error or "").split())
    more = f" (and {len(failed) - 1} more of {len(results)} items)" if len(failed) > 1 else ""
    raise BranchFailed(f"branch '{first.branch}' {first.error_type}: {message}{more}")


class BranchCeleryTask(Task):  # type: ignore[misc]
    """``run_flow``'s task class: an attempt that ended outside the attempt runner (killed at
    its hard time limit, or a failure of tea_dist itself) ends through the lifecycle here, in
    the worker's main process."""

    throws = (BranchFailed,)
    Request = "tea_dist.distributed.tasks:BranchRequest"  # below: counts crashes

    def on_failure(self, exc: Any, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, BranchFailed):
            return  # its outcome, reported already
        if not args or not isinstance(args[0], BranchMessage) or isinstance(exc, WorkerLostError):
            return  # a lost child's message is delivered again (reject_on_worker_lost)
        branch = WorkerBranch.of(cluster_of(self.app), args[0], task_id)
        config = branch.message.config
        if isinstance(exc, TimeLimitExceeded) and branch.child_died():
            return  # not a timeout: its driver sees the heartbeat lapse and sends it again
        if isinstance(exc, TimeLimitExceeded):
            error = _killed_at(config.timeout_seconds)
        else:
            error = ErrorInfo.from_exception(exc)
        branch.life.admitted_elsewhere(branch.run, branch.message.probe)
        branch.life.begin(branch.run)
        now = time.time()
        outcome = AttemptOutcome(False, None, now, now, error=error, worker=worker_id())
        delay = branch.life.end(branch.run, outcome)
        branch.send()
        if delay is not None:  # retried like any other attempt, from this process
            branch.again(delay).send(task_id)


def message_options(message: BranchMessage, settings: Settings) -> dict[str, Any]:
    """Celery options of a branch message: queue, time limits, what Flower shows."""
    config = message.config
    options: dict[str, Any] = {
        "queue": config.queue or settings.flows_queue,
        # the name Flower's task list shows: which graph and branch (the task is run_flow)
        "shadow": f"tea_dist.run_flow[{message.graph_name}/{message.branch}]",
        "argsrepr": message.describe(),
        "kwargsrepr": "{}",
        "ignore_result": True,
        # where a worker that cannot even decode the body reports it (see ``Refusals``)
        "headers": {
            "tea_run": message.run,
            "tea_fanout": message.fanout,
            "tea_index": message.index,
            "tea_branch": message.branch,
        },
    }
    if config.timeout_seconds is not None:  # the beater interrupts it at timeout_seconds
        options["time_limit"] = config.timeout_seconds + settings.hard_limit_grace
    if config.timeout_total is not None:
        options["expires"] = message.attempt.dispatched_at + config.timeout_total
    return options


def batch_options(items: list[tuple[str, BranchMessage]], settings: Settings) -> dict[str, Any]:
    """Celery options of a batch: its items' queue, what Flower shows, and a hard time limit
    only as a backstop (the beater stops each item at its own deadline)."""
    first = items[0][1]
    config = first.config
    options: dict[str, Any] = {
        "queue": config.queue or settings.flows_queue,
        "shadow": f"tea_dist.run_batch[{first.graph_name}/{first.branch}+{len(items) - 1}]",
        "argsrepr": f"{len(items)} items from {first.describe()}",
        "kwargsrepr": "{}",
        "ignore_result": True,
        "headers": {
            "tea_run": first.run,
            "tea_fanout": first.fanout,
            "tea_items": [[m.index, m.branch, item] for item, m in items],
        },
    }
    if config.timeout_seconds is not None:
        per_item = config.timeout_seconds + 2 * settings.hard_limit_grace
        options["time_limit"] = len(items) * per_item + settings.hard_limit_grace
    return options


@dataclass(frozen=True)
class Again:
    """A branch the worker publishes again as a task of its own, ``countdown`` from now."""

    cluster: Cluster
    message: BranchMessage
    countdown: float

    def send(self, task_id: str) -> None:
        options = message_options(self.message, self.cluster.settings)
        self.cluster.send(
            FLOW_TASK, (self.message,), task_id=task_id, countdown=self.countdown, **options
        )


def _killed_at(limit: float | None) -> ErrorInfo:
    """The error of an attempt killed with its process at its ``timeout_seconds``."""
    error = ErrorInfo.timed_out(limit or 0.0)
    return replace(
        error, message=f"attempt timed out after {limit or 0:g}s; its process was killed"
    )


@dataclass
class Batch:
    """A batch task's items (``(item id, message)``, run in order) and where it is."""

    cluster: Cluster
    id: str
    items: list[tuple[str, BranchMessage]]
    heartbeat: str
    position: int = 0
    held: WorkerBranch | None = None  # an item over, whose events wait for the next pipeline

    def hold(self, branch: WorkerBranch) -> None:
        """Send ``branch``'s last events with the next item's first pipeline: one round trip
        per item instead of two (the next item starts at once; ``flush`` sends the last)."""
        self.held = branch

    def take(self) -> WorkerBranch | None:
        held, self.held = self.held, None
        return held

    def flush(self) -> None:
        """The batch is over: what it holds goes, and its heartbeat (in one round trip)."""
        held = self.take()
        if held is not None:
            held.send(("delete", (self.heartbeat,)))
        else:
            self.cluster.client.delete(self.heartbeat)

    def cut(self, branch: WorkerBranch) -> None:
        """The item at ``position`` is being killed with this process: the items after it are
        sent again as a batch of their own, and their driver is told which."""
        rest = self.items[self.position + 1 :]
        if not rest:
            return
        batch = f"{self.id}~{self.position + 1}"
        options = batch_options(rest, self.cluster.settings)
        self.cluster.send(BATCH_TASK, (rest,), task_id=batch, **options)
        for item, message in rest:
            other = WorkerBranch.of(self.cluster, message, item)
            other.publisher.requeued(batch)
            branch.publisher.events.extend(other.publisher.events)


def run_branch(
    cluster: Cluster, message: BranchMessage, task_id: str, batch: Batch | None = None
) -> Again | ParallelFlowResult | None:
    """Run one attempt of one branch (alone, or an item of ``batch``); its events and result
    go to the run's stream. Returns what must be published again (a retry, or a branch
    waiting for a limit's permit: it holds no worker slot meanwhile), else its result."""
    branch = WorkerBranch.of(cluster, message, task_id, batch)
    life, run = branch.life, branch.run
    settings = cluster.settings
    try:
        message.check_signature(settings.secret)
    except SignatureError as exc:  # refused, and its caller is told
        logger.warning("refused branch message %s: %s", message.describe(), exc)
        life.resolve(run, build_result(run.state, run.config, error=ErrorInfo.from_exception(exc)))
        branch.send()
        return run.result
    first = not message.attempt.attempts  # the driver asked the first attempt's circuit
    if not life.admit(run, circuit=not first):
        if run.done:  # past its deadline, or its circuit is open
            branch.send()
            return run.result
        countdown = max(run.wait or 0.0, PERMIT_RECHECK_SECONDS) * (1 + random.random() / 2)
        life.stop_waiting(run)  # it waits in the broker, not here
        if batch is not None:  # it leaves the batch: its driver must know
            branch.publisher.requeued(delay=countdown)
            branch.send(end=False)
        return Again(cluster, message, countdown)
    if first:  # its driver asked the circuit; its outcome is recorded here
        life.admitted_elsewhere(run, message.probe)
    keys = branch.keys
    watch = Watch(
        (keys.heartbeat(message.fanout, message.index),),
        f"{message.fanout}:{message.index}",
        keys.run_lease(message.run),
        renew=life.renew_permits if run.permits else None,
        task=batch.id if batch is not None else task_id,
    )
    ttl = int(settings.heartbeat_ttl * 1000)
    life.begin(run, worker=worker_id())
    before: list[tuple[str, tuple[Any, ...]]] = [
        ("exists", (keys.fanout_finished(message.fanout),)),
        ("exists", (watch.lease,)),
        ("get", (keys.crashes(message.fanout, message.index),)),
        ("set", (watch.heartbeats[0], worker_id(), None, ttl)),
    ]
    if batch is not None:
        watch.heartbeats += (batch.heartbeat,)
        before.append(("set", (batch.heartbeat, worker_id(), None, ttl)))
        # whom the worker's main process blames if this process dies (BranchRequest)
        before.append(("set", (keys.batch_item(batch.id), message.index, CRASH_MEMORY)))
    if message.config.timeout_seconds is not None:
        assert run.started is not None
        watch.deadline = run.started + message.config.timeout_seconds
        if batch is not None:
            watch.kill = partial(_killed, branch, batch)
        inbox = keys.worker_inbox(worker_id())  # wakes the beater: it re-times its wait
        before += [("rpush", (inbox, "wake")), ("expire", (inbox, 60))]
    finished, caller, crashed, *_ = branch.send(*before, end=False)
    if finished or not caller:  # a late delivery, or its caller is gone: do not run it
        why = "the run had already finished" if finished else "its caller went away"
        life.end(run, _ended(ErrorInfo.cancelled(f"cancelled: {why}; branch not run")))
        branch.send()
        return run.result
    if int(crashed or 0) >= MAX_CRASHES:  # it killed its process twice: not run again
        logger.error("quarantined branch message %s: %s", message.describe(), QUARANTINED)
        error = ErrorInfo.from_exception(
            QuarantinedError(f"branch '{message.branch}' {QUARANTINED}")
        )
        life.end(run, _ended(error))
        branch.send()  # its count stays: a copy delivered later is refused the same way
        return run.result
    delay = life.end(run, _attempt(cluster, message, run, watch))
    if batch is not None and delay is None:
        batch.hold(branch)
        return run.result
    branch.send()
    return run.result if delay is None else branch.again(delay)


MAX_CRASHES = 2
QUARANTINED = "crashed its worker process twice; not run again (quarantined)"  # MAX_CRASHES
CRASH_MEMORY = 3600  # seconds a crash counts against its branch (and a batch's current item)


class BranchRequest(Request):  # type: ignore[misc]
    """Celery's request of a branch task, in the worker's main process: a pool process that
    died while running a branch (``WorkerLostError``: its node aborted, exited, crashed; not
    a time limit, a revoke or a kill of the whole worker, which nobody would live to count)
    counts a crash against that branch, so that its third start is quarantined instead of
    crashing processes in a loop. Celery's documented hook for custom request handling."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exc = getattr(exc_info.exception, "exc", exc_info.exception)
        if isinstance(exc, WorkerLostError):
            with suppress(Exception):  # counting is best effort; the failure's handling is not
                _count_crash(cluster_of(self.task.app), self.task.name, self.id, self.args)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


def _count_crash(cluster: Cluster, task: str, task_id: str, args: Any) -> None:
    client, keys = cluster.client, cluster.keys
    if task == FLOW_TASK and args and isinstance(args[0], BranchMessage):
        fanout, index = args[0].fanout, args[0].index
    elif task == BATCH_TASK and args and args[0]:
        item = client.get(keys.batch_item(task_id))
        if item is None:  # between items, or killed at an item's timeout: nobody to blame
            return
        fanout, index = args[0][0][1].fanout, int(item)
    else:
        return
    key = keys.crashes(fanout, index)
    pipe = client.pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, CRASH_MEMORY)
    pipe.execute()


def uncarried(state: dict[str, Any] | None, branch: str) -> SerializationError | None:
    """The error naming the first key of a branch's resulting ``state`` that JSON cannot
    carry back to its caller (a set, an object), or None. Checked where the attempt ran:
    the result would otherwise never reach the stream, and the branch look lost."""
    if not state:
        return None
    try:
        json.dumps(state)
        return None
    except (TypeError, ValueError):
        key, exc = first_unjsonable(state)
    if not key:
        return SerializationError(f"the state returned by branch '{branch}' is not JSON")
    return SerializationError(
        f"state key '{key}' returned by branch '{branch}' cannot be carried back to the "
        f"caller as JSON ({type(state[key]).__name__}): {exc}",
        key=key,
    )


def _killed(branch: WorkerBranch, batch: Batch) -> None:
    """The beater's last act for a batch item that ignored its interrupt: its timeout is
    reported (retried like any other attempt), the rest of the batch is sent again."""
    delay = branch.life.end(branch.run, _ended(_killed_at(branch.message.config.timeout_seconds)))
    if delay is not None:
        branch.again(delay).send(branch.publisher.task_id)
    batch.cut(branch)  # and the kill that follows is its timeout's, not a crash of its own
    branch.send(("delete", (batch.heartbeat,)), ("delete", (branch.keys.batch_item(batch.id),)))


@shared_task(
    bind=True,
    base=BranchCeleryTask,
    name=FLOW_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
    max_retries=None,  # the branch's RetryPolicy decides, not Celery's default of 3
)
def run_flow(self: Any, message: BranchMessage) -> None:
    """Run one attempt of one branch; its events and result go to the run's stream. The
    task ends in the Celery state of its outcome (``report``)."""
    _refuse_unless_messages(self, [message])
    outcome = run_branch(cluster_of(self.app), message, self.request.id)
    if isinstance(outcome, Again):
        raise self.retry(
            args=(outcome.message,),
            countdown=outcome.countdown,
            argsrepr=outcome.message.describe(),
        )
    report(self, [outcome])


@shared_task(
    bind=True,
    base=BranchCeleryTask,
    name=BATCH_TASK,
    acks_late=True,
    reject_on_worker_lost=False,  # its driver sends the unfinished items again, once each
    ignore_result=True,
)
def run_batch(self: Any, items: list[tuple[str, BranchMessage]]) -> None:
    """Run a map's items one after another in this process, each through ``run_branch`` with
    its own id, result, retries, circuit accounting, permits and events; a retry or a permit
    wait leaves the batch as a task of its own."""
    entries = items if isinstance(items, list) else [items]
    _refuse_unless_messages(self, [i[1] if isinstance(i, list | tuple) else i for i in entries])
    cluster = cluster_of(self.app)
    first = items[0][1]
    heartbeat = cluster.keys.batch_heartbeat(first.fanout, self.request.id)
    batch = Batch(cluster, self.request.id, list(items), heartbeat)
    results: list[ParallelFlowResult | None] = []
    try:
        for position, (item, message) in enumerate(batch.items):
            batch.position = position
            context = tracing.attach(message.trace)
            try:
                outcome = run_branch(cluster, message, item, batch)
            finally:
                tracing.detach(context)
            if isinstance(outcome, Again):
                outcome.send(item)
            else:
                results.append(outcome)
    except BaseException:  # the batch is over: its driver sends the unstarted items again
        with suppress(redis.RedisError):
            cluster.client.delete(batch.heartbeat)
        raise
    batch.flush()
    report(self, results)


def _refuse_unless_messages(task: Any, messages: Sequence[Any]) -> None:
    """A task whose arguments are no branch messages (sent to the broker by hand, not by a
    driver: their JSON lacks the typed marker) runs nothing: it fails at once, saying so."""
    wrong = [type(m).__name__ for m in messages if not isinstance(m, BranchMessage)]
    if messages and not wrong:
        return
    why = f"refused: {task.name} takes branch messages, got {', '.join(wrong) or 'none'}"
    logger.warning("%s (task %s)", why, task.request.id)
    raise BranchFailed(why)


def _attempt(
    cluster: Cluster,
    message: BranchMessage,
    run: BranchRun,
    watch: Watch,
) -> AttemptOutcome:
    """Run the attempt while the beater watches it; soft limits become timeouts or cancels."""
    started = time.time()
    entry = message.node or message.branch
    try:
        with BEATER.watching(watch, cluster):
            spec = cluster.stores.branches.get(message.graph, entry)
            task = BranchTask(
                spec=spec,
                branch=message.branch,
                fan_in=message.fan_in,
                state=message.state,
                run_config=message.run_config,
                include_traceback=message.config.include_traceback,
                index=message.index,
                node=message.node,
            )
            outcome = run_attempt(task, Runtime(graph_name=spec.name).fanout, watch.token)
        if outcome.ok and (error := uncarried(outcome.state, message.branch)) is not None:
            outcome = _ended(ErrorInfo.from_exception(error), started)
    except GraphError as exc:
        return _ended(ErrorInfo.from_exception(exc, node=message.branch), started)
    except SoftTimeLimitExceeded:  # raised between nodes, outside the attempt runner
        outcome = _ended(ErrorInfo("SoftTimeLimitExceeded", ""), started)
    if outcome.error is not None and outcome.error.type_name == "SoftTimeLimitExceeded":
        config = message.config
        if watch.stopped == "cancel":
            return _ended(ErrorInfo.cancelled("cancelled by the caller"), started)
        if watch.stopped == "orphaned":
            why = "cancelled: its caller went away (liveness lease lapsed)"
            return _ended(ErrorInfo.cancelled(why), started)
        if watch.stopped == "timeout":
            return _ended(ErrorInfo.timed_out(config.timeout_total, "branch"), started)
        return _ended(ErrorInfo.timed_out(config.timeout_seconds), started)
    return outcome


@signals.task_revoked.connect
def _revoked(sender: Any = None, request: Any = None, **info: Any) -> None:
    """A branch task revoked or expired before it ended (an operator, Flower, ``expires``): its
    driver hears of it at once, as a cancelled attempt, instead of waiting for nothing (every
    item of a batch: those already over are ignored by their driver)."""
    args = getattr(request, "args", None) or ()
    name = getattr(sender, "name", None)
    if not args or name not in (FLOW_TASK, BATCH_TASK):
        return
    cluster = cluster_of(sender.app)
    batched = name == BATCH_TASK
    items = args[0] if batched else [(request.id, args[0])]
    reason = "expired" if info.get("expired") else "revoked"
    for item, message in items:
        if not isinstance(message, BranchMessage):
            continue
        branch = WorkerBranch.of(cluster, message, item)
        branch.publisher.batch = request.id if batched else ""
        why = f"the branch task was {reason} before it finished"
        branch.life.end(branch.run, _ended(ErrorInfo.cancelled(why)))
        branch.send()


@signals.task_prerun.connect
def _enter_trace(task_id: str = "", task: Any = None, args: Any = (), **_: Any) -> None:
    """A branch task runs in its caller's trace: the branch span's context is current."""
    if getattr(task, "name", None) == FLOW_TASK and args:
        _TRACES[task_id] = tracing.attach(getattr(args[0], "trace", None))


@signals.task_postrun.connect
def _leave_trace(task_id: str = "", **_: Any) -> None:
    tracing.detach(_TRACES.pop(task_id, None))


_TRACES: dict[str, object | None] = {}  # task id -> its attached trace context


def _ended(error: ErrorInfo, started: float | None = None) -> AttemptOutcome:
    now = time.time()
    return AttemptOutcome(False, None, started or now, now, error=error, worker=worker_id())
