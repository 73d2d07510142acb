"""The strategy names: where a fan-out's branches may run, and what builds each.

A strategy is registered by name with the class of its executor, or the ``"module:attr"`` path
of that class (imported on first use, so that using threads never imports Celery).
``tea_dist`` registers the built-in ones (``thread``, ``process``, ``asyncio``, ``inline``,
``celery``) when it is imported; ``register_executor(name, cls)`` adds one.

This module only knows names: what an executor is (``ParallelExecutor``) is the engine's
business (``tea_dist.engine.runtime``), which runs branches on the instance ``get_executor``
gives. The YAML loader and the command line check a strategy's name here, before anything runs.
"""

from __future__ import annotations

import importlib
import threading

from tea_dist.core.errors import ConfigError

_registry: dict[str, type | str] = {}
_instances: dict[str, object] = {}
_lock = threading.Lock()


def known_strategies() -> list[str]:
    """Names of every registered strategy."""
    return sorted(_registry)


def register_executor(name: str, cls: type | str) -> None:
    """Register (or replace) a strategy by name: ``cls()`` (a class, or the ``"module:attr"``
    path of one) must give a ``ParallelExecutor``."""
    key = name.strip().lower()
    if not key:
        raise ConfigError("a strategy needs a non-empty name")
    if isinstance(cls, str) and not all(cls.partition(":")[::2]):
        raise ConfigError(f"strategy '{name}': expected 'module:attr', got {cls!r}")
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


def get_executor(strategy: str) -> object:
    """The shared executor instance for ``strategy`` (made on first use)."""
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
