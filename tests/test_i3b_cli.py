"""What scripts see is the truth: exit codes, failed branches on stderr, ``--version``,
``submit --wait`` output, ``raise_exceptions`` where the README says it works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tea_dist import StateGraph
from tea_dist.core.errors import NodeError
from tea_dist.interfaces import cli

HALF_FAILED = """\
name: half_failed
nodes:
  - {name: prepare}
  - {name: good, run: 'return {"good": 1}'}
  - {name: bad, run: 'raise ValueError("kaput\\nsecond line")'}
  - name: merge
    fan_in: true
    run: 'return {"ok": [r.success for r in parallel_results]}'
edges:
  - {from: __start__, to: prepare}
  - {from: prepare, to: [good, bad], parallel: true, fan_in: merge}
  - {from: good, to: merge}
  - {from: bad, to: merge}
  - {from: merge, to: __end__}
"""


def test_i3b_run_with_failed_branches_exits_3_naming_each_on_stderr(tmp_path: Path) -> None:
    agent = tmp_path / "agent.yaml"
    agent.write_text(HALF_FAILED)
    result = CliRunner().invoke(cli.app, ["run", str(agent)])
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert json.loads(result.stdout) == {"ok": [True, False]}  # the final state still printed
    lines = result.stderr.strip().splitlines()
    assert lines == ["branch 'bad' failed: ValueError: kaput second line"], result.stderr


def test_i3b_run_with_every_branch_successful_exits_0() -> None:
    research = str(Path(__file__).resolve().parent.parent / "examples" / "research.yaml")
    result = CliRunner().invoke(cli.app, ["run", research, "--input", '{"query": "x"}'])
    assert result.exit_code == 0 and result.stderr == ""


def test_i3b_version_prints_the_installed_version() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "tea_dist", "--version"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == f"tea-dist {version('tea-dist')}"


def _failing_graph() -> StateGraph:
    def broken(state: dict[str, int]) -> dict[str, int]:
        raise ValueError("kaput")

    g = StateGraph({"value": int})
    g.add_node("broken", run=broken)
    g.set_entry_point("broken")
    g.set_finish_point("broken")
    return g


def test_i3b_raise_exceptions_works_on_compile_invoke_and_the_builder() -> None:
    g = _failing_graph()
    assert list(g.compile().invoke({"value": 1}))[-1]["type"] == "error"
    with pytest.raises(NodeError, match="kaput"):
        list(g.compile(raise_exceptions=True).invoke({"value": 1}))
    compiled = g.compile()
    with pytest.raises(NodeError, match="kaput"):
        list(compiled.invoke({"value": 1}, raise_exceptions=True))
    with pytest.raises(NodeError, match="kaput"):
        list(compiled.stream({"value": 1}, raise_exceptions=True))
    assert list(compiled.invoke({"value": 1}))[-1]["type"] == "error"  # per call only
    strict = StateGraph({"value": int}, raise_exceptions=True)
    strict.add_node("broken", run=_failing_graph().compiled().spec.nodes["broken"].run)
    strict.set_entry_point("broken")
    strict.set_finish_point("broken")
    with pytest.raises(NodeError):
        list(strict.invoke({"value": 1}))
    assert list(strict.invoke({"value": 1}, raise_exceptions=False))[-1]["type"] == "error"


@pytest.mark.celery
def test_i3b_submit_imports_the_graph_from_the_working_directory(
    cluster: object, tmp_path: Path
) -> None:
    """``tea-dist submit mymod:graph`` from the project's folder, as ``tea-dist run`` works
    from there (the console script has no working directory on its path by itself)."""
    import os
    import uuid

    name = f"i3b_graphs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from tea_dist import StateGraph\n"
        "def one(state):\n    return {'value': 1}\n"
        "def graph():\n"
        "    g = StateGraph({'value': int})\n"
        "    g.add_node('one', run=one)\n"
        "    g.set_entry_point('one')\n    g.set_finish_point('one')\n    return g\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(cluster.env)  # type: ignore[attr-defined]
    env.pop("PYTHONPATH", None)
    script = str(Path(sys.executable).with_name("tea-dist"))
    done = subprocess.run(
        [script, "submit", f"{name}:graph"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.strip()) == 32  # a run id


@pytest.mark.celery
def test_i3b_runs_lists_recent_runs_and_events_follows_one_to_its_end(cluster: object) -> None:
    from tea_dist.distributed.apps import submit

    runner = CliRunner()
    done = submit("tests.apps_graphs:quick", {"value": 1})
    done.result(timeout=30)
    failed = submit("tests.apps_graphs:failing", {})
    listing = runner.invoke(cli.app, ["runs", "--limit", "5"])
    assert listing.exit_code == 0, listing.stderr
    rows = [line.split("\t") for line in listing.stdout.strip().splitlines()]
    assert [r[0] for r in rows[:2]] == [failed.run_id, done.run_id]  # newest first
    assert rows[1][1:3] == ["tests.apps_graphs:quick", "succeeded"]
    assert rows[1][5] == "handovers=0" and rows[1][4].endswith("s")
    followed = runner.invoke(cli.app, ["events", failed.run_id, "--follow"])  # until it ends
    assert followed.exit_code == 0, followed.stderr
    events = [json.loads(line) for line in followed.stdout.splitlines()]
    assert events[-1]["type"] == "error" and "remote boom" in events[-1]["error"]
    assert failed.status() == "failed"
    again = runner.invoke(cli.app, ["events", done.run_id])
    assert json.loads(again.stdout.splitlines()[-1])["type"] == "final"


@pytest.mark.celery
def test_i3b_cancel_is_true_only_for_a_run_that_ends_cancelled(
    cluster: object, tmp_path: Path
) -> None:
    from tea_dist.distributed.apps import submit

    config = {"marker_dir": str(tmp_path), "sleep": {"a": 5, "b": 5}}
    run = submit("tests.apps_graphs:two_branches", {}, config)
    assert run.cancel() is True and run.status() == "cancelled"
    quick = submit("tests.apps_graphs:quick", {"value": 1})
    quick.result(timeout=30)
    assert quick.cancel() is False


def _readme_cli_block() -> list[str]:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## The command line", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines() if line.startswith("tea-dist")]


def test_i3b_the_readme_cli_block_matches_the_commands_and_their_options() -> None:
    import re

    import typer

    group: Any = typer.main.get_command(cli.app)
    lines = _readme_cli_block()
    named = {w for line in lines for w in re.findall(r"(?:^tea-dist|\|) ([a-z][a-z-]+)", line)}
    assert set(group.commands) <= named, set(group.commands) - named  # every command shown
    for line in lines:
        for command in re.findall(r"(?:^tea-dist|\|) ([a-z][a-z-]+)", line):
            options = {o for p in group.commands[command].params for o in p.opts}
            segment = line.split(command, 1)[1].split("|")[0].split("#")[0]
            for option in re.findall(r"--[a-z-]+", segment):
                assert option in options, f"README: tea-dist {command} {option}"


def test_i3b_flags_show_no_value_in_help() -> None:
    for args in (["run", "--help"], ["submit", "--help"], ["--help"]):
        result = CliRunner().invoke(cli.app, args)
        theirs = ("--help", "completion")  # typer's own options
        ours = [ln for ln in result.stdout.splitlines() if not any(t in ln for t in theirs)]
        assert not [ln for ln in ours if "<bool>" in ln], result.stdout


def test_i3b_an_unnamed_submitted_graph_is_named_by_its_reference() -> None:
    from tea_dist.distributed.apps import resolve_graph

    assert resolve_graph("tests.boundary_nodes:graph").name == "tests.boundary_nodes:graph"
    assert resolve_graph("tests.apps_graphs:quick").name == "quick"  # a given name stays


def test_i3b_validate_reports_every_schema_problem(tmp_path: Path) -> None:
    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "name: broken\n"
        "settings:\n  parallel: {timeout_seconds: -1, max_workrs: 2}\n"
        "nodes:\n  - {name: a, fan_in: maybe}\n  - {nme: b}\n"
        "edges:\n  - {from: __start__, to: a}\n"
    )
    result = CliRunner().invoke(cli.app, ["validate", str(agent)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines), lines
    text = "\n".join(lines)
    for place in (
        "settings.parallel.max_workrs",
        "settings.parallel.timeout_seconds",
        "nodes[0].fan_in",
        "nodes[1]",
    ):
        assert place in text, text


def test_i3b_an_empty_progress_table_says_why() -> None:
    import io

    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=120).print(cli.BranchProgress(Console()).table())
    assert "no branch yet" in out.getvalue() and "local cluster" in out.getvalue()


@pytest.mark.celery
def test_i3b_run_serves_an_agent_outside_the_working_directory(tmp_path: Path) -> None:
    """``tea-dist run /elsewhere/agent.yaml`` with no broker: the private cluster it starts
    serves the agent's folder (it failed with "outside TEA_DIST_AGENTS_DIR")."""
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "agent.yaml").write_text(
        HALF_FAILED.replace("raise ValueError", 'return {"bad": 0} #')
    )
    here = tmp_path / "here"
    here.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEA_DIST_")}
    root = str(Path(__file__).resolve().parent.parent)
    env.update(PYTHONPATH=root, TEA_DIST_RUNTIME_DIR=str(tmp_path / "runtime"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tea_dist",
            "run",
            str(elsewhere / "agent.yaml"),
            "--strategy",
            "celery",
        ],
        cwd=here,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"ok": [True, True]}
