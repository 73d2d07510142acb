"""How a celery driver finds branches lost on their way (``Liveness``, a part of the driver).

A branch is lost when the process that took it dies (its heartbeat lapses: ``_check_lost``), when
the batch task holding it dies before its turn (``_check_batches``), when its retry is long
overdue, or when its message was lost with a worker that died before starting it: queues are
first in, first out, so a branch of the same queue sent after it and started
``UNSTARTED_GRACE`` ago proves it left the queue (``_check_unstarted``), and when a worker
consuming its queue vanishes without stopping (its presence lapses), the oldest unstarted
messages of the queue, which it may have held, are sent again (``_vanished``). Branches merely
waiting behind busy live workers are never sent again. A lost branch is sent again (at most
``MAX_REDISPATCH`` times) and its superseded task is revoked and closed for Flower
(``_close_lost``); a queue no live worker consumes fails the run after ``NO_WORKER_SECONDS``.

The caller's own liveness is its lease (``LeaseKeeper``), renewed on a thread of its own.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from celery import Celery

from tea_dist.core.errors import NoWorkerError
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.messages import BranchMessage
from tea_dist.distributed.presence import PRESENCE_TTL as TTL
from tea_dist.distributed.settings import Settings
from tea_dist.engine.lifecycle import BranchRun, Lifecycle
from tea_dist.policies.batching import ItemTimes

T = TypeVar("T")

MAX_REDISPATCH = 3
NO_WORKER_SECONDS = 5.0  # branches on a queue no live worker consumes end the run after this
UNSTARTED_GRACE = 5.0  # s a branch may take to start after a later one of its queue started
VANISHED_HOLD = 64  # unstarted messages a vanished worker may have held (its prefetch)

logger = logging.getLogger("tea_dist.driver")


@dataclass
class Remote:
    """What the driver knows of a branch sent to a worker (its ``BranchRun.handle``)."""

    message: BranchMessage | None  # None once the branch resolved (a large map's would stay)
    queue: str
    task_id: str = ""  # the branch's own id, ``{fanout}.{index}.{resends}``
    batch: str | None = None  # the batch task it was sent in (its Celery id), if any
    worker: str | None = None  # host/pid running its attempt, where a stop request goes
    silent_since: float | None = None  # monotonic: heartbeat missing since
    retry_due: float | None = None  # monotonic: when its retry should start
    redispatched: int = 0
    stopping: float | None = None  # monotonic: when a stop was requested
    seq: int = 0  # the order it was sent in (its queue is first in, first out)
    fifo: bool = True  # False once a worker published it again itself (with a countdown)

    def outgoing(self) -> BranchMessage:
        """Its message, to send (again): a resolved branch is never sent again."""
        if self.message is None:
            raise RuntimeError("a resolved branch is never sent again")
        return self.message


class Liveness:
    """The driver's checks for lost branches (mixed into the driver, whose state it reads)."""

    app: Celery
    client: Any
    keys: Keys
    settings: Settings
    fanout_id: str
    life: Lifecycle
    times: ItemTimes
    batches: dict[str, float | None]
    starts: dict[str, deque[tuple[float, int]]]
    passed: dict[str, int]
    consumers: dict[str, dict[str, float]]
    unconsumed: dict[str, float]

    def _redis(self, operation: Callable[[], T]) -> T:
        raise NotImplementedError

    def _send(self, runs: Sequence[BranchRun], producer: Any = None) -> str:
        raise NotImplementedError

    def _record_queued(self, runs: Sequence[BranchRun]) -> None:
        raise NotImplementedError

    def _check_lost(self) -> None:
        """Branches whose worker is gone: a running one's heartbeat lapsed, or a retry that was
        due a heartbeat period ago never started. One MGET of the heartbeat keys per check."""
        running = [r for r in self.life.runs if r.running and r.handle.worker]
        keys = [self.keys.heartbeat(self.fanout_id, r.index) for r in running]
        beats = self._redis(partial(self.client.mget, keys)) if running else []
        now, ttl = time.monotonic(), self.settings.heartbeat_ttl
        for run, beat in zip(running, beats, strict=True):
            remote: Remote = run.handle
            if beat is not None:
                remote.silent_since = None
                continue
            remote.silent_since = remote.silent_since or now
            if now - remote.silent_since > ttl:
                self._redispatch([run])
        for run in self.life.runs:
            due = None if run.done else run.handle and run.handle.retry_due
            if due is not None and now > due + ttl + self.settings.heartbeat_seconds:
                self._redispatch([run])
        self._check_batches(now, ttl)

    def _check_batches(self, now: float, ttl: float) -> None:
        """Items waiting in a batch that started and whose heartbeat lapsed (its process died,
        or was killed at the batch's time limit) will never start there: sent again."""
        waiting: dict[str, list[BranchRun]] = {}
        for run in self.life.runs:
            remote: Remote | None = run.handle
            if remote is None or remote.batch not in self.batches or run.done:
                continue
            if run.started is None and remote.retry_due is None:
                waiting.setdefault(remote.batch, []).append(run)
        for batch in [b for b in self.batches if b not in waiting]:
            del self.batches[batch]  # nothing of it left to wait for
        if not waiting:
            return
        keys = [self.keys.batch_heartbeat(self.fanout_id, b) for b in waiting]
        beats = self._redis(partial(self.client.mget, keys))
        for (batch, runs), beat in zip(waiting.items(), beats, strict=True):
            silent = None if beat is not None else self.batches[batch] or now
            self.batches[batch] = silent
            if silent is not None and now - silent > ttl:
                del self.batches[batch]
                self._redispatch(runs)

    def _redispatch(self, runs: Sequence[BranchRun]) -> None:
        """The worker holding these branches is gone: send them again (a branch lost more
        than ``MAX_REDISPATCH`` times ends as lost)."""
        again: list[BranchRun] = []
        for run in runs:
            if run.done:
                continue
            remote: Remote = run.handle
            remote.silent_since = remote.retry_due = remote.worker = None
            self.times.forget(run.index)
            if not self.life.lost(run, remote.redispatched, MAX_REDISPATCH):
                continue  # lost too often: it ended as lost
            remote.redispatched += 1
            remote.message = remote.outgoing().retried(run.state, None)  # signed when sent
            again.append(run)
        stale = sorted({r.handle.batch or r.handle.task_id for r in runs})
        self.app.control.revoke(stale, terminate=True, signal="SIGKILL")
        self._close_lost(stale)
        if again:
            self._send(again)
            self._record_queued(again)

    def _close_lost(self, task_ids: Sequence[str]) -> None:
        """A task lost with its worker would show ``STARTED`` in Flower forever (its worker
        can no longer say how it ended): the driver says it failed, as a ``task-failed``
        event from ``tea-dist-driver@host``, once it has sent the branch again."""
        why = "WorkerLostError('the worker holding this branch was lost; it was sent again')"
        with best_effort("closing lost tasks"):
            host = f"tea-dist-driver@{socket.gethostname()}"
            with self.app.events.default_dispatcher(hostname=host) as events:
                for task_id in task_ids:
                    events.send("task-failed", uuid=task_id, exception=why, traceback="")

    # -- stopping --

    def _check_queues(self) -> None:
        """Branches not started yet wait for a worker: fine while one consumes their queue. A
        worker seen consuming it whose presence lapsed (killed: a worker that stops removes
        itself, long before) may have taken some with it (``_vanished``)."""
        waiting: dict[str, list[str]] = {}
        for run in self.life.runs:
            remote: Remote | None = run.handle
            if run.done or remote is None or run.started is not None or remote.retry_due:
                continue
            waiting.setdefault(remote.queue, []).append(run.task.branch)
        for queue in list(self.unconsumed):
            if queue not in waiting:
                del self.unconsumed[queue]
        for queue in list(self.consumers):
            if queue not in waiting:  # seen again from scratch when branches wait there
                del self.consumers[queue]
        for queue, branches in waiting.items():
            key = self.keys.queue_workers(queue)
            now = time.time()
            found: Any = self._redis(
                partial(self.client.zrangebyscore, key, now, "+inf", withscores=True)
            )
            live = {_text(name): float(until) for name, until in found}
            seen = self.consumers.get(queue, {})
            self.consumers[queue] = live
            # lapsed, not removed by a worker stopping (it gives its messages back itself)
            lost = [w for w, until in seen.items() if w not in live and now >= until - TTL / 2]
            if lost:
                self._vanished(queue, sorted(lost))
            if live:
                self.unconsumed.pop(queue, None)
                continue
            since = self.unconsumed.setdefault(queue, time.monotonic())
            if time.monotonic() - since >= NO_WORKER_SECONDS:
                raise NoWorkerError(
                    f"no live worker consumes queue '{queue}' (branch "
                    f"{', '.join(repr(b) for b in branches)} waited {NO_WORKER_SECONDS:g}s): "
                    f"start one with `tea-dist worker --queues {queue}`"
                )

    def _unstarted(self, queue: str | None = None) -> list[BranchRun]:
        """Branches sent and not started, not waiting for a retry, nor in a batch that
        started (its heartbeat covers them), of ``queue`` (every queue: None)."""
        found = []
        for run in self.life.runs:
            remote: Remote | None = run.handle
            if run.done or remote is None or run.started is not None or remote.retry_due:
                continue
            if remote.batch in self.batches or (queue is not None and remote.queue != queue):
                continue
            found.append(run)
        return found

    def _check_unstarted(self) -> None:
        """A queue is first in, first out: a branch sent before one that started
        ``UNSTARTED_GRACE`` ago, and still not started, left the queue with a worker that never
        started it (killed in between): its message is lost, it is sent again. Branches under
        a ``ResourceLimit`` may wait for a permit on a worker, unseen: they are left alone."""
        horizon = time.monotonic() - UNSTARTED_GRACE
        for queue, starts in self.starts.items():
            while starts and starts[0][0] <= horizon:
                self.passed[queue] = max(self.passed.get(queue, 0), starts.popleft()[1])
        if not any(self.passed.values()):
            return
        lost = [
            run
            for run in self._unstarted()
            if run.handle.fifo
            and not run.config.limits
            and run.handle.seq < self.passed.get(run.handle.queue, 0)
        ]
        if lost:
            logger.warning(
                "%d branch(es) of fan-out %s left their queue and never started: sent again",
                len(lost),
                self.fanout_id,
            )
            self._redispatch(lost)

    def _vanished(self, queue: str, workers: Sequence[str]) -> None:
        """Workers consuming ``queue`` vanished (killed): the oldest messages of
        the queue not started yet, up to ``VANISHED_HOLD`` per worker (what one may have taken
        and not started), are sent again; the superseded ones are revoked."""
        unstarted = sorted(self._unstarted(queue), key=lambda r: r.handle.seq)
        messages: dict[str, list[BranchRun]] = {}
        for run in unstarted:
            message = run.handle.batch or run.handle.task_id
            if message not in messages and len(messages) >= VANISHED_HOLD * len(workers):
                break
            messages.setdefault(message, []).append(run)
        again = [run for runs in messages.values() for run in runs]
        if again:
            logger.warning(
                "worker(s) %s consuming queue '%s' vanished: %d branch(es) not started sent again",
                ", ".join(workers),
                queue,
                len(again),
            )
            self._redispatch(again)


class LeaseKeeper:
    """The caller's liveness lease, renewed by a thread of its own every ``every`` seconds
    (whatever the driver is busy with: sending thousands of messages, handling thousands of
    events), so a live caller is never taken for dead. Workers stop the run's branches once
    it lapses (``ttl`` after its last renewal)."""

    def __init__(self, client: Any, key: str, value: str, ttl: float, every: float) -> None:
        self.client, self.key, self.value = client, key, value
        self.ttl_ms, self.every = max(1, int(ttl * 1000)), every
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None

    def renew(self) -> None:
        self.client.set(self.key, self.value, px=self.ttl_ms)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._keep, name="tea-dist-caller-lease", daemon=True)
        self.thread.start()

    def _keep(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.renew()
            except Exception as exc:  # an outage: the driver rides it out or ends the run
                logger.debug("renewing the caller lease failed: %s", exc)

    def stop(self) -> None:
        """No renewal after this returns (idempotent)."""
        self.stopped.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def resends_of(task_id: str) -> int:
    """How many times a branch was sent again before task ``task_id`` (``{fanout}.{i}.{n}``)."""
    tail = task_id.rpartition(".")[2]
    return int(tail) if tail.isdigit() else 0


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """On the way out (often because Redis or the broker failed), nothing may mask the cause:
    a failure here is logged, not raised."""
    try:
        yield
    except Exception as exc:
        logger.warning("%s failed: %s: %s", what, type(exc).__name__, exc)
