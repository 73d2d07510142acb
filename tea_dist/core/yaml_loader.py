"""Loading YAML agents: ``load_yaml(path) -> StateGraph``.

The whole document is validated before a graph is built: pydantic models describe it (unknown
keys are errors) and every problem becomes ONE ``YAMLError`` naming its file, line and place,
e.g. ``agent.yaml:14: edges[2].fan_inn: unknown key (did you mean 'fan_in'?)``.

Node code comes from ``uses: "module:callable"`` (imported at load time) or an inline ``run:``
body, compiled into an ``InlineCode``; the ``when:`` edges leaving a node become one
``WhenCondition``. As in The Edge Agent, the run starts at the first node unless an edge leaves
``__start__``; a node with ``goto`` goes there (``goto: node``, or a list of ``{if: expression,
to: node}`` rules tried in order, a rule without ``if`` being the default); a node with neither
``goto`` nor edges leaving it goes on to the next node declared (the last one to ``__end__``).
``variables:`` is the dict inline code and conditions see as ``variables``. Inline code and
conditions keep their source, compile it again when unpickled (so the process strategy can send
them to child processes) and report the YAML file's own line numbers, in syntax errors and in
tracebacks alike.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from tea_dist.core.config import CircuitBreakerConfig, ParallelConfig, ResourceLimit, RetryPolicy
from tea_dist.core.errors import ConfigError, GraphError, UnknownStrategyError, YAMLError
from tea_dist.core.graph import END, START, StateGraph
from tea_dist.core.references import resolve
from tea_dist.core.strategies import check_strategy
from tea_dist.core.yaml_code import InlineCode, WhenCondition

__all__ = ["InlineCode", "UnknownStrategyError", "WhenCondition", "load_yaml", "load_yaml_string"]


# -- the document -------------------------------------------------------------------------

# ParallelConfig field -> other spellings accepted in YAML.
_ALIASES = {"retry_policy": ("retry",), "strategy": ("parallel_strategy",)}
_EDGE_SETTINGS = frozenset(ParallelConfig.model_fields) | {a for v in _ALIASES.values() for a in v}
_USES = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def _yaml_spellings(value: Any) -> Any:
    """Accept ``retry:`` and ``parallel_strategy:``; check the strategy is registered."""
    if not isinstance(value, Mapping):
        return value
    data = dict(value)
    for field, aliases in _ALIASES.items():
        given = [key for key in (field, *aliases) if key in data]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(map(repr, given))} are the same setting: give one")
        if given:
            data[field] = data.pop(given[0])
    if isinstance(data.get("strategy"), str):
        try:
            check_strategy(data["strategy"])
        except ConfigError as exc:
            raise PydanticCustomError("unknown_strategy", str(exc)) from None
    return data


ParallelSettings = Annotated[ParallelConfig, BeforeValidator(_yaml_spellings)]


class _Doc(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GotoRule(_Doc):
    """One rule of a conditional ``goto``: go ``to`` a node when ``if`` holds (no ``if``:
    always)."""

    when: str | None = Field(None, alias="if")
    to: str = Field(min_length=1)


_MAP_KINDS = "The Edge Agent's dynamic_parallel, matrix and parallel_each nodes"


class NodeDoc(_Doc):
    """``nodes[i]``: a name, its code (``run`` inline or ``uses`` an import path), and where
    the run goes after it (``goto``, else its edges, else the next node)."""

    name: str = Field(min_length=1)
    run: str | None = None
    uses: str | None = None
    fan_in: bool = False
    goto: str | list[GotoRule] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_map_kinds(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            strategy = data.get("strategy")
            if (
                data.get("type") == "dynamic_parallel"
                or "parallel_each" in data
                or (isinstance(strategy, Mapping) and "matrix" in strategy)
            ):
                raise ValueError(
                    f"node '{data.get('name')}': {_MAP_KINDS} (a fan-out over items known "
                    "at run time) are not supported; fan out with parallel edges"
                )
        return data

    @model_validator(mode="after")
    def _one_code(self) -> NodeDoc:
        if self.run is not None and self.uses is not None:
            raise ValueError("give 'run' or 'uses', not both")
        if self.uses is not None and not _USES.match(self.uses):
            raise ValueError(f"'uses' must look like 'module:callable', got {self.uses!r}")
        return self


class EdgeDoc(_Doc):
    """``edges[i]``: normal, conditional (``when``) or parallel, with per-edge settings."""

    source: str = Field(alias="from", min_length=1)
    to: str | list[str]
    parallel: bool = False
    type: Literal["normal", "parallel"] | None = None
    fan_in: str | None = None
    when: str | None = None
    map: str | None = Field(None, min_length=1)  # a state key: one branch per item
    item_key: str = Field("item", min_length=1)
    index_key: str = Field("index", min_length=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # map items per task
    parallel_config: ParallelSettings | None = None  # filled from the flat per-edge settings

    @model_validator(mode="before")
    @classmethod
    def _gather_settings(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        settings = {key: data.pop(key) for key in list(data) if key in _EDGE_SETTINGS}
        if settings:
            if "parallel_config" in data:
                raise ValueError("give edge settings flat or under 'parallel_config', not both")
            data["parallel_config"] = settings
        return data

    @model_validator(mode="after")
    def _consistent(self) -> EdgeDoc:
        if self.map is not None and not self.is_parallel:
            raise ValueError("a 'map' edge is a parallel edge: add 'parallel: true' and 'fan_in'")
        if self.map is None and "batch_size" in self.model_fields_set:
            raise ValueError("'batch_size' belongs on a 'map' edge")
        if self.map is not None and len(self.targets) != 1:
            raise ValueError("a 'map' edge has one target: the node each item's branch starts at")
        if self.is_parallel:
            if self.fan_in is None:
                raise ValueError("a parallel edge needs 'fan_in'")
            if self.when is not None:
                raise ValueError("a parallel edge cannot have 'when'")
        else:
            if isinstance(self.to, list):
                raise ValueError("several targets in 'to' need 'parallel: true'")
            if self.fan_in is not None:
                raise ValueError("'fan_in' belongs on parallel edges ('parallel: true')")
            if self.parallel_config is not None:
                keys = ", ".join(sorted(self.parallel_config.model_fields_set))
                raise ValueError(f"parallel settings ({keys}) belong on parallel edges")
        return self

    @property
    def is_parallel(self) -> bool:
        return self.parallel or self.type == "parallel"

    @property
    def targets(self) -> list[str]:
        return self.to if isinstance(self.to, list) else [self.to]


class SettingsDoc(_Doc):
    """``settings``: the graph-level ``ParallelConfig`` and run options."""

    parallel: ParallelSettings | None = None
    raise_exceptions: bool = False
    failed_branches: Literal["fan_in", "tea"] = "fan_in"


class AgentDoc(_Doc):
    """A YAML agent document."""

    name: str | None = None
    description: str | None = None
    state_schema: dict[str, Any] | None = None
    settings: SettingsDoc = SettingsDoc()
    variables: dict[str, Any] | None = None
    nodes: list[NodeDoc] = Field(min_length=1)
    edges: list[EdgeDoc] = Field(default_factory=list)


def _keys(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(f.alias or n for m in models for n, f in m.model_fields.items())


# The keys allowed under each parent key (a node, an edge, settings, a policy), for hints.
_PARALLEL_KEYS = _keys(ParallelConfig) | {a for v in _ALIASES.values() for a in v}
_KEYS_UNDER: dict[Any, frozenset[str]] = {
    None: _keys(AgentDoc),
    "nodes": _keys(NodeDoc),
    "goto": _keys(GotoRule),
    "edges": _keys(EdgeDoc) | _EDGE_SETTINGS,
    "settings": _keys(SettingsDoc),
    "parallel": _PARALLEL_KEYS,
    "parallel_config": _PARALLEL_KEYS,
    "retry": _keys(RetryPolicy),
    "retry_policy": _keys(RetryPolicy),
    "circuit_breaker": _keys(CircuitBreakerConfig),
    "limits": _keys(ResourceLimit),
}
_VOCABULARY = sorted(frozenset().union(*_KEYS_UNDER.values()))


def _keys_at(loc: Sequence[Any]) -> Sequence[str]:
    """The keys allowed where the unknown key at ``loc`` was found (every key if unsure)."""
    parents = [seg for seg in loc[:-1] if isinstance(seg, str) and seg in _KEYS_UNDER]
    keys = _KEYS_UNDER.get(parents[-1] if parents else None)
    return sorted(keys) if keys else _VOCABULARY


# -- places, lines and messages -------------------------------------------------------------


class _Source:
    """The parsed file: its name, data and node tree, to turn paths into places and lines."""

    def __init__(self, name: str, data: Any, root: yaml.Node):
        self.name, self.data, self.root = name, data, root

    def locate(self, loc: Sequence[Any]) -> tuple[str, int]:
        """A pydantic location as the user wrote it (``edges[2].retry``) and its line."""
        place, data, line = "", self.data, self.root.start_mark.line + 1
        node: Any = self.root
        for seg in loc:
            if isinstance(data, list) and isinstance(seg, int):
                place += f"[{seg}]"
                inside = 0 <= seg < len(data)
                data = data[seg] if inside else None
                node = node.value[seg] if inside and isinstance(node, yaml.SequenceNode) else None
                mark = node
            elif isinstance(data, Mapping):
                if seg not in data:
                    if seg == "parallel_config":  # synthetic: the settings sit on the edge itself
                        continue
                    seg = next((a for a in _ALIASES.get(seg, ()) if a in data), seg)
                place += f".{seg}" if place else str(seg)
                data = data.get(seg)
                mark, node = _entry(node, seg)
            else:  # a union member's tag such as 'list[str]'
                continue
            if mark is not None:
                line = mark.start_mark.line + 1
        return place, line

    def value_node(self, *path: Any) -> yaml.Node | None:
        node: yaml.Node | None = self.root
        for seg in path:
            node = node.value[seg] if isinstance(node, yaml.SequenceNode) else _entry(node, seg)[1]
        return node

    def error(
        self, loc: Sequence[Any], problem: str, cls: type[YAMLError] = YAMLError
    ) -> YAMLError:
        place, line = self.locate(loc)
        return cls(
            f"{self.name}:{line}: {place}: {problem}" if place else f"{self.name}:{line}: {problem}"
        )


def _entry(node: yaml.Node | None, key: Any) -> tuple[yaml.Node | None, yaml.Node | None]:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(key):
                return key_node, value_node
    return None, None


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    others = [c for c in candidates if c != str(word)]  # never suggest the rejected word
    close = difflib.get_close_matches(str(word), others, n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


_PHRASES = {
    "missing": "required",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",  # ParallelConfig.limits
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_too_short": "must not be empty",
    "too_short": "must not be empty",
}
_NO_VALUE = {"missing", "extra_forbidden", "value_error", "unknown_strategy"}
_COMPARISONS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _problem(error: Mapping[str, Any]) -> str:
    """One pydantic error as a short phrase: ``must be > 0``."""
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(error["loc"][-1], _keys_at(error["loc"]))
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    if kind in _COMPARISONS:
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {_COMPARISONS[kind]} {bound}"
    return _PHRASES.get(kind) or error["msg"].replace("Input should be", "must be")


def _validation_error(source: _Source, exc: ValidationError) -> YAMLError:
    """Every place's problem (unknown keys first: often a typo of a missing one), as one
    error whose message is the first and whose ``problems`` are all of them."""
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    places = {source.locate(e["loc"])[0]: e for e in reversed(errors)}  # each place's first
    ordered = [e for e in errors if places.get(source.locate(e["loc"])[0]) is e]
    found = [_place_error(source, errors, e) for e in ordered]
    cls = type(found[0])
    return cls(str(found[0]), tuple(str(e) for e in found))


def _place_error(source: _Source, errors: list[Any], first: Any) -> YAMLError:
    """The problem at ``first``'s place. Alternatives of a union at the same place are
    joined: ``must be a string or a list``."""
    place, _ = source.locate(first["loc"])
    problems = [_problem(e) for e in errors if source.locate(e["loc"])[0] == place]
    problem = problems[0] + "".join(
        " or " + p.removeprefix("must be ")
        for p in dict.fromkeys(problems[1:])
        if p.startswith("must be")
    )
    value = first.get("input")
    if first["type"] not in _NO_VALUE and isinstance(value, str | int | float | bool):
        problem += f", got {value!r}"
    strategy = first["type"] == "unknown_strategy"
    loc = (*first["loc"], "strategy") if strategy else first["loc"]
    return source.error(loc, problem, UnknownStrategyError if strategy else YAMLError)


# -- loading ------------------------------------------------------------------------------


def load_yaml(path: str | Path, *, variables: dict[str, Any] | None = None) -> StateGraph:
    """Load and validate a YAML agent file; return its ``StateGraph``.

    ``graph.origin`` records the absolute path and the SHA-256 of the file, which distributed
    workers use to load the same graph and to refuse a different file. ``variables`` is the
    dict its code sees as ``variables`` (updated with the document's ``variables:``; default:
    a new dict).
    """
    file = Path(path)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise YAMLError(f"{path}: no such file") from None
    except OSError as exc:
        raise YAMLError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YAMLError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    graph = load_yaml_string(text, str(path), variables=variables)
    graph.origin = {"yaml": str(file.resolve()), "sha256": hashlib.sha256(raw).hexdigest()}
    return graph


def load_yaml_string(
    text: str, path: str | None = None, *, variables: dict[str, Any] | None = None
) -> StateGraph:
    """Load a YAML agent from text; ``path`` names it in messages (no ``origin`` is set, so
    Celery workers, which load agents from files, cannot run its branches)."""
    source = _parse(text, path or "<yaml>")
    try:
        doc = AgentDoc.model_validate(source.data)
    except ValidationError as exc:
        raise _validation_error(source, exc) from None
    if variables is None:
        variables = {}
    variables.update(doc.variables or {})
    graph = _build(doc, source, variables)
    try:
        graph.to_spec()
    except GraphError as exc:
        raise YAMLError(f"{source.name}: {exc}") from None
    return graph


def _parse(text: str, name: str) -> _Source:
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise YAMLError(f"{where}: invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise YAMLError(f"{name}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
    if root is None:
        raise YAMLError(f"{name}: the document is empty")
    if not isinstance(data, dict):
        raise YAMLError(f"{name}:1: the document must be a mapping (name, settings, nodes, edges)")
    source = _Source(name, data, root)
    _check_duplicate_keys(source, root, [])
    return source


def _check_duplicate_keys(source: _Source, node: yaml.Node, path: list[Any]) -> None:
    """PyYAML keeps the last of two equal keys silently; a duplicated key is an error here."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                raise source.error(
                    path, f"key '{key}' appears twice (lines {seen[key]} and {line})"
                )
            seen[key] = line
            _check_duplicate_keys(source, value_node, [*path, key])
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(source, item, [*path, index])


def _first_line(node: yaml.Node | None) -> int:
    """Line of a scalar's first text line (block scalars start after their ``|``)."""
    if node is None:
        return 1
    return node.start_mark.line + (2 if getattr(node, "style", None) in ("|", ">") else 1)


def _build(doc: AgentDoc, source: _Source, variables: dict[str, Any]) -> StateGraph:
    settings = doc.settings
    graph = StateGraph(
        state_schema=doc.state_schema or {},
        raise_exceptions=settings.raise_exceptions,
        parallel_config=settings.parallel,
        name=doc.name or Path(source.name).stem,
        failed_branches=settings.failed_branches,
    )
    for index, node in enumerate(doc.nodes):
        run = _node_code(node, index, source, variables)
        add = graph.add_fanin_node if node.fan_in else graph.add_node
        try:
            add(node.name, run)
        except GraphError as exc:
            raise source.error(["nodes", index], str(exc)) from None
    _check_references(doc, source)
    _add_edges(graph, doc, source, variables)
    _add_implicit_edges(graph, doc, source, variables)
    return graph


def _node_code(node: NodeDoc, index: int, source: _Source, variables: dict[str, Any]) -> Any:
    if node.run is not None:
        first = _first_line(source.value_node("nodes", index, "run"))
        return InlineCode(node.run, node.name, source.name, first, variables)
    if node.uses is None:
        return None
    try:
        target: Any = resolve(node.uses)
    except GraphError as exc:
        problem = f"node '{node.name}': {exc}"
        raise source.error(["nodes", index, "uses"], problem) from None
    if not callable(target):
        raise source.error(["nodes", index, "uses"], f"'{node.uses}' is not callable")
    return target


def _check_references(doc: AgentDoc, source: _Source) -> None:
    """Every edge and ``goto`` names declared nodes; fan-ins are fan-in nodes; a node with
    ``goto`` has no edges leaving it."""
    nodes = {n.name: n for n in doc.nodes}
    sources = {e.source for e in doc.edges}
    for index, node in enumerate(doc.nodes):
        if node.goto is None:
            continue
        if node.name in sources:
            problem = f"node '{node.name}' has both 'goto' and edges leaving it: give one"
            raise source.error(["nodes", index, "goto"], problem)
        rules = [node.goto] if isinstance(node.goto, str) else [r.to for r in node.goto]
        if not rules:
            raise source.error(["nodes", index, "goto"], "needs a node or at least one rule")
        for target in rules:
            if target not in nodes and target != END:
                hint = _did_you_mean(target, [*nodes, END])
                raise source.error(["nodes", index, "goto"], f"unknown node '{target}'{hint}")
    for index, edge in enumerate(doc.edges):
        refs = [("from", edge.source, {START})]
        refs += [("to", t, {END}) for t in edge.targets]
        refs += [("fan_in", edge.fan_in, set())] if edge.fan_in is not None else []
        for key, name, extra in refs:
            if name not in nodes and name not in extra:
                hint = _did_you_mean(name, [*nodes, *extra])
                raise source.error(["edges", index, key], f"unknown node '{name}'{hint}")
        if edge.fan_in is not None and not nodes[edge.fan_in].fan_in:
            problem = f"'{edge.fan_in}' is not a fan-in node (add 'fan_in: true' to it)"
            raise source.error(["edges", index, "fan_in"], problem)


def _add_edges(
    graph: StateGraph, doc: AgentDoc, source: _Source, variables: dict[str, Any]
) -> None:
    routed = {e.source for e in doc.edges if e.when is not None}
    groups: dict[str, list[tuple[int, EdgeDoc]]] = {}
    for index, edge in enumerate(doc.edges):
        if edge.is_parallel and edge.map is not None:
            graph.add_parallel_map(
                edge.source,
                edge.targets[0],
                edge.fan_in or "",
                edge.map,
                item_key=edge.item_key,
                index_key=edge.index_key,
                config=edge.parallel_config,
                batch_size=edge.batch_size,
            )
        elif edge.is_parallel:
            for target in edge.targets:
                graph.add_parallel_edge(
                    edge.source, target, edge.fan_in or "", edge.parallel_config
                )
        elif edge.source in routed:
            groups.setdefault(edge.source, []).append((index, edge))
        else:
            graph.add_edge(edge.source, edge.targets[0])
    for node, edges in groups.items():
        whens = [(i, e) for i, e in edges if e.when is not None]
        defaults = [(i, e) for i, e in edges if e.when is None]
        if len(defaults) > 1:
            problem = f"node '{node}' already has an edge without 'when' (edges[{defaults[0][0]}])"
            raise source.error(["edges", defaults[1][0]], problem)
        expressions = [
            (e.when or "", _first_line(source.value_node("edges", i, "when"))) for i, e in whens
        ]
        targets: dict[Hashable, str] = {k: e.targets[0] for k, (_, e) in enumerate(whens)}
        if defaults:
            targets["default"] = defaults[0][1].targets[0]
        condition = WhenCondition(
            node, expressions, source.name, has_default=bool(defaults), variables=variables
        )
        graph.add_conditional_edges(node, condition, targets)


def _add_implicit_edges(
    graph: StateGraph, doc: AgentDoc, source: _Source, variables: dict[str, Any]
) -> None:
    """The Edge Agent's navigation: entry at the first node, ``goto``, then declaration order."""
    sources = {e.source for e in doc.edges}
    if START not in sources:
        graph.set_entry_point(doc.nodes[0].name)
    for index, node in enumerate(doc.nodes):
        following = doc.nodes[index + 1].name if index + 1 < len(doc.nodes) else END
        if isinstance(node.goto, str):
            graph.add_edge(node.name, node.goto)
        elif node.goto is not None:
            _add_goto_rules(graph, node, index, source, variables)
        elif node.name not in sources:
            graph.add_edge(node.name, following)


def _add_goto_rules(
    graph: StateGraph, node: NodeDoc, index: int, source: _Source, variables: dict[str, Any]
) -> None:
    rules = node.goto if isinstance(node.goto, list) else []
    conditional = [(i, r) for i, r in enumerate(rules) if r.when is not None]
    defaults = [r for r in rules if r.when is None]
    if len(defaults) > 1:
        problem = "only one rule may go without 'if' (it is the default)"
        raise source.error(["nodes", index, "goto"], problem)
    expressions = [
        (_expression(r.when or ""), _first_line(source.value_node("nodes", index, "goto", i)))
        for i, r in conditional
    ]
    targets: dict[Hashable, str] = {k: r.to for k, (_, r) in enumerate(conditional)}
    if defaults:
        targets["default"] = defaults[0].to
    if not conditional:
        graph.add_edge(node.name, targets["default"])
        return
    condition = WhenCondition(
        node.name, expressions, source.name, has_default=bool(defaults), variables=variables
    )
    graph.add_conditional_edges(node.name, condition, targets)


def _expression(text: str) -> str:
    """A ``goto`` condition, accepted with or without The Edge Agent's ``{{ }}``."""
    text = text.strip()
    if text.startswith("{{") and text.endswith("}}"):
        return text[2:-2].strip()
    return text
