"""Shared helpers of the benchmark scripts: graphs, alternating timers, tables, cleanup."""

from __future__ import annotations

import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def command_line() -> str:
    """The command that produced this output (to paste under a table)."""
    pythonpath = os.environ.get("PYTHONPATH")
    prefix = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else ""
    return prefix + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])


def fan_graph(
    n: int,
    run: Callable[..., Any],
    config: Any,
    *,
    name: str = "bench",
    fan_in: Callable[..., Any] | None = None,
    branches: Sequence[tuple[str, Callable[..., Any]]] | None = None,
) -> Any:
    """start -> n parallel branches -> fan-in ``count`` -> END (branch names b0, b1, ...)."""
    from bench import benchnodes
    from tea_dist import StateGraph

    g = StateGraph({}, name=name, parallel_config=config)
    g.add_node("start", run=benchnodes.start)
    g.add_fanin_node("merge", run=fan_in or benchnodes.count)
    for branch, fn in branches or [(f"b{i}", run) for i in range(n)]:
        g.add_node(branch, run=fn)
        g.add_parallel_edge("start", branch, "merge")
        g.add_edge(branch, "merge")
    g.set_entry_point("start")
    g.set_finish_point("merge")
    return g


def final_state(events: list[dict[str, Any]]) -> dict[str, Any]:
    if events[-1]["type"] != "final":
        raise RuntimeError(f"the run did not finish: {events[-1]}")
    return events[-1]["state"]  # type: ignore[no-any-return]


def alternate(
    sides: Sequence[tuple[str, Callable[[], Any]]], reps: int, label: str = ""
) -> dict[str, list[float]]:
    """Run every side once per repetition, in turn (A, B, A, B, ...); seconds per side."""
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for rep in range(reps):
        for name, fn in sides:
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
        if label:
            progress(f"{label}: repetition {rep + 1}/{reps} done")
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def progress(message: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(f"  .. {message}", file=sys.stderr, flush=True)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A small plain-text table (right-aligned columns after the first)."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first, rest = row[0].ljust(widths[0]), row[1:]
        return "  ".join([first, *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    out = [title, line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"
