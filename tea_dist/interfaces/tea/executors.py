"""The Edge Agent's executor API: pools of workers used as context managers.

TEA code that drives parallel work by hand (``get_executor("thread", max_workers=4)``,
``with executor: executor.submit(fn, *args)``) keeps working. ``ThreadExecutor`` is a thread
pool whose calls run in the submitter's ``contextvars`` context (as TEA's did, so tracing
spans nest); ``ProcessExecutor`` is a process pool started the way tea_dist's process strategy
starts its workers (``forkserver`` where available, never ``fork``), whose ``validate_state``
names the first state key that cannot be pickled.

These pools are for hand-driven work; graphs choose their strategy with
``ParallelConfig(strategy=...)`` and never go through this module.
"""

from __future__ import annotations

import contextvars
import multiprocessing
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import wait as wait_all
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError, SerializationError


class PickleValidationError(SerializationError):
    """A state value cannot be pickled for another process (TEA's signature and message)."""

    def __init__(self, key: str, flow_index: int, original_error: BaseException) -> None:
        super().__init__(
            f"State key '{key}' in flow {flow_index} is not picklable: {original_error}",
            key=key,
            flow_index=flow_index,
        )
        self.original_error = original_error

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.flow_index, self.original_error))


@dataclass
class FlowTask:
    """One parallel flow to submit: what ``submit_flow`` hands to the flow runner."""

    branch: str
    flow_func: Callable[..., Any] | None
    state: dict[str, Any]
    config: dict[str, Any]
    fan_in_node: str
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    start_time: float = field(default_factory=time.time)


@dataclass
class ExecutorResult:
    """A submitted flow: its future and what it was."""

    future: Future[Any]
    branch: str
    parallel_config: ParallelConfig
    start_time: float


@runtime_checkable
class ParallelExecutor(Protocol):
    """What every executor of this API offers."""

    @property
    def strategy(self) -> str: ...

    @property
    def max_workers(self) -> int | None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]: ...

    def submit_flow(self, task: FlowTask, flow_runner: Callable[..., Any]) -> ExecutorResult: ...

    def validate_state(self, state: dict[str, Any], flow_index: int = 0) -> None: ...


class _Executor:
    """Shared behaviour: usable only inside ``with``; ``submit_flow`` calls
    ``flow_runner(branch, state, config, fan_in_node, parallel_config, start_time)``."""

    strategy = ""

    def __init__(self, max_workers: int | None = None) -> None:
        if max_workers is not None and max_workers < 1:
            raise ConfigError(f"max_workers must be >= 1, got {max_workers}")
        self._max_workers = max_workers
        self._open = False
        self._futures: set[Future[Any]] = set()

    @property
    def max_workers(self) -> int | None:
        return self._max_workers

    def __enter__(self) -> Any:
        self._start()
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        wait_all(list(self._futures))
        self._futures.clear()
        self._stop()

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        if not self._open:
            raise RuntimeError(
                f"{type(self).__name__} is not open: use it as a context manager "
                f"('with executor: executor.submit(...)')"
            )
        future = self._submit(fn, args, kwargs)
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        return future

    def submit_flow(self, task: FlowTask, flow_runner: Callable[..., Any]) -> ExecutorResult:
        future = self.submit(
            flow_runner,
            task.branch,
            task.state,
            task.config,
            task.fan_in_node,
            task.parallel_config,
            task.start_time,
        )
        return ExecutorResult(future, task.branch, task.parallel_config, task.start_time)

    def validate_state(self, state: dict[str, Any], flow_index: int = 0) -> None:
        """Raise if ``state`` cannot go to this executor's workers (threads take anything)."""

    def _start(self) -> None: ...

    def _stop(self) -> None: ...

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        raise NotImplementedError


class ThreadExecutor(_Executor):
    """Calls on threads of this process, each in the submitter's ``contextvars`` context."""

    strategy = "thread"

    def _start(self) -> None:
        self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="tea-executor")

    def _stop(self) -> None:
        self._pool.shutdown(wait=True)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        context = contextvars.copy_context()
        return self._pool.submit(context.run, fn, *args, **kwargs)


class ProcessExecutor(_Executor):
    """Calls in worker processes; the callable and its arguments must pickle."""

    strategy = "process"

    def _start(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool = ProcessPoolExecutor(self._max_workers, mp_context=context)

    def _stop(self) -> None:
        self._pool.shutdown(wait=True)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    def validate_state(self, state: dict[str, Any], flow_index: int = 0) -> None:
        """``PickleValidationError`` naming the first key whose value cannot be pickled."""
        for key, value in state.items():
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise PickleValidationError(key, flow_index, exc) from exc


_REGISTRY: dict[str, type] = {"thread": ThreadExecutor, "process": ProcessExecutor}


def get_executor(strategy: str = "thread", max_workers: int | None = None) -> Any:
    """A new executor of ``strategy`` (``ConfigError``, also a ``ValueError``, when unknown)."""
    cls = _REGISTRY.get(strategy)
    if cls is None:
        raise ConfigError(
            f"Unknown parallel strategy: '{strategy}'. "
            f"Valid strategies are: {', '.join(available_strategies())}"
        )
    return cls(max_workers=max_workers)


def register_executor(name: str, executor_class: type) -> None:
    """Make ``get_executor(name)`` return ``executor_class(max_workers=...)``."""
    if not name:
        raise ConfigError("an executor needs a non-empty name")
    _REGISTRY[name] = executor_class


def available_strategies() -> list[str]:
    """Names ``get_executor`` knows, sorted."""
    return sorted(_REGISTRY)
