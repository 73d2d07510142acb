"""ParallelFlowResult structure and backwards compatibility (TD.13 AC2, AC5)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from tea_dist import ParallelConfig, ParallelFlowResult, RetryPolicy
from tea_dist.core.results import CircuitState
from tea_dist.engine.attempt import ErrorInfo
from tests import nodes
from tests.nodes import fan_graph, final_state


def results_of(
    graph_branches: dict[str, Any], config: ParallelConfig | None = None
) -> list[dict[str, Any]]:
    state = final_state(
        list(fan_graph(graph_branches, config=config).compile().invoke({"value": 1}))
    )
    return state["results"]


def test_td13_unit_007_success_result_fields() -> None:
    (r,) = results_of({"a": nodes.add_one})
    assert r["success"] is True and r["branch"] == "a"
    assert r["state"]["value"] == 2 and r["error"] is None and r["error_type"] is None
    assert r["timeout"] is False and r["retry_count"] == 0 and r["attempt_errors"] == []
    assert r["timing_ms"] >= 0 and r["worker"]


def test_td13_unit_008_failure_result_fields() -> None:
    (r,) = results_of({"a": nodes.fail})
    assert r["success"] is False and r["state"] is None
    assert r["error"] == "boom" and r["error_type"] == "ValueError"
    assert r["timeout"] is False and r["traceback"] is None
    assert r["attempt_errors"] == [
        {"attempt": 1, "error": "boom", "error_type": "ValueError", "timeout": False}
    ]


def test_td13_unit_009_timing_ms_is_end_minus_start() -> None:
    (r,) = results_of({"a": nodes.sleep_node})
    assert r["end_time"] >= r["start_time"]
    assert r["timing_ms"] == pytest.approx((r["end_time"] - r["start_time"]) * 1000, abs=0.01)
    assert r["timing_ms"] >= 45  # the node sleeps 50 ms


def test_td13_unit_010_dict_like_access_to_state() -> None:
    r = ParallelFlowResult(branch="a", success=True, state={"value": 3})
    assert r["state"] == {"value": 3} and r["value"] == 3 and r["success"] is True
    with pytest.raises(KeyError):
        r["missing"]


def test_td13_unit_011_get_with_default() -> None:
    r = ParallelFlowResult(branch="a", success=True, state={"value": 3})
    assert r.get("value", 0) == 3 and r.get("other", 7) == 7 and r.get("branch") == "a"
    failed = ParallelFlowResult(branch="b", success=False, state=None, error="x")
    assert failed.get("value", 0) == 0 and "value" not in failed and "error" in failed


def test_td13_unit_012_error_type_is_exception_class_name() -> None:
    (r,) = results_of({"a": nodes.fail_connection})
    assert r["error_type"] == "ConnectionError" and r["error"] == "service down"


def test_td13_unit_013_traceback_only_when_asked_and_without_locals() -> None:
    secret = "hunter2"  # a local of the failing frame must never leak

    def leaky(state: dict[str, Any]) -> dict[str, Any]:
        password = secret  # noqa: F841
        raise ValueError("bad")

    (off,) = results_of({"a": leaky})
    (on,) = results_of({"a": leaky}, ParallelConfig(include_traceback=True))
    assert off["traceback"] is None
    assert "Traceback (most recent call last)" in on["traceback"]
    assert "leaky" in on["traceback"] and "ValueError: bad" in on["traceback"]
    assert "hunter2" not in on["traceback"]


def test_result_json_round_trip() -> None:
    r = ParallelFlowResult(
        branch="a",
        success=False,
        error="slow",
        error_type="TimeoutError",
        timeout=True,
        timing_ms=12.5,
        start_time=time.time(),
        end_time=time.time(),
        circuit_state=CircuitState.HALF_OPEN,
        attempt_errors=[
            {"attempt": 1, "error": "slow", "error_type": "TimeoutError", "timeout": True}
        ],
    )
    text = json.dumps(r.to_dict())
    assert ParallelFlowResult.from_dict(json.loads(text)) == r


def test_result_is_frozen_and_rejects_unknown_fields() -> None:
    r = ParallelFlowResult(branch="a", success=True)
    with pytest.raises(ValidationError):
        r.success = False  # type: ignore[misc]
    with pytest.raises(ValidationError, match="bogus"):
        ParallelFlowResult(branch="a", success=True, bogus=1)  # type: ignore[call-arg]


def test_models_name_the_bad_field() -> None:
    with pytest.raises(ValidationError, match="timeout_seconds"):
        ParallelConfig(timeout_seconds=-1)
    with pytest.raises(ValidationError, match="max_retries"):
        RetryPolicy(max_retries=-2)
    with pytest.raises(ValidationError, match="unknown_field"):
        ParallelConfig(unknown_field=1)  # type: ignore[call-arg]


def test_error_info_keeps_exception_names_for_retry_matching() -> None:
    info = ErrorInfo.from_exception(ConnectionRefusedError("no"))
    assert info.type_name == "ConnectionRefusedError"
    assert "ConnectionError" in info.names and "OSError" in info.names
