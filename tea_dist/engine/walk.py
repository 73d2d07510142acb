"""Walking a graph segment: run nodes from ``start`` until ``stop_at`` (a fan-in, or END).

The main run and every branch attempt are walks; a fan-out met on the way is handed to the
``FanOutRunner`` (the driver's, or a default one in a worker process), whose results feed the
fan-in node. ``walk`` is a generator of ``Step``s returning the final state; ``awalk`` is the
same walk for the asyncio strategy, awaiting ``async def`` nodes on the running loop.

Every walk counts its node steps: past ``config["recursion_limit"]`` (default 1000, as in
LangGraph) it raises ``GraphRecursionError`` naming the node and the limit, so a cycle without
an exit ends the run instead of hanging it. The main path and each branch count on their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from tea_dist.core.errors import ConfigError, GraphRecursionError
from tea_dist.core.graph import END, FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.nodes import CancelToken, acall_node, call_node

DEFAULT_RECURSION_LIMIT = 1000


def recursion_limit(config: Mapping[str, Any]) -> int:
    """``config["recursion_limit"]``, checked (``ConfigError`` naming it), or the default."""
    limit = config.get("recursion_limit", DEFAULT_RECURSION_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"config['recursion_limit'] must be an integer >= 1, got {limit!r}")
    return limit


def _count_step(steps: int, limit: int, node: str) -> int:
    """``steps + 1``, or ``GraphRecursionError`` when running ``node`` would pass ``limit``."""
    if steps >= limit:
        raise GraphRecursionError(
            f"recursion limit of {limit} node steps reached before node '{node}' "
            "(a cycle without an exit?); raise it with config={'recursion_limit': N}",
            node=node,
            limit=limit,
        )
    return steps + 1


class FanOutRunner(Protocol):
    """Runs the branches of a fan-out and returns one result per branch, in order."""

    def __call__(
        self, spec: GraphSpec, fan: FanOut, state: dict[str, Any], run_config: Mapping[str, Any]
    ) -> list[ParallelFlowResult]: ...


class Cancelled(Exception):
    """Raised inside a walk when its cancel token was set between two nodes."""


class Step(NamedTuple):
    """One node done: its name and the state after it (``results``: a fan-out's results)."""

    node: str
    state: dict[str, Any]
    results: tuple[ParallelFlowResult, ...] = ()


@dataclass
class Cursor:
    """Where a walk is: the node running now (for error reports)."""

    node: str = ""


def _merge(state: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    return {**state, **update} if update else state


class Walk:
    """A walk from ``start`` up to (not including) ``stop_at``: which node is next, the
    state, the step count, and what a node is called with. ``walk`` and ``awalk`` run it."""

    def __init__(
        self,
        spec: GraphSpec,
        start: str,
        stop_at: str,
        state: dict[str, Any],
        *,
        fanout: FanOutRunner,
        run_config: Mapping[str, Any] | None = None,
        cancel_token: CancelToken | None = None,
        cursor: Cursor | None = None,
        after: bool = False,
    ) -> None:
        """``after``: ``start`` already ran (a resumed run); the walk goes on from what follows
        it."""
        self.spec, self.stop_at, self.state, self.fanout = spec, stop_at, state, fanout
        self.after = after
        self.config = dict(run_config or {})
        self.limit: int | None = None  # checked when the walk starts, like every node error
        self.steps = 0
        self.cancel_token, self.cursor = cancel_token, cursor or Cursor()
        self.node: str = start
        self.results: list[ParallelFlowResult] | None = None

    def enter(self) -> bool:
        """Whether there is a node to run next (``self.node``); counts it as a step."""
        node = self.node
        if node in (self.stop_at, END):
            return False
        if self.cancel_token is not None and self.cancel_token.is_cancelled():
            raise Cancelled(f"cancelled before node '{node}'")
        self.cursor.node = node
        if self.limit is None:
            self.limit = recursion_limit(self.config)
        self.steps = _count_step(self.steps, self.limit, node)
        return True

    def call(self) -> dict[str, Any]:
        """The arguments of the node about to run."""
        return {
            "fn": self.spec.nodes[self.node].run,
            "state": self.state,
            "config": self.config,
            "node": self.node,
            "graph": self.spec,
            "parallel_results": self.results,
            "cancel_token": self.cancel_token,
        }

    def ran(self, update: dict[str, Any]) -> Step:
        """The node returned ``update``: the step it made."""
        self.state, self.results = _merge(self.state, update), None
        return Step(self.node, self.state)

    def move(self) -> Step | None:
        """Go to the next node; for a fan-out, run it: the step carrying its results."""
        fan = self.spec.fanouts.get(self.node)
        if fan is None:
            self.node = self.spec.successor(self.node, self.state)
            return None
        self.results = self.fanout(self.spec, fan, self.state, self.config)
        self.node = fan.fan_in
        return Step(self.node, self.state, tuple(self.results))


def walk(run: Walk) -> Generator[Step, None, dict[str, Any]]:
    """Run the walk's nodes, yielding a step after each; return the final state."""
    if run.after and (fanned := run.move()) is not None:
        yield fanned
    while run.enter():
        args = run.call()
        yield run.ran(call_node(args.pop("fn"), **args))
        if (fanned := run.move()) is not None:
            yield fanned
    return run.state


async def awalk(run: Walk) -> AsyncIterator[Step]:
    """``walk`` for a running event loop; the final state is the last step's state. A fan-out
    met on the way runs in a thread, so the loop keeps serving its other branches."""
    while run.enter():
        args = run.call()
        yield run.ran(await acall_node(args.pop("fn"), **args))
        fans_out = run.node in run.spec.fanouts
        fanned = await asyncio.to_thread(run.move) if fans_out else run.move()
        if fanned is not None:
            yield fanned
