"""Coming from The Edge Agent: what a TEA user's code meets, named after what they hit.

Issue 15: TEA's parallel tests pass with only the import lines changed. Graph-level behaviour
runs on every strategy (celery on the session's real workers); node functions are module-level
so that process and celery workers import them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tea_dist import ParallelConfig, ParallelFlowResult, RetryPolicy
from tea_dist import StateGraph as DistStateGraph
from tea_dist.core.errors import (
    ConfigError,
    GraphError,
    NodeError,
    SerializationError,
    TeaDistError,
    YAMLError,
)
from tea_dist.core.yaml_loader import load_yaml_string
from tea_dist.interfaces.tea import (
    CallbackManager,
    CancellationToken,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakerRegistry,
    CircuitState,
    ParallelFlowContext,
    PickleValidationError,
    ProcessExecutor,
    StateGraph,
    TeaJSONEncoder,
    ThreadExecutor,
    YAMLEngine,
    available_strategies,
    get_executor,
)
from tea_dist.policies.breaker import MemoryBreakerStore
from tests.nodes import final_state

# -- module-level nodes (workers import them) --------------------------------------------------


def start(state: dict[str, Any], config: Any, node: str, graph: Any) -> dict[str, Any]:
    return {"value": state.get("value", 0), "graph_name": graph.name}


def plus_one(state: dict[str, Any], config: Any, node: str, graph: Any) -> dict[str, Any]:
    return {"one": state["value"] + 1}


def plus_two(state: dict[str, Any], config: Any, node: str, graph: Any) -> dict[str, Any]:
    return {"two": state["value"] + 2}


def broken(state: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("broken branch")


def total_from_state(state: dict[str, Any], config: Any, node: str, graph: Any) -> dict[str, Any]:
    results = state.get("parallel_results", [])
    return {
        "total": sum(r.get("one", 0) + r.get("two", 0) for r in results if r.success),
        "seen": [r.branch for r in results],
    }


def tea_graph(strategy: str, second: Any = plus_two, cls: type = StateGraph) -> Any:
    """start -> [one, two] -> total, written as TEA code writes it."""
    g = cls({"value": int}, raise_exceptions=False)
    g.parallel_config = ParallelConfig(strategy=strategy)
    g.add_node("start", run=start)
    g.add_node("one", run=plus_one)
    g.add_node("two", run=second)
    g.add_fanin_node("total", run=total_from_state)
    g.set_entry_point("start")
    g.add_parallel_edge("start", "one", "total")
    g.add_parallel_edge("start", "two", "total")
    g.add_edge("one", "total")
    g.add_edge("two", "total")
    g.set_finish_point("total")
    return g


# -- graphs: compile() then invoke() on the graph, the graph parameter, parallel_results ----


def test_tea_compile_then_invoke_on_the_graph_itself(strategy: str) -> None:
    g = tea_graph(strategy)
    assert g.compile() is g  # TEA's compile() returns the graph
    state = final_state(list(g.invoke({"value": 10})))
    assert state["total"] == 11 + 12 and state["graph_name"] == "graph"
    assert state["seen"] == ["one", "two"]
    assert "parallel_results" not in state  # only the fan-in's view of the state has it


def test_tea_nodes_naming_graph_get_it_and_fan_in_reads_state_parallel_results() -> None:
    seen: dict[str, Any] = {}

    def merge(state: dict[str, Any], graph: Any) -> dict[str, Any]:
        seen["graph"], seen["results"] = graph, state["parallel_results"]
        return {}

    g = DistStateGraph({})
    g.add_node("a", run=lambda state: {"x": 1})
    g.add_fanin_node("m", run=merge)
    g.set_entry_point("a")
    g.add_parallel_edge("a", "b", "m")
    g.add_node("b", run=lambda state: {"y": 2})
    g.add_edge("b", "m")
    g.set_finish_point("m")
    final_state(list(g.compile().invoke({})))
    assert set(seen["graph"].nodes) == {"a", "b", "m"}
    assert [r.get("y") for r in seen["results"]] == [2]


def test_builder_invoke_uses_the_last_compile_and_recompiles_after_a_change() -> None:
    calls: list[str] = []

    class Tracking:
        def on_flow_start(self, ctx: Any) -> None:
            calls.append(ctx.branch)

    g = tea_graph("thread", cls=DistStateGraph)
    app = g.compile(parallel_callbacks=[Tracking()])
    final_state(list(g.invoke({"value": 1})))  # the builder runs the graph compile() made
    assert sorted(calls) == ["one", "two"] and g.compiled() is app
    g.add_node("three", run=lambda state: {"one": 100})
    g.add_parallel_edge("start", "three", "total")
    g.add_edge("three", "total")
    assert final_state(list(g.invoke({"value": 1})))["seen"] == ["one", "two", "three"]
    assert g.compiled() is not app and sorted(calls[2:]) == ["one", "three", "two"]


def test_graph_invoke_without_compile_compiles_with_defaults() -> None:
    g = tea_graph("thread", cls=DistStateGraph)
    assert final_state(list(g.invoke({"value": 0})))["total"] == 1 + 2


# -- exceptions TEA code catches ---------------------------------------------------------------


def test_raise_exceptions_error_is_a_runtime_error_naming_the_node() -> None:
    g = DistStateGraph({}, raise_exceptions=True)
    g.add_node("bad", run=broken)
    g.set_entry_point("bad")
    g.set_finish_point("bad")
    with pytest.raises(RuntimeError) as info:
        list(g.invoke({}))
    assert isinstance(info.value, NodeError) and isinstance(info.value, TeaDistError)
    assert "node 'bad'" in str(info.value) and "broken branch" in str(info.value)


def test_unknown_strategy_and_bad_yaml_are_value_errors() -> None:
    with pytest.raises(ValueError) as info:
        tea_graph("warp").compile()
    assert isinstance(info.value, ConfigError) and "'warp'" in str(info.value)
    with pytest.raises(ValueError) as yaml_info:
        load_yaml_string("nodes: []")
    assert isinstance(yaml_info.value, YAMLError)


# -- events: error carries state, parallel events carry node -----------------------------------


def test_error_event_carries_the_state_reached() -> None:
    g = DistStateGraph({})
    g.add_node("ok", run=lambda state: {"done": 1})
    g.add_node("bad", run=broken)
    g.set_entry_point("ok")
    g.add_edge("ok", "bad")
    g.set_finish_point("bad")
    (event,) = list(g.compile().invoke({"in": 0}))
    assert event["type"] == "error" and event["node"] == "bad"
    assert event["state"] == {"in": 0, "done": 1}


def test_parallel_events_carry_node_and_failed_branch_state(strategy: str) -> None:
    g = tea_graph(strategy, second=broken, cls=DistStateGraph)
    events = list(g.compile().stream({"value": 1}))
    by_type = {e["type"]: e for e in events if e["type"].startswith("parallel")}
    assert by_type["parallel_state"]["node"] == "one"
    failed = by_type["parallel_error"]
    assert (failed["node"], failed["branch"]) == ("two", "two")
    assert failed["state"]["value"] == 1 and "broken branch" in failed["error"]


# -- failed branches: tea_dist's best effort by default, TEA's rule by a setting --------------


def test_failed_branch_goes_to_the_fan_in_by_default(strategy: str) -> None:
    g = tea_graph(strategy, second=broken, cls=DistStateGraph)
    state = final_state(list(g.compile().invoke({"value": 1})))
    assert state["seen"] == ["one", "two"] and state["total"] == 2


def test_tea_rule_invoke_ends_the_run_at_the_failed_branch(strategy: str) -> None:
    g = tea_graph(strategy, second=broken)  # TEA's StateGraph: failed_branches="tea"
    (event,) = list(g.compile().invoke({"value": 1}))
    assert event["type"] == "error" and event["node"] == "two"
    assert event["error"] == "broken branch" and event["state"]["value"] == 1
    g.raise_exceptions = True
    with pytest.raises(RuntimeError, match=r"Error in node 'two': broken branch"):
        list(g.compile().invoke({"value": 1}))


def test_tea_rule_stream_leaves_failed_branches_out_of_the_fan_in(strategy: str) -> None:
    g = tea_graph(strategy, second=broken)
    events = list(g.compile().stream({"value": 1}))
    assert [e["branch"] for e in events if e["type"] == "parallel_error"] == ["two"]
    assert final_state(events)["seen"] == ["one"]


def test_tea_rule_is_a_setting_of_tea_dist_graphs_and_yaml() -> None:
    g = tea_graph("thread", second=broken, cls=DistStateGraph)
    g.failed_branches = "tea"
    assert list(g.compile().invoke({"value": 1}))[-1]["node"] == "two"
    doc = "settings: {failed_branches: tea}\nnodes: [{name: a}]\n"
    assert load_yaml_string(doc).failed_branches == "tea"
    odd = DistStateGraph({"a": int}, failed_branches="maybe")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="failed_branches must be 'fan_in' or 'tea'"):
        odd.add_node("a").set_entry_point("a").compile()


# -- circuits: TEA's states, registry and CircuitBreaker objects ------------------------------


def test_tea_circuit_states_are_keyed_by_branch(strategy: str) -> None:
    g = tea_graph(strategy, second=broken)
    breaker = CircuitBreakerConfig(failure_threshold=2, reset_timeout=60)
    g.compile(parallel_config=ParallelConfig(strategy=strategy, circuit_breaker=breaker))
    try:
        for _ in range(2):
            list(g.invoke({"value": 1}))
        states = g.get_circuit_states()
        assert states["two"]["state"] == "open" and states["two"]["failure_count"] == 2
        assert states["one"]["state"] == "closed"
        assert g.compiled().get_circuit_states() == {  # tea_dist's shape is unchanged
            "graph:one": CircuitState.CLOSED,
            "graph:two": CircuitState.OPEN,
        }
        cb = g.circuit_registry.get_or_create("two", breaker)
        assert cb.state is CircuitState.OPEN and not cb.allow_request()
        g.reset_circuit("two")
        assert cb.state is CircuitState.CLOSED
    finally:
        g.reset_all_circuits()


def test_circuit_breaker_object_follows_closed_open_half_open_closed() -> None:
    now = [1000.0]
    store = MemoryBreakerStore(clock=lambda: now[0])
    cfg = CircuitBreakerConfig(failure_threshold=2, reset_timeout=5, half_open_max_calls=1)
    cb = CircuitBreaker(cfg, name="svc", store=store)
    assert cb.state is CircuitState.CLOSED and cb.allow_request()
    cb.record_failure()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.allow_request()
    now[0] += 5
    assert cb.allow_request() and cb.state is CircuitState.HALF_OPEN
    assert not cb.allow_request()  # one probe at a time
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.failure_count == 0
    assert cb.get_state_info()["name"] == "svc"


def test_circuit_registry_hands_out_one_breaker_per_name() -> None:
    registry = CircuitBreakerRegistry(scope="graph")
    cfg = CircuitBreakerConfig(failure_threshold=1)
    cb = registry.get_or_create("a", cfg)
    assert registry.get_or_create("a", cfg) is cb
    cb.record_failure()
    assert registry.get_circuit_states()["a"]["state"] == "open"
    registry.reset_circuit("a")
    assert cb.state is CircuitState.CLOSED
    with pytest.raises(ConfigError, match="scope"):
        CircuitBreakerRegistry(scope="cluster")


# -- helpers TEA had -----------------------------------------------------------------------


def test_retry_policy_get_delay_is_tea_name_for_delay_for() -> None:
    policy = RetryPolicy(base_delay=1.0, backoff_multiplier=2.0, max_delay=5.0)
    assert [policy.get_delay(n) for n in range(4)] == [1.0, 2.0, 4.0, 5.0]


def test_result_builders_and_json() -> None:
    ok = ParallelFlowResult.from_success("a", {"v": 1}, timing_ms=3.0)
    bad = ParallelFlowResult.from_error("b", KeyError("k"), {"v": 0}, 2.0)
    slow = ParallelFlowResult.from_timeout("c", None, 30000.0, timeout_seconds=30)
    shut = ParallelFlowResult.from_circuit_open("d", "svc")
    assert (ok.success, ok["v"], ok.timing_ms) == (True, 1, 3.0)
    assert (bad.error_type, bad.traceback) == ("KeyError", None)
    assert slow.timeout and "timed out after 30s" in (slow.error or "")
    assert shut.circuit_state == "open" and "Circuit breaker 'svc' is open" in (shut.error or "")
    text = json.dumps({"parallel_results": [ok]}, cls=TeaJSONEncoder)
    assert json.loads(text)["parallel_results"][0]["branch"] == "a"


def test_result_state_key_wins_over_fields_tea_did_not_have() -> None:
    r = ParallelFlowResult(branch="b", success=True, state={"worker": "alice", "branch": "x"})
    assert r.get("worker") == "alice" and r["worker"] == "alice"
    assert r["branch"] == "b"  # TEA's own field names still mean the field
    assert ParallelFlowResult(branch="b", success=True, worker="h/1").get("worker") == "h/1"


def test_cancellation_token_resets_for_reuse() -> None:
    token = CancellationToken()
    token.cancel()
    assert token.is_cancelled()
    token.reset()
    assert not token.is_cancelled() and token.wait(0) is False


def test_callback_manager_fires_in_order_and_survives_a_bad_or_hung_callback() -> None:
    seen: list[str] = []
    release = threading.Event()

    class Good:
        def on_flow_start(self, ctx: Any) -> None:
            seen.append(ctx.branch)

    class Bad:
        def on_flow_start(self, ctx: Any) -> None:
            raise RuntimeError("callback bug")

    class Hung:
        def on_flow_start(self, ctx: Any) -> None:
            release.wait(10)

    manager = CallbackManager(callbacks=[Good(), Bad(), Hung()], timeout=0.2)
    ctx = ParallelFlowContext(branch="b1", fan_in_node="m", state_snapshot={}, start_time=0.0)
    started = time.monotonic()
    manager.fire_flow_start(ctx)
    assert seen == ["b1"]  # delivered before fire_* returns
    assert time.monotonic() - started < 2.0  # the hung callback was left behind
    release.set()
    with pytest.raises(ConfigError, match="error_policy"):
        CallbackManager(error_policy="raise")


# -- TEA's executor API ----------------------------------------------------------------------


def square(x: int) -> int:
    return x * x


def test_tea_executors_are_context_managers_named_by_strategy() -> None:
    with get_executor("thread", max_workers=2) as executor:
        assert isinstance(executor, ThreadExecutor) and executor.max_workers == 2
        assert executor.submit(lambda x: x + 1, 41).result(5) == 42
    with pytest.raises(RuntimeError, match="context manager"):
        executor.submit(square, 2)
    with ProcessExecutor(max_workers=1) as processes:
        assert processes.submit(square, 7).result(30) == 49
    with pytest.raises(ValueError, match="Unknown parallel strategy: 'warp'") as info:
        get_executor("warp")
    assert "process, thread" in str(info.value)
    assert available_strategies() == ["process", "thread"]


def test_process_executor_validate_state_names_key_and_flow() -> None:
    with pytest.raises(PickleValidationError) as info:
        ProcessExecutor().validate_state({"ok": 1, "fn": lambda: None}, flow_index=3)
    error = info.value
    assert isinstance(error, SerializationError)
    assert (error.key, error.flow_index) == ("fn", 3)
    assert "'fn'" in str(error) and "flow 3" in str(error) and "not picklable" in str(error)
    ThreadExecutor().validate_state({"fn": lambda: None})  # threads take anything


# -- YAML: implicit chaining, goto, variables, hints, TEA's map node kinds -------------------


def test_yaml_nodes_without_edges_chain_in_declaration_order() -> None:
    doc = """
nodes:
  - {name: a, run: 'return {"trail": ["a"]}'}
  - {name: b, run: 'return {"trail": state["trail"] + ["b"]}'}
  - {name: c, run: 'return {"trail": state["trail"] + ["c"]}'}
"""
    state = final_state(list(load_yaml_string(doc).compile().invoke({})))
    assert state["trail"] == ["a", "b", "c"]


def test_yaml_goto_jumps_and_routes_by_rules() -> None:
    doc = """
nodes:
  - {name: a, run: 'return {"n": state["n"] + 1}', goto: check}
  - {name: skipped, run: 'return {"skipped": True}'}
  - name: check
    goto:
      - {if: 'state["n"] < 3', to: a}
      - {to: __end__}
"""
    state = final_state(list(load_yaml_string(doc).compile().invoke({"n": 0})))
    assert state == {"n": 3}
    bad = doc.replace("goto: check", "goto: chek")
    with pytest.raises(YAMLError, match=r"nodes\[0\]\.goto: unknown node 'chek'.*'check'"):
        load_yaml_string(bad)
    with pytest.raises(YAMLError, match=r"nodes\[0\]\.goto: needs a node or at least one rule"):
        load_yaml_string(doc.replace("goto: check", "goto: []"))


def test_yaml_variables_are_shared_by_the_agents_code() -> None:
    doc = """
variables: {greeting: hello}
nodes:
  - name: a
    run: |
      variables["seen"] = variables["greeting"]
      return {}
  - {name: b, run: 'return {"said": variables["seen"]}'}
"""
    variables: dict[str, Any] = {}
    graph = load_yaml_string(doc, variables=variables)
    assert final_state(list(graph.compile().invoke({})))["said"] == "hello"
    assert variables == {"greeting": "hello", "seen": "hello"}


def test_yaml_did_you_mean_never_suggests_the_rejected_key() -> None:
    for key in ("strategy", "type"):
        with pytest.raises(YAMLError) as info:
            load_yaml_string(f"nodes:\n  - {{name: a, {key}: thread}}\n", "agent.yaml")
        assert f"nodes[0].{key}: unknown key" in str(info.value)
        assert "did you mean" not in str(info.value)
    with pytest.raises(
        YAMLError, match=r"nodes\[0\]\.fan_inn: unknown key \(did you mean 'fan_in'"
    ):
        load_yaml_string("nodes:\n  - {name: a, fan_inn: true}\n")


def test_yaml_tea_map_node_kinds_are_refused_naming_the_node() -> None:
    doc = "nodes:\n  - {name: fan, type: dynamic_parallel, items: x, fan_in: m}\n"
    with pytest.raises(YAMLError, match=r"node 'fan'.*dynamic_parallel.*not supported"):
        load_yaml_string(doc)


# -- YAMLEngine ------------------------------------------------------------------------------

TEA_DOC = {
    "name": "tea-fanout",
    "variables": {"factor": 10},
    "state_schema": {"value": "int"},
    "nodes": [
        {"name": "start", "run": "return {'value': state.get('value', 1)}"},
        {"name": "a", "run": "return {'a': state['value'] * variables['factor']}"},
        {"name": "b", "run": "return {'b': state['value'] + 1}"},
        {
            "name": "merge",
            "fan_in": True,
            "run": "return {'total': sum(r.get('a', 0) + r.get('b', 0) for r in parallel_results)}",
        },
    ],
    "edges": [
        {"from": "start", "to": "a", "type": "parallel", "fan_in": "merge"},
        {"from": "start", "to": "b", "type": "parallel", "fan_in": "merge"},
        {"from": "a", "to": "merge"},
        {"from": "b", "to": "merge"},
    ],
}


def test_yaml_engine_load_from_dict_runs_on_every_strategy(strategy: str) -> None:
    doc = {**TEA_DOC, "settings": {"parallel": {"strategy": strategy}}}
    engine = YAMLEngine()
    graph = engine.load_from_dict(doc)
    assert isinstance(graph, StateGraph) and engine._current_graph is graph
    assert engine.variables == {"factor": 10} and graph.failed_branches == "tea"
    assert final_state(list(graph.invoke({"value": 2})))["total"] == 20 + 3


def test_yaml_engine_gives_tea_defaults_and_reads_files(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({**TEA_DOC, "settings": {"parallel": {"max_workers": 4}}}))
    graph = YAMLEngine().load_from_file(path)
    assert graph.parallel_config is not None and graph.parallel_config.strategy == "thread"
    assert graph.max_workers == 4 and graph.origin and graph.origin["yaml"] == str(path)
    assert YAMLEngine().load_from_dict({"nodes": [{"name": "a"}]}).max_workers is None


@pytest.mark.celery
def test_yaml_from_text_on_celery_is_refused_for_having_no_file(cluster: object) -> None:
    doc = yaml.safe_dump({**TEA_DOC, "settings": {"parallel": {"strategy": "celery"}}})
    with pytest.raises(GraphError) as info:
        load_yaml_string(doc).compile()
    message = str(info.value)
    assert "not loaded from a file" in message and "load_yaml(path)" in message
    assert "lambda" not in message
