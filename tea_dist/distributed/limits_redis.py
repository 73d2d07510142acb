"""``RedisLimitStore``: resource limits in Redis, shared by every worker, run and caller.

A limit is four keys (``Keys.limit_keys``: leases, the rate window's starts, waiters, info)
under one hash tag, ``{name}``, so every operation is one EVALSHA of a script from
``limits.lua`` with all its keys declared, and runs on Redis Cluster too. Each script sets
every key to expire once nothing in it matters any more (the last lease, the last start plus
one period, the last waiter), so an abandoned limit leaves nothing behind. Limit names are kept
in the set ``Keys.limits_index()`` (refreshed by every ``acquire`` and ``waiting``, expiring a
day after the last) so that listing them needs no SCAN.

Without an injected clock the scripts read the Redis server's clock (``TIME``), so machines
with skewed clocks agree on leases and windows. Redis errors become ``TeaDistError`` naming the
server by its URL, password redacted. The store pickles as its URL, key prefix, clock and poll,
so it can be sent to another process, which connects on its own.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import RedisCluster

from tea_dist.core.config import ResourceLimit
from tea_dist.distributed.scripted import ScriptedStore, text
from tea_dist.policies.limits import DEFAULT_POLL_SECONDS, LimitSnapshot

INDEX_TTL_SECONDS = 86400


def _opt(value: object | None) -> str:
    return "" if value is None else str(value)


class RedisLimitStore(ScriptedStore):
    """Resource limits in Redis; one Lua script (``limits.lua``) per operation.

    Besides a ``redis.Redis`` or a URL it takes a ``RedisCluster``; ``poll_seconds`` is the
    wait answered while ``max_concurrent`` is full.
    """

    SCRIPTS = "limits.lua"
    WHAT = "limit store"

    def __init__(self, *args: Any, poll_seconds: float = DEFAULT_POLL_SECONDS, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._poll = poll_seconds

    def _init_kwargs(self) -> dict[str, Any]:
        return {**super()._init_kwargs(), "poll_seconds": self._poll}

    # -- the LimitStore interface --

    def acquire(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> float | None:
        """Take one permit for ``holder`` now: ``None`` when granted, else seconds to wait."""
        count, period = limit.window or (None, None)
        args = [
            holder,
            _opt(limit.max_concurrent),
            _opt(count),
            _opt(period),
            repr(float(lease_seconds)),
            self._now(),
            repr(float(self._poll)),
            _opt(limit.rate),
        ]
        reply = text(self._run_indexed("acquire", limit.name, args))
        return float(reply) if reply else None

    def renew(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> bool:
        """Extend the lease; ``False`` if it was lost (expired and taken, or released)."""
        args = [holder, repr(float(lease_seconds)), self._now()]
        return bool(self._run("renew", self._keys.limit_keys(limit.name), args))

    def release(self, limit: ResourceLimit, holder: str, *, started: bool = True) -> None:
        """Give the permit back (``started=False``: and its start in the rate window)."""
        args = [holder, int(started), self._now()]
        self._run("release", self._keys.limit_keys(limit.name), args)

    def waiting(self, limit: ResourceLimit, holder: str, until: float) -> None:
        """Record that ``holder`` waits for a permit until epoch ``until``."""
        period = limit.window[1] if limit.window else None
        args = [
            holder,
            repr(float(until)),
            self._now(),
            _opt(limit.max_concurrent),
            _opt(limit.rate),
            _opt(period),
        ]
        self._run_indexed("waiting", limit.name, args)

    def states(self) -> dict[str, LimitSnapshot]:
        """Every limit with a permit held, a holder waiting, or a start in its window."""
        index = self._keys.limits_index()
        with self._translated():
            names = sorted(text(n) for n in self._client.smembers(index))
        out: dict[str, LimitSnapshot] = {}
        gone: list[str] = []
        for name in names:
            known, held, waiting, started, max_c, rate = self._run(
                "state", self._keys.limit_keys(name), [self._now()]
            )
            if not known:
                gone.append(name)
            elif held or waiting or started:
                out[name] = LimitSnapshot(
                    name=name,
                    held=int(held),
                    waiting=int(waiting),
                    max_concurrent=int(text(max_c)) if text(max_c) else None,
                    rate=text(rate) or None,
                    started=int(started),
                )
        if gone:
            with self._translated():
                self._client.srem(index, *gone)
        return out

    def reset(self, name: str) -> bool:
        """Drop everything known of the limit ``name``; ``False`` when nothing was known."""
        deleted = self._run("reset", self._keys.limit_keys(name), [])
        with self._translated():
            self._client.srem(self._keys.limits_index(), name)
        return bool(deleted)

    # -- helpers --

    def _run_indexed(self, script: str, name: str, args: list[Any]) -> Any:
        """Run ``script`` on limit ``name`` and list the name in the index: one round trip."""
        keys, index = self._keys.limit_keys(name), self._keys.limits_index()
        runner = self._scripts[script]
        with self._translated():
            if isinstance(self._client, RedisCluster):  # no scripts in a cluster pipeline
                reply = runner(keys=keys, args=args)
                self._client.sadd(index, name)
                self._client.expire(index, INDEX_TTL_SECONDS)
                return reply
            pipe = self._client.pipeline(transaction=False)
            pipe.evalsha(runner.sha, len(keys), *keys, *args)
            pipe.sadd(index, name)
            pipe.expire(index, INDEX_TTL_SECONDS)
            try:
                return pipe.execute()[0]
            except redis.exceptions.NoScriptError:  # the server lost its script cache
                return runner(keys=keys, args=args)
