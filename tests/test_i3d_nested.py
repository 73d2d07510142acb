"""A fan-out nested in a branch: its branches reach the caller's callbacks under the caller's
run id (``thread``: it runs in the caller; ``process``: its events come back with the attempt),
or the graph is refused at ``compile()`` (``celery``: it would run on a worker, unheard)."""

from __future__ import annotations

import os
import pickle
import uuid
from typing import Any

import pytest

from tea_dist import ParallelConfig, StateGraph
from tea_dist.core.errors import GraphError
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import Raised, Relay
from tea_dist.observe.events import FlowContext
from tests import nodes
from tests.nodes import final_state


class Heard:
    """A plain callback object: the branch and run id of every start and completion."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, str]] = []
        self.completes: list[tuple[str, str, bool]] = []
        self.errors: list[tuple[str, str]] = []

    def on_flow_start(self, context: FlowContext) -> None:
        self.starts.append((context.branch, context.run_id))

    def on_flow_error(self, context: FlowContext, error: BaseException, attempt: int) -> None:
        self.errors.append((context.branch, getattr(error, "error_type", type(error).__name__)))

    def on_flow_complete(self, context: FlowContext, result: ParallelFlowResult) -> None:
        self.completes.append((context.branch, context.run_id, result.success))


def nested(outer: str, inner: str = "thread", x: Any = nodes.tag_branch) -> StateGraph:
    """start -> outer (on ``outer``) -> merge, where ``outer`` fans out to x and y -> inner."""
    graph = StateGraph({}, name=f"nested-{outer}")
    graph.add_node("start", run=nodes.start)
    graph.add_node("outer", run=nodes.add_one)
    graph.add_node("x", run=x)
    graph.add_node("y", run=nodes.tag_branch)
    graph.add_fanin_node("inner", run=nodes.collect)
    graph.add_fanin_node("merge", run=nodes.collect)
    graph.add_parallel_edge("start", "outer", "merge", config=ParallelConfig(strategy=outer))
    for branch in ("x", "y"):
        graph.add_parallel_edge("outer", branch, "inner", config=ParallelConfig(strategy=inner))
        graph.add_edge(branch, "inner")
    graph.add_edge("inner", "merge")
    graph.set_entry_point("start")
    graph.set_finish_point("merge")
    return graph


def run_heard(graph: StateGraph) -> tuple[dict[str, Any], Heard, str]:
    heard, run_id = Heard(), uuid.uuid4().hex
    app = graph.compile(parallel_callbacks=[heard])
    state = final_state(list(app.invoke({"value": 1}, run_id=run_id)))
    return state, heard, run_id


@pytest.mark.parametrize("outer", ["thread", "process"])
def test_a_nested_fan_out_reaches_the_callers_callbacks_under_its_run_id(outer: str) -> None:
    state, heard, run_id = run_heard(nested(outer))
    (result,) = state["results"]
    assert result["success"], result
    assert result["state"]["total"] == 24  # (1 + 1 + 10) twice
    assert sorted(heard.starts) == [("outer", run_id), ("x", run_id), ("y", run_id)]
    assert sorted(heard.completes) == [
        ("outer", run_id, True),
        ("x", run_id, True),
        ("y", run_id, True),
    ]
    # the nested branches complete before the branch that holds them
    assert [c[0] for c in heard.completes][-1] == "outer"
    if outer == "process":  # really in another process
        pids = {r["state"]["pid"] for r in result["state"]["results"]}
        assert os.getpid() not in pids


def test_a_nested_branch_error_in_a_process_branch_reaches_the_callbacks_with_its_type() -> None:
    _, heard, run_id = run_heard(nested("process", x=nodes.fail))
    assert heard.errors == [("x", "ValueError")]
    assert ("x", run_id, False) in heard.completes and ("outer", run_id, True) in heard.completes


@pytest.mark.parametrize("inner", ["thread", "process", "celery"])
def test_a_fan_out_nested_in_a_celery_branch_is_refused_at_compile(inner: str) -> None:
    with pytest.raises(GraphError) as caught:
        nested("celery", inner=inner).compile()
    message = str(caught.value)
    assert "fan-out 'start' -> 'merge'" in message  # the outer fan-out
    assert "celery strategy" in message  # its strategy
    assert "node 'outer'" in message and "'x', 'y'" in message and "'inner'" in message


def test_relayed_events_cross_processes_as_data() -> None:
    relay = Relay("run-1")
    ctx = FlowContext(branch="x", run_id="run-1")
    relay.on_flow_error(ctx, KeyError("k"), 1)
    ((event, args),) = pickle.loads(pickle.dumps(relay.events))
    assert event == "on_flow_error" and isinstance(args[1], Raised)
    error = Relay.replayed(args)[1]
    assert isinstance(error, BaseException) and getattr(error, "error_type", "") == "KeyError"
