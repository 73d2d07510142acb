"""The ``tea-dist`` command line.

    tea-dist run AGENT.yaml --input '{"query": "x"}' [--strategy S] [--stream] [--debug]
    tea-dist validate AGENT.yaml
    tea-dist worker | submit | status | result | cancel | circuits | cluster   (see cli_ops)

stdout carries only JSON (the final state, or one event per line with ``--stream``); messages
and the live branch table go to stderr. Every failure is one line ``error: ...`` on stderr
(a traceback too with ``--debug``: a failing node's, and every failed branch's) and a non-zero
exit: 2 for bad input (file, YAML, JSON, options), 1 for a run that failed, 3 for a run that
finished with failed branches (one line per failed branch on stderr: branch, error type,
message), 128 + N when signal N (Ctrl-C, SIGTERM, SIGHUP) stopped it, after the same clean-up
as on Ctrl-C. Each command is one ``@app.command()`` function built from the shared helpers
below.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Annotated, Any

import typer
from rich.console import Console

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import YAMLError
from tea_dist.core.graph import GraphSpec
from tea_dist.core.strategies import check_strategy
from tea_dist.engine.walk import DEFAULT_RECURSION_LIMIT
from tea_dist.interfaces import cli_ops  # noqa: F401 - registers the distributed commands
from tea_dist.interfaces.common import (
    EXIT_BRANCHES_FAILED,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    FLAG,
    AgentArg,
    BranchProgress,
    BranchTracebacks,
    DebugOpt,
    FailedBranches,
    app,
    fail,
    interruptible,
    load_agent,
    parse_input,
    reporting,
    stderr_is_terminal,
    to_json,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"tea-dist {version('tea-dist')}")
        except PackageNotFoundError:
            typer.echo("tea-dist (not installed as a package)")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version.",
            metavar=FLAG,
        ),
    ] = False,
) -> None:
    """Run workflow graphs whose parallel branches run on threads, processes or Celery."""


@app.command()
def run(
    agent: AgentArg,
    input_: Annotated[
        str,
        typer.Option("--input", "-i", help="Initial state: JSON, @file.json, or @- for stdin."),
    ] = "{}",
    strategy: Annotated[
        str | None,
        typer.Option(help="Parallel strategy for the whole graph (edges that set one keep it)."),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print every event as a JSON line.", metavar=FLAG)
    ] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a YAML agent and print its final state as JSON."""
    with reporting(debug, EXIT_USAGE):
        state = parse_input(input_)
        graph = load_agent(agent)
        fields: dict[str, Any] = {"strategy": check_strategy(strategy)} if strategy else {}
        if debug:  # a failing node raises (its traceback shown), branches keep theirs
            graph.raise_exceptions = True
            fields["include_traceback"] = True
        config = ParallelConfig(**fields) if fields else None
        progress = None
        if not stream and stderr_is_terminal():
            progress = BranchProgress(Console(file=sys.stderr))
        failed = FailedBranches()
        callbacks: list[Any] = [failed, progress] if progress else [failed]
        if debug:
            callbacks.append(
                BranchTracebacks(progress.console if progress else Console(stderr=True))
            )
        compiled = graph.compile(parallel_config=config, parallel_callbacks=callbacks)
    with (
        interruptible(),
        reporting(debug, EXIT_RUN_FAILED),
        progress.live() if progress else nullcontext(),
    ):
        events = compiled.stream(state) if stream else compiled.invoke(state)
        last = _drain(events, stream)
    if last is None:
        fail("the run produced no events", EXIT_RUN_FAILED)
    if last.get("type") == "error":
        fail(_describe_error(last), EXIT_RUN_FAILED)
    if not stream:
        typer.echo(to_json(last.get("state", {}), indent=2))
    if failed.failed:
        for line in failed.lines():
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_BRANCHES_FAILED)


def _drain(events: Iterable[Mapping[str, Any]], stream: bool) -> Mapping[str, Any] | None:
    """Consume the events (printing each one as a JSON line when streaming); the last one."""
    last = None
    for event in events:
        if stream:
            sys.stdout.write(to_json(event) + "\n")
            sys.stdout.flush()
        last = event
    return last


def _describe_error(event: Mapping[str, Any]) -> str:
    kind = event.get("error_type")
    what = f"{kind + ': ' if kind else ''}{event.get('error', 'unknown error')}"
    if event.get("node") is None:  # the broker or Redis, not a node
        return f"the run failed: {what}"
    where = f"node '{event.get('node')}'"
    if event.get("branch"):
        where += f" (branch '{event['branch']}')"
    return f"{where} failed: {what}"


@app.command()
def validate(agent: AgentArg, debug: DebugOpt = False) -> None:
    """Check a YAML agent (schema, nodes, edges, strategies) without running it; every
    problem the schema check finds is one line on stderr."""
    with reporting(debug, EXIT_USAGE):
        try:
            graph = load_agent(agent)
        except YAMLError as exc:
            for problem in exc.problems[:-1]:
                typer.echo(f"error: {problem}", err=True)
            raise YAMLError(exc.problems[-1]) from None
        spec = graph.to_spec()
    for cycle in spec.cycles_without_exit():
        path = " -> ".join((*cycle, cycle[0]))
        typer.echo(
            f"warning: the cycle {path} has no conditional exit: a run goes round it until "
            f"its recursion_limit ({DEFAULT_RECURSION_LIMIT} node steps by default) and fails",
            err=True,
        )
    typer.echo(f"OK {agent}: {summary(spec)}")


def summary(spec: GraphSpec) -> str:
    """``graph 'research': 4 nodes, 5 edges, 1 fan-out (2 branches, thread)``."""
    edges = 1 + sum(len(t) for t in spec.edges.values())
    edges += sum(len(c.targets) for c in spec.conditionals.values())
    branches = sum(len(f.branches) for f in spec.fanouts.values())
    strategies = sorted({c.strategy for f in spec.fanouts.values() for c in f.configs})
    text = f"graph '{spec.name}': {_count(len(spec.nodes), 'node')}, "
    text += f"{_count(edges + branches, 'edge')}, {_count(len(spec.fanouts), 'fan-out')}"
    if branches:
        text += f" ({_count(branches, 'branch', 'branches')}, {', '.join(strategies)})"
    return text


def _count(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def main() -> None:
    """Entry point of the ``tea-dist`` console script."""
    app(prog_name="tea-dist")


if __name__ == "__main__":
    main()
