"""TD.13 AC6 lifecycle callbacks and the logging listener, on each in-process strategy.

Callbacks run in the caller's process on one lane per listener: an exception is logged and
swallowed, a hang is abandoned after ``callback_timeout``, and events of a branch arrive in
order. The logging listener writes one record per event, naming its run and branch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, ParallelFlowResult, RetryPolicy
from tea_dist.observe.events import FlowContext
from tests import nodes
from tests.nodes import fan_graph, final_state


class Recorder:
    """Records every lifecycle event as a tuple, in arrival order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.contexts: list[FlowContext] = []
        self.lock = threading.Lock()

    def _add(self, ctx: FlowContext, *item: Any) -> None:
        with self.lock:
            self.events.append(item)
            self.contexts.append(ctx)

    def on_flow_start(self, ctx: FlowContext) -> None:
        self._add(ctx, "start", ctx.branch)

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        self._add(ctx, "complete", ctx.branch, result)

    def on_flow_error(self, ctx: FlowContext, error: BaseException, attempt: int) -> None:
        self._add(ctx, "error", ctx.branch, error, attempt)

    def on_flow_timeout(self, ctx: FlowContext, timeout_seconds: float) -> None:
        self._add(ctx, "timeout", ctx.branch, timeout_seconds)

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException
    ) -> None:
        self._add(ctx, "retry", ctx.branch, attempt, delay)

    def of(self, branch: str) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[1] == branch]

    def kinds(self, branch: str) -> list[str]:
        return [e[0] for e in self.of(branch)]


class Exploding:
    """Every callback raises."""

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)

        def explode(*args: Any) -> None:
            raise RuntimeError(f"callback bug in {name}")

        return explode


class Hanging:
    """Its first ``on_flow_start`` hangs for 30 s (until released); other events are recorded."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.completed: list[str] = []
        self.starts = 0

    def on_flow_start(self, ctx: FlowContext) -> None:
        self.starts += 1
        if self.starts == 1:
            self.release.wait(30)

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        self.completed.append(ctx.branch)


@pytest.fixture
def hanging() -> Iterator[Hanging]:
    callback = Hanging()
    yield callback
    callback.release.set()


def error_name(error: BaseException) -> str:
    return getattr(error, "error_type", None) or type(error).__name__


def invoke(
    graph: Any, callbacks: list[Any], run_config: dict[str, Any] | None = None, **options: Any
) -> list[dict[str, Any]]:
    app = graph.compile(parallel_callbacks=callbacks, **options)
    return final_state(list(app.invoke({"value": 1}, config=run_config)))["results"]


def flaky_graph(strategy: str, **fields: Any) -> Any:
    policy = RetryPolicy(max_retries=2, base_delay=0.01)
    return fan_graph(
        {"flaky": nodes.flaky, "steady": nodes.add_one},
        config=ParallelConfig(strategy=strategy, retry_policy=policy, **fields),
    )


# -- unit --


def test_td13_unit_033_a_raising_callback_is_logged_and_the_flow_continues(
    strategy: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tea_dist.events"):
        results = invoke(
            flaky_graph(strategy), [Exploding()], {"counter_dir": str(tmp_path), "fail_times": 1}
        )
    assert [(r["branch"], r["success"]) for r in results] == [("flaky", True), ("steady", True)]
    assert results[1]["state"]["value"] == 2
    raised = [r for r in caplog.records if "raised; ignored" in r.getMessage()]
    logged = {r.getMessage().split(".")[1].split(" ")[0] for r in raised}
    assert {"on_flow_start", "on_flow_error", "on_flow_retry", "on_flow_complete"} <= logged
    assert all(r.exc_info and "callback bug" in str(r.exc_info[1]) for r in raised)


def test_td13_unit_034_a_hanging_callback_does_not_block_the_run(
    strategy: str, hanging: Hanging
) -> None:
    """An ``on_flow_start`` sleeps 30 s: it is abandoned after callback_timeout=0.5 s."""
    recorder = Recorder()
    g = fan_graph({"a": nodes.add_one, "b": nodes.double}, config=ParallelConfig(strategy=strategy))
    started = time.monotonic()
    results = invoke(g, [hanging, recorder], callback_timeout=0.5)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, elapsed
    assert [r["state"]["value"] for r in results] == [2, 2]
    assert sorted(hanging.completed) == ["a", "b"] and hanging.starts == 2  # later events arrive
    assert sorted(recorder.kinds("a") + recorder.kinds("b")) == [
        "complete",
        "complete",
        "start",
        "start",
    ]


def test_callback_timeout_defaults_to_five_seconds_and_must_be_positive() -> None:
    from tea_dist.core.errors import TeaDistError

    g = fan_graph({"a": nodes.add_one})
    assert g.compile().callback_timeout == 5.0
    with pytest.raises(TeaDistError, match="callback_timeout"):
        g.compile(callback_timeout=0)


def test_td13_unit_035_on_flow_start_gets_branch_and_state(strategy: str) -> None:
    recorder = Recorder()
    g = fan_graph({"a": nodes.add_one, "b": nodes.double}, config=ParallelConfig(strategy=strategy))
    invoke(g, [recorder])
    starts = {
        c.branch: c
        for c, e in zip(recorder.contexts, recorder.events, strict=True)
        if e[0] == "start"
    }
    assert sorted(starts) == ["a", "b"]
    for ctx in starts.values():
        assert ctx.state_snapshot == {
            "value": 1,
            "started": True,
        }  # the state the branch starts from
        assert ctx.fan_in_node == "merge" and ctx.graph_name == "fan" and ctx.attempt == 1
        assert ctx.run_id and ctx.start_time > 0 and ctx.config is not None


def test_td13_unit_036_on_flow_complete_gets_the_result(strategy: str) -> None:
    recorder = Recorder()
    g = fan_graph({"a": nodes.add_one, "bad": nodes.fail}, config=ParallelConfig(strategy=strategy))
    results = invoke(g, [recorder])
    completed = {e[1]: e[2] for e in recorder.events if e[0] == "complete"}
    assert all(isinstance(r, ParallelFlowResult) for r in completed.values())
    assert (
        completed["a"].success
        and completed["a"].state is not None
        and completed["a"].state["value"] == 2
    )
    assert not completed["bad"].success and completed["bad"].error_type == "ValueError"
    assert [completed[r["branch"]].to_dict() for r in results] == results  # the fan-in's results


def test_td13_unit_037_on_flow_error_gets_exception_and_attempt(
    strategy: str, tmp_path: Path
) -> None:
    recorder = Recorder()
    invoke(flaky_graph(strategy), [recorder], {"counter_dir": str(tmp_path), "fail_times": 2})
    errors = [e for e in recorder.events if e[0] == "error"]
    assert [(branch, attempt) for _, branch, _, attempt in errors] == [("flaky", 1), ("flaky", 2)]
    for (_, _, error, attempt), ctx in zip(
        errors,
        [c for c, e in zip(recorder.contexts, recorder.events, strict=True) if e[0] == "error"],
        strict=True,
    ):
        assert isinstance(error, BaseException) and error_name(error) == "RuntimeError"
        assert str(error) == f"attempt {attempt} failed" and ctx.attempt == attempt
        if strategy not in ("process", "celery"):  # in-process: the original exception itself
            assert isinstance(error, RuntimeError)


def test_td13_unit_038_on_flow_timeout_gets_the_timeout_seconds(strategy: str) -> None:
    recorder = Recorder()
    g = fan_graph(
        {"hang": nodes.cooperative_sleep, "ok": nodes.add_one},
        config=ParallelConfig(strategy=strategy, timeout_seconds=0.2),
    )
    invoke(g, [recorder])
    assert [e for e in recorder.events if e[0] == "timeout"] == [("timeout", "hang", 0.2)]
    assert recorder.kinds("hang") == ["start", "timeout", "complete"]
    assert recorder.of("hang")[-1][2].timeout is True


# -- integration --


def test_td13_int_019_one_failing_callback_does_not_stop_the_others(
    strategy: str, tmp_path: Path
) -> None:
    first, second = Recorder(), Recorder()
    invoke(
        flaky_graph(strategy),
        [first, Exploding(), second],
        {"counter_dir": str(tmp_path), "fail_times": 1},
    )
    assert first.kinds("flaky") == ["start", "error", "retry", "complete"]
    assert second.kinds("flaky") == first.kinds("flaky")
    assert second.kinds("steady") == ["start", "complete"]


def test_td13_int_020_callbacks_arrive_in_lifecycle_order(strategy: str, tmp_path: Path) -> None:
    recorder = Recorder()
    g = fan_graph(
        {"flaky": nodes.flaky, "hang": nodes.slow_then_fast, "steady": nodes.add_one},
        config=ParallelConfig(
            strategy=strategy,
            timeout_seconds=0.3,
            retry_policy=RetryPolicy(max_retries=2, base_delay=0.01, retry_on_timeout=True),
        ),
    )
    invoke(g, [recorder], {"counter_dir": str(tmp_path), "fail_times": 2, "slow_times": 1})
    assert recorder.kinds("flaky") == ["start", "error", "retry", "error", "retry", "complete"]
    assert recorder.kinds("hang") == ["start", "timeout", "retry", "complete"]
    assert recorder.kinds("steady") == ["start", "complete"]
    retries = [(e[2], e[3]) for e in recorder.of("flaky") if e[0] == "retry"]
    assert retries == [(1, 0.01), (2, 0.02)]
    assert all(r[2].success for r in recorder.events if r[0] == "complete")


def test_td13_int_021_logging_listener_records_every_event_with_run_and_branch(
    strategy: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """tea_dist has no tracing system of its own: the logging listener is its trace. Each
    lifecycle event a callback sees has one log record carrying the same run id and branch."""
    recorder = Recorder()
    app = flaky_graph(strategy).compile(parallel_callbacks=[recorder])
    with caplog.at_level(logging.DEBUG, logger="tea_dist.events"):
        for _ in range(2):
            list(app.invoke({"value": 1}, config={"counter_dir": str(tmp_path), "fail_times": 1}))
    seen = sorted(
        (f"on_flow_{e[0]}", c.run_id, c.branch)
        for c, e in zip(recorder.contexts, recorder.events, strict=True)
    )
    records = [r for r in caplog.records if hasattr(r, "run_id")]
    logged = sorted((r.event, r.run_id, r.branch) for r in records)  # type: ignore[attr-defined]
    assert logged == seen
    run_ids = {run_id for _, run_id, _ in seen}
    assert len(run_ids) == 2  # one per invocation
    assert all(r.run_id in r.getMessage() and r.branch in r.getMessage() for r in records)  # type: ignore[attr-defined]


def test_callbacks_with_only_some_methods_are_fine(strategy: str) -> None:
    class OnlyComplete:
        def __init__(self) -> None:
            self.branches: list[str] = []

        def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
            self.branches.append(result.branch)

    callback = OnlyComplete()
    invoke(
        fan_graph({"a": nodes.add_one, "b": nodes.fail}, config=ParallelConfig(strategy=strategy)),
        [callback],
    )
    assert sorted(callback.branches) == ["a", "b"]
