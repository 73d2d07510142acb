"""tea_dist: workflow graphs whose parallel branches run on threads, processes, asyncio
or a Celery cluster.

Grouped by concept:

- building and running graphs: ``StateGraph``, ``START``, ``END``, ``load_yaml``
- policies: ``ParallelConfig``, ``RetryPolicy``, ``CircuitBreakerConfig``
- results and events: ``ParallelFlowResult``, ``CircuitState``, ``ParallelFlowCallback``,
  ``FlowContext``, ``CancelToken``
- fan-in helpers: ``first_success``, ``all_success``, ``majority``
- strategies: ``get_executor``, ``register_executor``, ``ParallelExecutor``
- apps: ``submit``, ``WorkflowRun`` (enqueue whole workflows on run workers)
- errors: ``TeaDistError`` and its subclasses in ``tea_dist.errors``
"""

from __future__ import annotations

from typing import Any

from .config import CircuitBreakerConfig, ParallelConfig, RetryPolicy
from .errors import TeaDistError
from .events import FlowContext, ParallelFlowCallback
from .executors import ParallelExecutor, get_executor, register_executor
from .graph import END, START, StateGraph
from .nodes import CancelToken
from .results import CircuitState, ParallelFlowResult

__all__ = [
    "END",
    "START",
    "CancelToken",
    "CircuitBreakerConfig",
    "CircuitState",
    "FlowContext",
    "ParallelConfig",
    "ParallelExecutor",
    "ParallelFlowCallback",
    "ParallelFlowResult",
    "RetryPolicy",
    "StateGraph",
    "TeaDistError",
    "WorkflowRun",
    "all_success",
    "first_success",
    "get_executor",
    "load_yaml",
    "majority",
    "register_executor",
    "submit",
]

_LAZY = {
    "load_yaml": "tea_dist.yaml_loader",
    "first_success": "tea_dist.merge",
    "all_success": "tea_dist.merge",
    "majority": "tea_dist.merge",
    "submit": "tea_dist.apps",
    "WorkflowRun": "tea_dist.apps",
}


def __getattr__(name: str) -> Any:
    """Import heavier parts (YAML, merge helpers, apps) on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tea_dist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
