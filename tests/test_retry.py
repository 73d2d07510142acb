"""TD.13 AC3 retries: the ``RetryPolicy`` and lifecycle decisions (no loop, no sleep),
then retries in running graphs on each in-process strategy."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig, RetryPolicy
from tea_dist.core.config import exception_names
from tea_dist.core.errors import BranchTimeoutError
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, ErrorInfo
from tea_dist.engine.lifecycle import BranchRun, Lifecycle
from tea_dist.engine.runtime import Runtime
from tests import nodes
from tests.nodes import fan_graph, final_state


class ServiceError(Exception):
    """A user exception matched by its dotted name."""


class FlakyServiceError(ServiceError):
    pass


def run(graph: Any, run_config: dict[str, Any], **state: Any) -> tuple[list[dict[str, Any]], float]:
    started = time.monotonic()
    events = list(graph.compile().invoke({"value": 1, **state}, config=run_config))
    return final_state(events)["results"], time.monotonic() - started


def cfg(strategy: str, policy: RetryPolicy, **fields: Any) -> ParallelConfig:
    return ParallelConfig(strategy=strategy, retry_policy=policy, **fields)


# -- unit: the policy is a pure object --


def test_td13_unit_014_retry_policy_defaults_mean_no_retry() -> None:
    policy = RetryPolicy()
    assert policy.max_retries == 0 and policy.base_delay == 1.0 and policy.max_delay == 60.0
    assert policy.backoff_multiplier == 2.0 and policy.jitter is False and policy.retry_on is None
    assert policy.retry_on_timeout is False and policy.max_stored_errors == 5
    assert policy.should_retry(ValueError("x"), 0) is False
    assert ParallelConfig().retry() == policy  # no policy configured: no retries


@pytest.mark.parametrize(
    ("base", "multiplier", "cap", "retry", "expected"),
    [
        (1.0, 2.0, 60.0, 0, 1.0),
        (1.0, 2.0, 60.0, 3, 8.0),
        (0.5, 3.0, 60.0, 2, 4.5),
        (0.1, 1.0, 60.0, 7, 0.1),  # multiplier 1: constant delay
        (2.0, 2.0, 10.0, 4, 10.0),  # 32 capped
    ],
)
def test_td13_unit_015_backoff_formula(
    base: float, multiplier: float, cap: float, retry: int, expected: float
) -> None:
    policy = RetryPolicy(base_delay=base, backoff_multiplier=multiplier, max_delay=cap)
    assert policy.delay_for(retry) == pytest.approx(min(base * multiplier**retry, cap))
    assert policy.delay_for(retry) == pytest.approx(expected)


def test_td13_unit_016_retry_on_filters_by_class_and_by_dotted_name() -> None:
    by_class = RetryPolicy(max_retries=1, retry_on=[ConnectionError])
    assert by_class.should_retry(ConnectionError("down"), 0)
    assert by_class.should_retry(ConnectionRefusedError("down"), 0)  # a subclass matches
    assert not by_class.should_retry(ValueError("bad"), 0)

    dotted = f"{__name__}.ServiceError"
    by_name = RetryPolicy(max_retries=1, retry_on=dotted)
    assert by_name.retry_on == (dotted,)
    assert by_name.should_retry(ServiceError(), 0) and by_name.should_retry(FlakyServiceError(), 0)
    assert not by_name.should_retry(RuntimeError(), 0)
    # across processes only names travel: the same decision from exception_names
    assert by_name.should_retry(exception_names(FlakyServiceError), 0)
    assert not by_name.should_retry(exception_names(RuntimeError), 0)
    assert RetryPolicy(max_retries=1, retry_on=["ConnectionError"]).should_retry(
        exception_names(ConnectionResetError), 0
    )
    with pytest.raises(ValueError, match="retry_on"):
        RetryPolicy(retry_on=[42])


def test_td13_unit_017_retry_on_none_retries_any_exception() -> None:
    policy = RetryPolicy(max_retries=2)
    for error in (ValueError(), KeyError("k"), ServiceError(), TimeoutError("user's own")):
        assert policy.should_retry(error, 0) and policy.should_retry(error, 1)
        assert not policy.should_retry(error, 2)  # attempts are 0-based: two retries only


def test_td13_unit_018_max_delay_caps_the_delay() -> None:
    policy = RetryPolicy(base_delay=10.0, backoff_multiplier=10.0, max_delay=15.0)
    assert [policy.delay_for(n) for n in range(4)] == [10.0, 15.0, 15.0, 15.0]
    jittered = policy.model_copy(update={"jitter": True})
    assert jittered.delay_for(9, rand=lambda: 1.0) == 15.0  # jitter never exceeds the cap


def test_td13_unit_019_delay_progression_1_2_4_8() -> None:
    policy = RetryPolicy(base_delay=1.0, backoff_multiplier=2.0)
    assert [policy.delay_for(n) for n in range(4)] == [1.0, 2.0, 4.0, 8.0]


def test_jitter_is_uniform_in_half_delay_to_delay() -> None:
    policy = RetryPolicy(base_delay=2.0, jitter=True)  # retry 1: delay 4
    assert policy.delay_for(1, rand=lambda: 0.0) == 2.0
    assert policy.delay_for(1, rand=lambda: 0.5) == 3.0
    assert policy.delay_for(1, rand=lambda: 1.0) == 4.0
    samples = [policy.delay_for(1) for _ in range(2000)]
    assert all(2.0 <= d <= 4.0 for d in samples)
    assert min(samples) < 2.2 and max(samples) > 3.8  # spread over the whole range


def test_timeouts_are_retried_only_with_retry_on_timeout() -> None:
    timeout = BranchTimeoutError("attempt timed out", error_type="TimeoutError")
    assert not RetryPolicy(max_retries=3).should_retry(timeout, 0)
    assert RetryPolicy(max_retries=3, retry_on_timeout=True).should_retry(timeout, 0)
    assert not RetryPolicy(max_retries=3, retry_on=[TimeoutError]).should_retry(timeout, 0)


# -- unit: the lifecycle's decision after each attempt (injected clock, no loop, no sleep) --


class FakeClock:
    """Monotonic and epoch time that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.now + 900.0


def failed(message: str = "boom", timeout: bool = False) -> AttemptOutcome:
    error = ErrorInfo.timed_out(0.1) if timeout else ErrorInfo.from_exception(ValueError(message))
    return AttemptOutcome(False, None, 1000.0, 1000.5, error=error)


def one_branch(**fields: Any) -> tuple[Lifecycle, BranchRun, FakeClock]:
    clock = FakeClock()
    task = BranchTask(
        spec=nodes.fan_graph({"b": nodes.add_one}).to_spec(), branch="b", fan_in="merge", state={}
    )
    life = Lifecycle.for_fanout([task], [ParallelConfig(**fields)], Runtime(), clock=clock)
    return life, life.runs[0], clock


def attempt(life: Lifecycle, run: BranchRun, outcome: AttemptOutcome) -> float | None:
    life.begin(run)
    return life.end(run, outcome)


def test_lifecycle_schedules_retries_with_backoff_then_finishes() -> None:
    life, run, clock = one_branch(retry_policy=RetryPolicy(max_retries=2, base_delay=0.5))
    assert attempt(life, run, failed("one")) == 0.5
    clock.now = 101.0
    assert attempt(life, run, failed("two")) == 1.0
    clock.now = 103.0
    assert attempt(life, run, failed("three")) is None
    result = run.result
    assert result is not None and not result.success
    assert result.retry_count == 2 and result.error == "three"
    assert [e["error"] for e in result.attempt_errors] == ["one", "two", "three"]


def test_lifecycle_success_after_retries_keeps_first_start() -> None:
    life, run, clock = one_branch(retry_policy=RetryPolicy(max_retries=2, base_delay=0.1))
    attempt(life, run, failed())
    clock.now = 101.0
    assert attempt(life, run, AttemptOutcome(True, {"v": 1}, 1001.0, 1001.2)) is None
    result = run.result
    assert result is not None and result.success and result.attempt_errors == []
    assert result.retry_count == 1 and result.start_time == 1000.0  # the first begin()
    assert result.timing_ms == pytest.approx(1200.0)


def test_lifecycle_gives_up_when_the_delay_would_cross_timeout_total() -> None:
    life, run, clock = one_branch(
        timeout_total=2.0, retry_policy=RetryPolicy(max_retries=5, base_delay=1.5)
    )
    clock.now = 100.2
    assert attempt(life, run, failed()) == 1.5  # 101.7 < 102
    clock.now = 101.8
    assert attempt(life, run, failed()) is None  # 101.8 + 3 > 102
    assert run.done


def test_lifecycle_does_not_retry_errors_outside_retry_on() -> None:
    life, run, _ = one_branch(retry_policy=RetryPolicy(max_retries=5, retry_on=[ConnectionError]))
    assert attempt(life, run, failed()) is None
    life, run, _ = one_branch(retry_policy=RetryPolicy(max_retries=5))
    assert attempt(life, run, failed(timeout=True)) is None


def test_lifecycle_keeps_the_last_max_stored_errors() -> None:
    life, run, _ = one_branch(
        retry_policy=RetryPolicy(max_retries=6, base_delay=0, max_stored_errors=3)
    )
    for i in range(7):
        attempt(life, run, failed(f"e{i + 1}"))
    assert run.result is not None
    assert [e["attempt"] for e in run.result.attempt_errors] == [5, 6, 7]
    assert run.result.retry_count == 6


# -- integration: retries in running graphs --


def test_td13_int_009_success_after_two_retries(strategy: str, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=2, base_delay=0.01)
    g = fan_graph({"flaky": nodes.flaky, "steady": nodes.add_one}, config=cfg(strategy, policy))
    (flaky, steady), _ = run(g, {"counter_dir": str(tmp_path), "fail_times": 2})
    assert flaky["success"] is True and flaky["retry_count"] == 2
    assert flaky["state"]["attempts"] == 3 and flaky["attempt_errors"] == []
    assert steady["success"] is True and steady["retry_count"] == 0


def test_td13_int_010_each_attempt_has_its_own_timeout(strategy: str, tmp_path: Path) -> None:
    """Two attempts hang and time out at 0.3 s each; the third takes 0.1 s and succeeds,
    although the branch as a whole has run more than twice the 0.3 s limit."""
    policy = RetryPolicy(max_retries=2, base_delay=0.01, retry_on_timeout=True)
    g = fan_graph({"b": nodes.slow_then_fast}, config=cfg(strategy, policy, timeout_seconds=0.3))
    (r,), elapsed = run(g, {"counter_dir": str(tmp_path), "slow_times": 2, "fast": 0.1})
    assert r["success"] is True and r["retry_count"] == 2 and r["state"]["attempts"] == 3
    assert r["timing_ms"] >= 690  # 0.3 + 0.3 + 0.1 s
    assert 0.69 <= elapsed < 2.0


def test_td13_int_011_exhausted_retries_report_every_attempt_error(strategy: str) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.01)
    g = fan_graph({"bad": nodes.fail}, config=cfg(strategy, policy))
    (r,), _ = run(g, {})
    assert r["success"] is False and r["retry_count"] == 3
    assert r["error"] == "boom" and r["error_type"] == "ValueError"
    assert r["attempt_errors"] == [
        {"attempt": n, "error": "boom", "error_type": "ValueError", "timeout": False}
        for n in (1, 2, 3, 4)
    ]


def test_attempt_errors_are_capped_by_max_stored_errors(strategy: str) -> None:
    policy = RetryPolicy(max_retries=5, base_delay=0.0, max_stored_errors=2)
    g = fan_graph({"bad": nodes.fail}, config=cfg(strategy, policy))
    (r,), _ = run(g, {})
    assert r["retry_count"] == 5 and [e["attempt"] for e in r["attempt_errors"]] == [5, 6]


def test_td13_int_012_a_waiting_retry_does_not_block_siblings(
    local_strategy: str, tmp_path: Path
) -> None:
    """One slot only: while 'flaky' waits 0.5 s for its retry, 'sibling' takes the slot and
    finishes. A retry that slept in its slot would make 'sibling' start after 'flaky' ended.
    (Celery: test_celery_retry_waits_without_blocking_a_sibling, on a real worker slot.)"""
    strategy = local_strategy
    policy = RetryPolicy(max_retries=1, base_delay=0.5)
    g = fan_graph(
        {"flaky": nodes.flaky, "sibling": nodes.sleep_node},
        config=cfg(strategy, policy, max_workers=1),
    )
    (flaky, sibling), elapsed = run(g, {"counter_dir": str(tmp_path), "fail_times": 1}, sleep=0.1)
    assert flaky["success"] is True and flaky["retry_count"] == 1
    assert sibling["success"] is True
    assert sibling["end_time"] < flaky["end_time"] - 0.2  # done while the retry waited
    assert flaky["end_time"] - flaky["start_time"] >= 0.5  # the retry did wait its delay
    assert elapsed < 1.5


def test_retries_of_many_branches_wait_concurrently(strategy: str, tmp_path: Path) -> None:
    """Eight branches each wait 0.4 s for a retry: the waits overlap (~0.4 s, not 3.2 s).

    In-process, a waiting retry holds no slot of ``max_workers``; on celery its task is still
    outstanding and counts (the worker slots are what it does not hold)."""
    policy = RetryPolicy(max_retries=1, base_delay=0.4)
    slots = None if strategy == "celery" else 2
    g = fan_graph(
        {f"f{i}": nodes.flaky for i in range(8)}, config=cfg(strategy, policy, max_workers=slots)
    )
    results, elapsed = run(g, {"counter_dir": str(tmp_path), "fail_times": 1})
    assert all(r["success"] and r["retry_count"] == 1 for r in results)
    assert elapsed < 1.5, elapsed


def test_td13_int_013_retry_logs_attempt_delay_and_error(
    strategy: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = RetryPolicy(max_retries=2, base_delay=0.05)
    g = fan_graph({"flaky": nodes.flaky}, config=cfg(strategy, policy))
    with caplog.at_level(logging.INFO, logger="tea_dist"):
        run(g, {"counter_dir": str(tmp_path), "fail_times": 2})
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2, retries
    first, second = retries
    assert "flaky" in first and "attempt 1" in first and "0.050s" in first
    assert "RuntimeError" in first and "attempt 1 failed" in first
    assert "attempt 2" in second and "0.100s" in second and "attempt 2 failed" in second


def test_retry_on_matches_the_original_exception_on_every_strategy(
    strategy: str, tmp_path: Path
) -> None:
    """retry_on=[ConnectionError]: a ConnectionError is retried, a ValueError is not (the
    process strategy matches by the exception's names)."""
    policy = RetryPolicy(max_retries=2, base_delay=0.01, retry_on=[ConnectionError])
    g = fan_graph(
        {"conn": nodes.raise_named, "value": nodes.raise_named}, config=cfg(strategy, policy)
    )
    run_config = {
        "counter_dir": str(tmp_path),
        "raise": {"conn": "ConnectionResetError", "value": "ValueError"},
    }
    (conn, value), _ = run(g, run_config)
    assert conn["retry_count"] == 2 and nodes.calls(tmp_path, "conn") == 3
    assert conn["error_type"] == "ConnectionResetError"
    assert value["retry_count"] == 0 and nodes.calls(tmp_path, "value") == 1


def test_td13_unit_attempt_state_keeps_one_error_per_attempt() -> None:
    # the worker's per-attempt timeout and the caller's timeout_total can both end attempt 2
    from tea_dist.engine.lifecycle import AttemptState

    state = AttemptState(branch="b", dispatched_at=0.0, attempts=1)
    state.note(ErrorInfo.timed_out(0.3), keep=5)
    state.attempts = 2
    state.note(ErrorInfo.timed_out(0.3), keep=5)
    state.note(ErrorInfo.timed_out(0.5, "branch"), keep=5)
    assert [e["attempt"] for e in state.errors] == [1, 2]
    assert "branch timed out after 0.5s" in state.errors[-1]["error"]
