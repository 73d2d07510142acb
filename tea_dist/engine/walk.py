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
from typing import Any, Protocol

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


@dataclass(frozen=True)
class Step:
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


def walk(
    spec: GraphSpec,
    start: str,
    stop_at: str,
    state: dict[str, Any],
    *,
    fanout: FanOutRunner,
    run_config: Mapping[str, Any] | None = None,
    cancel_token: CancelToken | None = None,
    cursor: Cursor | None = None,
) -> Generator[Step, None, dict[str, Any]]:
    """Run nodes from ``start`` up to (not including) ``stop_at``; return the final state."""
    cursor = cursor or Cursor()
    config = dict(run_config or {})
    limit, steps = recursion_limit(config), 0
    node, results = start, None
    while node not in (stop_at, END):
        if cancel_token is not None and cancel_token.is_cancelled():
            raise Cancelled(f"cancelled before node '{node}'")
        cursor.node = node
        steps = _count_step(steps, limit, node)
        update = call_node(
            spec.nodes[node].run,
            state=state,
            config=config,
            node=node,
            graph=spec,
            parallel_results=results,
            cancel_token=cancel_token,
        )
        state, results = _merge(state, update), None
        yield Step(node, state)
        node, results = _next(spec, node, state, fanout, config)
        if results is not None:
            yield Step(node, state, tuple(results))
    return state


async def awalk(
    spec: GraphSpec,
    start: str,
    stop_at: str,
    state: dict[str, Any],
    *,
    fanout: FanOutRunner,
    run_config: Mapping[str, Any] | None = None,
    cancel_token: CancelToken | None = None,
    cursor: Cursor | None = None,
) -> AsyncIterator[Step]:
    """``walk`` for a running event loop; the final state is the last step's state."""
    cursor = cursor or Cursor()
    config = dict(run_config or {})
    limit, steps = recursion_limit(config), 0
    node, results = start, None
    while node not in (stop_at, END):
        if cancel_token is not None and cancel_token.is_cancelled():
            raise Cancelled(f"cancelled before node '{node}'")
        cursor.node = node
        steps = _count_step(steps, limit, node)
        update = await acall_node(
            spec.nodes[node].run,
            state=state,
            config=config,
            node=node,
            graph=spec,
            parallel_results=results,
            cancel_token=cancel_token,
        )
        state, results = _merge(state, update), None
        yield Step(node, state)
        if node in spec.fanouts:
            node, results = await asyncio.to_thread(_next, spec, node, state, fanout, config)
        else:
            node, results = _next(spec, node, state, fanout, config)
        if results is not None:
            yield Step(node, state, tuple(results))


def _next(
    spec: GraphSpec,
    node: str,
    state: dict[str, Any],
    fanout: FanOutRunner,
    config: Mapping[str, Any],
) -> tuple[str, list[ParallelFlowResult] | None]:
    """The next node, and for a fan-out the branch results its fan-in will receive."""
    fan = spec.fanouts.get(node)
    if fan is None:
        return spec.successor(node, state), None
    return fan.fan_in, fanout(spec, fan, state, config)
