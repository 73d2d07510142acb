"""The ``tea-dist`` command line: run, validate, input and error handling, progress display."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner

from tea_dist.core.config import ParallelConfig
from tea_dist.core.graph import StateGraph
from tea_dist.core.results import ParallelFlowResult
from tea_dist.interfaces import cli

ROOT = Path(__file__).resolve().parent.parent
RESEARCH = str(ROOT / "examples" / "research.yaml")

FAILING = """\
name: failing
nodes:
  - {name: ok, run: 'return {"ok": True}'}
  - {name: broken, run: 'raise ValueError("kaput")'}
edges:
  - {from: __start__, to: ok}
  - {from: ok, to: broken}
  - {from: broken, to: __end__}
"""

PIDS = """\
name: pids
settings:
  parallel: {strategy: thread}
nodes:
  - {name: prepare}
  - {name: a, run: 'import os; return {"pid": os.getpid()}'}
  - {name: b, run: 'import os; return {"pid": os.getpid()}'}
  - name: merge
    fan_in: true
    run: 'return {"pids": [r.state["pid"] for r in parallel_results]}'
edges:
  - {from: __start__, to: prepare}
  - {from: prepare, to: [a, b], parallel: true, fan_in: merge}
  - {from: a, to: merge}
  - {from: b, to: merge}
  - {from: merge, to: __end__}
"""


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def write(tmp_path: Path, text: str, name: str = "agent.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def assert_one_line_error(result: Any, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# -- run ---------------------------------------------------------------------------------


def test_cli_run_prints_final_state(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", '{"query": " celery "}'])
    assert result.exit_code == 0, result.stderr
    state = json.loads(result.stdout)
    assert state["query"] == "celery"
    assert {hit["source"] for hit in state["hits"]} == {"web", "docs"}
    assert result.stderr == ""  # no progress table when stderr is not a terminal


def test_cli_run_reads_input_from_a_file(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "in.json").write_text('{"query": "redis"}')
    result = runner.invoke(cli.app, ["run", RESEARCH, "-i", f"@{tmp_path / 'in.json'}"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["query"] == "redis"


def test_cli_run_stream_prints_json_lines(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", '{"query": "x"}', "--stream"])
    assert result.exit_code == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["type"] == "final"
    assert [e["node"] for e in events if e["type"] == "state"] == ["prepare", "merge"]
    branches = {e["branch"] for e in events if e["type"] == "parallel_state"}
    assert branches == {"search_web", "search_docs"}


def test_cli_run_error_event_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["run", write(tmp_path, FAILING)])
    assert_one_line_error(result, 1, "node 'broken'", "ValueError", "kaput")
    assert result.stdout == ""


def test_cli_run_stream_error_event_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["run", write(tmp_path, FAILING), "--stream"])
    assert result.exit_code == 1
    assert json.loads(result.stdout.splitlines()[-1])["type"] == "error"


def test_cli_strategy_option_overrides_settings(runner: CliRunner, tmp_path: Path) -> None:
    agent = write(tmp_path, PIDS)
    result = runner.invoke(cli.app, ["run", agent, "--strategy", "process"])
    assert result.exit_code == 0, result.stderr
    pids = json.loads(result.stdout)["pids"]
    assert len(pids) == 2 and os.getpid() not in pids
    result = runner.invoke(cli.app, ["run", agent])  # settings say thread
    assert json.loads(result.stdout)["pids"] == [os.getpid()] * 2


def test_cli_strategy_option_is_passed_to_compile(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    def fake_compile(self: StateGraph, parallel_config: Any = None, **kw: Any) -> Any:
        seen["config"] = parallel_config
        return SimpleNamespace(invoke=lambda state: iter([{"type": "final", "state": state}]))

    monkeypatch.setattr(StateGraph, "compile", fake_compile)
    result = runner.invoke(cli.app, ["run", RESEARCH, "-i", '{"q": 1}', "--strategy", "Process"])
    assert result.exit_code == 0, result.stderr
    assert seen["config"] == ParallelConfig(strategy="process")
    assert json.loads(result.stdout) == {"q": 1}


def test_cli_unknown_strategy_option_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--strategy", "gpu"])
    assert_one_line_error(result, 2, "unknown parallel strategy 'gpu'", "thread")


def test_cli_prints_non_serialisable_values_with_str(runner: CliRunner, tmp_path: Path) -> None:
    body = "import datetime; return {'day': datetime.date(2024, 5, 1)}"
    edges = "edges:\n  - {from: __start__, to: a}\n  - {from: a, to: __end__}\n"
    agent = write(tmp_path, f'name: d\nnodes:\n  - {{name: a, run: "{body}"}}\n{edges}')
    result = runner.invoke(cli.app, ["run", agent])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["day"] == "2024-05-01"


# -- bad input ---------------------------------------------------------------------------


def test_cli_bad_json_input_one_line_error(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", "{query: x"])
    assert_one_line_error(result, 2, "--input is not valid JSON", "line 1")
    assert result.stdout == ""


def test_cli_input_must_be_a_json_object(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", "[1, 2]"])
    assert_one_line_error(result, 2, "must be a JSON object, got list")


def test_cli_missing_input_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", f"@{tmp_path / 'none.json'}"])
    assert_one_line_error(result, 2, "cannot read")


def test_cli_missing_file_exit_code(runner: CliRunner, tmp_path: Path) -> None:
    for command in ("run", "validate"):
        result = runner.invoke(cli.app, [command, str(tmp_path / "nope.yaml")])
        assert_one_line_error(result, 2, "nope.yaml: no such file")


def test_cli_malformed_yaml_one_line_error(runner: CliRunner, tmp_path: Path) -> None:
    agent = write(tmp_path, "name: x\nnodes: [\n")
    result = runner.invoke(cli.app, ["run", agent])
    assert_one_line_error(result, 2, "agent.yaml:", "invalid YAML")


def test_cli_debug_shows_the_traceback(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", "nope", "--debug"])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --input is not valid JSON")


NODE_FAILS = """\
name: node_fails
nodes:
  - {name: ok, run: 'return {"ok": True}'}
  - {name: broken, uses: "tests.nodes:fail"}
edges:
  - {from: __start__, to: ok}
  - {from: ok, to: broken}
  - {from: broken, to: __end__}
"""

BRANCH_FAILS = """\
name: branch_fails
nodes:
  - {name: prepare}
  - {name: good, run: 'return {"x": 1}'}
  - {name: bad, uses: "tests.nodes:fail"}
  - {name: merge, fan_in: true, run: 'return {"n": len(parallel_results)}'}
edges:
  - {from: __start__, to: prepare}
  - {from: prepare, to: [good, bad], parallel: true, fan_in: merge}
  - {from: good, to: merge}
  - {from: bad, to: merge}
  - {from: merge, to: __end__}
"""


def test_item10_debug_shows_a_failing_nodes_traceback(runner: CliRunner, tmp_path: Path) -> None:
    agent = write(tmp_path, NODE_FAILS)
    plain = runner.invoke(cli.app, ["run", agent])
    assert_one_line_error(plain, 1, "node 'broken' failed", "ValueError: boom")
    debug = runner.invoke(cli.app, ["run", agent, "--debug"])
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr
    assert 'raise ValueError("boom")' in debug.stderr  # the node's own line, from tests/nodes.py
    last = debug.stderr.strip().splitlines()[-1]
    assert last.startswith("error: node 'broken' failed") and "ValueError: boom" in last


def test_item10_debug_shows_a_failed_branchs_traceback(runner: CliRunner, tmp_path: Path) -> None:
    agent = write(tmp_path, BRANCH_FAILS)
    plain = runner.invoke(cli.app, ["run", agent])
    assert plain.exit_code == 3 and "Traceback" not in plain.stderr  # finished, a branch failed
    debug = runner.invoke(cli.app, ["run", agent, "--debug"])
    assert debug.exit_code == 3, debug.stderr
    assert "branch 'bad' failed:" in debug.stderr and "Traceback" in debug.stderr
    assert 'raise ValueError("boom")' in debug.stderr
    assert json.loads(debug.stdout)["n"] == 2  # best effort: the run still succeeds


# -- validate ----------------------------------------------------------------------------

CYCLE = """\
name: cycle
nodes:
  - {name: prepare}
  - {name: a}
  - {name: b}
  - {name: merge, fan_in: true}
edges:
  - {from: __start__, to: prepare}
  - {from: prepare, to: [a, b], parallel: true, fan_in: merge}
  - {from: a, to: merge}
  - {from: b, to: merge}
  - {from: merge, to: prepare}
"""


def test_item4_validate_warns_about_a_cycle_without_exit(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(cli.app, ["validate", write(tmp_path, CYCLE)])
    assert result.exit_code == 0 and result.stdout.startswith("OK "), result.stderr
    warning = result.stderr.strip()
    assert warning.startswith("warning: the cycle prepare -> merge -> prepare")
    assert "no conditional exit" in warning and "recursion_limit" in warning


def test_item4_validate_accepts_a_cycle_with_a_conditional_exit(
    runner: CliRunner, tmp_path: Path
) -> None:
    text = CYCLE.replace(
        "  - {from: merge, to: prepare}\n",
        "  - {from: merge, to: prepare, when: 'state.get(\"again\")'}\n"
        "  - {from: merge, to: __end__}\n",
    )
    result = runner.invoke(cli.app, ["validate", write(tmp_path, text)])
    assert result.exit_code == 0 and result.stderr == "", result.stderr


def test_cli_validate_ok(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["validate", RESEARCH])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("OK ")
    assert "graph 'research': 4 nodes, 6 edges, 1 fan-out (2 branches, thread)" in result.stdout
    assert len(result.stdout.splitlines()) == 1


def test_cli_validate_reports_the_place(runner: CliRunner, tmp_path: Path) -> None:
    text = Path(RESEARCH).read_text().replace("timeout_seconds: 5}", "timeout_second: 5}")
    result = runner.invoke(cli.app, ["validate", write(tmp_path, text)])
    assert_one_line_error(result, 2, "edges[1].timeout_second: unknown key")


# -- progress display --------------------------------------------------------------------


def render(progress: cli.BranchProgress) -> str:
    console = Console(record=True, width=120, file=open(os.devnull, "w"))
    console.print(progress.table())
    return console.export_text()


def test_cli_progress_table_tracks_branch_states() -> None:
    now = [0.0]
    progress = cli.BranchProgress(Console(), clock=lambda: now[0])
    ctx = {b: SimpleNamespace(branch=b, fan_in_node="merge") for b in ("web", "docs", "slow")}
    for context in ctx.values():
        progress.on_flow_start(context)
    ok = ParallelFlowResult(branch="web", success=True, timing_ms=212)
    progress.on_flow_complete(ctx["web"], ok)
    failed = ParallelFlowResult(branch="docs", success=False, error="down", error_type="OSError")
    progress.on_flow_complete(ctx["docs"], failed)
    now[0] = 0.5
    rows = {line.split()[1]: line for line in render(progress).splitlines() if "│" in line}
    assert " ok " in rows["web"] and " 212 " in rows["web"]
    assert " failed " in rows["docs"] and "OSError: down" in rows["docs"]
    assert " running " in rows["slow"] and " 500 " in rows["slow"]  # elapsed so far


def test_cli_progress_drawn_on_stderr_when_it_is_a_terminal(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "stderr_is_terminal", lambda: True)
    result = runner.invoke(cli.app, ["run", RESEARCH, "--input", '{"query": "x"}'])
    assert result.exit_code == 0, result.stderr
    assert "search_web" in result.stderr and "ok" in result.stderr
    assert json.loads(result.stdout)["query"] == "x"  # stdout stays pure JSON


# -- a real process ----------------------------------------------------------------------


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "tea_dist.interfaces.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def test_cli_subprocess_validate_and_run() -> None:
    done = run_module("validate", "examples/research.yaml")
    assert done.returncode == 0 and done.stdout.startswith("OK examples/research.yaml"), done.stderr
    done = run_module("run", "examples/research.yaml", "--input", '{"query": "celery"}')
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sources"] == ["search_web", "search_docs"]


def test_cli_subprocess_bad_input_exit_code() -> None:
    done = run_module("run", "examples/research.yaml", "--input", "{")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: --input is not valid JSON")
    assert len(done.stderr.strip().splitlines()) == 1


def test_cli_usage_error_without_arguments(runner: CliRunner) -> None:
    result = runner.invoke(cli.app, ["run"])
    assert result.exit_code == 2


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    yield
    sys.path[:] = saved
