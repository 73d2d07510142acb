"""Heartbeats and stop requests: one thread per worker process (``BEATER``).

While a branch runs, the beater keeps its heartbeat key alive for the driver, stops the attempt
at its ``timeout_seconds`` and listens for a stop request (cancel, or the branch's
``timeout_total``), which it turns into Celery's soft-time-limit exception so the slot is freed
at once; a branch whose caller's lease lapsed is stopped as an orphan.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import redis
from billiard.exceptions import SoftTimeLimitExceeded
from billiard.pool import soft_timeout_sighandler

from tea_dist.engine.attempt import worker_id
from tea_dist.engine.nodes import CancelToken

if TYPE_CHECKING:
    from tea_dist.distributed.cluster import Cluster

logger = logging.getLogger("tea_dist.worker")


@dataclass
class Watch:
    """The branch running in this process, as the beater sees it."""

    heartbeats: tuple[str, ...]  # the branch's, and its batch's when it runs in one
    target: str  # "fanout:index", what a stop request for this branch names
    lease: str  # the caller's liveness lease: gone, the branch is orphaned
    renew: Callable[[], None] | None = None  # keeps the attempt's limit permits
    token: CancelToken = field(default_factory=CancelToken)
    stopped: str = ""  # why it was stopped: "cancel" or "timeout" (the driver), "orphaned",
    # "attempt" (its own timeout_seconds)
    deadline: float | None = None  # monotonic: its timeout_seconds runs out
    kill: Callable[[], None] | None = None  # a batch item still running a grace after it (a
    # task of its own is killed by Celery's hard limit)
    task: str = ""  # the Celery task running it (a batch item's: its batch's)
    orphaned: float | None = None  # monotonic: when it was interrupted as an orphan
    terminated: bool = False  # its task was revoked with terminate

    def due(self, grace: float) -> float | None:
        """When the beater must act on this branch's own deadline next (interrupt, then kill);
        None once the driver stopped it (the driver kills it if it must), or once it was
        interrupted and Celery's hard limit is what kills it."""
        if self.deadline is None or self.stopped not in ("", "attempt"):
            return None
        if self.stopped and self.kill is None:
            return None
        return self.deadline + (grace if self.stopped else 0.0)


class Beater:
    """One thread per worker process: keeps the running branch's heartbeat alive and takes
    stop requests from the process's inbox (the driver knows which process runs a branch
    from its events), so nothing is set up or torn down per branch.

    The beater stops every attempt at its own ``timeout_seconds``: a cooperative interrupt
    (the cancel token, and the soft-limit exception in a prefork child); a task of its own that
    ignores it is killed by Celery's hard limit, a batch item a grace later by ``kill`` (which
    reports the item and sends the rest of the batch again) and SIGKILL of this process.

    A branch whose caller's lease lapsed (a caller killed without a word) is interrupted as
    an orphan, and if still running ``TEA_DIST_CANCEL_GRACE`` later, its task is revoked with
    terminate, as its caller would have done: nothing it does after that happens."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # an attempt starts or ends
        self.current: Watch | None = None
        self.pid = 0
        self.raises = False  # a prefork child: an interrupt raises the soft-limit exception
        self.cluster: Cluster | None = None  # the cluster of the worker this process serves

    @contextmanager
    def watching(self, watch: Watch, cluster: Cluster) -> Iterator[Watch]:
        with self.lock:
            self.current = watch
            self.changed.notify_all()
            if self.pid != os.getpid():  # first use in this (forked) process
                self.pid, self.cluster = os.getpid(), cluster
                self.raises = _guard_soft_limit()
                threading.Thread(target=self._loop, name="tea-dist-beater", daemon=True).start()
        try:
            yield watch
        finally:
            try:
                with self.lock:  # after this, no interrupt can be sent for this branch
                    self.current = None
                    self.changed.notify_all()
            finally:  # an interrupt's exception may land in the lines above: it still ends
                self.current = None

    def _loop(self) -> None:
        assert self.cluster is not None
        settings = self.cluster.settings
        client = redis.Redis.from_url(settings.redis)  # its own connection: BLPOP blocks it
        ttl = int(settings.heartbeat_ttl * 1000)
        inbox = self.cluster.keys.worker_inbox(worker_id())
        while True:
            try:
                watch = self.current
                due = watch.due(settings.hard_limit_grace) if watch is not None else None
                popped, wait = None, settings.heartbeat_seconds
                if due is not None and due - time.monotonic() < wait:
                    # its deadline comes before the next beat: waited for here (a blocking
                    # pop's timeout is only as precise as the Redis server's tick, 100 ms)
                    with self.changed:
                        self.changed.wait_for(
                            partial(self._moved_from, watch), due - time.monotonic()
                        )
                else:
                    popped = client.blpop([inbox], timeout=wait)
                    if popped and popped[1] == b"wake":  # an attempt with a deadline starts
                        with self.changed:
                            self.changed.wait_for(partial(self._moved_from, None), wait)
                        continue
                watch = self.current
                if popped and watch is not None:
                    raw = popped[1]
                    text = raw.decode() if isinstance(raw, bytes) else str(raw)
                    target, _, reason = text.rpartition(":")
                    if target == watch.target:
                        self._interrupt(watch, reason)
                elif watch is not None:
                    if watch.deadline is not None and time.monotonic() >= watch.deadline:
                        self._overdue(watch, settings.hard_limit_grace)
                    pipe = client.pipeline(transaction=False)
                    for heartbeat in watch.heartbeats:
                        pipe.set(heartbeat, worker_id(), px=ttl)
                    pipe.exists(watch.lease)
                    if not pipe.execute()[-1]:  # its caller went silent: stop the orphan
                        self._orphaned(watch, settings.cancel_grace)
                    if watch.renew is not None:
                        watch.renew()
            except redis.RedisError:  # a hiccup: the driver's heartbeat check covers it
                time.sleep(settings.heartbeat_seconds)

    def _moved_from(self, watch: Watch | None) -> bool:
        """The branch watched is no longer ``watch`` (None: an attempt started)."""
        return self.current is not watch

    def _interrupt(self, watch: Watch, reason: str) -> None:
        """Cancel cooperatively, then raise the soft-time-limit exception in the task."""
        with self.lock:
            if self.current is not watch:
                return
            watch.stopped = reason or "cancel"
            watch.token.cancel()
            if self.raises:
                os.kill(os.getpid(), signal.SIGUSR1)

    def _orphaned(self, watch: Watch, grace: float) -> None:
        """The branch's caller is gone: interrupt it; one still running ``grace`` after its
        interrupt (it swallowed it) is killed with its process, as its caller's revoke with
        terminate would have (the pool replaces the process; every item of a batch ends)."""
        if watch.orphaned is None:
            watch.orphaned = time.monotonic()
        self._interrupt(watch, "orphaned")
        if watch.terminated or not watch.task or not self.raises:  # solo, threads: not killed
            return
        if time.monotonic() - watch.orphaned >= grace and self.current is watch:
            watch.terminated = True
            logger.warning(
                "branch %s ignored its interrupt %.1fs after its caller went away: killed",
                watch.target,
                time.monotonic() - watch.orphaned,
            )
            assert self.cluster is not None
            self.cluster.app.control.revoke(watch.task, terminate=True, signal="SIGKILL")

    def _overdue(self, watch: Watch, grace: float) -> None:
        """A branch ran past its ``timeout_seconds``: interrupt it; a batch item still running
        a grace later is reported and its process killed (Celery's hard limit kills a task of
        its own)."""
        if not watch.stopped:
            self._interrupt(watch, "attempt")
            return
        due = watch.due(grace)
        if watch.kill is None or due is None or time.monotonic() < due:
            return
        with self.lock:  # held to the end: the task cannot go on to its next item
            if self.current is watch:
                watch.kill()
                os.kill(os.getpid(), signal.SIGKILL)


BEATER = Beater()


def _guard_soft_limit() -> bool:
    """In a prefork child (billiard's soft-limit handler on SIGUSR1), the beater's interrupt
    raises the soft-limit exception in the task, only while an attempt is watched: a signal
    landing after the attempt is over is dropped. Elsewhere (solo or threads pool) an
    interrupt is the cancel token alone. Called in the task's (main) thread."""
    if signal.getsignal(signal.SIGUSR1) is not soft_timeout_sighandler:
        return False

    def interrupt(signum: int, frame: Any) -> None:
        if BEATER.current is not None:
            raise SoftTimeLimitExceeded()

    signal.signal(signal.SIGUSR1, interrupt)
    return True
