"""Building a graph: ``StateGraph`` and the immutable ``GraphSpec`` that ``compile()`` checks.

``StateGraph`` is the builder users call (names compatible with The Edge Agent). It validates
the topology, naming the culprit of every problem, and freezes it into a ``GraphSpec``
(``to_spec``): plain data that can be pickled to another process. Running a graph is the
engine's business: ``compile()`` hands the spec to the compiler ``tea_dist`` installs when it
is imported (``set_compiler``: the engine's ``CompiledGraph``), and returns what it makes, a
``Runnable``. As in The Edge Agent, the builder also runs itself (``graph.compile(...);
graph.invoke(state)``) through the graph its last ``compile()`` made.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from tea_dist.core.config import ParallelConfig, resolve_config
from tea_dist.core.errors import GraphError

ADAPTIVE = 0  # ``BranchTask.batch`` of a map whose batch size the driver decides as it goes

Event = dict[str, Any]


class Runnable(Protocol):
    """What ``compile()`` returns: a validated graph, ready to run any number of times (the
    engine's ``CompiledGraph``, ``tea_dist.engine.runner``)."""

    @property
    def name(self) -> str:
        """The graph's name."""
        ...

    @property
    def breakers(self) -> Any:
        """Where the graph's circuits live (a ``BreakerStore``)."""
        ...

    def invoke(
        self,
        state: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        cancel_token: Any = None,
        raise_exceptions: bool | None = None,
    ) -> Iterator[Event]:
        """Run the graph; yields the ``final`` event (or an ``error`` event)."""
        ...

    def stream(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[Event]:
        """Run the graph, yielding an event after every node and every branch."""
        ...

    def reset_circuit(self, name: str | None = None) -> None:
        """Close one circuit (by name or branch name), or every circuit when None."""
        ...

    def get_circuit_states(self) -> Mapping[str, Any]:
        """Every known circuit and its state."""
        ...


Compiler = Callable[..., Runnable]
"""``compiler(spec, *, raise_exceptions, callbacks, failed_branches, **options)``."""

_compiler: Compiler | None = None


def set_compiler(compiler: Compiler) -> None:
    """Install what ``StateGraph.compile()`` builds from its ``GraphSpec`` (``tea_dist`` installs
    the engine's ``CompiledGraph`` when it is imported)."""
    global _compiler
    _compiler = compiler


START = "__start__"
END = "__end__"

NodeFn = Callable[..., Any]


DEFAULT_NAME = "graph"  # an unnamed graph's: submit() names it by its reference


@dataclass(frozen=True)
class Node:
    """A node: a name, the callable it runs (None: passes state through), fan-in or not."""

    name: str
    run: NodeFn | None = None
    fan_in: bool = False


@dataclass(frozen=True)
class Conditional:
    """A conditional edge: ``func(state)`` picks a key of ``targets``."""

    func: NodeFn
    targets: Mapping[Hashable, str]


@dataclass(frozen=True)
class MapItems:
    """The items of a run-time fan-out (a map): a state key, or ``items(state)`` evaluated in
    the caller; each branch sees its item and index under ``item_key`` and ``index_key``."""

    items: str | Callable[[Mapping[str, Any]], Iterable[Any]]
    item_key: str = "item"
    index_key: str = "index"
    batch_size: int | Literal["auto"] = "auto"  # items per celery task (others: ignored)

    def __post_init__(self) -> None:
        size = self.batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise GraphError(f"batch_size must be a positive int or 'auto', got {size!r}")

    def batch_for(self, count: int) -> int:
        """Items per celery task for a map of ``count`` items: ``batch_size``, or
        ``ADAPTIVE`` (0) for ``"auto"``: the driver sizes each task as the map runs
        (``tea_dist.policies.batching``)."""
        return ADAPTIVE if self.batch_size == "auto" else self.batch_size

    def of(self, state: Mapping[str, Any], source: str) -> list[Any]:
        """The items for one run; ``GraphError`` naming the map when there are none to take."""
        if callable(self.items):
            found: Any = self.items(state)
        elif self.items in state:
            found = state[self.items]
        else:
            raise GraphError(f"map of node '{source}': the state has no key '{self.items}'")
        if isinstance(found, (str, bytes, Mapping)) or not isinstance(found, Iterable):
            raise GraphError(
                f"map of node '{source}': items must be a list or another iterable, "
                f"got {type(found).__name__}"
            )
        return list(found)

    def branch_state(self, state: Mapping[str, Any], index: int, item: Any) -> dict[str, Any]:
        """The state branch ``index`` starts from: its own copy, with its item, without the list
        of items it was taken from (N branches each carrying all N items would make a map's
        messages and results grow as N squared)."""
        own = {k: v for k, v in state.items() if k != self.items}
        return {**own, self.item_key: item, self.index_key: index}


@dataclass(frozen=True)
class ParallelEdge:
    """A fan-out edge from a node to a branch start, joining at ``fan_in`` (``map``: one branch
    per item, known only at run time)."""

    target: str
    fan_in: str
    config: ParallelConfig | None = None
    map: MapItems | None = None


@dataclass(frozen=True)
class FanOut:
    """Every parallel edge leaving one node, in declaration order, with resolved configs."""

    source: str
    fan_in: str
    branches: tuple[str, ...]
    configs: tuple[ParallelConfig, ...]
    map: MapItems | None = None  # a map: ``branches`` is its one target, run once per item


@dataclass(frozen=True)
class GraphSpec:
    """A validated, immutable graph. Picklable when its callables are."""

    name: str
    nodes: Mapping[str, Node]
    edges: Mapping[str, tuple[str, ...]]
    conditionals: Mapping[str, Conditional]
    fanouts: Mapping[str, FanOut]
    entry: str
    origin: Mapping[str, str] | None = None

    def successor(self, node: str, state: Mapping[str, Any]) -> str:
        """The node after ``node`` (not a fan-out source) for this state; END when none."""
        cond = self.conditionals.get(node)
        if cond is not None:
            key = call_condition(cond.func, state)
            if key not in cond.targets:
                raise GraphError(
                    f"condition of node '{node}' returned {key!r}, "
                    f"which is not one of {sorted(map(str, cond.targets))}"
                )
            return cond.targets[key]
        targets = self.edges.get(node, ())
        return targets[0] if targets else END

    def cycles_without_exit(self) -> list[tuple[str, ...]]:
        """Cycles a run can never leave: every node on them has one fixed successor (a normal
        edge, or a fan-out's fan-in), none a conditional edge. Each cycle once, from its node
        declared first (``("prepare", "merge")`` for ``prepare => merge -> prepare``)."""
        fixed: dict[str, str] = {}
        for name in self.nodes:
            if name in self.fanouts:
                fixed[name] = self.fanouts[name].fan_in
            elif name not in self.conditionals and self.edges.get(name):
                fixed[name] = self.edges[name][0]
        order = {name: i for i, name in enumerate(self.nodes)}
        cycles: list[tuple[str, ...]] = []
        done: set[str] = set()
        for start in self.nodes:
            path: list[str] = []
            node: str | None = start
            while node is not None and node not in done and node not in path:
                path.append(node)
                node = fixed.get(node)
            if node is not None and node in path:
                cycle = path[path.index(node) :]
                first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
                cycles.append(tuple(cycle[first:] + cycle[:first]))
            done.update(path)
        return cycles

    def branch_nodes(self, branch: str, fan_in: str) -> tuple[list[str], bool]:
        """Nodes a branch may run before ``fan_in`` (nested fan-outs included), in visit
        order, and whether ``fan_in`` is reachable at all."""
        seen: list[str] = []
        reached = False
        todo = [branch]
        while todo:
            node = todo.pop()
            if node == fan_in:
                reached = True
                continue
            if node in seen or node == END:
                continue
            seen.append(node)
            fan = self.fanouts.get(node)
            if fan is not None:
                todo.extend((*fan.branches, fan.fan_in))
            todo.extend(self.edges.get(node, ()))
            cond = self.conditionals.get(node)
            if cond is not None:
                todo.extend(cond.targets.values())
        return seen, reached

    def branch_part(self, branch: str, fan_in: str) -> GraphSpec:
        """The part of this graph a branch runs: what another process needs, nothing more."""
        names = self.branch_nodes(branch, fan_in)[0]

        def keep(mapping: Mapping[str, Any]) -> dict[str, Any]:
            return {name: mapping[name] for name in names if name in mapping}

        return replace(
            self,
            nodes=keep(self.nodes),
            edges=keep(self.edges),
            conditionals=keep(self.conditionals),
            fanouts=keep(self.fanouts),
            entry=branch,
        )


def call_condition(func: NodeFn, state: Mapping[str, Any]) -> Any:
    """Evaluate a conditional-edge function (it takes the state)."""
    return func(dict(state))


@dataclass
class StateGraph:
    """A workflow graph under construction.

    >>> g = StateGraph({"value": int})
    >>> g.add_node("a", run=lambda state: {"value": state["value"] + 1})
    >>> g.set_entry_point("a"); g.set_finish_point("a")
    >>> list(g.compile().invoke({"value": 1}))[-1]["state"]["value"]
    2

    ``failed_branches`` says what a failed (or timed-out, or circuit-refused) branch does:
    ``"fan_in"`` (the default) hands its result to the fan-in with the others; ``"tea"`` is The
    Edge Agent's rule: ``invoke()`` ends the run at the first failed branch (an ``error`` event
    naming it, or ``NodeError`` with ``raise_exceptions``), ``stream()`` reports it as a
    ``parallel_error`` event and leaves it out of the fan-in's ``parallel_results``.
    """

    state_schema: Mapping[str, Any] = field(default_factory=dict)
    raise_exceptions: bool = False
    max_workers: int | None = None
    parallel_config: ParallelConfig | None = None
    name: str = DEFAULT_NAME
    origin: dict[str, str] | None = None
    failed_branches: Literal["fan_in", "tea"] = "fan_in"
    _compiled: Runnable | None = field(default=None, repr=False, compare=False)
    _compile_args: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _stale: bool = field(default=False, repr=False, compare=False)
    _nodes: dict[str, Node] = field(default_factory=dict, repr=False)
    _edges: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _conditionals: dict[str, Conditional] = field(default_factory=dict, repr=False)
    _parallel: dict[str, list[ParallelEdge]] = field(default_factory=dict, repr=False)

    # -- building --

    def add_node(self, name: str, run: NodeFn | None = None) -> StateGraph:
        """Add a node running ``run(state, config?, node?, cancel_token?) -> dict``."""
        return self._add(Node(name, run, fan_in=False))

    def add_fanin_node(self, name: str, run: NodeFn | None = None) -> StateGraph:
        """Add a fan-in node; ``run`` may take ``parallel_results``."""
        return self._add(Node(name, run, fan_in=True))

    def _add(self, node: Node) -> StateGraph:
        if not isinstance(node.name, str) or not node.name:
            raise GraphError(f"node names must be non-empty strings, got {node.name!r}")
        if node.name in (START, END):
            raise GraphError(f"'{node.name}' is reserved and cannot be a node name")
        if node.name in self._nodes:
            raise GraphError(f"node '{node.name}' is already in the graph")
        if node.run is not None and not callable(node.run):
            raise GraphError(f"run of node '{node.name}' is not callable: {node.run!r}")
        self._nodes[node.name] = node
        self._stale = True
        return self

    def add_edge(self, source: str, target: str) -> StateGraph:
        """Add a normal edge ``source -> target``."""
        self._edges.setdefault(source, []).append(target)
        self._stale = True
        return self

    def add_conditional_edges(
        self, source: str, func: NodeFn, targets: Mapping[Hashable, str]
    ) -> StateGraph:
        """After ``source``, go to ``targets[func(state)]``."""
        if source in self._conditionals:
            raise GraphError(f"node '{source}' already has conditional edges")
        self._conditionals[source] = Conditional(func, dict(targets))
        self._stale = True
        return self

    def add_parallel_edge(
        self, source: str, target: str, fan_in: str, config: ParallelConfig | None = None
    ) -> StateGraph:
        """Fan out from ``source`` to a branch starting at ``target``, joining at ``fan_in``."""
        self._parallel.setdefault(source, []).append(ParallelEdge(target, fan_in, config))
        self._stale = True
        return self

    def add_parallel_map(
        self,
        source: str,
        target: str,
        fan_in: str,
        items: str | Callable[[Mapping[str, Any]], Iterable[Any]],
        *,
        item_key: str = "item",
        index_key: str = "index",
        config: ParallelConfig | None = None,
        batch_size: int | Literal["auto"] = "auto",
    ) -> StateGraph:
        """Fan out from ``source`` to one branch per item, each starting at ``target``.

        ``items`` is a state key or ``items(state)``, evaluated when the run reaches
        ``source``. Branch ``i`` runs on its own copy of the state plus ``{item_key: item,
        index_key: i}``, is named ``target[i]``, and the fan-in gets the results in item order
        (none for no items). One circuit guards the whole map.

        ``batch_size`` (celery branches): items sent per Celery task, run one after another by
        one worker process, each still with its own result, retries, circuit accounting, limit
        permits and callbacks. ``"auto"`` (the default) sizes each task as the map runs, from
        the worker slots consuming its queue and the items' measured run time
        (``tea_dist.policies.batching``); an integer is used exactly.
        """
        mapping = MapItems(items, item_key, index_key, batch_size)
        self._parallel.setdefault(source, []).append(ParallelEdge(target, fan_in, config, mapping))
        self._stale = True
        return self

    def set_entry_point(self, name: str) -> StateGraph:
        """The first node to run."""
        return self.add_edge(START, name)

    def set_finish_point(self, name: str) -> StateGraph:
        """A node after which the run ends."""
        return self.add_edge(name, END)

    # -- compiling --

    def compile(
        self,
        parallel_config: ParallelConfig | None = None,
        parallel_callbacks: Iterable[Any] | None = None,
        **options: Any,
    ) -> Runnable:
        """Validate the graph and return it compiled: a ``Runnable`` (``CompiledGraph``).

        Raises ``GraphError`` naming the culprit: unknown node, no entry point, a branch
        that cannot reach its fan-in, a node with both parallel and normal successors.
        ``parallel_callbacks``: ``ParallelFlowCallback`` objects.
        Options: ``callback_timeout`` (seconds, default 5), ``breaker_store``,
        ``raise_exceptions`` (this compiled graph's, instead of the builder's).

        The builder keeps the graph made last: ``invoke``, ``stream`` and the circuit methods
        of the builder use it (compiling with these arguments again after the builder changed).
        """
        return self._compile(parallel_config, parallel_callbacks, **options)

    def _compile(
        self,
        parallel_config: ParallelConfig | None = None,
        parallel_callbacks: Iterable[Any] | None = None,
        **options: Any,
    ) -> Runnable:
        if _compiler is None:
            raise GraphError("no graph engine is loaded: import tea_dist")
        spec = self.to_spec(parallel_config)
        compiled = _compiler(
            spec,
            **{"raise_exceptions": self.raise_exceptions, **options},
            callbacks=list(parallel_callbacks or []),
            failed_branches=self.failed_branches,
        )
        self._compile_args = {
            "parallel_config": parallel_config,
            "parallel_callbacks": parallel_callbacks,
            **options,
        }
        self._compiled, self._stale = compiled, False
        return compiled

    # -- running the builder itself, as The Edge Agent does --

    def compiled(self) -> Runnable:
        """The graph the last ``compile()`` made (compiled with defaults if there was none).

        When the builder changed since, it is compiled again with the same arguments, keeping
        its circuits.
        """
        current = self._compiled
        if current is None or self._stale:
            args = dict(self._compile_args)
            if current is not None:
                args.setdefault("breaker_store", current.breakers)
            current = self._compile(**args)
        return current

    def invoke(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[Event]:
        """``compiled().invoke(...)``: run, yielding the ``final`` (or ``error``) event."""
        return self.compiled().invoke(state, config, **options)

    def stream(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[Event]:
        """``compiled().stream(...)``: run the graph, yielding an event after every step."""
        return self.compiled().stream(state, config, **options)

    def reset_circuit(self, name: str | None = None) -> None:
        """``compiled().reset_circuit(name)``."""
        self.compiled().reset_circuit(name)

    def get_circuit_states(self) -> Mapping[str, Any]:
        """``compiled().get_circuit_states()``."""
        return self.compiled().get_circuit_states()

    def to_spec(self, parallel_config: ParallelConfig | None = None) -> GraphSpec:
        """Validate and freeze the topology (see ``compile``)."""
        graph_config = resolve_config(
            ParallelConfig(max_workers=self.max_workers) if self.max_workers else None,
            self.parallel_config,
            parallel_config,
        )
        self._check_references()
        entry = self._edges.get(START, [])
        if not entry:
            raise GraphError("the graph has no entry point: call set_entry_point(node)")
        if len(entry) > 1:
            raise GraphError(f"the graph has several entry points: {entry}")
        fanouts = {
            src: self._fanout(src, edges, graph_config) for src, edges in self._parallel.items()
        }
        spec = GraphSpec(
            name=self.name,
            nodes=dict(self._nodes),
            edges={src: tuple(t) for src, t in self._edges.items() if src != START},
            conditionals=dict(self._conditionals),
            fanouts=fanouts,
            entry=entry[0],
            origin=dict(self.origin) if self.origin else None,
        )
        for fanout in fanouts.values():
            for branch in fanout.branches:
                if not spec.branch_nodes(branch, fanout.fan_in)[1]:
                    raise GraphError(
                        f"branch '{branch}' cannot reach its fan-in node '{fanout.fan_in}'"
                    )
        return spec

    def _check_references(self) -> None:
        known = set(self._nodes) | {START, END}

        def check(name: str, where: str) -> None:
            if name not in known:
                raise GraphError(f"{where} refers to unknown node '{name}'")

        for src, targets in self._edges.items():
            check(src, f"edge '{src}' -> ...")
            for target in targets:
                check(target, f"edge '{src}' -> '{target}'")
                if src != START and len(targets) > 1:
                    raise GraphError(
                        f"node '{src}' has several normal successors {targets}: "
                        "use add_parallel_edge for a fan-out or add_conditional_edges"
                    )
        for src, cond in self._conditionals.items():
            check(src, f"conditional edges of '{src}'")
            for target in cond.targets.values():
                check(target, f"conditional edge '{src}' -> '{target}'")
            if src in self._edges:
                raise GraphError(f"node '{src}' has both conditional and normal edges")
        for src, edges in self._parallel.items():
            check(src, f"parallel edge '{src}' -> ...")
            if src in self._edges or src in self._conditionals:
                raise GraphError(
                    f"node '{src}' has both parallel and normal successors; "
                    "a fan-out node may only have parallel edges"
                )
            for edge in edges:
                check(edge.target, f"parallel edge '{src}' -> '{edge.target}'")
                check(edge.fan_in, f"fan-in of parallel edge '{src}' -> '{edge.target}'")
                if edge.fan_in in (START, END) or not self._nodes[edge.fan_in].fan_in:
                    raise GraphError(
                        f"fan-in '{edge.fan_in}' of parallel edge '{src}' -> '{edge.target}' "
                        "is not a fan-in node: declare it with add_fanin_node"
                    )

    def _fanout(self, src: str, edges: list[ParallelEdge], graph_config: ParallelConfig) -> FanOut:
        fan_ins = {e.fan_in for e in edges}
        if len(fan_ins) > 1:
            raise GraphError(
                f"parallel edges of '{src}' join at different fan-in nodes: {sorted(fan_ins)}"
            )
        targets = [e.target for e in edges]
        if len(set(targets)) != len(targets):
            raise GraphError(f"node '{src}' has the same parallel edge twice: {targets}")
        if any(e.map for e in edges) and len(edges) > 1:
            raise GraphError(
                f"node '{src}' has a map and other parallel edges: a map is the only fan-out of "
                "its node (put the other branches behind another node)"
            )
        return FanOut(
            source=src,
            fan_in=edges[0].fan_in,
            branches=tuple(targets),
            configs=tuple(resolve_config(graph_config, e.config) for e in edges),
            map=edges[0].map,
        )
