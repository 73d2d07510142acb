"""Node callables for the trust-boundary tests: this module imports what an attacker would like
to reach through it (``os``, ``subprocess``, ``logging.config``) and defines a few callables of
every kind a reference may name."""

from __future__ import annotations

import logging.config  # noqa: F401  (reachable as an attribute: must never be followed)
import os  # noqa: F401
import subprocess  # noqa: F401
from json import dumps  # noqa: F401  (imported, not defined here)
from typing import Any

from tea_dist import StateGraph


def ok(state: dict[str, Any]) -> dict[str, Any]:
    return {"value": state.get("value", 0) + 1}


class Steps:
    """Dotted qualnames: a static method and a class method defined here."""

    @staticmethod
    def add_one(state: dict[str, Any]) -> dict[str, Any]:
        return {"value": state.get("value", 0) + 1}

    @classmethod
    def add_two(cls, state: dict[str, Any]) -> dict[str, Any]:
        return {"value": state.get("value", 0) + 2}


def collect(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    return {"results": [r.to_dict() for r in parallel_results]}


def graph() -> StateGraph:
    """A graph factory defined here (a submitted ``tests.boundary_nodes:graph``)."""
    g = StateGraph({"value": int})
    g.add_node("start", run=ok)
    g.add_node("a", run=ok)
    g.add_node("b", run=Steps.add_one)
    g.add_fanin_node("merge", run=collect)
    g.add_parallel_edge("start", "a", "merge")
    g.add_parallel_edge("start", "b", "merge")
    g.add_edge("a", "merge")
    g.add_edge("b", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    return g


GRAPH = graph()
