"""Redis clients, one per URL per process (re-created after a fork), never at import time."""

from __future__ import annotations

import os
import threading

import redis

_clients: dict[tuple[str, int], redis.Redis] = {}
_lock = threading.Lock()


def redis_for(url: str) -> redis.Redis:
    """A shared client for ``url`` in this process."""
    key = (url, os.getpid())
    client = _clients.get(key)
    if client is None:
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = redis.Redis.from_url(url, health_check_interval=30)
    return client
