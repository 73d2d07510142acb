"""tea_dist: workflow graphs whose parallel branches run on threads, processes, asyncio
or a Celery cluster.

Grouped by concept:

- building and running graphs: ``StateGraph``, ``START``, ``END``, ``load_yaml``
- policies: ``ParallelConfig``, ``RetryPolicy``, ``CircuitBreakerConfig``, ``ResourceLimit``
- results and events: ``ParallelFlowResult``, ``CircuitState``, ``ParallelFlowCallback``,
  ``FlowContext``, ``CancelToken``
- fan-in helpers: ``first_success``, ``all_success``, ``majority``
- strategies: ``get_executor``, ``register_executor``, ``ParallelExecutor``
- clusters and apps: ``Cluster`` (where celery branches go), ``submit``, ``WorkflowRun``
  (enqueue whole workflows on run workers)
- errors: ``TeaDistError`` and its subclasses in ``tea_dist.core.errors``

Importing ``tea_dist`` (which importing any of its modules does first) wires the layers that
do not know one another: ``StateGraph.compile()`` builds the engine's ``CompiledGraph``; the
built-in strategies are registered by name (each executor imported on first use, so that
threads never import Celery); every ``Dispatcher`` gets the logging, metrics and tracing
listeners.
"""

from __future__ import annotations

from typing import Any

from tea_dist.core.config import (
    CircuitBreakerConfig,
    ParallelConfig,
    ResourceLimit,
    RetryPolicy,
)
from tea_dist.core.errors import TeaDistError
from tea_dist.core.graph import END, START, StateGraph, set_compiler
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.core.strategies import register_executor
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.runner import CompiledGraph
from tea_dist.engine.runtime import ParallelExecutor, get_executor
from tea_dist.observe import logs, metrics, tracing
from tea_dist.observe.events import FlowContext, ParallelFlowCallback, add_listener

set_compiler(CompiledGraph)
for _name, _path in (
    ("thread", "tea_dist.executors.thread:ThreadExecutor"),
    ("inline", "tea_dist.executors.inline:InlineExecutor"),
    ("process", "tea_dist.executors.process:ProcessExecutor"),
    ("asyncio", "tea_dist.executors.asyncio:AsyncioExecutor"),
    ("celery", "tea_dist.distributed.driver:CeleryExecutor"),
):
    register_executor(_name, _path)
for _listener in (logs.LogListener, metrics.listener, tracing.listener):
    add_listener(_listener)

__all__ = [
    "END",
    "START",
    "CancelToken",
    "CircuitBreakerConfig",
    "CircuitState",
    "Cluster",
    "FlowContext",
    "ParallelConfig",
    "ParallelExecutor",
    "ParallelFlowCallback",
    "ParallelFlowResult",
    "ResourceLimit",
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
    "load_yaml": "tea_dist.core.yaml_loader",
    "first_success": "tea_dist.policies.merge",
    "all_success": "tea_dist.policies.merge",
    "majority": "tea_dist.policies.merge",
    "Cluster": "tea_dist.distributed.cluster",
    "submit": "tea_dist.distributed.apps",
    "WorkflowRun": "tea_dist.distributed.apps",
}


def __getattr__(name: str) -> Any:
    """Import heavier parts (YAML, merge helpers, apps) on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tea_dist' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
