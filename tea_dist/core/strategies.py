"""The strategy registry: where a fan-out's branches run, by name.

``ParallelExecutor`` is the protocol; ``get_executor(name)`` returns the shared instance of a
registered strategy and ``register_executor(name, cls)`` adds one. Built in: ``thread``,
``process``, ``asyncio`` (in-process), ``celery`` (distributed) and ``inline`` (sequential, in
the caller's thread: a test double), each imported lazily so that using threads never imports
Celery.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tea_dist.core.errors import ConfigError

if TYPE_CHECKING:
    from tea_dist.core.config import ParallelConfig
    from tea_dist.core.graph import FanOut, GraphSpec
    from tea_dist.core.results import ParallelFlowResult
    from tea_dist.engine.attempt import BranchTask
    from tea_dist.engine.runtime import Runtime
    from tea_dist.policies.breaker import BreakerStore
    from tea_dist.policies.limits import LimitStore


@runtime_checkable
class ParallelExecutor(Protocol):
    """Runs the branches of one fan-out and returns one result per branch, in order."""

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Refuse, at compile time, a graph this strategy cannot run (raise ``GraphError``)."""
        ...

    def execute(
        self,
        tasks: Sequence[BranchTask],
        configs: Sequence[ParallelConfig],
        runtime: Runtime,
    ) -> list[ParallelFlowResult]:
        """Run every task (honouring its config) and return results in task order."""
        ...


@runtime_checkable
class SharesStores(Protocol):
    """An executor whose branches run in other processes, which must share its circuits and
    its limits' permits."""

    def shared_breakers(self) -> BreakerStore:
        """The store every process running its branches records circuits in."""
        ...

    def check_breakers(self, graph: str, store: BreakerStore) -> None:
        """Refuse (``GraphError``) a store its branches' processes cannot reach."""
        ...

    def shared_limits(self) -> LimitStore:
        """The store of ``ResourceLimit`` permits every process running its branches uses."""
        ...


_BUILTIN = {
    "thread": "tea_dist.executors.thread:ThreadExecutor",
    "inline": "tea_dist.executors.inline:InlineExecutor",
    "process": "tea_dist.executors.process:ProcessExecutor",
    "asyncio": "tea_dist.executors.asyncio:AsyncioExecutor",
    "celery": "tea_dist.distributed.driver:CeleryExecutor",
}
_registry: dict[str, type | str] = dict(_BUILTIN)
_instances: dict[str, ParallelExecutor] = {}
_lock = threading.Lock()


def known_strategies() -> list[str]:
    """Names of every registered strategy."""
    return sorted(_registry)


def register_executor(name: str, cls: type) -> None:
    """Register (or replace) a strategy by name; ``cls()`` must give a ``ParallelExecutor``."""
    key = name.strip().lower()
    if not key:
        raise ConfigError("a strategy needs a non-empty name")
    with _lock:
        _registry[key] = cls
        _instances.pop(key, None)


def check_strategy(name: str) -> str:
    """The normalised strategy name; ``ConfigError`` naming it and the known ones otherwise."""
    key = name.strip().lower()
    if key not in _registry:
        raise ConfigError(
            f"unknown parallel strategy '{name}'; known strategies: {', '.join(known_strategies())}"
        )
    return key


def get_executor(strategy: str) -> ParallelExecutor:
    """The shared executor instance for ``strategy``."""
    key = check_strategy(strategy)
    with _lock:
        executor = _instances.get(key)
        if executor is None:
            target = _registry[key]
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module), attr)
            executor = _instances[key] = target()
        return executor
