"""Walking a graph segment: run nodes from ``start`` until ``stop_at`` (a fan-in, or END).

The main run and every branch attempt are walks; a fan-out met on the way is handed to the
``FanOutRunner`` (the driver's, or a default one in a worker process), whose results feed the
fan-in node. ``walk`` is a generator of ``Step``s returning the final state; ``awalk`` is the
same walk for the asyncio strategy, awaiting ``async def`` nodes on the running loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tea_dist.core.graph import END, FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.nodes import CancelToken, acall_node, call_node


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
    after: bool = False,
) -> Generator[Step, None, dict[str, Any]]:
    """Run nodes from ``start`` up to (not including) ``stop_at``; return the final state.

    ``after``: ``start`` already ran (a resumed run), the walk goes on with what follows it.
    """
    cursor = cursor or Cursor()
    config = dict(run_config or {})
    node, results = start, None
    if after:
        node, results = _next(spec, start, state, fanout, config)
        if results is not None:
            yield Step(node, state, tuple(results))
    while node not in (stop_at, END):
        if cancel_token is not None and cancel_token.is_cancelled():
            raise Cancelled(f"cancelled before node '{node}'")
        cursor.node = node
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
    node, results = start, None
    while node not in (stop_at, END):
        if cancel_token is not None and cancel_token.is_cancelled():
            raise Cancelled(f"cancelled before node '{node}'")
        cursor.node = node
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
