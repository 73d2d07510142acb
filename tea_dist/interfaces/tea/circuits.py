"""The Edge Agent's circuit-breaker objects, as views on tea_dist's breaker stores.

``CircuitBreaker`` is one named circuit of a ``BreakerStore`` (a private in-memory store when
none is given); its methods are the store's transitions, so a breaker obtained from a graph's
``circuit_registry`` is the very circuit that graph's branches use. ``CircuitBreakerRegistry``
hands out one ``CircuitBreaker`` per name. TEA's ``scope="global"`` registries share one
process-wide store; ``scope="graph"`` ones have their own.
"""

from __future__ import annotations

import threading
from typing import Any

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.core.results import CircuitState
from tea_dist.engine.runner import circuit_info
from tea_dist.policies.breaker import BreakerStore, MemoryBreakerStore

GLOBAL_STORE = MemoryBreakerStore()
"""The store of every ``scope="global"`` registry and ``compile(circuit_breaker_scope=
"global")`` graph in this process."""


class CircuitBreaker:
    """One circuit: ``allow_request()``, ``record_success()``, ``record_failure()``, ``reset()``.

    ``state``, ``failure_count`` and ``get_state_info()`` read the store, so they always show
    what every user of the circuit did.
    """

    def __init__(
        self,
        config: CircuitBreakerConfig,
        name: str | None = None,
        *,
        store: BreakerStore | None = None,
        circuit: str | None = None,
    ) -> None:
        self.config = config
        self.name = name or f"circuit_{id(self)}"
        self.store: BreakerStore = store if store is not None else MemoryBreakerStore()
        self.circuit = circuit or self.name  # the name in the store
        self._probes = 0  # half-open calls admitted through this object, not yet recorded
        self._lock = threading.Lock()

    @property
    def state(self) -> CircuitState:
        return self.store.snapshot(self.circuit).state

    @property
    def failure_count(self) -> int:
        return self.store.snapshot(self.circuit).failures

    def allow_request(self) -> bool:
        """Whether a call may go through now (an open circuit past its reset timeout admits a
        half-open probe)."""
        admission = self.store.acquire(self.circuit, self.config)
        if admission.probe:
            with self._lock:
                self._probes += 1
        return admission.allowed

    def record_success(self) -> None:
        self._record(True)

    def record_failure(self) -> None:
        self._record(False)

    def _record(self, success: bool) -> None:
        with self._lock:
            probe = self._probes > 0
            self._probes = max(0, self._probes - 1)
        self.store.record(self.circuit, self.config, success, probe)

    def reset(self) -> None:
        """Close the circuit."""
        _ensure(self.store, self.circuit, self.config)
        self.store.reset(self.circuit)
        with self._lock:
            self._probes = 0

    def get_state_info(self) -> dict[str, Any]:
        """``{"name", "state", "failure_count", "opened_at", "half_open_active"}``."""
        return {**circuit_info(self.circuit, self.store), "name": self.name}


class CircuitBreakerRegistry:
    """One ``CircuitBreaker`` per name, over one store.

    ``prefix`` maps The Edge Agent's names to the store's: a graph's registry uses its name
    (``"graph:"``), so ``get_or_create("branch", ...)`` is the circuit of that branch.
    """

    def __init__(
        self, scope: str = "graph", *, store: BreakerStore | None = None, prefix: str = ""
    ) -> None:
        if scope not in ("graph", "global"):
            raise ConfigError(f"circuit breaker scope must be 'graph' or 'global', got {scope!r}")
        self.scope = scope
        self.store: BreakerStore = store or (
            GLOBAL_STORE if scope == "global" else MemoryBreakerStore()
        )
        self.prefix = prefix
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def circuit_name(self, name: str) -> str:
        """The store's name for TEA's ``name``: a circuit configured by name keeps it."""
        if not self.prefix or name in self.store.states():
            return name
        return f"{self.prefix}{name}"

    def tea_name(self, circuit: str) -> str:
        """TEA's name for a circuit of the store: the branch name for per-branch circuits."""
        return circuit.removeprefix(self.prefix) if self.prefix else circuit

    def get_or_create(self, name: str, config: CircuitBreakerConfig) -> CircuitBreaker:
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                circuit = self.circuit_name(name)
                breaker = CircuitBreaker(config, name, store=self.store, circuit=circuit)
                self._breakers[name] = breaker
                _ensure(self.store, circuit, config)
            return breaker

    def get_circuit(self, name: str) -> CircuitBreaker | None:
        return self._breakers.get(name)

    def reset_circuit(self, name: str | None = None) -> None:
        """Close one circuit, or every circuit when ``name`` is None."""
        self.store.reset(None if name is None else self.circuit_name(name))

    def reset_all_circuits(self) -> None:
        self.store.reset(None)

    def get_circuit_states(self) -> dict[str, dict[str, Any]]:
        """``{name: {"name", "state", "failure_count", ...}}`` for every circuit."""
        return {
            self.tea_name(circuit): {
                **circuit_info(circuit, self.store),
                "name": self.tea_name(circuit),
            }
            for circuit in self.store.states()
        }


def _ensure(store: BreakerStore, circuit: str, config: CircuitBreakerConfig) -> None:
    """Make ``circuit`` known to ``store`` (closed) without admitting a call through it."""
    if circuit not in store.states():
        store.record(circuit, config, True, False)


class CircuitOpenError(TeaDistError):
    """The Edge Agent's error for a call refused by an open circuit (``circuit_name``)."""

    def __init__(self, circuit_name: str) -> None:
        super().__init__(f"Circuit breaker '{circuit_name}' is open")
        self.circuit_name = circuit_name


class RetryExhaustedError(TeaDistError):
    """The Edge Agent's error for a branch whose every attempt failed.

    tea_dist reports that as the branch's ``ParallelFlowResult`` (``retry_count`` and
    ``attempt_errors``); this class is for code that raises or catches TEA's error.
    """

    def __init__(self, branch: str, attempts: int, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"All {attempts} retry attempts exhausted for branch '{branch}'")
        self.branch = branch
        self.attempts = attempts
        self.errors = errors
