"""Circuit breakers: states, pure transitions, and the stores that keep them.

The split follows pybreaker: *states* (``CircuitSnapshot``), *transitions* (``on_acquire`` and
``on_record``, pure functions of snapshot, config and time, with no I/O and no clock reads),
and *storage* (``BreakerStore``). Listeners are the caller's business: every store method
returns the transition it made, and the runtime turns it into an ``on_circuit_state_change``
event.

Transitions::

    closed ──failure_threshold consecutive failures──► open
    open ──reset_timeout elapsed, next acquire──► half_open (that acquire is the first probe)
    half_open ──a probe succeeds──► closed        half_open ──a probe fails──► open

Decisions the seeds left open:

- ``opened_at`` is when the current non-closed period began: the time the circuit opened, or,
  in ``half_open``, when probing began. It is ``None`` while closed.
- An outcome that is not a probe and arrives while the circuit is open or half-open belongs to
  a call admitted earlier, while closed. It is ignored: a late failure does not extend the open
  period, and a late success does not close the circuit without a probe.
- A probe outcome arriving while open (another probe already failed) is ignored too; one
  arriving after the circuit closed counts like any closed-state outcome.
- A probe whose holder never records (a killed process) would hold its slot forever. Probe
  slots are therefore leases of ``reset_timeout`` seconds: when every slot is taken and probing
  began at least ``reset_timeout`` ago, the slots are reclaimed and the caller becomes the
  first probe of a new probing period.

``MemoryBreakerStore`` keeps circuits in a dict behind one ``RLock``; it is also the test double
for users' unit tests. ``distributed.breaker_redis.RedisBreakerStore`` keeps them in Redis, one Lua
script per transition, so every process sees the same circuits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.results import CircuitState

Transition = tuple[CircuitState, CircuitState]
"""``(old_state, new_state)`` of a circuit that changed state."""

Clock = Callable[[], float]
"""Epoch seconds; injected so that tests control time."""


@dataclass(frozen=True)
class CircuitSnapshot:
    """The whole state of one circuit at one moment.

    ``failures`` counts consecutive failures (while open: the failures that opened it);
    ``opened_at`` is when the current open or half-open period began (``None`` while closed);
    ``probes_in_flight`` counts half-open probes admitted and not yet recorded.
    """

    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    opened_at: float | None = None
    probes_in_flight: int = 0


CLOSED = CircuitSnapshot()
"""A fresh circuit: closed, no failures."""


@dataclass(frozen=True)
class Admission:
    """The answer to "may this call go through?".

    ``probe`` is true for a half-open trial call (pass it back to ``record``); ``state`` is the
    circuit's state after the decision; ``transition`` is the change the decision made, if any.
    """

    allowed: bool
    probe: bool
    state: CircuitState
    transition: Transition | None = None


def _timed_out(opened_at: float | None, cfg: CircuitBreakerConfig, now: float) -> bool:
    """Whether ``reset_timeout`` has passed since ``opened_at`` (``None`` counts as passed)."""
    return opened_at is None or now - opened_at >= cfg.reset_timeout


def _probe_period(now: float) -> CircuitSnapshot:
    """A new half-open period whose first probe has just been admitted."""
    return CircuitSnapshot(CircuitState.HALF_OPEN, 0, now, 1)


def on_acquire(
    snap: CircuitSnapshot, cfg: CircuitBreakerConfig, now: float
) -> tuple[Admission, CircuitSnapshot]:
    """Decide whether a call may run, and the circuit after that decision.

    Closed admits. Open refuses until ``reset_timeout`` has passed, then moves to half-open and
    admits the caller as a probe. Half-open admits probes while fewer than
    ``half_open_max_calls`` are in flight (reclaiming slots held longer than ``reset_timeout``).
    """
    if snap.state is CircuitState.CLOSED:
        return Admission(True, False, CircuitState.CLOSED), snap
    if snap.state is CircuitState.OPEN:
        if not _timed_out(snap.opened_at, cfg, now):
            return Admission(False, False, CircuitState.OPEN), snap
        transition = (CircuitState.OPEN, CircuitState.HALF_OPEN)
        return Admission(True, True, CircuitState.HALF_OPEN, transition), _probe_period(now)
    if snap.probes_in_flight < cfg.half_open_max_calls:
        admitted = replace(snap, probes_in_flight=snap.probes_in_flight + 1)
        return Admission(True, True, CircuitState.HALF_OPEN), admitted
    if _timed_out(snap.opened_at, cfg, now):
        return Admission(True, True, CircuitState.HALF_OPEN), _probe_period(now)
    return Admission(False, False, CircuitState.HALF_OPEN), snap


def on_record(
    snap: CircuitSnapshot, cfg: CircuitBreakerConfig, success: bool, probe: bool, now: float
) -> CircuitSnapshot:
    """The circuit after a call admitted by ``on_acquire`` finished (``success`` or not).

    Closed: a success resets the failure count; a failure increments it and the
    ``failure_threshold``-th consecutive one opens the circuit. Half-open: a probe's success
    closes, its failure reopens. Stale outcomes are ignored (see the module docstring).
    """
    if snap.state is CircuitState.CLOSED:
        if success:
            return CLOSED
        failures = snap.failures + 1
        if failures >= cfg.failure_threshold:
            return CircuitSnapshot(CircuitState.OPEN, failures, now, 0)
        return replace(snap, failures=failures)
    if snap.state is CircuitState.HALF_OPEN and probe:
        if success:
            return CLOSED
        return CircuitSnapshot(CircuitState.OPEN, snap.failures + 1, now, 0)
    return snap


def on_release(snap: CircuitSnapshot, probe: bool) -> CircuitSnapshot:
    """The circuit after an admitted call ended with no outcome (cancelled, never ran).

    Neither a success nor a failure: only a half-open probe's slot is given back.
    """
    if snap.state is CircuitState.HALF_OPEN and probe and snap.probes_in_flight > 0:
        return replace(snap, probes_in_flight=snap.probes_in_flight - 1)
    return snap


def transition_between(before: CircuitSnapshot, after: CircuitSnapshot) -> Transition | None:
    """``(old, new)`` when the state changed, else ``None``."""
    return None if before.state is after.state else (before.state, after.state)


@runtime_checkable
class BreakerStore(Protocol):
    """Where circuits live. Every method is atomic with respect to every other caller."""

    def acquire(self, circuit: str, cfg: CircuitBreakerConfig) -> Admission:
        """Ask ``circuit`` whether a call may run now (creating it, closed, when unknown)."""
        ...

    def record(
        self, circuit: str, cfg: CircuitBreakerConfig, success: bool, probe: bool
    ) -> Transition | None:
        """Record the outcome of an admitted call; returns the transition it caused, if any."""
        ...

    def release(self, circuit: str, probe: bool) -> None:
        """An admitted call ended with no outcome (cancelled): free its probe slot."""
        ...

    def reset(self, circuit: str | None = None) -> list[tuple[str, CircuitState, CircuitState]]:
        """Close one known circuit (every circuit when ``None``); returns the transitions made."""
        ...

    def forget(self, circuits: Iterable[str]) -> None:
        """Drop circuits entirely (used for per-invocation circuits after the run)."""
        ...

    def states(self) -> dict[str, CircuitState]:
        """Every known circuit and its stored state."""
        ...

    def snapshot(self, circuit: str) -> CircuitSnapshot:
        """The stored state of ``circuit`` (a fresh closed snapshot when unknown)."""
        ...


class MemoryBreakerStore:
    """Circuits in this process's memory, guarded by one ``threading.RLock``.

    For local strategies and for users' unit tests; processes do not share it (use
    ``RedisBreakerStore`` for that). ``clock`` gives epoch seconds.
    """

    def __init__(self, clock: Clock = time.time) -> None:
        self._clock = clock
        self._lock = threading.RLock()
        self._circuits: dict[str, CircuitSnapshot] = {}

    def __repr__(self) -> str:
        return f"MemoryBreakerStore(circuits={len(self._circuits)})"

    def acquire(self, circuit: str, cfg: CircuitBreakerConfig) -> Admission:
        """Ask ``circuit`` whether a call may run now (creating it, closed, when unknown)."""
        with self._lock:
            before = self._circuits.get(circuit, CLOSED)
            admission, after = on_acquire(before, cfg, self._clock())
            self._circuits[circuit] = after
            return admission

    def record(
        self, circuit: str, cfg: CircuitBreakerConfig, success: bool, probe: bool
    ) -> Transition | None:
        """Record the outcome of an admitted call; returns the transition it caused, if any."""
        with self._lock:
            before = self._circuits.get(circuit, CLOSED)
            after = on_record(before, cfg, success, probe, self._clock())
            self._circuits[circuit] = after
            return transition_between(before, after)

    def release(self, circuit: str, probe: bool) -> None:
        """An admitted call ended with no outcome: give back its probe slot, count nothing."""
        with self._lock:
            before = self._circuits.get(circuit)
            if before is not None:
                self._circuits[circuit] = on_release(before, probe)

    def reset(self, circuit: str | None = None) -> list[tuple[str, CircuitState, CircuitState]]:
        """Close one known circuit (every circuit when ``None``); returns the transitions made."""
        with self._lock:
            names = list(self._circuits) if circuit is None else [circuit]
            changed: list[tuple[str, CircuitState, CircuitState]] = []
            for name in names:
                before = self._circuits.get(name)
                if before is None:
                    continue
                self._circuits[name] = CLOSED
                if before.state is not CircuitState.CLOSED:
                    changed.append((name, before.state, CircuitState.CLOSED))
            return changed

    def forget(self, circuits: Iterable[str]) -> None:
        """Drop circuits entirely (they are no longer listed)."""
        with self._lock:
            for name in circuits:
                self._circuits.pop(name, None)

    def states(self) -> dict[str, CircuitState]:
        """Every known circuit and its stored state."""
        with self._lock:
            return {name: snap.state for name, snap in self._circuits.items()}

    def snapshot(self, circuit: str) -> CircuitSnapshot:
        """The stored state of ``circuit`` (a fresh closed snapshot when unknown)."""
        with self._lock:
            return self._circuits.get(circuit, CLOSED)
