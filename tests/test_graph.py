"""The StateGraph API: building, compile-time validation, invoke and stream."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from tea_dist import END, START, ParallelConfig, ParallelFlowResult, StateGraph
from tea_dist.core.errors import ConfigError, GraphError, NodeError
from tests import nodes
from tests.nodes import fan_graph, final_state


def linear() -> StateGraph:
    g = StateGraph({"value": int})
    g.add_node("a", run=nodes.add_one)
    g.add_node("b", run=nodes.double)
    g.add_edge("a", "b")
    g.set_entry_point("a")
    g.set_finish_point("b")
    return g


def test_constants_match_tea() -> None:
    assert START == "__start__" and END == "__end__"


def test_invoke_yields_final_event_with_state() -> None:
    events = list(linear().compile().invoke({"value": 1}))
    assert [e["type"] for e in events] == ["final"]
    assert events[0]["state"]["value"] == 4


def test_stream_yields_state_after_each_node() -> None:
    events = list(linear().compile().stream({"value": 1}))
    assert [(e["type"], e.get("node")) for e in events] == [
        ("state", "a"),
        ("state", "b"),
        ("final", None),
    ]
    assert events[0]["state"]["value"] == 2


def test_parameter_injection_gives_only_named_parameters() -> None:
    seen: dict[str, Any] = {}

    def node(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
        seen.update(state=state, config=config, node=node)
        return {"x": 1}

    def kwargs_node(**kwargs: Any) -> dict[str, Any]:
        seen["kwargs"] = sorted(kwargs)
        return None  # type: ignore[return-value]

    g = StateGraph({})
    g.add_node("n", run=node)
    g.add_node("k", run=kwargs_node)
    g.add_edge("n", "k")
    g.set_entry_point("n")
    g.set_finish_point("k")
    state = final_state(list(g.compile().invoke({"v": 1}, config={"user": "u"})))
    assert seen["node"] == "n" and seen["config"] == {"user": "u"} and seen["state"] == {"v": 1}
    assert seen["kwargs"] == ["cancel_token", "config", "node", "parallel_results", "state"]
    assert state == {"v": 1, "x": 1}


def test_async_def_nodes_are_awaited() -> None:
    async def anode(state: dict[str, Any]) -> dict[str, Any]:
        return {"async": True}

    g = StateGraph({})
    g.add_node("a", run=anode)
    g.set_entry_point("a")
    g.set_finish_point("a")
    assert final_state(list(g.compile().invoke({})))["async"] is True


def test_non_dict_return_is_stored_as_result() -> None:
    g = StateGraph({})
    g.add_node("a", run=lambda state: 42)
    g.set_entry_point("a")
    g.set_finish_point("a")
    assert final_state(list(g.compile().invoke({})))["result"] == 42


def test_conditional_edges_choose_target() -> None:
    g = StateGraph({"value": int})
    g.add_node("check")
    g.add_node("big", run=lambda state: {"size": "big"})
    g.add_node("small", run=lambda state: {"size": "small"})
    g.add_conditional_edges(
        "check", lambda state: state["value"] > 5, {True: "big", False: "small"}
    )
    g.set_entry_point("check")
    g.set_finish_point("big")
    g.set_finish_point("small")
    app = g.compile()
    assert final_state(list(app.invoke({"value": 9})))["size"] == "big"
    assert final_state(list(app.invoke({"value": 1})))["size"] == "small"


def test_node_error_gives_error_event_naming_node() -> None:
    g = StateGraph({})
    g.add_node("bad", run=nodes.fail)
    g.set_entry_point("bad")
    g.set_finish_point("bad")
    events = list(g.compile().invoke({}))
    assert events == [
        {"type": "error", "node": "bad", "error": "boom", "error_type": "ValueError", "state": {}}
    ]


def test_raise_exceptions_raises_instead_of_error_event() -> None:
    g = StateGraph({}, raise_exceptions=True)
    g.add_node("bad", run=nodes.fail)
    g.set_entry_point("bad")
    g.set_finish_point("bad")
    with pytest.raises(NodeError, match="node 'bad' failed: ValueError: boom") as info:
        list(g.compile().invoke({}))
    assert isinstance(info.value.__cause__, ValueError)


# -- compile-time validation names the culprit --


def test_compile_rejects_unknown_node() -> None:
    g = StateGraph({})
    g.add_node("a")
    g.set_entry_point("a")
    g.add_edge("a", "ghost")
    with pytest.raises(GraphError, match="unknown node 'ghost'"):
        g.compile()


def test_compile_requires_entry_point() -> None:
    g = StateGraph({})
    g.add_node("a")
    with pytest.raises(GraphError, match="no entry point"):
        g.compile()


def test_compile_rejects_branch_that_cannot_reach_fan_in() -> None:
    g = fan_graph({"a": nodes.add_one, "b": nodes.add_one})
    g._edges["b"] = [END]
    with pytest.raises(GraphError, match="branch 'b' cannot reach its fan-in node 'merge'"):
        g.compile()


def test_compile_rejects_parallel_and_normal_successors() -> None:
    g = fan_graph({"a": nodes.add_one})
    g.add_edge("start", "a")
    with pytest.raises(GraphError, match="node 'start' has both parallel and normal successors"):
        g.compile()


def test_compile_rejects_fan_in_not_declared_as_fan_in() -> None:
    g = StateGraph({})
    g.add_node("s")
    g.add_node("a")
    g.add_node("m")
    g.add_parallel_edge("s", "a", "m")
    g.add_edge("a", "m")
    g.set_entry_point("s")
    with pytest.raises(GraphError, match=r"'m' .* is not a fan-in node"):
        g.compile()


def test_compile_rejects_duplicate_node() -> None:
    g = StateGraph({})
    g.add_node("a")
    with pytest.raises(GraphError, match="node 'a' is already in the graph"):
        g.add_node("a")


def test_compile_rejects_unknown_strategy_listing_known_ones() -> None:
    g = fan_graph({"a": nodes.add_one}, config=ParallelConfig(strategy="quantum"))
    with pytest.raises(
        ConfigError, match=r"unknown parallel strategy 'quantum'; known strategies: .*thread"
    ):
        g.compile()


# -- TD.13 AC7: API evolution --


def test_td13_unit_039_add_parallel_edge_signature_unchanged() -> None:
    params = list(inspect.signature(StateGraph.add_parallel_edge).parameters)
    assert params[:4] == ["self", "source", "target", "fan_in"]
    g = fan_graph({"a": nodes.add_one})  # the three-argument form, no config
    assert final_state(list(g.compile().invoke({"value": 1})))["total"] == 2


def test_td13_unit_040_parallel_config_fields_all_optional() -> None:
    config = ParallelConfig()
    assert config.strategy == "thread" and config.timeout_seconds is None
    assert config.retry_policy is None and config.circuit_breaker is None and not config.fail_fast
    assert all(not f.is_required() for f in ParallelConfig.model_fields.values())


def test_td13_unit_041_edge_config_overrides_graph_config() -> None:
    g = fan_graph(
        {"a": nodes.add_one, "b": nodes.add_one},
        edge_configs={"b": ParallelConfig(timeout_seconds=2.0)},
    )
    spec = g.to_spec(ParallelConfig(timeout_seconds=9.0, max_workers=3))
    a, b = spec.fanouts["start"].configs
    assert a.timeout_seconds == 9.0 and b.timeout_seconds == 2.0
    assert b.max_workers == 3  # unset on the edge: falls through to the graph


def test_td13_unit_042_compile_parallel_config_sets_graph_default() -> None:
    app = fan_graph({"a": nodes.add_one}).compile(parallel_config=ParallelConfig(max_workers=2))
    assert app.spec.fanouts["start"].configs[0].max_workers == 2


def test_td13_int_022_plain_parallel_graph_runs_unmodified() -> None:
    """A TEA-style parallel graph with no new options behaves as before."""
    g = fan_graph({"a": nodes.add_one, "b": nodes.double, "c": nodes.add_one})
    state = final_state(list(g.compile().invoke({"value": 3})))
    assert state["total"] == 4 + 6 + 4
    assert state["branches"] == ["a", "b", "c"] and state["ok"] == [True, True, True]


def test_td13_int_005_existing_fan_in_code_works_unchanged() -> None:
    def old_style_merge(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
        total = 0
        for result in parallel_results:
            total += result.get("value", 0)
        return {"total": total}

    g = fan_graph({"a": nodes.add_one, "b": nodes.add_one}, fan_in=old_style_merge)
    assert final_state(list(g.compile().invoke({"value": 1})))["total"] == 4


def test_td13_int_006_fan_in_reads_state_by_attribute_or_key() -> None:
    seen: list[Any] = []

    def merge(state: dict[str, Any], parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        for r in parallel_results:
            assert r.state == r["state"]
            seen.append((r.branch, r.state["value"], r["state"]["value"], "value" in r))
        return {}

    g = fan_graph({"a": nodes.add_one, "b": nodes.double}, fan_in=merge)
    list(g.compile().invoke({"value": 5}))
    assert seen == [("a", 6, 6, True), ("b", 10, 10, True)]


def test_invoke_and_stream_give_fan_in_the_same_parallel_results() -> None:
    captured: list[list[dict[str, Any]]] = []

    def merge(state: dict[str, Any], parallel_results: list[ParallelFlowResult]) -> dict[str, Any]:
        captured.append(
            [
                {
                    k: v
                    for k, v in r.to_dict().items()
                    if k not in ("timing_ms", "start_time", "end_time", "worker")
                }
                for r in parallel_results
            ]
        )
        return {}

    app = fan_graph(
        {"a": nodes.add_one, "b": nodes.fail, "c": nodes.double}, fan_in=merge
    ).compile()
    list(app.invoke({"value": 2}))
    events = list(app.stream({"value": 2}))
    assert captured[0] == captured[1]
    kinds = [(e["type"], e.get("branch")) for e in events if e["type"].startswith("parallel")]
    assert kinds == [("parallel_state", "a"), ("parallel_error", "b"), ("parallel_state", "c")]


def test_nested_fan_out_inside_a_branch() -> None:
    g = StateGraph({"value": int})
    g.add_node("start")
    g.add_node("outer_a", run=nodes.add_one)
    g.add_node("outer_b")
    g.add_node("inner_x", run=nodes.add_one)
    g.add_node("inner_y", run=nodes.double)
    g.add_fanin_node(
        "inner_merge",
        run=lambda state, parallel_results: {"value": sum(r["value"] for r in parallel_results)},
    )
    g.add_fanin_node("merge", run=nodes.collect)
    g.add_parallel_edge("start", "outer_a", "merge")
    g.add_parallel_edge("start", "outer_b", "merge")
    g.add_edge("outer_a", "merge")
    g.add_parallel_edge("outer_b", "inner_x", "inner_merge")
    g.add_parallel_edge("outer_b", "inner_y", "inner_merge")
    g.add_edge("inner_x", "inner_merge")
    g.add_edge("inner_y", "inner_merge")
    g.add_edge("inner_merge", "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    state = final_state(list(g.compile().invoke({"value": 3})))
    # outer_a: 4; outer_b: inner_x 4 + inner_y 6 = 10
    assert state["total"] == 14
