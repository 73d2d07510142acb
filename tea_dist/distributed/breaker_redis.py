"""``RedisBreakerStore``: circuits in Redis, shared by every worker and caller.

Each circuit is one hash (``Keys.circuit(name)``: state, failures, opened_at, probes) and its
name is kept in the set ``Keys.circuits_index()`` so listing circuits needs no SCAN. Every
``acquire``, ``record`` and ``reset`` is one EVALSHA of a Lua script from ``breaker.lua``, so
a transition is atomic across processes and machines. Without an injected clock the scripts
read the Redis server's clock, so workers with skewed clocks agree on when a circuit may
half-open. Circuit hashes never expire.

Redis errors are translated to ``TeaDistError`` naming the server by its URL, password
redacted; no repr shows a password either. The store pickles as its URL, key prefix and clock,
so it can be sent to another process, which connects on its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.results import CircuitState
from tea_dist.distributed.scripted import ScriptedStore, text
from tea_dist.policies.breaker import Admission, CircuitSnapshot, Transition


class RedisBreakerStore(ScriptedStore):
    """Circuit breakers in Redis; one Lua script (``breaker.lua``) per transition."""

    SCRIPTS = "breaker.lua"
    WHAT = "circuit breaker store"

    # -- the BreakerStore interface --

    def acquire(self, circuit: str, cfg: CircuitBreakerConfig) -> Admission:
        """Ask ``circuit`` whether a call may run now (creating it, closed, when unknown)."""
        args = [circuit, repr(cfg.reset_timeout), cfg.half_open_max_calls, self._now()]
        allowed, probe, state, previous = self._run("acquire", self._circuit_keys(circuit), args)
        after = CircuitState(text(state))
        transition = (CircuitState(text(previous)), after) if text(previous) else None
        return Admission(bool(allowed), bool(probe), after, transition)

    def record(
        self, circuit: str, cfg: CircuitBreakerConfig, success: bool, probe: bool
    ) -> Transition | None:
        """Record the outcome of an admitted call; returns the transition it caused, if any."""
        args = [circuit, cfg.failure_threshold, int(success), int(probe), self._now()]
        before, after = self._run("record", self._circuit_keys(circuit), args)
        old, new = CircuitState(text(before)), CircuitState(text(after))
        return None if old is new else (old, new)

    def release(self, circuit: str, probe: bool) -> None:
        """An admitted call ended with no outcome: give back its probe slot, count nothing."""
        if probe:
            self._run("release", self._circuit_keys(circuit), [])

    def reset(self, circuit: str | None = None) -> list[tuple[str, CircuitState, CircuitState]]:
        """Close one known circuit (every circuit when ``None``); returns the transitions made."""
        if circuit is None:
            index = self._keys.circuits_index()
            reply = self._run("reset_all", [index], [self._keys.circuit_prefix()])
        else:
            reply = self._run("reset_one", self._circuit_keys(circuit), [circuit])
        return [
            (text(name), CircuitState(text(old)), CircuitState.CLOSED)
            for name, old in zip(reply[::2], reply[1::2], strict=True)
        ]

    def forget(self, circuits: Iterable[str]) -> None:
        """Drop circuits entirely: their hashes and their place in the index."""
        names = list(circuits)
        if not names:
            return
        with self._translated():
            pipe = self._client.pipeline()
            pipe.delete(*[self._keys.circuit(name) for name in names])
            pipe.srem(self._keys.circuits_index(), *names)
            pipe.execute()

    def states(self) -> dict[str, CircuitState]:
        """Every known circuit and its stored state (one atomic read)."""
        reply = self._run("states", [self._keys.circuits_index()], [self._keys.circuit_prefix()])
        return {
            text(name): CircuitState(text(state))
            for name, state in zip(reply[::2], reply[1::2], strict=True)
        }

    def snapshot(self, circuit: str) -> CircuitSnapshot:
        """The stored state of ``circuit`` (a fresh closed snapshot when unknown)."""
        with self._translated():
            fields = self._client.hgetall(self._keys.circuit(circuit))
        data = {text(k): text(v) for k, v in fields.items()}
        if not data:
            return CircuitSnapshot()
        return CircuitSnapshot(
            state=CircuitState(data.get("state", CircuitState.CLOSED)),
            failures=int(data.get("failures") or 0),
            opened_at=float(data["opened_at"]) if data.get("opened_at") else None,
            probes_in_flight=int(data.get("probes") or 0),
        )

    # -- helpers --

    def _circuit_keys(self, circuit: str) -> list[str]:
        return [self._keys.circuit(circuit), self._keys.circuits_index()]
