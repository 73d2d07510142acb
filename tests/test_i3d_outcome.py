"""One outcome per result: set where the result is built, carried on the wire as a string,
read by metrics, tracing, fail-fast and the Celery task states."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery.exceptions import Ignore
from prometheus_client import REGISTRY
from pydantic import ValidationError

from tea_dist import ParallelConfig, ParallelFlowResult
from tea_dist.core.results import Outcome
from tea_dist.distributed.tasks import BranchFailed, report
from tea_dist.engine.attempt import AttemptOutcome, ErrorInfo
from tea_dist.engine.lifecycle import AttemptState, build_result, stops_siblings
from tea_dist.observe import metrics
from tea_dist.observe.events import FlowContext

CONFIG = ParallelConfig()


def _built(error: ErrorInfo | None) -> ParallelFlowResult:
    state = AttemptState(branch="b", dispatched_at=0.0, attempts=1)
    outcome = AttemptOutcome(error is None, {"x": 1} if error is None else None, 0.0, 1.0, error)
    return build_result(state, CONFIG, error=error, outcome=outcome)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (None, Outcome.SUCCESS),
        (ErrorInfo.from_exception(ValueError("no")), Outcome.ERROR),
        (ErrorInfo.timed_out(1.0), Outcome.TIMEOUT),
        (ErrorInfo.circuit_open("c"), Outcome.CIRCUIT_OPEN),
        (ErrorInfo.cancelled("stop"), Outcome.CANCELLED),
        (ErrorInfo.lost("gone"), Outcome.LOST),
    ],
)
def test_build_result_sets_the_outcome(error: ErrorInfo | None, expected: Outcome) -> None:
    result = _built(error)
    assert result.outcome is expected
    assert result.to_dict()["outcome"] == expected.value  # a plain string on the wire
    assert ParallelFlowResult.model_validate_json(result.model_dump_json()) == result


def test_outcome_values_are_the_metric_labels() -> None:
    assert [o.value for o in Outcome] == [
        "success",
        "error",
        "timeout",
        "circuit_open",
        "cancelled",
        "lost",
    ]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"success": True, "state": {"v": 1}}, Outcome.SUCCESS),
        ({"success": False, "error_type": "ValueError"}, Outcome.ERROR),
        ({"success": False, "error_type": "TimeoutError", "timeout": True}, Outcome.TIMEOUT),
        ({"success": False, "error_type": "CircuitOpenError"}, Outcome.CIRCUIT_OPEN),
        ({"success": False, "error_type": "CancelledError"}, Outcome.CANCELLED),
        ({"success": False, "error_type": "WorkerLostError"}, Outcome.LOST),
    ],
)
def test_a_payload_without_outcome_still_parses(fields: dict[str, Any], expected: Outcome) -> None:
    payload = json.dumps({"branch": "b", **fields})
    assert ParallelFlowResult.model_validate_json(payload).outcome is expected
    assert ParallelFlowResult.from_dict({"branch": "b", **fields}).outcome is expected


def test_an_outcome_that_contradicts_success_is_refused() -> None:
    with pytest.raises(ValidationError, match="contradicts"):
        ParallelFlowResult(branch="b", success=True, outcome=Outcome.ERROR)


def _cancelled_otherwise_named() -> ParallelFlowResult:
    """A cancelled result whose error type says nothing of it: only ``outcome`` tells."""
    return ParallelFlowResult(
        branch="b", success=False, error_type="Shutdown", outcome=Outcome.CANCELLED
    )


def test_fail_fast_reads_the_outcome() -> None:
    fail_fast = ParallelConfig(fail_fast=True)
    assert not stops_siblings(fail_fast, _cancelled_otherwise_named())
    lost = ParallelFlowResult(branch="b", success=False, error_type="X", outcome=Outcome.LOST)
    assert stops_siblings(fail_fast, lost)


class _Task:
    def __init__(self) -> None:
        self.events: list[str] = []

    def send_event(self, name: str, **fields: Any) -> None:
        self.events.append(name)


def test_report_reads_the_outcome() -> None:
    task = _Task()
    with pytest.raises(Ignore):
        report(task, [_cancelled_otherwise_named()])
    assert task.events == ["task-revoked"]
    timed_out = ParallelFlowResult(
        branch="b", success=False, error_type="X", outcome=Outcome.TIMEOUT
    )
    with pytest.raises(BranchFailed):
        report(_Task(), [timed_out])


def test_metrics_count_branches_by_their_outcome() -> None:
    metrics.enable()
    try:
        listener = metrics.listener()
        assert listener is not None
        ctx = FlowContext(branch="b", fan_in_node="m", graph_name="i3d-outcome", config=CONFIG)
        labels = {"graph": "i3d-outcome", "branch": "b", "strategy": "thread"}

        def count(outcome: str) -> float:
            sample = REGISTRY.get_sample_value(
                "tea_dist_branches_total", {**labels, "outcome": outcome}
            )
            return sample or 0.0

        before = count("cancelled")
        listener.on_flow_complete(ctx, _cancelled_otherwise_named())
        assert count("cancelled") == before + 1
    finally:
        metrics.disable()
