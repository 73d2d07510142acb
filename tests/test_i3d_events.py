"""One ``Event`` vocabulary: every event has an emitter, every listener hook names an event,
and a user's ``ParallelFlowCallback`` stays a plain duck-typed object."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from tea_dist import ParallelConfig
from tea_dist.core.results import ParallelFlowResult
from tea_dist.observe.events import CALLBACK_EVENTS, Dispatcher, Event, FlowContext, Listener
from tea_dist.observe.logs import LogListener
from tea_dist.observe.metrics import MetricsListener
from tea_dist.observe.tracing import TracingListener
from tests import nodes
from tests.nodes import fan_graph

PACKAGE = Path(__file__).resolve().parent.parent / "tea_dist"
EMIT = re.compile(r"""emit\(\s*(?:Event\.(?P<member>[A-Z_]+)|["'](?P<value>on_[a-z_]+)["'])""")


def _emitted() -> set[Event]:
    """Every event some module of tea_dist emits, by member or by hook name."""
    found: set[Event] = set()
    for path in PACKAGE.rglob("*.py"):
        for match in EMIT.finditer(path.read_text()):
            member, value = match.group("member"), match.group("value")
            found.add(Event[member] if member else Event(value))
    return found


def _hooks(cls: type) -> set[str]:
    return {name for name, _ in inspect.getmembers(cls, inspect.isfunction) if name[:3] == "on_"}


def test_every_event_has_an_emitter() -> None:
    missing = set(Event) - _emitted()
    assert not missing, f"events nothing emits: {sorted(missing)}"


def test_every_listener_hook_names_an_event_and_every_event_has_a_hook() -> None:
    names = {event.value for event in Event}
    assert _hooks(Listener) == names
    for cls in (LogListener, MetricsListener, TracingListener):
        assert issubclass(cls, Listener)
        assert _hooks(cls) <= names, (cls, _hooks(cls) - names)


def test_event_values_are_the_hook_names() -> None:
    assert Event.FLOW_START == "on_flow_start"
    assert Event("on_fanout_end") is Event.FANOUT_END
    assert set(Event) >= CALLBACK_EVENTS


def test_a_listener_hears_only_the_hooks_it_overrides() -> None:
    heard: list[tuple[str, tuple[Any, ...]]] = []

    class Starts(Listener):
        def on_flow_start(self, ctx: FlowContext) -> None:
            heard.append(("start", (ctx.branch,)))

    dispatcher = Dispatcher(listeners=[Starts()])
    ctx = FlowContext(branch="a")
    dispatcher.emit(Event.FLOW_START, ctx)
    dispatcher.emit("on_flow_start", ctx)  # the hook's name works as well
    dispatcher.emit(Event.FLOW_ERROR, ctx, ValueError("x"), 1)  # a no-op: not overridden
    assert heard == [("start", ("a",)), ("start", ("a",))]
    assert dispatcher._route(Event.FLOW_ERROR)[0] == []  # never even called


def test_an_unknown_event_name_is_refused() -> None:
    with pytest.raises(ValueError, match="on_flow_started"):
        Dispatcher(listeners=[]).emit("on_flow_started", FlowContext(branch="a"))


def test_a_duck_typed_listener_still_hears_its_events() -> None:
    heard: list[str] = []

    class Plain:  # no base class: a worker's publisher, a durable run's watcher
        def on_attempt_start(self, ctx: FlowContext) -> None:
            heard.append(ctx.branch)

    dispatcher = Dispatcher(listeners=[])
    dispatcher.listen(Plain())
    dispatcher.emit(Event.ATTEMPT_START, FlowContext(branch="b"))
    assert heard == ["b"]


def test_a_plain_callback_object_hears_a_run() -> None:
    class Recorder:  # duck-typed: no base class, only the methods it wants
        def __init__(self) -> None:
            self.events: list[tuple[str, str]] = []

        def on_flow_start(self, context: FlowContext) -> None:
            self.events.append(("start", context.branch))

        def on_flow_complete(self, context: FlowContext, result: ParallelFlowResult) -> None:
            self.events.append(("complete", result.branch))

    recorder = Recorder()
    graph = fan_graph({"a": nodes.add_one, "b": nodes.add_one}, config=ParallelConfig())
    events = list(graph.compile(parallel_callbacks=[recorder]).invoke({"value": 1}))
    assert events[-1]["type"] == "final"
    assert sorted(recorder.events) == [
        ("complete", "a"),
        ("complete", "b"),
        ("start", "a"),
        ("start", "b"),
    ]
