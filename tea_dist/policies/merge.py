"""Fan-in merge helpers: ``first_success``, ``all_success``, ``majority``.

Each takes a fan-in's ``parallel_results`` (``ParallelFlowResult``s, in declaration order) and
returns branch state, or raises ``MergeError`` naming the failed branches and their errors when
the merge is impossible:

    def merge(state, parallel_results):
        return first_success(parallel_results)          # alternative paths: first that worked

    def gather(state, parallel_results):
        return {"hits": [s["hits"] for s in all_success(parallel_results)]}   # need them all

    def vote(state, parallel_results):
        return majority(parallel_results)                # most common answer wins

Plain dicts are accepted too: a mapping with a ``success`` key is read like a result, any
other mapping is taken as a successful branch's state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tea_dist.core.errors import MergeError

__all__ = ["all_success", "first_success", "majority"]


@dataclass(frozen=True)
class _Outcome:
    branch: str
    success: bool
    state: dict[str, Any]
    error: str


def _outcome(index: int, result: Any) -> _Outcome:
    if isinstance(result, Mapping) and "success" not in result:
        return _Outcome(f"#{index}", True, dict(result), "")
    get = getattr(result, "get", None)
    if get is None:
        raise MergeError(f"result #{index} is neither a ParallelFlowResult nor a dict: {result!r}")
    success = bool(get("success"))
    error = "" if success else f"{get('error_type') or 'Error'}: {get('error') or 'failed'}"
    return _Outcome(str(get("branch") or f"#{index}"), success, dict(get("state") or {}), error)


def _outcomes(parallel_results: Iterable[Any]) -> list[_Outcome]:
    return [_outcome(i, result) for i, result in enumerate(parallel_results)]


def _failures(outcomes: Iterable[_Outcome]) -> str:
    return ", ".join(f"'{o.branch}' ({o.error})" for o in outcomes if not o.success)


def first_success(parallel_results: Iterable[Any]) -> dict[str, Any]:
    """The state of the first successful branch, in declaration order.

    Raises ``MergeError`` when no branch succeeded (or there are no results).
    """
    outcomes = _outcomes(parallel_results)
    for outcome in outcomes:
        if outcome.success:
            return outcome.state
    if not outcomes:
        raise MergeError("first_success: there are no branch results to merge")
    raise MergeError(f"first_success: no branch succeeded: {_failures(outcomes)}")


def all_success(parallel_results: Iterable[Any]) -> list[dict[str, Any]]:
    """Every branch's state, in declaration order, provided every branch succeeded.

    Returns a list rather than one merged dict: how branch states combine (append, sum,
    override) is the fan-in's decision. Raises ``MergeError`` naming every failed branch.
    """
    outcomes = _outcomes(parallel_results)
    if any(not o.success for o in outcomes):
        failed = sum(not o.success for o in outcomes)
        raise MergeError(
            f"all_success: {failed} of {len(outcomes)} branches failed: {_failures(outcomes)}"
        )
    return [o.state for o in outcomes]


def canonical(state: Mapping[str, Any]) -> str:
    """A state as canonical JSON (sorted keys; non-JSON values by ``repr``): its vote key."""
    return json.dumps(state, sort_keys=True, separators=(",", ":"), default=repr)


def majority(parallel_results: Iterable[Any]) -> dict[str, Any]:
    """The most common state among the successful branches.

    States are compared by their canonical JSON; a tie goes to the state whose first branch
    comes first in declaration order. Failed branches do not vote. Raises ``MergeError``
    when no branch succeeded.
    """
    outcomes = _outcomes(parallel_results)
    votes: dict[str, list[_Outcome]] = {}
    for outcome in outcomes:
        if outcome.success:
            votes.setdefault(canonical(outcome.state), []).append(outcome)
    if not votes:
        if not outcomes:
            raise MergeError("majority: there are no branch results to merge")
        raise MergeError(f"majority: no branch succeeded: {_failures(outcomes)}")
    # dicts keep insertion order, and max() keeps the first of equal counts
    winner = max(votes.values(), key=len)
    return winner[0].state
