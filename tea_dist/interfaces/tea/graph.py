"""The Edge Agent's ``StateGraph``: tea_dist's builder with TEA's defaults.

It is a ``tea_dist.StateGraph`` (same engine, same strategies) that behaves as TEA's did:

- ``compile()`` returns the graph itself, which then runs (``invoke``, ``stream``);
- a failed branch follows TEA's rule (``failed_branches="tea"``): ``invoke()`` ends the run at
  the first failed branch, ``stream()`` leaves it out of the fan-in's ``parallel_results``;
- ``trace`` (set by ``YAMLEngine``'s tracing options) receives every event ``invoke()`` and
  ``stream()`` yield;
- ``get_circuit_states()`` is keyed by branch name with TEA's description of each circuit,
  ``circuit_registry`` hands out ``CircuitBreaker`` views of the graph's own circuits, and
  ``compile(circuit_breaker_scope="global")`` shares circuits with every such graph.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError
from tea_dist.core.graph import StateGraph as _StateGraph
from tea_dist.interfaces.tea.circuits import GLOBAL_STORE, CircuitBreakerRegistry

logger = logging.getLogger("tea_dist.interfaces.tea")


@dataclass
class StateGraph(_StateGraph):
    """tea_dist's ``StateGraph`` with The Edge Agent's defaults (see the module docstring)."""

    failed_branches: Literal["fan_in", "tea"] = "tea"
    _registry: CircuitBreakerRegistry | None = field(default=None, repr=False, compare=False)
    trace: Callable[[dict[str, Any]], None] | None = field(default=None, repr=False, compare=False)

    def compile(  # type: ignore[override]
        self,
        parallel_config: ParallelConfig | None = None,
        parallel_callbacks: Iterable[Any] | None = None,
        circuit_breaker_scope: str = "graph",
        **options: Any,
    ) -> StateGraph:
        """Validate and prepare the graph; returns the graph itself, as TEA's did."""
        if circuit_breaker_scope == "global":
            options.setdefault("breaker_store", GLOBAL_STORE)
        elif circuit_breaker_scope != "graph":
            raise ConfigError(
                f"circuit_breaker_scope must be 'graph' or 'global', got {circuit_breaker_scope!r}"
            )
        self._compile(parallel_config, parallel_callbacks, **options)
        return self

    def invoke(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:
        """Run, yielding the ``final`` (or ``error``) event; each also goes to ``trace``."""
        return self._traced(super().invoke(state, config, **options))

    def stream(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[dict[str, Any]]:
        """Run, yielding an event after every step; each also goes to ``trace``."""
        return self._traced(super().stream(state, config, **options))

    def _traced(self, events: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if self.trace is None:
            return events
        return _tee(events, self.trace)

    # -- circuits, as TEA names and describes them --

    @property
    def circuit_registry(self) -> CircuitBreakerRegistry:
        """The graph's circuits as a TEA registry (``get_or_create(branch, config)``)."""
        store = self.compiled().breakers
        if self._registry is None or self._registry.store is not store:
            self._registry = CircuitBreakerRegistry(store=store, prefix=f"{self.name}:")
        return self._registry

    def get_circuit_states(self) -> dict[str, dict[str, Any]]:  # type: ignore[override]
        """``{branch or circuit name: {"name", "state", "failure_count", ...}}``."""
        return self.circuit_registry.get_circuit_states()

    def reset_all_circuits(self) -> None:
        """Close every circuit of the graph."""
        self.reset_circuit(None)


def _tee(
    events: Iterator[dict[str, Any]], trace: Callable[[dict[str, Any]], None]
) -> Iterator[dict[str, Any]]:
    """``events``, each handed to ``trace`` first; a failing ``trace`` never stops the run."""
    with contextlib.closing(events):  # type: ignore[type-var]
        for event in events:
            try:
                trace(event)
            except Exception:
                logger.exception("the trace callback failed on a %s event", event.get("type"))
            yield event
