"""Which queues live workers consume: how a driver tells "no worker" from "workers busy".

Every worker's consumer (``Presence``, a Celery bootstep) adds itself (``name#pid``), every
``PRESENCE_SECONDS``, to one sorted set per queue it consumes, scored by the epoch time until
which it counts as alive, and its concurrency (the tasks it runs at once) to one hash per
queue; it removes itself from both when it stops. ``live_consumers`` and ``live_slots`` are
the driver's side: how many workers count as alive for a queue now, and how many slots they
consume it with (what a map's batches are sized for).
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
PRUNE_BEATS = 15  # announcements between two prunings of lapsed workers' slots


def live_consumers(client: Any, keys: Keys, queue: str, now: float | None = None) -> int:
    """Workers that announced, within ``PRESENCE_TTL``, that they consume ``queue``."""
    return int(client.zcount(keys.queue_workers(queue), now or time.time(), "+inf"))


def live_slots(client: Any, keys: Keys, queue: str, now: float | None = None) -> dict[str, int]:
    """Live worker consuming ``queue`` -> its slots (1 for one that did not say), in one
    round trip; ``sum(...values())`` is the queue's total."""
    pipe = client.pipeline(transaction=False)
    pipe.zrangebyscore(keys.queue_workers(queue), now or time.time(), "+inf")
    pipe.hgetall(keys.queue_slots(queue))
    names, slots = pipe.execute()
    said = {_text(name): int(count) for name, count in slots.items()}
    return {_text(name): max(1, said.get(_text(name), 1)) for name in names}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _concurrency(c: Any) -> int:
    """The tasks a worker runs at once (its pool's processes, threads or greenlets)."""
    count = getattr(getattr(c, "controller", None), "concurrency", None)
    return count if isinstance(count, int) and count > 0 else 1


class Presence(bootsteps.StartStopStep):  # type: ignore[misc]
    """Announce this worker on each queue it consumes while it runs."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer_ref: Any = None
        self.name = ""
        self.beats = 0

    def start(self, c: Any) -> None:
        settings = c.app.tea_settings
        self.client = redis_for(settings.redis)
        self.keys = Keys(settings.key_prefix)
        # one member per process: a worker killed and restarted under the same name within
        # PRESENCE_TTL is a new member, and the old one lapses (the driver notices the loss)
        self.name = f"{getattr(c, 'hostname', None) or socket.gethostname()}#{os.getpid()}"
        self.queues = [q.name for q in c.task_consumer.queues] if c.task_consumer else []
        self.slots = _concurrency(c)
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
                slots = self.keys.queue_slots(queue)
                pipe.hset(slots, self.name, self.slots)
                pipe.expire(slots, int(PRESENCE_TTL * 6))
            pipe.execute()
            self.beats += 1
            if self.beats % PRUNE_BEATS == 0:
                self._prune()

    def _prune(self) -> None:
        """Drop the slots of workers gone without a word (killed): their presence lapsed."""
        for queue in self.queues:
            found = self.client.zrangebyscore(self.keys.queue_workers(queue), time.time(), "+inf")
            live = set(map(_text, found))
            said = map(_text, self.client.hkeys(self.keys.queue_slots(queue)))
            gone = [name for name in said if name not in live]
            if gone:
                self.client.hdel(self.keys.queue_slots(queue), *gone)

    def stop(self, c: Any) -> None:
        if self.timer_ref is not None:
            self.timer_ref.cancel()
            self.timer_ref = None
        with contextlib.suppress(redis.RedisError, AttributeError):
            pipe = self.client.pipeline(transaction=False)
            for queue in self.queues:
                pipe.zrem(self.keys.queue_workers(queue), self.name)
                pipe.hdel(self.keys.queue_slots(queue), self.name)
            pipe.execute()

    shutdown = stop
