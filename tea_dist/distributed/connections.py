"""Redis clients, one per URL per process (re-created after a fork), never at import time.

``ride_out`` runs a Redis operation through a short outage: a connection error is retried
with backoff until ``grace`` seconds (``TEA_DIST_BROKER_GRACE``) have passed since the first
one, then a ``BrokerError`` naming the redacted URL is raised. ``check_reachable`` is its quick
opposite, for the start of a run: it fails within about two seconds. ``check_broker`` is the
same for the Celery broker, whatever it is (Redis, RabbitMQ, ...), and ``queue_depths`` counts
the messages waiting in a broker's queues.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

from tea_dist.core.errors import BrokerError
from tea_dist.distributed.settings import is_redis_url, redact

T = TypeVar("T")

_clients: dict[tuple[str, int], redis.Redis] = {}
_lock = threading.Lock()
CONNECT_TIMEOUT = 1.0
SOCKET_TIMEOUT = 2.0  # well above any blocking read tea_dist makes (0.1 s)
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def redis_for(url: str) -> redis.Redis:
    """A shared client for ``url`` in this process."""
    key = (url, os.getpid())
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = redis.Redis.from_url(
                    url,
                    health_check_interval=30,
                    socket_connect_timeout=CONNECT_TIMEOUT,
                    socket_timeout=SOCKET_TIMEOUT,
                )
    return client


def ride_out(operation: Callable[[], T], url: str, grace: float) -> T:
    """``operation()``, retried through a Redis outage of up to ``grace`` seconds."""
    first_failure: float | None = None
    delay = 0.05
    while True:
        try:
            return operation()
        except redis.AuthenticationError as exc:
            raise BrokerError(f"Redis at {redact(url)} refused us: {exc}") from exc
        except OUTAGE_ERRORS as exc:
            now = time.monotonic()
            first_failure = first_failure or now
            if now - first_failure >= grace:
                raise BrokerError(
                    f"Redis at {redact(url)} has been unreachable for {now - first_failure:.1f}s "
                    f"(TEA_DIST_BROKER_GRACE={grace:g}): {type(exc).__name__}: {exc}"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def check_reachable(url: str, what: str = "Redis") -> None:
    """Fail fast (within ~2 s) with ``BrokerError`` naming the redacted URL if ``url`` does not
    answer or refuses us (wrong password, wrong database)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BrokerError(
            f"{what} at {redact(url)} cannot be used: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        client.close()


def check_broker(url: str) -> None:
    """``check_reachable`` for the Celery broker: a Redis one is pinged, any other is connected
    to through kombu (within ~2 s; ``BrokerError`` naming the redacted URL)."""
    if is_redis_url(url):
        check_reachable(url, "the broker")
        return
    from kombu import Connection

    connection = Connection(url, connect_timeout=2 * CONNECT_TIMEOUT)
    try:
        connection.ensure_connection(max_retries=1, timeout=2 * CONNECT_TIMEOUT)
    except Exception as exc:  # kombu raises its transport's own errors (socket, AMQP, ...)
        raise BrokerError(
            f"the broker at {redact(url)} cannot be used: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        connection.release()


def queue_depths(url: str, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each of the broker's ``queues`` (a queue that does not exist, or
    cannot be read, is left out). Redis: the queue's list length; any other broker: a passive
    declare (RabbitMQ's message count: ready messages, not those delivered and unacknowledged)."""
    if is_redis_url(url):
        client = redis_for(url)
        return {queue: int(client.llen(queue)) for queue in queues}
    from kombu import Connection

    depths: dict[str, int] = {}
    with Connection(url, connect_timeout=2 * CONNECT_TIMEOUT) as connection:
        for queue in queues:
            channel = connection.channel()
            try:
                depths[queue] = int(channel.queue_declare(queue, passive=True).message_count)
            except Exception:
                continue  # a missing queue: the server closed the channel
            finally:
                with contextlib.suppress(Exception):  # maybe closed by the server already
                    channel.close()
    return depths
