"""The ``celery`` strategy: each branch is a ``tea_dist.run_flow`` task on a flow worker.

The driver (in the caller's process) checks everything before sending anything (JSON state,
size limit, importable code, visibility timeout), admits each branch through its circuit in
Redis (an open circuit sends no task) and sends one ``BranchMessage`` per branch. Then it
reads the run's event stream, the one channel workers answer on, and drives the fan-out's
``Lifecycle`` with it: worker events are relayed to the callbacks, each branch's result
resolves it once (a redelivered branch counts once), ``timeout_total`` and ``fail_fast`` stop
branches (a cooperative interrupt first, ``revoke(terminate=True)`` after a grace period), and
a branch whose worker died (its heartbeat lapsed), or whose retry was due long ago without
starting, is sent again.

A branch sent but never started whose message was lost with a worker is found and sent again
too; how a lost branch is told from one waiting behind busy workers is ``liveness``'s part
(``Liveness``, mixed into the driver).

The caller's liveness lease is renewed by a thread of its own, whatever the driver is busy
with, and branches are sent in slices between reads of the stream. A submitted run's lease
lives as long as the run's retention: its branches wait for the run to be taken over, not for
the process driving it (cancelling the run, or its end, deletes the lease).

In a durable run (``submit()``) the fan-out's id is ``{run_id}.{steps}`` and each branch's task
id ``{fanout}.{index}.{resends}``; the driver records every branch it sends on the stream
(``on_flow_queued``, fenced by the run's owner). A driver that takes a run over finds there the
branches its predecessor sent (``_adopt``): they are re-attached, not sent again, and replaying
the stream from its start brings back their events and results.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import (
    BrokerError,
    ConfigError,
    GraphError,
)
from tea_dist.core.graph import ADAPTIVE, FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.distributed.cluster import Cluster
from tea_dist.distributed.connections import check_broker, check_reachable
from tea_dist.distributed.liveness import (
    LeaseKeeper,
    Liveness,
    Remote,
    best_effort,
    resends_of,
)
from tea_dist.distributed.local_cluster import default_cluster
from tea_dist.distributed.messages import BranchEvent, BranchMessage
from tea_dist.distributed.presence import live_slots
from tea_dist.distributed.wire import check_fanout, check_json_state, encode_branch
from tea_dist.engine.attempt import BranchTask, worker_id
from tea_dist.engine.lifecycle import BranchRun, Lifecycle
from tea_dist.engine.runtime import Detached
from tea_dist.observe import tracing
from tea_dist.policies.batching import BatchPolicy, ItemTimes
from tea_dist.policies.breaker import BreakerStore
from tea_dist.policies.limits import LimitStore

if TYPE_CHECKING:
    from tea_dist.engine.runtime import RunOwner, Runtime

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

SEND_SLICE = 500  # branches sent between two reads of the stream

logger = logging.getLogger("tea_dist.driver")


class CeleryExecutor:
    """Branches as Celery tasks; see the module docstring."""

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Importable callables and no nested celery fan-out (``GraphError`` naming the node)."""
        check_fanout(spec, fanout)

    def shared_breakers(self, cluster: object | None) -> BreakerStore:
        """Circuits of celery branches live in the cluster's Redis, shared by every worker
        and caller."""
        return _cluster(cluster).stores.breakers

    def shared_limits(self, cluster: object | None) -> LimitStore:
        """Permits of ``ResourceLimit``s live in the cluster's Redis, shared by every worker
        and caller."""
        return _cluster(cluster).stores.limits

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
        except (BrokerError, Detached):  # Redis is gone (its branches stop once their caller's
            raise  # lease lapses), or another process drives the run on: its branches go on
        except BaseException:  # the caller went away (Ctrl-C, an exception): stop everything
            driver.life.cancel_all("cancelled: the caller went away")
            driver.cleanup()
            driver.kill_stragglers()
            raise
        driver.cleanup()  # first: a batch's items not started yet are skipped from now on
        driver.kill_stragglers()
        return driver.life.results()


class _Driver(Liveness):
    def __init__(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> None:
        self.cluster = _cluster(runtime.cluster)
        self.app = self.cluster.app
        self.settings = self.cluster.settings
        self.client = self.cluster.client
        self.keys = self.cluster.keys
        self.runtime = runtime
        self.fanout_id = runtime.fanout_id or uuid.uuid4().hex
        self.owner: RunOwner | None = runtime.owner
        self.life = Lifecycle.for_fanout(tasks, configs, runtime, stop=self._stop)
        self.graphs: dict[str, str] = {}  # start->fan_in -> its description, as JSON text
        self.lease = self.keys.run_lease(runtime.run_id)
        self.unsent = deque(self.life.runs)  # branches not sent yet, in declaration order
        self.in_flight: set[BranchRun] = set()  # sent and not resolved yet (with a window)
        self.bounded = [r for r in self.life.runs if r.deadline is not None]  # timeout_total
        self.window = min((c.max_workers for c in configs if c.max_workers), default=None)
        self.unconsumed: dict[str, float] = {}  # queue -> monotonic time it was seen unconsumed
        self.batches: dict[str, float | None] = {}  # batch started -> monotonic: silent since
        self.sent = 0  # messages sent so far: the ``seq`` of the last one
        self.starts: dict[str, deque[tuple[float, int]]] = {}  # queue -> (when, seq) started
        self.passed: dict[str, int] = {}  # queue -> every message sent before this one left it
        self.consumers: dict[str, dict[str, float]] = {}  # queue -> live worker -> alive until
        # a map with the adaptive batch size: its tasks sized as it runs (policies.batching)
        self.adaptive = bool(self.life.runs) and self.life.runs[0].task.batch == ADAPTIVE
        self.policy = BatchPolicy()
        self.times = ItemTimes(long_seconds=self.policy.target_seconds)
        self.slots = 0  # worker slots consuming the map's queue, as its workers announce
        self.open_tasks: dict[str, tuple[int, deque[BranchRun]]] = {}  # id -> size, not over
        ttl = self.settings.run_expires if self.owner is not None else self.settings.caller_lease
        every = min(self.settings.heartbeat_seconds, self.settings.caller_lease / 4)
        self.keeper = LeaseKeeper(self.client, self.lease, self.fanout_id, ttl, every)

    def _redis(self, operation: Callable[[], T]) -> T:
        """A Redis operation that rides out an outage shorter than ``TEA_DIST_BROKER_GRACE``."""
        return self.cluster.ride_out(operation)

    # -- before anything is sent --

    def validate(self) -> None:
        """Every check that must pass before the first message is published."""
        for run in self.life.runs:
            task, config = run.task, run.config
            limit = self.settings.max_state_bytes  # workers refuse a larger state or config
            check_json_state(task.state, f"branch '{task.branch}'", limit)
            check_json_state(dict(task.run_config), f"the run config of '{task.branch}'", limit)
            worst, hold = self._longest_hold(config), self.settings.hold_limit()
            if hold is not None and worst >= hold[0]:
                most, setting, past = hold
                raise ConfigError(
                    f"branch '{task.branch}' may hold a message for {worst:g}s (retry delay plus "
                    f"time limit), not below {past} ({setting}={most:g}s); raise {setting} "
                    "or lower max_delay or timeout_seconds"
                )
            key = f"{task.start}->{task.fan_in}"
            if key not in self.graphs:
                graph = encode_branch(task.spec, task.start, task.fan_in, self.settings)
                self.graphs[key] = json.dumps(graph, separators=(",", ":"))

    def _longest_hold(self, config: ParallelConfig) -> float:
        policy = config.retry()
        delay = policy.delay_for(policy.max_retries - 1) if policy.max_retries else 0.0
        limit = (config.timeout_seconds or 0.0) + self.settings.hard_limit_grace
        return delay + limit

    # -- sending --

    def dispatch(self) -> None:
        check_reachable(self.settings.redis)
        if self.settings.broker != self.settings.redis:
            check_broker(self.settings.broker)
        self._redis(self.keeper.renew)  # the first time here: an unreachable Redis fails it
        self.keeper.start()
        if self.runtime.adopting:
            self._adopt()
        if self.adaptive:
            self._read_slots()
        self._top_up()

    def _top_up(self) -> None:
        """Send branches while fewer than ``max_workers`` are outstanding (every one, without
        it, ``SEND_SLICE`` at a time): the rest wait here, not in the broker."""
        if self.window is not None:
            self.in_flight = {r for r in self.in_flight if not r.done}
            if len(self.in_flight) >= self.window:
                return
        if self.owner is not None and self.unsent:
            self.owner.check()
        queued: list[BranchRun] = []
        size = self._batch_size()
        if not size:
            return
        with self.app.producer_or_acquire() as producer:  # one channel for all of them
            group: list[BranchRun] = []
            while (
                self.unsent
                and size
                and (self.window is None or len(self.in_flight) < self.window)
                and len(queued) + len(group) < SEND_SLICE
            ):
                run = self.unsent.popleft()
                # an open circuit resolves it, nothing is sent; the worker takes the permits
                if run.done or not self.life.admit(run, permits=False):
                    continue
                queue = run.config.queue or self.settings.flows_queue
                run.handle = Remote(self._message(run), queue)
                if self.window is not None:
                    self.in_flight.add(run)
                group.append(run)
                if len(group) >= size or not self.unsent:
                    self._send_task(group, producer)
                    queued += group
                    group = []
                    size = self._batch_size()
            if group:  # the window or the slice closed before the batch was full
                self._send_task(group, producer)
                queued += group
        self._record_queued(queued)

    def _batch_size(self) -> int:
        """Items of the next task: the map's ``batch_size``, or the adaptive policy's answer
        (0: none now, the map has ``policy.window`` tasks outstanding already)."""
        if not self.adaptive:
            return self.unsent[0].task.batch if self.unsent else 1
        if not self._task_room():
            return 0
        return self.policy.size(
            pending=len(self.unsent),
            slots=self.slots,
            item_seconds=self.times.item_seconds(),
            measured=self.times.measured,
            running_seconds=self.times.running_seconds(),
        )

    def _task_room(self) -> bool:
        """An adaptive map has fewer than ``policy.window(slots)`` tasks outstanding (those
        whose items are all over are dropped here; a batch over counts as measured)."""
        for task_id in list(self.open_tasks):
            size, runs = self.open_tasks[task_id]
            while runs and runs[0].done:
                self.times.forget(runs.popleft().index)  # a no-op once its result came
            if not runs:
                del self.open_tasks[task_id]
                self.times.batch_done(size)
        return len(self.open_tasks) < self.policy.window(self.slots)

    def _send_task(self, runs: list[BranchRun], producer: Any) -> None:
        """Send one task of ``runs`` (an adaptive map's counts against its window)."""
        task_id = self._send(runs, producer)
        if self.adaptive:
            self.open_tasks[task_id] = (len(runs), deque(runs))

    def _read_slots(self) -> None:
        """The worker slots consuming an adaptive map's queue, as its workers announce."""
        first = self.life.runs[0].config.queue or self.settings.flows_queue
        found = self._redis(partial(live_slots, self.client, self.keys, first))
        self.slots = sum(found.values())

    def _message(self, run: BranchRun) -> BranchMessage:
        task, admission = run.task, run.admission
        return BranchMessage(
            run=self.runtime.run_id,
            graph_name=self.runtime.graph_name,
            fanout=self.fanout_id,
            index=run.index,
            branch=task.branch,
            node=task.node,
            fan_in=task.fan_in,
            graph=self.graphs[f"{task.start}->{task.fan_in}"],
            state=task.state,
            run_config=dict(task.run_config),
            config=run.config,
            circuit=run.ctx.circuit,
            probe=bool(admission and admission.probe),
            attempt=run.state,
            trace=tracing.carrier(task.branch),
        )

    def _send(self, runs: Sequence[BranchRun], producer: Any = None) -> str:
        """Send branches: one alone as a ``run_flow`` task, several of a map as one
        ``run_batch`` task (their items run in order, each with its own id); its task id."""
        from tea_dist.distributed.tasks import BATCH_TASK, FLOW_TASK, batch_options, message_options

        batch = f"{self.fanout_id}.batch.{uuid.uuid4().hex[:12]}" if len(runs) > 1 else None
        items = []
        self.sent += 1
        for run in runs:
            remote: Remote = run.handle
            remote.seq, remote.fifo = self.sent, True
            remote.task_id = f"{self.fanout_id}.{run.index}.{remote.redispatched}"
            message = remote.outgoing().signed(self.settings.secret)
            remote.message, remote.batch = message, batch
            items.append((remote.task_id, message))
        if batch is None:
            ((task_id, message),) = items
            options = message_options(message, self.settings)
            self.cluster.send(FLOW_TASK, (message,), task_id=task_id, producer=producer, **options)
            return task_id
        options = batch_options(items, self.settings)
        self.cluster.send(BATCH_TASK, (items,), task_id=batch, producer=producer, **options)
        return batch

    def _record_queued(self, runs: Sequence[BranchRun]) -> None:
        """Record on the stream the branches just sent, so that a driver taking the run over
        re-attaches them (a durable run only; ``Detached`` if another driver owns it now)."""
        if self.owner is None or not runs:
            return
        worker = worker_id()
        entries = [
            {
                "e": BranchEvent(
                    event="on_flow_queued",
                    fanout=self.fanout_id,
                    index=run.index,
                    branch=run.task.branch,
                    task_id=run.handle.task_id,
                    worker=worker,
                    attempt=run.state,
                ).model_dump_json()
            }
            for run in runs
        ]
        self.owner.append(entries)

    def _adopt(self) -> None:
        """This run was taken over: the branches of this fan-out that the previous driver sent
        (their ``on_flow_queued`` or worker events on the stream) are re-attached, not sent
        again. ``wait`` replays the stream from its start, so their events and results arrive
        as if this driver had sent them."""
        stream = self.keys.events(self.runtime.run_id)
        entries: Any = self._redis(partial(self.client.xrange, stream))
        marker = f'"fanout":"{self.fanout_id}"'.encode()
        latest: dict[int, BranchEvent] = {}  # index -> an event of its newest task
        for _id, fields in entries:
            if marker not in fields.get(b"e", b""):
                continue
            event = BranchEvent.model_validate_json(fields[b"e"])
            seen = latest.get(event.index)
            if seen is None or resends_of(event.task_id) > resends_of(seen.task_id):
                latest[event.index] = event
        adopted = set()
        for index, event in latest.items():
            run = self.life.runs[index]
            self.life.adopt(run, event.attempt.dispatched_at)  # timeout_total runs on
            remote = Remote(self._message(run), run.config.queue or self.settings.flows_queue)
            remote.task_id, remote.redispatched = event.task_id, resends_of(event.task_id)
            self.sent += 1  # sent in an order unknown here: only a vanished worker re-sends it
            remote.seq, remote.fifo = self.sent, False
            run.handle = remote
            adopted.add(run)
            if self.window is not None:
                self.in_flight.add(run)
        self.unsent = deque(r for r in self.unsent if r not in adopted)

    # -- watching --

    def wait(self) -> None:
        life, cancel = self.life, self.runtime.cancel_token
        stream, last = self.keys.events(self.runtime.run_id), "0-0"
        next_check = time.monotonic() + self.settings.heartbeat_seconds
        while life.pending:
            block = None if self.unsent and self._can_send() else 100  # more to send: no wait
            read = partial(self.client.xread, {stream: last}, count=1000, block=block)
            reply: Any = self._redis(read)
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if b"e" in fields:  # else an event of the run itself (apps)
                        self._on_event(BranchEvent.model_validate_json(fields[b"e"]))
            if self.owner is not None:
                self.owner.check()
            self._expire()
            if self.unsent:
                self._top_up()
            if cancel.is_cancelled():
                life.cancel_all(cancel.why("cancelled: the run was cancelled"))
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.settings.heartbeat_seconds
                if self.adaptive and self.unsent:
                    self._read_slots()
                self._check_lost()
                self._check_unstarted()
                self._check_queues()

    def _can_send(self) -> bool:
        """A branch may be sent now (``max_workers`` and an adaptive map's window of tasks
        leave room for it)."""
        if self.adaptive and not self._task_room():
            return False
        if self.window is None:
            return True
        return sum(not r.done for r in self.in_flight) < self.window

    def _on_event(self, event: BranchEvent) -> None:
        if event.fanout != self.fanout_id or event.event == "on_flow_queued":
            return
        run = self.life.runs[event.index]
        remote: Remote | None = run.handle
        if run.done or remote is None or event.task_id != remote.task_id:
            return  # over, or from a superseded task
        life, kind = self.life, event.event
        if kind == "on_flow_requeued":  # out of its batch, into a task of its own or the rest
            life.heard(run, event.attempt)  # of a batch cut short
            remote.batch = event.batch or None
            remote.fifo = False  # published by the worker, maybe with a countdown
            return
        if kind in ("on_flow_start", "on_attempt_start"):
            # the worker runs an attempt now, and owns its circuit accounting
            first = kind == "on_flow_start"
            life.started_remotely(run, event.attempt, event.worker, first=first)
            assert run.started is not None
            if self.adaptive:
                self.times.started(run.index)
            if remote.fifo:  # every message of its queue sent before it has left the queue
                starts = self.starts.setdefault(remote.queue, deque())
                starts.append((run.started, remote.seq))
            remote.worker, remote.retry_due, remote.silent_since = event.worker, None, None
            remote.batch = event.batch or None
            if event.batch:
                self.batches.setdefault(event.batch, None)
        elif kind == "on_flow_retry":  # a retry is a task of its own
            error = event.error.as_exception() if event.error else None
            delay = event.delay or 0.0
            remote.retry_due = life.retry_scheduled_remotely(
                run, event.attempt, event.worker, delay, error
            )
            remote.worker, remote.batch = None, None
            self.times.forget(run.index)
        elif kind == "on_flow_complete" and event.result is not None:
            if self.adaptive:
                self.times.ended(run.index, event.result.timing_ms / 1000)
            # the result and attempt are kept until the fan-in: slim; the message is not
            life.ended_remotely(run, _slim(event.attempt), event.worker, _slim(event.result))
            remote.message = None
        else:  # an error, a timeout, a circuit's change: relayed to the listeners
            life.heard(run, event.attempt)
            self.runtime.emit(kind, *event.callback_args(run.context(worker=event.worker)))

    def _expire(self) -> None:
        now = time.monotonic()
        for run in self.bounded:
            if not run.done and run.deadline is not None and now >= run.deadline:
                self.life.time_out(run)

    def _stop(self, run: BranchRun) -> None:
        """The lifecycle's ``stop``: interrupt a branch cooperatively now; it is killed if still
        running after a grace period (``kill_stragglers``)."""
        remote: Remote | None = run.handle
        if remote is None or remote.stopping is not None:
            return
        remote.stopping = time.monotonic()
        with best_effort(f"stopping branch '{run.task.branch}'"):
            if remote.worker is not None:  # running: its process's beater interrupts it
                overdue = run.deadline is not None and time.monotonic() >= run.deadline
                reason = "timeout" if overdue else "cancel"
                inbox = self.keys.worker_inbox(remote.worker)
                pipe = self.client.pipeline(transaction=False)
                pipe.rpush(inbox, f"{self.fanout_id}:{run.index}:{reason}")
                pipe.expire(inbox, 60)
                pipe.execute()
            elif remote.batch is None:  # queued or waiting: workers discard it
                self.app.control.revoke(remote.task_id)
            # queued in a batch: its worker skips it (past its deadline, or the fan-out over)

    def kill_stragglers(self) -> None:
        """Branches that ignored the interrupt are revoked with terminate after the grace."""
        stopping = {
            r.index: r.handle
            for r in self.life.runs
            if r.handle is not None and r.handle.stopping is not None and r.handle.worker
        }
        if not stopping:
            return
        deadline = max(s.stopping or 0.0 for s in stopping.values()) + self.settings.cancel_grace
        with best_effort("stopping branches that ignored their interrupt"):
            while stopping and time.monotonic() < deadline:
                keys = [self.keys.heartbeat(self.fanout_id, i) for i in stopping]
                beats = self.client.mget(keys)
                stopping = {
                    i: s for (i, s), beat in zip(stopping.items(), beats, strict=True) if beat
                }
                if stopping:
                    time.sleep(0.05)
            ids = sorted({s.batch or s.task_id for s in stopping.values()})
            if ids:
                self.app.control.revoke(ids, terminate=True, signal="SIGKILL")

    def cleanup(self) -> None:
        """Tell late deliveries that the fan-out is over; the caller's lease goes."""
        self.keeper.stop()  # first: it would set the lease again
        ttl = int(self.settings.run_expires)
        with best_effort("ending the fan-out"):
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self.keys.fanout_finished(self.fanout_id), 1, ex=ttl)
            pipe.delete(self.lease)
            pipe.execute()


def _slim(model: M) -> M:
    """``model``, kept until the fan-in, made smaller in place: a model of which every field
    was set (the JSON from a worker sets every one) shares one set of its field names with
    the others of its class instead of a set of its own (0.7 kB for 15 names; a map of
    100,000 items keeps two models per item), and the worker's name is interned. Its values
    are untouched; the shared set stays whole (setting a field adds a name already in it)."""
    every = _EVERY_FIELD.setdefault(type(model), set(type(model).model_fields))
    if model.model_fields_set != every:
        return model
    object.__setattr__(model, "__pydantic_fields_set__", every)
    worker = model.__dict__.get("worker")
    if isinstance(worker, str):
        model.__dict__["worker"] = sys.intern(worker)
    return model


_EVERY_FIELD: dict[type[BaseModel], set[str]] = {}


def _cluster(cluster: object | None) -> Cluster:
    """``cluster`` (a graph compiled with ``cluster=``), else the default one."""
    if cluster is None:
        return default_cluster()
    if not isinstance(cluster, Cluster):
        raise ConfigError(f"cluster= takes a tea_dist Cluster, not {type(cluster).__name__}")
    return cluster
