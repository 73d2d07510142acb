"""TEA agents with run-time fan-out nodes run unchanged through the TEA ``YAMLEngine``.

``dynamic_parallel``, ``parallel_each`` and ``matrix`` nodes, TEA's Jinja2 templates, actions
of ``actions_registry`` and TEA's tracing options, checked through what a TEA user sees: the
fan-in's ``parallel_results``, the final state, the error a bad agent gets. Celery runs on the
session's real workers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tea_dist.core.errors import ConfigError, GraphError
from tea_dist.interfaces.tea import YAMLEngine
from tests.nodes import final_state

EDGES = [{"from": "__start__", "to": "process"}, {"from": "collect", "to": "__end__"}]
COLLECT = {"name": "collect", "fan_in": True, "run": "return state"}


def dynamic(**node: Any) -> dict[str, Any]:
    """A TEA agent: one dynamic_parallel node 'process' collected by 'collect'."""
    body = {"name": "process", "type": "dynamic_parallel", "fan_in": "collect", **node}
    return {"name": "tea-fanout", "nodes": [body, COLLECT], "edges": EDGES}


def on(strategy: str, doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "settings": {"parallel": {"strategy": strategy}}}


@pytest.fixture
def agents_here(strategy: str, monkeypatch: pytest.MonkeyPatch, request: Any) -> None:
    """Agents given as dicts are written where the session's celery workers look for them."""
    if strategy == "celery":
        base = request.getfixturevalue("tmp_path_factory").getbasetemp()
        monkeypatch.setenv("TEA_DIST_AGENTS_DIR", str(base))


def triple(state: dict[str, Any], factor: int = 1) -> dict[str, Any]:
    """An action named by import path (``uses: module:callable``), as Celery workers need."""
    return {"value": state["item"] * 3 * factor}


@pytest.mark.usefixtures("agents_here")
def test_dynamic_parallel_steps_fan_out_per_item_on_every_strategy(strategy: str) -> None:
    steps = [
        {"name": "double", "run": "return {'doubled': state['n'] * 2}"},
        {"name": "add", "run": "return {'result': state['doubled'] + state['i'] * 100}"},
    ]
    doc = dynamic(items="{{ state.nums }}", item_var="n", index_var="i", steps=steps)
    doc["nodes"][0]["parallel_config"] = {"batch_size": 2, "timeout_seconds": 60}  # celery: 2 tasks
    graph = YAMLEngine().load_from_dict(on(strategy, doc))
    results = final_state(list(graph.invoke({"nums": [5, 10, 1]})))["parallel_results"]
    assert [r.branch for r in results] == ["process[0]", "process[1]", "process[2]"]
    assert [r.state["result"] for r in results] == [10, 120, 202]
    assert all(r.success for r in results)


@pytest.mark.usefixtures("agents_here")
def test_dynamic_parallel_action_by_import_path_renders_templates(strategy: str) -> None:
    action = {"uses": f"{__name__}:triple", "with": {"factor": "{{ variables.factor }}"}}
    doc = {**dynamic(items="{{ state['values'] }}", action=action), "variables": {"factor": 2}}
    graph = YAMLEngine().load_from_dict(on(strategy, doc))
    results = final_state(list(graph.invoke({"values": [1, 2]})))["parallel_results"]
    assert [r.state["value"] for r in results] == [6, 12]


def test_parallel_each_and_matrix_shape_results_as_tea(local_strategy: str) -> None:
    each = {
        "name": "process",
        "parallel_each": "{{ state['words'] }}",
        "fan_in": "collect",
        "max_workers": 2,
        "run": "return {'upper': state['item'].upper(), 'at': state['item_index']}",
    }
    doc = {"nodes": [each, COLLECT], "edges": EDGES}
    graph = YAMLEngine().load_from_dict(on(local_strategy, doc))
    results = final_state(list(graph.invoke({"words": ["a", "b"]})))["parallel_results"]
    assert [(r.state["item"], r.state["index"], r.state["result"]) for r in results] == [
        ("a", 0, {"upper": "A", "at": 0}),
        ("b", 1, {"upper": "B", "at": 1}),
    ]
    matrix = {
        "name": "process",
        "strategy": {"matrix": {"py": ["3.11", "3.12"], "os": ["linux", "mac"]}},
        "fan_in": "collect",
        "run": "return {'tag': state['matrix']['py'] + '-' + state['matrix']['os']}",
    }
    graph = YAMLEngine().load_from_dict(on(local_strategy, {"nodes": [matrix, COLLECT]}))
    results = final_state(list(graph.invoke({})))["parallel_results"]
    assert [r.state["result"]["tag"] for r in results] == [
        "3.11-linux",
        "3.11-mac",
        "3.12-linux",
        "3.12-mac",
    ]
    assert results[3].state["matrix"] == {"py": "3.12", "os": "mac"}


def test_registry_actions_are_closures_that_run_on_process_and_are_refused_on_celery(
    cluster: object, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    offset = 1000  # captured by value: the process strategy sends the closure itself

    def add_offset(state: dict[str, Any], label: str) -> dict[str, Any]:
        return {"out": f"{label}:{state['item'] + offset}", "pid": os.getpid()}

    action = {"uses": "test.offset", "with": {"label": "n{{ state.index }}"}}
    engine = YAMLEngine(actions_registry={"test.offset": add_offset})
    graph = engine.load_from_dict(on("process", dynamic(items="{{ state.xs }}", action=action)))
    results = final_state(list(graph.invoke({"xs": [1, 2]})))["parallel_results"]
    assert [r.state["out"] for r in results] == ["n0:1001", "n1:1002"]
    assert all(r.state["pid"] != os.getpid() for r in results)

    monkeypatch.setenv("TEA_DIST_AGENTS_DIR", str(tmp_path_factory.getbasetemp()))
    graph = engine.load_from_dict(on("celery", dynamic(items="{{ state.xs }}", action=action)))
    with pytest.raises(GraphError) as info:
        list(graph.invoke({"xs": [1, 2]}))
    message = str(info.value)
    assert "node 'process'" in message and "test.offset" in message
    assert "no lambdas or closures" in message


def test_bad_agents_get_teas_messages_naming_node_and_key() -> None:
    cases = {
        "missing required key 'items'": dynamic(steps=[{"run": "return {}"}]),
        "missing branch-body key": dynamic(items="{{ state.x }}"),
        "conflicting branch-body keys": dynamic(
            items="{{ state.x }}", steps=[{"run": "return {}"}], subgraph="other.yaml"
        ),
        "max_concurrency must be positive integer": dynamic(
            items="{{ state.x }}", steps=[{"run": "return {}"}], max_concurrency=0
        ),
    }
    for expected, doc in cases.items():
        with pytest.raises(ValueError) as info:
            YAMLEngine().load_from_dict(doc)
        first = str(info.value).splitlines()[0]
        assert "'process'" in first and expected in first, info.value
    doc = dynamic(items="{{ state.x }}", steps=[{"run": "return {}"}], fan_in="colect")
    with pytest.raises(ValueError, match=r"fan_in target 'colect'") as info:
        YAMLEngine().load_from_dict(doc)
    assert "Declared nodes: ['collect', 'process']" in str(info.value)
    matrix = {"name": "process", "strategy": {"matrix": {"py": "3.12"}}, "fan_in": "collect"}
    with pytest.raises(ValueError, match=r"matrix\.py must be a list, got str"):
        YAMLEngine().load_from_dict({"nodes": [matrix, COLLECT]})


def test_items_that_are_no_list_or_unsafe_end_the_run_naming_the_node() -> None:
    graph = YAMLEngine().load_from_dict(dynamic(items="{{ state.x }}", steps=[{"run": "1"}]))
    (event,) = list(graph.invoke({"x": "not a list"}))
    assert event["type"] == "error" and "'process'" in event["error"]
    assert "items expression must return an iterable, got str" in event["error"]
    assert final_state(list(graph.invoke({"x": None})))["parallel_results"] == []
    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"  # refused by the sandbox
    graph = YAMLEngine().load_from_dict(dynamic(items=escape, steps=[{"run": "1"}]))
    (event,) = list(graph.invoke({}))
    assert event["type"] == "error" and "failed to evaluate items expression" in event["error"]


def test_policies_apply_to_each_branch_and_the_fan_in_gets_every_result() -> None:
    step = {"run": "import time\ntime.sleep(state['item'])\nreturn {'slept': state['item']}"}
    settings = {"timeout_seconds": 0.5, "max_concurrency": 3}
    doc = dynamic(items="{{ state.naps }}", steps=[step], parallel_config=settings)
    graph = YAMLEngine().load_from_dict(doc)
    began = time.monotonic()
    results = final_state(list(graph.invoke({"naps": [0, 5, 0]})))["parallel_results"]
    assert time.monotonic() - began < 4
    outcomes = [(r.success, r.timeout) for r in results]
    assert outcomes == [(True, False), (False, True), (True, False)]


def test_tracing_sends_every_event_and_unknown_exporters_are_refused(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    engine = YAMLEngine(enable_tracing=True, trace_exporter="callback", trace_callback=seen.append)
    graph = engine.load_from_dict(dynamic(items="{{ state.x }}", steps=[{"run": "return {}"}]))
    events = list(graph.invoke({"x": [1]}))
    assert seen == events and seen[-1]["type"] == "final"
    trace = tmp_path / "trace.jsonl"
    graph = YAMLEngine(trace_exporter="file", trace_file=str(trace)).load_from_dict(
        dynamic(items="{{ state.x }}", steps=[{"run": "return {}"}])
    )
    list(graph.stream({"x": [1, 2]}))
    assert '"type": "final"' in trace.read_text().splitlines()[-1]
    with pytest.raises(ConfigError, match=r"trace_exporter 'opik' has no tea_dist equivalent"):
        YAMLEngine(trace_exporter="opik")
    assert YAMLEngine(enable_tracing=False, trace_exporter="opik") is not None


def test_a_dynamic_parallel_subgraph_runs_the_other_agent_on_each_item(tmp_path: Path) -> None:
    other = {
        "name": "double",
        "nodes": [{"name": "double", "run": "return {'doubled': state['n'] * 2}"}],
        "edges": [
            {"from": "__start__", "to": "double"},
            {"from": "double", "to": "__end__"},
        ],
    }
    (tmp_path / "double.yaml").write_text(yaml.safe_dump(other))
    doc = dynamic(items="{{ state.xs }}", subgraph=str(tmp_path / "double.yaml"))
    doc["nodes"][0]["input"] = {"n": "{{ state.item }}"}
    graph = YAMLEngine().load_from_dict(on("thread", doc))
    results = final_state(list(graph.invoke({"xs": [1, 2, 3]})))["parallel_results"]
    assert [r.state["doubled"] for r in results] == [2, 4, 6]
