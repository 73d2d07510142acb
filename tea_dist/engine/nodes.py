"""Calling node callables: parameter injection, sync and ``async def`` alike.

A node receives only the parameters it names, out of ``state``, ``config``, ``node``,
``graph`` (the ``GraphSpec`` being run), ``parallel_results`` and ``cancel_token`` (all but
``graph`` if it takes ``**kwargs``; the state positionally if it names none of them). A fan-in
node also finds its results in ``state["parallel_results"]``, as in The Edge Agent (only in the
state it is given: the key is not kept unless the node returns it). A node returns a dict
merged into the state; ``None`` means no change and any other value is stored under
``"result"``."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

INJECTABLE = ("state", "config", "node", "graph", "parallel_results", "cancel_token")


class CancelToken:
    """Cooperative cancellation for a branch or a run: set on timeout, fail-fast or cancel.

    Long-running nodes that name ``cancel_token`` should check ``is_cancelled()`` (or use
    ``wait(seconds)`` instead of ``time.sleep``) and return early. A token made with a
    ``parent`` is cancelled when its parent is; ``reason`` says why.
    """

    __slots__ = ("_cancelled", "_event", "_parent", "reason")

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._cancelled = False
        self._event: threading.Event | None = None  # made by the first ``wait``
        self._parent = parent
        self.reason = ""

    def cancel(self, reason: str = "") -> None:
        """Signal cancellation."""
        self.reason = self.reason or reason
        self._cancelled = True
        with _EVENTS:
            event = self._event
        if event is not None:
            event.set()

    def is_cancelled(self) -> bool:
        """Whether cancellation was signalled (here or on a parent)."""
        return self._cancelled or (self._parent is not None and self._parent.is_cancelled())

    def why(self, default: str) -> str:
        """The reason given with the first ``cancel()`` here or above, else ``default``."""
        token: CancelToken | None = self
        while token is not None:
            if token._cancelled and token.reason:
                return token.reason
            token = token._parent
        return default

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds, waking early on cancellation; True if cancelled.

        A parent's cancellation is noticed within 0.1 s.
        """
        event = self._waitable()
        if self._parent is None:
            return event.wait(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_cancelled():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return False
            event.wait(left)
        return True

    def _waitable(self) -> threading.Event:
        """The event ``cancel`` sets, made on first use (most tokens are never waited on)."""
        with _EVENTS:
            if self._event is None:
                self._event = threading.Event()
                if self._cancelled:
                    self._event.set()
            return self._event


_EVENTS = threading.Lock()  # makes a token's event at most once, and never misses its cancel


@lru_cache(maxsize=4096)
def _plan(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool, bool]:
    """(names to inject, takes **kwargs, pass state positionally) for a callable."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ("state",), False, False
    names = tuple(p.name for p in params if p.name in INJECTABLE and p.kind is not p.VAR_POSITIONAL)
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, var_kw, not names and not var_kw and bool(positional)


def _invoke(fn: Callable[..., Any], values: dict[str, Any]) -> Any:
    values.setdefault("graph", None)
    results = values.get("parallel_results")
    if results is not None and "parallel_results" not in values["state"]:
        values["state"] = {**values["state"], "parallel_results": results}
    names, var_kw, state_positional = _plan(fn)
    if state_positional:
        return fn(values["state"])
    if var_kw:  # ``graph`` only when named: **kwargs nodes get what they always got
        return fn(**{k: v for k, v in values.items() if k != "graph" or k in names})
    return fn(**{name: values[name] for name in names})


def normalise(result: Any) -> dict[str, Any]:
    """A node's return value as a state update."""
    if result is None:
        return {}
    if type(result) is dict or isinstance(result, Mapping):
        return dict(result)
    return {"result": result}


def call_node(fn: Callable[..., Any] | None, **values: Any) -> dict[str, Any]:
    """Call a node synchronously; an ``async def`` node is run to completion."""
    if fn is None:
        return {}
    result = _invoke(fn, values)
    if result is not None and type(result) is not dict and inspect.isawaitable(result):
        result = run_sync(result)
    return normalise(result)


async def acall_node(fn: Callable[..., Any] | None, **values: Any) -> dict[str, Any]:
    """Call a node from a coroutine: async nodes are awaited, sync ones run off the loop."""
    if fn is None:
        return {}
    call = type(fn).__call__ if not inspect.isfunction(fn) else fn
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call):
        return normalise(await _invoke(fn, values))
    result = await asyncio.to_thread(_invoke, fn, values)
    if inspect.isawaitable(result):
        result = await result
    return normalise(result)


def run_sync(awaitable: Any) -> Any:
    """Run an awaitable to completion from synchronous code, even inside a running loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(awaitable))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(_await(awaitable))
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="tea-dist-async-node")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


async def _await(awaitable: Any) -> Any:
    return await awaitable
