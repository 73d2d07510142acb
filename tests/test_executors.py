"""The executor abstraction (seed 002): protocol, factory, default, same results everywhere."""

from __future__ import annotations

import inspect
import os
from typing import Any

import pytest

from tea_dist import ParallelConfig, ParallelExecutor, get_executor
from tea_dist.core.errors import ConfigError
from tea_dist.core.strategies import known_strategies
from tea_dist.executors.asyncio import AsyncioExecutor
from tea_dist.executors.process import ProcessExecutor
from tea_dist.executors.thread import ThreadExecutor
from tests import nodes
from tests.nodes import fan_graph, final_state

VOLATILE = ("timing_ms", "start_time", "end_time", "worker")


def stable_results(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    """Fan-in keeping what must not depend on the strategy (not timing, not the worker)."""
    return {
        "results": [
            {k: v for k, v in r.to_dict().items() if k not in VOLATILE} for r in parallel_results
        ]
    }


def test_p001_unit_001_protocol_defines_execute_and_check() -> None:
    execute = inspect.signature(ParallelExecutor.execute)
    check = inspect.signature(ParallelExecutor.check)
    assert list(execute.parameters) == ["self", "tasks", "configs", "runtime"]
    assert list(check.parameters) == ["self", "spec", "fanout"]
    assert not isinstance(object(), ParallelExecutor)


def test_p001_unit_002_thread_executor_implements_protocol() -> None:
    assert isinstance(ThreadExecutor(), ParallelExecutor)


def test_p001_unit_003_process_executor_implements_protocol() -> None:
    assert isinstance(ProcessExecutor(), ParallelExecutor)
    assert isinstance(AsyncioExecutor(), ParallelExecutor)


def test_p001_int_001_factory_returns_executor_types() -> None:
    assert type(get_executor("thread")) is ThreadExecutor
    assert type(get_executor("process")) is ProcessExecutor
    assert type(get_executor("asyncio")) is AsyncioExecutor
    assert get_executor(" Process ") is get_executor("process")  # one shared instance


def test_p001_unit_007_unknown_strategy_error_lists_known_ones() -> None:
    assert {"thread", "process", "asyncio", "celery"} <= set(known_strategies())
    with pytest.raises(ConfigError, match="unknown parallel strategy 'gpu'") as info:
        get_executor("gpu")
    assert "asyncio, celery, inline, process, thread" in str(info.value)


def test_p001_e2e_002_default_strategy_is_thread() -> None:
    assert ParallelConfig().strategy == "thread"
    state = final_state(list(fan_graph({"a": nodes.where}).compile().invoke({})))
    (result,) = state["results"]
    assert result["state"]["pid"] == os.getpid()
    assert result["state"]["thread"].startswith("tea-dist-branch")


@pytest.mark.parametrize("strategy", ["process", "asyncio"])
def test_p001_int_002_thread_results_identical_across_strategies(strategy: str) -> None:
    branches = {
        "inc": nodes.add_one,
        "dbl": nodes.double,
        "mut": nodes.mutate_in_place,
        "bad": nodes.fail,
        "conn": nodes.fail_connection,
    }
    start = {"value": 3, "items": ["orig"]}

    def run(config: ParallelConfig) -> dict[str, Any]:
        graph = fan_graph(branches, config=config, fan_in=stable_results)
        return final_state(list(graph.compile().invoke(start)))

    reference = run(ParallelConfig(strategy="thread"))
    other = run(ParallelConfig(strategy=strategy))
    assert other == reference
    assert [r["success"] for r in reference["results"]] == [True, True, True, False, False]
    assert reference["results"][3]["error_type"] == "ValueError"


class _Concurrency:
    """Counts how many nodes run at once (thread strategy: one process, one counter)."""

    def __init__(self) -> None:
        import threading

        self.lock, self.now, self.peak = threading.Lock(), 0, 0

    def node(self, state: dict[str, Any]) -> dict[str, Any]:
        import time

        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        time.sleep(0.02)
        with self.lock:
            self.now -= 1
        return {}


def test_p001_int_003_thread_executor_respects_max_workers() -> None:
    counter = _Concurrency()
    g = fan_graph({f"b{i}": counter.node for i in range(12)}, config=ParallelConfig(max_workers=3))
    state = final_state(list(g.compile().invoke({})))
    assert state["ok"] == [True] * 12 and counter.peak == 3


def test_p001_int_004_thread_executor_integrates_with_retry_policy(tmp_path: Any) -> None:
    from tea_dist import RetryPolicy

    policy = RetryPolicy(max_retries=2, base_delay=0.01)
    g = fan_graph({"flaky": nodes.flaky}, config=ParallelConfig(retry_policy=policy))
    state = final_state(list(g.compile().invoke({}, {"counter_dir": str(tmp_path)})))
    (result,) = state["results"]
    assert result["success"] and result["retry_count"] == 2


def test_p001_int_005_thread_executor_integrates_with_circuit_breaker() -> None:
    from tea_dist import CircuitBreakerConfig

    breaker = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60)
    app = fan_graph({"bad": nodes.fail}, config=ParallelConfig(circuit_breaker=breaker)).compile()
    first = final_state(list(app.invoke({})))["results"][0]
    second = final_state(list(app.invoke({})))["results"][0]
    assert first["error_type"] == "ValueError" and second["error_type"] == "CircuitOpenError"


def test_p001_int_006_thread_executor_signals_the_cancel_token() -> None:
    import time

    woke: list[bool] = []

    def waits(state: dict[str, Any], cancel_token: Any) -> dict[str, Any]:
        woke.append(cancel_token.wait(5))  # True only when the token is set
        return {}

    g = fan_graph({"waits": waits}, config=ParallelConfig(timeout_seconds=0.2))
    started = time.monotonic()
    (result,) = final_state(list(g.compile().invoke({})))["results"]
    assert result["timeout"] is True and time.monotonic() - started < 2
    deadline = time.monotonic() + 2
    while not woke and time.monotonic() < deadline:
        time.sleep(0.01)
    assert woke == [True]


def test_inline_strategy_runs_branches_in_order_in_the_callers_thread(tmp_path: Any) -> None:
    import threading

    from tea_dist import RetryPolicy

    seen: list[tuple[str, str]] = []

    def where(state: dict[str, Any], node: str) -> dict[str, Any]:
        seen.append((node, threading.current_thread().name))
        return {"value": 1}

    config = ParallelConfig(
        strategy="inline", retry_policy=RetryPolicy(max_retries=1, base_delay=0)
    )
    g = fan_graph({"a": where, "b": where, "flaky": nodes.flaky}, config=config)
    state = final_state(
        list(g.compile().invoke({}, {"counter_dir": str(tmp_path), "fail_times": 1}))
    )
    caller = threading.current_thread().name
    assert seen == [("a", caller), ("b", caller)]
    assert state["ok"] == [True, True, True] and state["results"][2]["retry_count"] == 1
