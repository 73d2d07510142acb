"""Cluster-wide resource limits: the rules, as pure functions, and an in-memory store.

A ``ResourceLimit`` is named; everything that names it (branches, runs, workers, callers)
shares it through a ``LimitStore``. An attempt takes one *permit* before it starts:

- ``max_concurrent``: at most N holders at once;
- ``rate``: at most N attempt starts in any window of one period (``"4/s"``: never five starts
  within one second);
- both: the permit needs both, granted together or not at all.

Permits are *leases*: a grant holds for ``lease_seconds`` and the holder renews it while its
attempt runs (from its heartbeat). A holder that dies (a SIGKILLed worker) stops renewing and
its permit comes back by itself once the lease has run out. An expired lease is dropped by the
next ``acquire`` (which needs the room; in Redis also when the limit's keys expire, a second
after everything in them is over); until then its holder may still renew it, so a ``renew``
fails only when the lease has expired *and* been taken. A released lease is gone: a late
``renew`` never brings it back.

The rate rule is a sliding-window log: the start times of the last period are kept and a new
start is granted while fewer than N are younger than one period. It is exact: no half-open
window of one period ever holds more than N starts. A token bucket or GCRA is cheaper (one
number instead of N) but lets a full burst be followed by one more start every ``period / N``,
so one period can see up to ``2N - 1`` starts; the log's cost is N timestamps per limit.

A refused ``acquire`` says how long to wait before asking again: for ``rate`` exactly when the
oldest counted start leaves the window; for ``max_concurrent`` no one knows when a holder
releases, so ``poll_seconds`` (or sooner, when the earliest lease runs out). With both full,
the longer of the two.

Holder ids name one attempt (e.g. ``run:branch:attempt``): an ``acquire`` by a holder that
already holds the permit is granted again without counting a new start (a redelivered task);
a retry is a new attempt, hence a new acquire after the previous one's ``release``.

``MemoryLimitStore`` keeps limits in a dict behind one lock (local strategies, users' tests);
``distributed.limits_redis.RedisLimitStore`` keeps them in Redis, one Lua script per operation,
so that every process and machine shares them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from tea_dist.core.config import ResourceLimit

Clock = Callable[[], float]
"""Epoch seconds; injected so that tests control time."""

DEFAULT_LEASE_SECONDS = 5.0
"""How long a permit holds without renewal: a dead holder's permit is back within this."""

DEFAULT_POLL_SECONDS = 0.1
"""How soon to ask again when ``max_concurrent`` is full (a release may come at any moment)."""


@dataclass(frozen=True)
class Lease:
    """One holder's permit: valid while ``expires > now``; ``start`` is the time of the start it
    counted in the rate window (``None``: the limit has no rate)."""

    expires: float
    start: float | None = None


@dataclass(frozen=True)
class LimitState:
    """The whole state of one limit: leases by holder, start times of the rate window
    (ascending), and the holders waiting for a permit with the time they wait until."""

    holders: Mapping[str, Lease] = field(default_factory=lambda: MappingProxyType({}))
    starts: tuple[float, ...] = ()
    waiting: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))


EMPTY = LimitState()


@dataclass(frozen=True)
class LimitSnapshot:
    """What ``tea-dist limits`` shows of a limit: permits ``held`` now, holders ``waiting``,
    the limit's ``max_concurrent`` and ``rate`` (as last used), and ``started``: attempt starts
    within the current window of the rate's period (0 without a rate)."""

    name: str
    held: int
    waiting: int
    max_concurrent: int | None
    rate: str | None
    started: int


# -- the rules: pure functions of (state, limit, now) ----------------------------------------


def expire(state: LimitState, limit: ResourceLimit, now: float) -> LimitState:
    """``state`` without expired leases, starts older than one period, and past waiters."""
    window = limit.window
    holders = {h: lease for h, lease in state.holders.items() if lease.expires > now}
    starts = (
        state.starts if window is None else tuple(s for s in state.starts if s > now - window[1])
    )
    waiting = {h: until for h, until in state.waiting.items() if until > now}
    return LimitState(MappingProxyType(holders), starts, MappingProxyType(waiting))


def wait_for(
    state: LimitState, limit: ResourceLimit, now: float, poll: float = DEFAULT_POLL_SECONDS
) -> float | None:
    """Seconds before a new permit may be granted (``None``: now), on an expired ``state``."""
    waits: list[float] = []
    if limit.max_concurrent is not None and len(state.holders) >= limit.max_concurrent:
        earliest = min(lease.expires for lease in state.holders.values())
        waits.append(min(poll, earliest - now))
    window = limit.window
    if window is not None and len(state.starts) >= window[0]:
        oldest_counted = state.starts[len(state.starts) - window[0]]
        waits.append(oldest_counted + window[1] - now)
    return max(waits) if waits else None


def on_acquire(
    state: LimitState,
    limit: ResourceLimit,
    holder: str,
    lease_seconds: float,
    now: float,
    poll: float = DEFAULT_POLL_SECONDS,
) -> tuple[float | None, LimitState]:
    """Take one permit for ``holder`` at ``now``: ``(None, state after)`` when granted, else
    ``(seconds to wait, state)``. A holder already holding a live permit has its lease extended
    and is granted again, without a new start."""
    state = expire(state, limit, now)
    holders = dict(state.holders)
    waiting = {h: until for h, until in state.waiting.items() if h != holder}
    if holder in holders:
        holders[holder] = replace(holders[holder], expires=now + lease_seconds)
        return None, _state(holders, state.starts, waiting)
    delay = wait_for(state, limit, now, poll)
    if delay is not None:
        return delay, state
    start = now if limit.window is not None else None
    holders[holder] = Lease(now + lease_seconds, start)
    starts = state.starts if start is None else tuple(sorted((*state.starts, start)))
    return None, _state(holders, starts, waiting)


def on_renew(
    state: LimitState, holder: str, lease_seconds: float, now: float
) -> tuple[bool, LimitState]:
    """Extend ``holder``'s lease to ``now + lease_seconds``; ``False`` when it holds none (it
    released, or its lease expired and was taken by an ``acquire``)."""
    lease = state.holders.get(holder)
    if lease is None:
        return False, state
    holders = {**state.holders, holder: replace(lease, expires=now + lease_seconds)}
    return True, _state(holders, state.starts, state.waiting)


def on_release(state: LimitState, holder: str, started: bool = True) -> LimitState:
    """``holder`` gives its permit back (and stops waiting). ``started=False``: its attempt never
    started (another limit refused it, it was cancelled first), so its start leaves the rate
    window too; an attempt that ran keeps its start counted."""
    lease = state.holders.get(holder)
    holders = {h: v for h, v in state.holders.items() if h != holder}
    waiting = {h: v for h, v in state.waiting.items() if h != holder}
    starts = state.starts
    if not started and lease is not None and lease.start in starts:
        index = starts.index(lease.start)
        starts = starts[:index] + starts[index + 1 :]
    return _state(holders, starts, waiting)


def on_wait(state: LimitState, holder: str, until: float, now: float) -> LimitState:
    """Note that ``holder`` waits for a permit until epoch ``until`` (shown by ``states``)."""
    if until <= now:
        return state
    return _state(state.holders, state.starts, {**state.waiting, holder: until})


def snapshot(name: str, state: LimitState, limit: ResourceLimit, now: float) -> LimitSnapshot:
    """The counts of ``state`` at ``now`` (expired entries not counted)."""
    live = expire(state, limit, now)
    return LimitSnapshot(
        name=name,
        held=len(live.holders),
        waiting=len(live.waiting),
        max_concurrent=limit.max_concurrent,
        rate=limit.rate,
        started=len(live.starts) if limit.window is not None else 0,
    )


def _state(
    holders: Mapping[str, Lease], starts: tuple[float, ...], waiting: Mapping[str, float]
) -> LimitState:
    return LimitState(MappingProxyType(dict(holders)), starts, MappingProxyType(dict(waiting)))


# -- stores ----------------------------------------------------------------------------------


@runtime_checkable
class LimitStore(Protocol):
    """Where limits live. Every method is atomic with respect to every other caller."""

    def acquire(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> float | None:
        """Take one permit for ``holder`` now: ``None`` when granted, else seconds to wait before
        asking again. A holder that already holds a permit of this limit gets it again."""
        ...

    def renew(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> bool:
        """Extend the lease; ``False`` if it was lost (expired and taken, or released)."""
        ...

    def release(self, limit: ResourceLimit, holder: str, *, started: bool = True) -> None:
        """Give the permit back. ``started=False`` also takes back its start from the rate
        window (the attempt never started)."""
        ...

    def waiting(self, limit: ResourceLimit, holder: str, until: float) -> None:
        """Record that ``holder`` waits for a permit until epoch ``until``."""
        ...

    def states(self) -> dict[str, LimitSnapshot]:
        """Every limit with a permit held, a holder waiting, or a start in its window."""
        ...

    def reset(self, name: str) -> bool:
        """Drop everything known of the limit ``name``; ``False`` when nothing was known."""
        ...


class MemoryLimitStore:
    """Limits in this process's memory, guarded by one lock.

    For local strategies and users' unit tests; processes do not share it (use
    ``RedisLimitStore`` for that). ``clock`` gives epoch seconds; ``poll_seconds`` is the wait
    answered while ``max_concurrent`` is full.
    """

    def __init__(self, clock: Clock = time.time, poll_seconds: float = DEFAULT_POLL_SECONDS):
        self._clock = clock
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._limits: dict[str, tuple[ResourceLimit, LimitState]] = {}

    def __repr__(self) -> str:
        return f"MemoryLimitStore(limits={len(self._limits)})"

    def acquire(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> float | None:
        """Take one permit for ``holder`` now: ``None`` when granted, else seconds to wait."""
        with self._lock:
            before = self._state(limit.name)
            delay, after = on_acquire(
                before, limit, holder, lease_seconds, self._clock(), self._poll
            )
            self._limits[limit.name] = (limit, after)
            return delay

    def renew(self, limit: ResourceLimit, holder: str, lease_seconds: float) -> bool:
        """Extend the lease; ``False`` if it was lost."""
        with self._lock:
            renewed, after = on_renew(self._state(limit.name), holder, lease_seconds, self._clock())
            if renewed:
                self._limits[limit.name] = (self._limits[limit.name][0], after)
            return renewed

    def release(self, limit: ResourceLimit, holder: str, *, started: bool = True) -> None:
        """Give the permit back (``started=False``: and its start in the rate window)."""
        with self._lock:
            known = self._limits.get(limit.name)
            if known is not None:
                self._limits[limit.name] = (known[0], on_release(known[1], holder, started))

    def waiting(self, limit: ResourceLimit, holder: str, until: float) -> None:
        """Record that ``holder`` waits for a permit until epoch ``until``."""
        with self._lock:
            known, state = self._limits.get(limit.name, (limit, EMPTY))
            self._limits[limit.name] = (known, on_wait(state, holder, until, self._clock()))

    def states(self) -> dict[str, LimitSnapshot]:
        """Every limit with a permit held, a holder waiting, or a start in its window."""
        with self._lock:
            now = self._clock()
            snaps = {
                name: snapshot(name, state, limit, now)
                for name, (limit, state) in self._limits.items()
            }
        return {name: s for name, s in snaps.items() if s.held or s.waiting or s.started}

    def reset(self, name: str) -> bool:
        """Drop everything known of the limit ``name``."""
        with self._lock:
            return self._limits.pop(name, None) is not None

    def _state(self, name: str) -> LimitState:
        known = self._limits.get(name)
        return EMPTY if known is None else known[1]


PROCESS_LIMITS = MemoryLimitStore()
"""The limits of in-process strategies when no Redis store is configured: one per process."""
