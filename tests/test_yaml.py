"""YAML agents: parsing, validation messages, inline code, and running loaded graphs."""

from __future__ import annotations

import hashlib
import os
import pickle
import textwrap
import traceback
from pathlib import Path

import pytest

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError, GraphError, YAMLError
from tea_dist.core.results import ParallelFlowResult
from tea_dist.core.yaml_loader import InlineCode, WhenCondition, load_yaml, load_yaml_string

ROOT = Path(__file__).resolve().parent.parent
RESEARCH = ROOT / "examples" / "research.yaml"

FANOUT = """\
name: fanout
settings:
  parallel:
{settings}
nodes:
  - name: prepare
    run: |
      return {{"value": state.get("value", 1)}}
  - {{name: a, uses: "tests.nodes:double"}}
  - {{name: b, uses: "tests.nodes:add_one"}}
  - name: merge
    fan_in: true
    run: |
      return {{"values": [r.state["value"] for r in parallel_results if r.success]}}
edges:
  - {{from: __start__, to: prepare}}
  - {{from: prepare, to: [a, b], parallel: true, fan_in: merge{edge}}}
  - {{from: a, to: merge}}
  - {{from: b, to: merge}}
  - {{from: merge, to: __end__}}
"""


def fanout_yaml(settings: str = "    max_workers: 2", edge: str = "") -> str:
    """The fan-out agent with ``settings.parallel`` lines and extra flow-style edge keys."""
    return FANOUT.format(settings=settings, edge=f", {edge}" if edge else "")


def configs(text: str, source: str = "prepare") -> tuple[ParallelConfig, ...]:
    """The resolved per-branch configs of the fan-out leaving ``source``."""
    return load_yaml_string(text).to_spec().fanouts[source].configs


def load_error(text: str) -> str:
    with pytest.raises(YAMLError) as info:
        load_yaml_string(text, "agent.yaml")
    return str(info.value)


# -- AC6: parallel strategy in settings and on edges (seed 002) ---------------------------


def test_p001_unit_008_parse_settings_parallel_strategy() -> None:
    graph = load_yaml_string(fanout_yaml("    strategy: process\n    max_workers: 3"))
    assert graph.parallel_config == ParallelConfig(strategy="process", max_workers=3)
    assert [c.strategy for c in graph.to_spec().fanouts["prepare"].configs] == ["process"] * 2


def test_p001_unit_009_parse_edge_parallel_strategy() -> None:
    text = fanout_yaml("    timeout_seconds: 7", edge="parallel_strategy: process")
    for config in configs(text):
        # The edge sets only the strategy; the timeout falls through from settings.
        assert (config.strategy, config.timeout_seconds) == ("process", 7.0)


def test_p001_unit_010_edge_strategy_overrides_settings() -> None:
    text = fanout_yaml("    strategy: process", edge="parallel_strategy: thread")
    assert [c.strategy for c in configs(text)] == ["thread", "thread"]
    assert [c.strategy for c in configs(fanout_yaml("    strategy: process"))] == ["process"] * 2


def test_yaml_default_strategy_is_thread() -> None:
    assert {c.strategy for c in configs(fanout_yaml())} == {"thread"}


def test_yaml_settings_parallel_takes_every_field() -> None:
    settings = textwrap.indent(
        textwrap.dedent("""\
        strategy: asyncio
        max_workers: 8
        timeout_seconds: 2.5
        timeout_total: 9
        fail_fast: true
        include_traceback: true
        queue: tea.flows
        retry: {max_retries: 2, base_delay: 0.5, jitter: true, retry_on: [ConnectionError]}
        circuit_breaker: {failure_threshold: 3, reset_timeout: 10, name: shared}
        """),
        "    ",
    )
    config = load_yaml_string(fanout_yaml(settings)).parallel_config
    assert config is not None
    assert (config.strategy, config.max_workers, config.timeout_seconds) == ("asyncio", 8, 2.5)
    assert (config.timeout_total, config.fail_fast, config.include_traceback) == (9, True, True)
    assert config.queue == "tea.flows"
    assert config.retry_policy is not None and config.retry_policy.max_retries == 2
    assert config.retry_policy.retry_on == ("ConnectionError",)
    assert config.circuit_breaker is not None and config.circuit_breaker.name == "shared"


def test_yaml_retry_policy_spelling_is_accepted() -> None:
    config = load_yaml_string(fanout_yaml("    retry_policy: {max_retries: 4}")).parallel_config
    assert config is not None and config.retry_policy is not None
    assert config.retry_policy.max_retries == 4


def test_yaml_edge_settings_override_settings_field_by_field() -> None:
    settings = "    timeout_seconds: 3\n    max_workers: 2\n    retry: {max_retries: 1}"
    edge = "timeout_seconds: 5, fail_fast: true, retry: {max_retries: 3}, queue: q1"
    config = configs(fanout_yaml(settings, edge))[0]
    assert (config.timeout_seconds, config.fail_fast, config.queue) == (5.0, True, "q1")
    assert config.retry_policy is not None and config.retry_policy.max_retries == 3
    assert config.max_workers == 2  # not set on the edge: from settings


# -- validation messages -------------------------------------------------------------------


def test_yaml_unknown_key_names_its_place() -> None:
    text = fanout_yaml().replace("  - {from: a, to: merge}", "  - {from: a, to: merge, fan_inn: m}")
    message = load_error(text)
    assert "edges[2].fan_inn: unknown key" in message
    assert "did you mean 'fan_in'" in message
    assert message.startswith("agent.yaml:18:")  # file and line of the key


def test_yaml_bad_value_names_its_place() -> None:
    message = load_error(fanout_yaml("    timeout_seconds: 0"))
    assert "settings.parallel.timeout_seconds: must be > 0, got 0" in message


def test_yaml_nested_policy_error_uses_the_yaml_spelling() -> None:
    message = load_error(fanout_yaml("    retry: {max_retries: -1}"))
    assert "settings.parallel.retry.max_retries: must be >= 0" in message


def test_yaml_edge_setting_error_names_the_edge() -> None:
    message = load_error(fanout_yaml(edge="timeout_seconds: -2"))
    assert "edges[1].timeout_seconds: must be > 0" in message


def test_yaml_uses_must_look_like_module_callable() -> None:
    message = load_error(fanout_yaml().replace('"tests.nodes:add_one"', "add_one"))
    assert "nodes[2]: 'uses' must look like 'module:callable'" in message


def test_yaml_uses_import_failure_names_node_and_path() -> None:
    message = load_error(fanout_yaml().replace("tests.nodes:add_one", "no_such_mod:f"))
    assert "nodes[2].uses" in message and "node 'b'" in message
    assert "'no_such_mod:f'" in message


def test_yaml_uses_accepts_a_dotted_qualname() -> None:
    from tests.boundary_nodes import Steps

    graph = load_yaml_string(
        fanout_yaml().replace("tests.nodes:add_one", "tests.boundary_nodes:Steps.add_one")
    )
    assert graph.to_spec().nodes["b"].run is Steps.add_one


@pytest.mark.parametrize(
    "uses",
    [
        "collections:OrderedDict.fromkeys",  # a builtin method: not a function defined there
        "tests.boundary_nodes:os.system",  # through a module the module imported
        "tests.boundary_nodes:dumps",  # a name it imported
    ],
)
def test_i3a_yaml_uses_names_only_what_its_module_defines(uses: str) -> None:
    with pytest.raises(YAMLError) as info:
        load_yaml_string(fanout_yaml().replace("tests.nodes:add_one", uses))
    assert "nodes[1].uses" in str(info.value) or "nodes[2].uses" in str(info.value)
    assert uses in str(info.value) and "defined in its module" in str(info.value)


def test_yaml_unknown_strategy_names_it_and_the_known_ones() -> None:
    for text, place in [
        (fanout_yaml("    strategy: gpu"), "settings.parallel.strategy"),
        (fanout_yaml(edge="parallel_strategy: gpu"), "edges[1].parallel_strategy"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_yaml_string(text)
        assert isinstance(info.value, YAMLError)
        assert f"{place}: unknown parallel strategy 'gpu'" in str(info.value)
        assert "process" in str(info.value) and "thread" in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "fan_in: merge",
            "fan_in: mergee",
            "edges[1].fan_in: unknown node 'mergee' (did you mean 'merge'?)",
        ),
        (
            "{from: a, to: merge}",
            "{from: a, to: [merge, b]}",
            "edges[2]: several targets in 'to' need 'parallel: true'",
        ),
        (
            "parallel: true, fan_in: merge",
            "parallel: true",
            "edges[1]: a parallel edge needs 'fan_in'",
        ),
        (
            "{from: a, to: merge}",
            "{from: a, to: merge, timeout_seconds: 1}",
            "edges[2]: parallel settings (timeout_seconds) belong on parallel edges",
        ),
        ("    fan_in: true\n", "", "edges[1].fan_in: 'merge' is not a fan-in node"),
        (
            "{from: a, to: merge}",
            "{from: a, to: 3}",
            "edges[2].to: must be a string or a list, got 3",
        ),
        ("name: b, uses", "name: a, uses", "nodes[2]: node 'a' is already in the graph"),
        (
            "{from: b, to: merge}",
            "{from: b, to: __end__}",
            "branch 'b' cannot reach its fan-in node 'merge'",
        ),
        (
            "name: fanout\n",
            "name: fanout\nname: again\n",
            "key 'name' appears twice (lines 1 and 2)",
        ),
        (
            "    fan_in: true",
            "    fan_in: maybe",
            "nodes[3].fan_in: must be true or false, got 'maybe'",
        ),
    ],
)
def test_yaml_structural_errors_name_their_place(old: str, new: str, expected: str) -> None:
    text = fanout_yaml()
    assert old in text
    assert expected in load_error(text.replace(old, new, 1))


def test_yaml_syntax_error_has_its_line() -> None:
    text = fanout_yaml().replace("  - {from: a, to: merge}", "  - {from: a, to: merge")
    message = load_error(text)
    assert message.startswith("agent.yaml:19:") and "invalid YAML" in message


def test_yaml_missing_file_is_a_yaml_error(tmp_path: Path) -> None:
    with pytest.raises(YAMLError, match="no such file"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_errors_are_one_line() -> None:
    text = fanout_yaml("    timeout_seconds: -1\n    max_workers: 0").replace(
        "fan_in: merge", "fan_inn: merge"
    )
    assert "\n" not in load_error(text)


# -- graph identity ------------------------------------------------------------------------


def test_yaml_sets_name_and_origin_for_workers(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(fanout_yaml())
    graph = load_yaml(path)
    assert graph.name == "fanout"
    assert graph.origin == {
        "yaml": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }
    assert graph.to_spec().origin == graph.origin


# -- edge forms ----------------------------------------------------------------------------


def test_yaml_tea_single_target_parallel_form() -> None:
    text = fanout_yaml().replace(
        "  - {from: prepare, to: [a, b], parallel: true, fan_in: merge}",
        "  - {from: prepare, to: a, type: parallel, fan_in: merge, timeout_seconds: 4}\n"
        "  - {from: prepare, to: b, type: parallel, fan_in: merge}",
    )
    fanout = load_yaml_string(text).to_spec().fanouts["prepare"]
    assert (fanout.branches, fanout.fan_in) == (("a", "b"), "merge")
    assert [c.timeout_seconds for c in fanout.configs] == [4.0, None]


WHEN = """\
name: router
nodes:
  - {name: start}
  - {name: big}
  - {name: small}
  - {name: other}
edges:
  - {from: __start__, to: start}
  - {from: start, to: big, when: 'state["n"] > 10'}
  - {from: start, to: other}
  - {from: start, to: small, when: 'state["n"] > 0'}
  - {from: big, to: __end__}
  - {from: small, to: __end__}
  - {from: other, to: __end__}
"""


def test_yaml_when_edges_are_tried_in_order_with_a_default() -> None:
    spec = load_yaml_string(WHEN).to_spec()
    assert [spec.successor("start", {"n": n}) for n in (50, 5, -1)] == ["big", "small", "other"]


def test_yaml_when_without_default_fails_clearly() -> None:
    spec = load_yaml_string(WHEN.replace("  - {from: start, to: other}\n", "")).to_spec()
    with pytest.raises(GraphError, match="no 'when' condition after node 'start' holds"):
        spec.successor("start", {"n": -1})


def test_yaml_when_syntax_error_names_edge_and_line() -> None:
    message = load_error(WHEN.replace('state["n"] > 10', 'state["n"] >'))
    assert message.startswith("agent.yaml:9:") and "'when' after node 'start'" in message


def test_yaml_when_condition_is_picklable() -> None:
    condition = WhenCondition("start", [('state["n"] > 1', 3)], "x.yaml", has_default=True)
    copy = pickle.loads(pickle.dumps(condition))
    assert (copy({"n": 2}), copy({"n": 0})) == (0, "default")


# -- inline code ---------------------------------------------------------------------------


def test_yaml_inline_code_is_picklable() -> None:
    code = InlineCode('import os\nreturn {"v": state["v"] + 1, "pid": os.getpid()}', "bump")
    copy = pickle.loads(pickle.dumps(code))
    assert isinstance(copy, InlineCode) and copy is not code
    assert copy({"v": 1})["v"] == 2
    assert "bump" in repr(code) and "import os" in repr(code)


def test_yaml_inline_code_gets_every_node_parameter() -> None:
    code = InlineCode(
        "return {'n': len(parallel_results), 'node': node, 'k': config['k'], 'c': cancel_token}",
        "merge",
    )
    result = ParallelFlowResult(branch="a", success=True, state={"x": 1})
    out = code({}, config={"k": 1}, node="merge", parallel_results=[result], cancel_token="t")
    assert out == {"n": 1, "node": "merge", "k": 1, "c": "t"}


def test_yaml_inline_code_syntax_error_names_node_and_line() -> None:
    message = load_error(
        fanout_yaml().replace('return {"value": state.get("value", 1)}', "return {")
    )
    assert message.startswith("agent.yaml:8:") and "node 'prepare'" in message


def test_yaml_inline_code_traceback_points_at_the_yaml_line(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(
        fanout_yaml().replace('return {"value"', 'x = 1\n      return {"value": 1 / 0, "v"')
    )
    node = load_yaml(path).to_spec().nodes["prepare"].run
    with pytest.raises(ZeroDivisionError) as info:
        node({})
    frame = traceback.extract_tb(info.tb)[-1]
    assert (frame.filename, frame.lineno, frame.name) == (str(path), 9, "prepare")
    assert frame.line is not None and "1 / 0" in frame.line


# -- running loaded graphs (needs tea_dist.engine.runner) ----------------------------------------


def final_state(events: list[dict]) -> dict:
    assert events[-1]["type"] == "final", events[-1]
    return events[-1]["state"]


def test_yaml_research_example_runs() -> None:
    app = load_yaml(RESEARCH).compile()
    state = final_state(list(app.invoke({"query": "  celery  "})))
    assert state["query"] == "celery"
    assert state["sources"] == ["search_web", "search_docs"]
    assert {hit["source"] for hit in state["hits"]} == {"web", "docs"}


def test_yaml_fanout_runs_uses_and_inline_nodes() -> None:
    state = final_state(list(load_yaml_string(fanout_yaml()).compile().invoke({"value": 5})))
    assert state["values"] == [10, 6]


def test_yaml_when_edges_route_a_run() -> None:
    text = WHEN.replace("{name: big}", '{name: big, run: \'return {"went": "big"}\'}')
    text = text.replace("{name: small}", '{name: small, run: \'return {"went": "small"}\'}')
    app = load_yaml_string(text).compile()
    assert final_state(list(app.invoke({"n": 3})))["went"] == "small"
    assert final_state(list(app.invoke({"n": 30})))["went"] == "big"


def test_yaml_process_strategy_ships_inline_code_to_children() -> None:
    text = fanout_yaml("    strategy: process").replace(
        '{name: a, uses: "tests.nodes:double"}',
        '{name: a, run: \'import os; return {"value": 0, "pid": os.getpid()}\'}',
    )
    text = text.replace(
        '"values": [', '"pids": [r.state.get("pid") for r in parallel_results], "values": ['
    )
    state = final_state(list(load_yaml_string(text).compile().invoke({"value": 1})))
    assert state["values"] == [0, 2]
    assert state["pids"][0] not in (None, os.getpid())
