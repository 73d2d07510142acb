"""Which queues live workers consume: how a driver tells "no worker" from "workers busy".

Every worker's consumer (``Presence``, a Celery bootstep) adds itself (``name#pid``), every
``PRESENCE_SECONDS``, to one sorted set per queue it consumes, scored by the epoch time until
which it counts as alive; it removes itself when it stops. ``live_consumers`` is the driver's
side: how many workers counted as alive for a queue now.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import redis
from celery import bootsteps

from tea_dist.distributed.connections import redis_for
from tea_dist.distributed.keys import Keys

PRESENCE_SECONDS = 2.0
PRESENCE_TTL = 10.0  # a worker silent this long no longer counts


def live_consumers(client: Any, keys: Keys, queue: str, now: float | None = None) -> int:
    """Workers that announced, within ``PRESENCE_TTL``, that they consume ``queue``."""
    return int(client.zcount(keys.queue_workers(queue), now or time.time(), "+inf"))


class Presence(bootsteps.StartStopStep):  # type: ignore[misc]
    """Announce this worker on each queue it consumes while it runs."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.name = ""

    def start(self, c: Any) -> None:
        settings = c.app.tea_settings
        self.client = redis_for(settings.redis)
        self.keys = Keys(settings.key_prefix)
        # one member per process: a worker killed and restarted under the same name within
        # PRESENCE_TTL is a new member, and the old one lapses (the driver notices the loss)
        self.name = f"{getattr(c, 'hostname', None) or socket.gethostname()}#{os.getpid()}"
        self.queues = [q.name for q in c.task_consumer.queues] if c.task_consumer else []
        self._announce()
        self.timer_ref = c.timer.call_repeatedly(PRESENCE_SECONDS, self._announce)

    def _announce(self) -> None:
        until = time.time() + PRESENCE_TTL
        with contextlib.suppress(redis.RedisError):  # an outage: the next beat tries again
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                key = self.keys.queue_workers(queue)
                pipe.zadd(key, {self.name: until})
                pipe.zremrangebyscore(key, "-inf", time.time())
                pipe.expire(key, int(PRESENCE_TTL * 6))
            pipe.execute()

    def stop(self, c: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        with contextlib.suppress(redis.RedisError, AttributeError):
            for queue in self.queues:
                self.client.zrem(self.keys.queue_workers(queue), self.name)

    shutdown = stop
