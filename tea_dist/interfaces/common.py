"""What every ``tea-dist`` command shares: the Typer app, input parsing, one-line errors
and exit codes, signals, JSON output, the live branch table."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tea_dist.core.errors import TeaDistError
from tea_dist.core.graph import StateGraph

EXIT_RUN_FAILED = 1
EXIT_USAGE = 2
EXIT_BRANCHES_FAILED = 3  # the run finished, but some branches failed

app = typer.Typer(
    name="tea-dist",
    help="Run workflow graphs whose parallel branches run on threads, processes or Celery.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)

FLAG = ""  # a flag's metavar: help shows '--stream', not '--stream <bool>' (it takes no value)
AgentArg = Annotated[Path, typer.Argument(help="A YAML agent file.", show_default=False)]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.", metavar=FLAG)]


class InputError(Exception):
    """Raised when a command-line input (``--input`` JSON, a file) cannot be used."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as a Ctrl-C is, so that a command cleans
    up the same way whatever stopped it (its run cancelled, its cluster stopped)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- shared helpers -----------------------------------------------------------------------


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


@contextmanager
def reporting(debug: bool, code: int = EXIT_USAGE) -> Iterator[None]:
    """Turn any exception in the block into ``fail`` (plus its traceback with ``--debug``)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:
        if debug:
            traceback.print_exc()
        known = isinstance(exc, TeaDistError | InputError)
        fail(str(exc) if known else f"{type(exc).__name__}: {exc}", code)


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP end the block by an exception (``KeyboardInterrupt``, or
    ``Terminated``), so its clean-up runs; the command then exits 128 + the signal number.
    A second signal during the clean-up exits at once (the local cluster's reaper still
    removes what is left)."""
    caught: list[int] = []

    def handler(signum: int, _frame: Any) -> None:
        if caught:
            os._exit(128 + signum)
        caught.append(signum)
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(signum)

    previous = {
        s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    except KeyboardInterrupt:
        code = 128 + (caught[0] if caught else signal.SIGINT)
        typer.echo(f"interrupted ({signal.Signals(code - 128).name})", err=True)
        raise typer.Exit(code) from None
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def parse_input(text: str, option: str = "--input") -> dict[str, Any]:
    """A JSON object from an option (``--input``, ``--config``): JSON, ``@file`` with JSON,
    or ``@-`` for stdin; ``InputError`` naming the option."""
    where = option
    if text.startswith("@"):
        name = text[1:]
        where = f"{option} file '{name}'"
        try:
            text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{where}: cannot read: {exc.strerror or exc}") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{where} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(state, dict):
        raise InputError(f"{where} must be a JSON object, got {type(state).__name__}")
    return state


def load_agent(path: Path) -> StateGraph:
    """Load a YAML agent; modules next to the caller (``uses: mynodes:f``) are importable."""
    from tea_dist.core.yaml_loader import load_yaml

    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    return load_yaml(path)


def to_json(value: Any, **kwargs: Any) -> str:
    """JSON text for states and events; results as dicts, anything else via ``str``."""
    return json.dumps(value, default=_jsonable, ensure_ascii=False, **kwargs)


def _jsonable(value: Any) -> Any:
    to_dict = getattr(value, "to_dict", None) or getattr(value, "model_dump", None)
    return to_dict() if callable(to_dict) else str(value)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


class BranchTracebacks:
    """With ``--debug``: the traceback of every failed branch, on stderr (a callback)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def on_flow_complete(self, context: Any, result: Any) -> None:
        if not result.success and result.traceback:
            self.console.print(
                f"branch '{result.branch}' failed:\n{result.traceback}",
                markup=False,
                highlight=False,
            )


class FailedBranches:
    """Every branch that did not succeed (a callback): ``tea-dist run`` lists them on stderr
    and exits 3, so a script sees failures that the fan-in absorbed."""

    def __init__(self) -> None:
        self.failed: list[Any] = []
        self._lock = threading.Lock()

    def on_flow_complete(self, context: Any, result: Any) -> None:
        if not result.success:
            with self._lock:
                self.failed.append(result)

    def lines(self) -> list[str]:
        """One line per failed branch: ``branch 'b' failed: TimeoutError: ...``."""
        lines = []
        for result in self.failed:
            message = " ".join(str(result.error or "").split())
            lines.append(f"branch '{result.branch}' failed: {result.error_type}: {message}")
        return lines


# -- live progress ------------------------------------------------------------------------


SUMMARY_ABOVE = 30  # more branches than this: the table shows counts per status


class BranchProgress:
    """A live table of fan-out branches (branch, status, ms), drawn on stderr.

    It is a ``ParallelFlowCallback``: the run's dispatcher feeds it lifecycle events.
    """

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _update(self, context: Any, **fields: Any) -> None:
        key = (getattr(context, "fan_in_node", ""), context.branch)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = {"started": self.clock(), "ms": None, "detail": ""}
            row.update(fields)

    def on_flow_queued(self, context: Any) -> None:
        self._update(context, status="queued")

    def on_flow_start(self, context: Any) -> None:
        self._update(context, status="running", started=self.clock())

    def on_flow_retry(self, context: Any, attempt: int, delay: float, error: Any) -> None:
        self._update(context, status="retrying", detail=f"attempt {attempt} failed: {error}")

    def on_flow_error(self, context: Any, error: Any, attempt: int) -> None:
        self._update(context, status="failed", detail=f"{type(error).__name__}: {error}")

    def on_flow_timeout(self, context: Any, timeout_seconds: float) -> None:
        self._update(context, status="timeout", detail=f"after {timeout_seconds}s")

    def on_flow_complete(self, context: Any, result: Any) -> None:
        status = "ok" if result.success else ("timeout" if result.timeout else "failed")
        detail = "" if result.success else f"{result.error_type}: {result.error}"
        self._update(context, status=status, ms=result.timing_ms, detail=detail)

    def table(self) -> Table:
        """The current state of every branch seen so far."""
        table = Table("branch", "status", "ms", "detail", title="branches", title_justify="left")
        colours = {"ok": "green", "failed": "red", "timeout": "red", "retrying": "yellow"}
        now = self.clock()
        with self._lock:
            rows = [(key, dict(row)) for key, row in self._rows.items()]
        if not rows:  # main-path nodes run, or a local cluster starts: say so, not nothing
            table.caption = (
                "no branch yet (a celery run with no broker configured starts a local cluster "
                "first: a few seconds)"
            )
        if len(rows) > SUMMARY_ABOVE:  # a large map: one line of counts, not a row per item
            counts = Counter(str(row.get("status", "")) for _, row in rows)
            line = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
            table.add_row(f"{len(rows)} branches", line, "", "")
            return table
        for (_, branch), row in rows:
            status = row.get("status", "")
            ms = row["ms"] if row["ms"] is not None else (now - row["started"]) * 1000
            style = colours.get(status, "cyan")
            table.add_row(branch, f"[{style}]{status}[/]", f"{ms:.0f}", row["detail"][:60])
        return table

    def __rich__(self) -> Table:
        return self.table()

    def live(self) -> Live:
        """A ``Live`` display of this table (use as a context manager)."""
        return Live(self, console=self.console, refresh_per_second=8, transient=False)


# -- commands -----------------------------------------------------------------------------
