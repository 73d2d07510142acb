"""Fan-in merge helpers (seed 004): first_success, all_success, majority."""

from __future__ import annotations

from typing import Any

import pytest

import tea_dist
from tea_dist import ParallelFlowResult
from tea_dist.core.errors import MergeError
from tea_dist.policies.merge import all_success, first_success, majority
from tests import nodes
from tests.nodes import fan_graph, final_state


def ok(branch: str, **state: Any) -> ParallelFlowResult:
    return ParallelFlowResult(branch=branch, success=True, state=state)


def failed(branch: str, error: str = "boom", error_type: str = "ValueError") -> ParallelFlowResult:
    return ParallelFlowResult(branch=branch, success=False, error=error, error_type=error_type)


def test_helpers_are_exported_by_the_package() -> None:
    assert tea_dist.first_success is first_success
    assert tea_dist.all_success is all_success
    assert tea_dist.majority is majority


def test_first_success_takes_the_first_successful_branch_in_declaration_order() -> None:
    results = [failed("a"), ok("b", value=2), ok("c", value=3)]
    assert first_success(results) == {"value": 2}


def test_first_success_without_any_success_names_every_failure() -> None:
    results = [failed("a"), failed("b", "attempt timed out after 1s", "TimeoutError")]
    with pytest.raises(MergeError) as info:
        first_success(results)
    assert str(info.value) == (
        "first_success: no branch succeeded: 'a' (ValueError: boom), "
        "'b' (TimeoutError: attempt timed out after 1s)"
    )
    with pytest.raises(MergeError, match="no branch results"):
        first_success([])


def test_all_success_returns_every_state_in_order() -> None:
    assert all_success([ok("a", value=1), ok("b", value=2)]) == [{"value": 1}, {"value": 2}]
    assert all_success([]) == []


def test_all_success_with_a_failure_names_the_failed_branches() -> None:
    results = [ok("a", value=1), failed("b"), failed("c", "down", "ConnectionError")]
    with pytest.raises(MergeError) as info:
        all_success(results)
    assert str(info.value) == (
        "all_success: 2 of 3 branches failed: 'b' (ValueError: boom), 'c' (ConnectionError: down)"
    )


def test_majority_returns_the_most_common_state() -> None:
    results = [ok("a", v=1), ok("b", v=2, w=[1]), failed("x"), ok("c", w=[1], v=2)]
    assert majority(results) == {"v": 2, "w": [1]}


def test_majority_tie_goes_to_declaration_order() -> None:
    assert majority([ok("a", v=1), ok("b", v=2), ok("c", v=2), ok("d", v=1)]) == {"v": 1}
    assert majority([failed("a"), ok("b", v=2), ok("c", v=1)]) == {"v": 2}


def test_majority_without_any_success_is_a_merge_error() -> None:
    with pytest.raises(MergeError, match=r"^majority: no branch succeeded: 'a' \(ValueError"):
        majority([failed("a")])
    with pytest.raises(MergeError, match="no branch results"):
        majority([])


def test_plain_dict_results_are_accepted() -> None:
    assert first_success([{"value": 1}]) == {"value": 1}
    as_dicts = [failed("a").to_dict(), ok("b", value=2).to_dict()]
    assert first_success(as_dicts) == {"value": 2}
    with pytest.raises(MergeError, match="neither a ParallelFlowResult nor a dict"):
        first_success([42])


def test_merge_helpers_in_a_fan_in_node() -> None:
    def merge(parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        return first_success(parallel_results)

    graph = fan_graph({"bad": nodes.fail, "good": nodes.add_one}, fan_in=merge)
    assert final_state(list(graph.compile().invoke({"value": 1})))["value"] == 2

    def strict(parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        return {"states": all_success(parallel_results)}

    graph = fan_graph({"bad": nodes.fail, "good": nodes.add_one}, fan_in=strict)
    (event,) = list(graph.compile().invoke({"value": 1}))
    assert event["type"] == "error" and event["error_type"] == "MergeError"
    assert "'bad' (ValueError: boom)" in event["error"]
