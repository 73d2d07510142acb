"""The Edge Agent's API on tea_dist: change ``the_edge_agent`` to ``tea_dist.interfaces.tea``.

Every name here is what TEA's own code and tests import from ``the_edge_agent``,
``the_edge_agent.parallel``, ``the_edge_agent.parallel_executors`` and
``the_edge_agent.serialization``, running on tea_dist's engine (and so on every strategy:
``thread``, ``process``, ``asyncio``, ``celery``):

- graphs: ``StateGraph`` (TEA's defaults: ``compile()`` returns the graph, TEA's rule for
  failed branches, TEA's circuit states), ``START``, ``END``, ``YAMLEngine``;
- policies and results: ``ParallelConfig``, ``RetryPolicy``, ``CircuitBreakerConfig``,
  ``CircuitState``, ``ParallelFlowResult``;
- circuits: ``CircuitBreaker``, ``CircuitBreakerRegistry``, ``CircuitOpenError``,
  ``RetryExhaustedError``;
- callbacks: ``ParallelFlowCallback``, ``ParallelFlowContext``, ``CallbackManager``,
  ``CancellationToken``;
- executors: ``ParallelExecutor``, ``ThreadExecutor``, ``ProcessExecutor``, ``FlowTask``,
  ``ExecutorResult``, ``PickleValidationError``, ``get_executor``, ``register_executor``,
  ``available_strategies``;
- JSON: ``TeaJSONEncoder``, ``dumps``.
"""

from __future__ import annotations

from tea_dist.core.config import CircuitBreakerConfig, ParallelConfig, RetryPolicy
from tea_dist.core.graph import END, START
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.interfaces.tea.callbacks import (
    CallbackManager,
    CancellationToken,
    ParallelFlowContext,
)
from tea_dist.interfaces.tea.circuits import (
    CircuitBreaker,
    CircuitBreakerRegistry,
    CircuitOpenError,
    RetryExhaustedError,
)
from tea_dist.interfaces.tea.executors import (
    ExecutorResult,
    FlowTask,
    ParallelExecutor,
    PickleValidationError,
    ProcessExecutor,
    ThreadExecutor,
    available_strategies,
    get_executor,
    register_executor,
)
from tea_dist.interfaces.tea.graph import StateGraph
from tea_dist.interfaces.tea.serialization import TeaJSONEncoder, dumps
from tea_dist.interfaces.tea.yaml_engine import YAMLEngine
from tea_dist.observe.events import ParallelFlowCallback

__all__ = [
    "END",
    "START",
    "CallbackManager",
    "CancellationToken",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakerRegistry",
    "CircuitOpenError",
    "CircuitState",
    "ExecutorResult",
    "FlowTask",
    "ParallelConfig",
    "ParallelExecutor",
    "ParallelFlowCallback",
    "ParallelFlowContext",
    "ParallelFlowResult",
    "PickleValidationError",
    "ProcessExecutor",
    "RetryExhaustedError",
    "RetryPolicy",
    "StateGraph",
    "TeaJSONEncoder",
    "ThreadExecutor",
    "YAMLEngine",
    "available_strategies",
    "dumps",
    "get_executor",
    "register_executor",
]
