"""Graphs submitted by reference in the app tests (``tests.apps_graphs:NAME``)."""

from __future__ import annotations

from tea_dist import ParallelConfig, StateGraph
from tests import celery_nodes as cn
from tests.nodes import fan_graph


def two_branches() -> StateGraph:
    """A celery fan-out whose branches sleep ``config['sleep']`` and leave marker files."""
    return fan_graph(
        {"a": cn.sleep_then_mark, "b": cn.sleep_then_mark},
        config=ParallelConfig(strategy="celery"),
        fan_in=cn.collect,
        name="two",
    )


quick = fan_graph(
    {"a": cn.whoami, "b": cn.whoami},
    config=ParallelConfig(strategy="celery"),
    fan_in=cn.collect,
    name="quick",
)


def failing() -> StateGraph:
    return fan_graph(
        {"bad": cn.fail},
        config=ParallelConfig(strategy="celery", fail_fast=True),
        fan_in=cn.collect,
    )
