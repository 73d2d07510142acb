"""What the nodes of TEA's run-time fan-out kinds do when they run.

``fanout.py`` turns a ``dynamic_parallel``, ``parallel_each`` or ``matrix`` node into an items
node, a map and the nodes of one branch (see there); the inline code it writes calls the
functions here, so a YAML agent file alone says what runs (Celery workers load that file):

- ``items``: the items of the fan-out, from a TEA template (``None`` is no item; a string or
  a non-iterable is an error, worded as TEA words it);
- ``each_result``: a ``parallel_each`` or ``matrix`` branch's result, shaped as TEA shapes it
  (``{"item", "index", "result"}`` or ``{"matrix", "result"}``);
- ``call_action``: an action named by ``module:callable``, with TEA's ``with:`` and ``output``;

``ActionCall`` is an action from ``YAMLEngine(actions_registry=...)``: a Python callable, so it
runs on the thread, asyncio and process strategies (the process strategy sends it by value)
and a Celery worker, which imports code, refuses it naming the node.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tea_dist.core.references import resolve
from tea_dist.interfaces.tea.templates import render, render_params

__all__ = ["ActionCall", "call_action", "data", "each_result", "items"]


def data(text: str) -> Any:
    """A value the translated agent carries as JSON text."""
    return json.loads(text)


def items(
    expression: str, state: Mapping[str, Any], variables: Mapping[str, Any], node: str, kind: str
) -> list[Any]:
    """The items ``expression`` gives for ``state``, as a list (``None``: no items)."""
    what = "items expression" if kind == "dynamic_parallel" else "parallel_each expression"
    try:
        value = render(expression, state, variables)
    except ValueError as exc:
        raise ValueError(
            f"{kind} node '{node}': failed to evaluate {what} '{expression}': {exc}"
        ) from None
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError(
            f"{kind} node '{node}': {what} must return an iterable, got {type(value).__name__}"
        )
    return list(value)


def each_result(returned: Any, state: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """A ``parallel_each`` or ``matrix`` branch's update: what it returned under ``result``
    (a value that is no dict counts as ``{}``, as in TEA) and, for ``parallel_each``, its
    item and index."""
    result = returned if isinstance(returned, dict) else {}
    if kind == "parallel_each":
        return {"item": state.get("item"), "index": state.get("item_index"), "result": result}
    return {"result": result}


def _shape(result: Any, output: Any, state: Mapping[str, Any], variables: Any) -> Any:
    """An action's result as TEA's ``output`` setting shapes it."""
    if isinstance(output, str):
        return {output: result}
    if isinstance(output, Mapping):
        extra = {"result": result}
        shaped = {k: render(v, state, variables, extra) for k, v in output.items()}
        return {k: "" if v is None else v for k, v in shaped.items()}
    return result if isinstance(result, dict) else {"result": result}


def call_action(
    path: str,
    params: Mapping[str, Any],
    output: Any,
    state: Mapping[str, Any],
    variables: Mapping[str, Any],
) -> Any:
    """Call the action ``module:callable`` as TEA calls one: ``action(state=..., **with)``."""
    action: Callable[..., Any] = resolve(path)
    result = action(state=state, **render_params(params, state, variables))
    return _shape(result, output, state, variables)


class ActionCall:
    """A node running an action of ``YAMLEngine(actions_registry=...)`` with its ``with:``
    parameters (templates) and ``output``; for ``parallel_each`` and ``matrix`` bodies
    (``each``), the result is shaped as theirs."""

    def __init__(
        self,
        action: Callable[..., Any],
        name: str,
        params: Mapping[str, Any],
        output: Any,
        variables: Mapping[str, Any],
        each: str | None = None,
    ) -> None:
        self.action, self.name, self.params = action, name, dict(params)
        self.output, self.variables, self.each = output, variables, each

    def __call__(self, state: dict[str, Any]) -> Any:
        params = render_params(self.params, state, self.variables)
        result = self.action(state=state, **params)
        shaped = _shape(result, self.output, state, self.variables)
        return each_result(shaped, state, self.each) if self.each else shaped

    def __repr__(self) -> str:
        return f"<action {self.name!r} from YAMLEngine(actions_registry=...)>"
