"""TEA's run-time fan-out node kinds, as tea_dist maps (``StateGraph.add_parallel_map``).

``translate(doc)`` rewrites a TEA agent document into tea_dist's own YAML, which
``load_yaml`` builds and Celery workers load by path and hash like any agent. A node of one of
TEA's kinds, named ``N`` and collecting at ``F`` (its ``fan_in``), becomes:

- ``N.items``: evaluates the items (a TEA template, ``templates.py``) into the state key
  ``__tea_items_N``; edges and ``goto`` that led to ``N`` lead here;
- a map edge ``N.items => N ... F``: one branch per item, named ``N[i]``, with every policy
  of tea_dist's maps (strategy, timeouts, retries, circuit, limits, callbacks, and
  ``batch_size`` for celery, on the node or under ``parallel_config``);
- the branch's nodes, from ``N`` to ``F``: a ``dynamic_parallel`` node's ``steps`` (one node a
  step), ``action`` or ``subgraph``; a ``parallel_each`` or ``matrix`` node's own ``run`` or
  ``uses``, its result shaped as TEA shapes it;
- ``F`` becomes a fan-in node (its ``parallel_results`` are the branches' results, in item
  order).

The kinds, as TEA defines them:

- ``type: dynamic_parallel``: ``items``, ``item_var`` (``item``), ``index_var`` (``index``),
  one of ``action`` / ``steps`` / ``subgraph`` (+ ``input``), ``fan_in``, ``max_concurrency``
  and ``fail_fast`` (on the node or under ``parallel_config``, whose other keys are tea_dist's
  ``ParallelConfig`` settings);
- ``parallel_each: <template>``: the node's own ``run`` / ``uses`` per item (``item`` and
  ``item_index`` in the state), ``max_workers``;
- ``strategy: {matrix: {key: [values]}, fail_fast, max_parallel}``: one branch per
  combination, ``matrix`` in the state.

TEA's ``fail_fast`` keeps TEA's outcome: the fan-in still runs, with every branch's result
(tea_dist's own ``fail_fast`` would end the run instead). Malformed nodes fail at load time
with TEA's messages (node, key, an example and TEA's reference section).
"""

from __future__ import annotations

import itertools
import json
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tea_dist.core.errors import YAMLError

__all__ = ["ActionSpec", "Translation", "kind_of", "translate"]

_DOC = "docs/shared/YAML_REFERENCE.md#dynamic-parallel"
_TEA = "from tea_dist.interfaces.tea import branches as _tea\n"
_NODE_KEYS = ("name", "run", "uses", "fan_in", "goto")


@dataclass(frozen=True)
class ActionSpec:
    """A node that calls an action of ``YAMLEngine(actions_registry=...)``."""

    action: str
    params: Mapping[str, Any]
    output: Any
    each: str | None = None  # "parallel_each" or "matrix": shape the result as theirs


@dataclass
class Translation:
    """The rewritten document, and the nodes that call registry actions."""

    doc: dict[str, Any]
    actions: dict[str, ActionSpec] = field(default_factory=dict)
    has_maps: bool = False


def kind_of(node: Mapping[str, Any]) -> str | None:
    """``dynamic_parallel``, ``parallel_each``, ``matrix`` or None."""
    if node.get("type") == "dynamic_parallel":
        return "dynamic_parallel"
    if "parallel_each" in node:
        return "parallel_each"
    strategy = node.get("strategy")
    if isinstance(strategy, Mapping) and "matrix" in strategy:
        return "matrix"
    return None


def _error(*lines: str) -> YAMLError:
    return YAMLError("\n".join(lines))


def _code(*lines: str) -> str:
    return _TEA + "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    """Python source giving ``value`` back (JSON data)."""
    try:
        return f"_tea.data({json.dumps(value)!r})"
    except (TypeError, ValueError):
        raise YAMLError(f"cannot carry {value!r} in an agent (not JSON data)") from None


class _Translator:
    def __init__(self, doc: Mapping[str, Any], registry: Mapping[str, Any], base: Path):
        self.doc, self.registry, self.base = dict(doc), registry, base
        self.nodes: list[dict[str, Any]] = [
            dict(n) if isinstance(n, Mapping) else n for n in self.doc.get("nodes") or []
        ]
        self.names = [n.get("name") for n in self.nodes if isinstance(n, dict)]
        self.actions: dict[str, ActionSpec] = {}
        self.renamed: dict[str, str] = {}  # a kind's node -> its items node
        self.fan_ins: dict[str, str] = {}  # a kind's node -> its fan-in

    # -- the document --

    def run(self) -> Translation:
        out: list[Any] = []
        edges: list[Any] = []
        for node in self.nodes:
            kind = kind_of(node) if isinstance(node, dict) else None
            if kind is None:
                out.append(self._plain(node) if isinstance(node, dict) else node)
                continue
            made, edge = self._kind(node, kind)
            out.extend(made)
            edges.append(edge)
        for node in out:
            if isinstance(node, dict) and node.get("name") in self.fan_ins.values():
                node["fan_in"] = True
            if isinstance(node, dict) and node.get("name") in self.renamed:
                continue
            if isinstance(node, dict) and isinstance(node.get("goto"), str | list):
                node["goto"] = self._goto(node["goto"])
        doc = {**self.doc, "nodes": out, "edges": self._edges(edges)}
        return Translation(doc, self.actions, has_maps=bool(self.renamed))

    def _goto(self, goto: Any) -> Any:
        if isinstance(goto, str):
            return self.renamed.get(goto, goto)
        return [
            {**r, "to": self.renamed.get(str(r.get("to")), r.get("to"))}
            if isinstance(r, dict)
            else r
            for r in goto
        ]

    def _edges(self, maps: list[dict[str, Any]]) -> list[Any]:
        edges: list[Any] = []
        for index, edge in enumerate(self.doc.get("edges") or []):
            if not isinstance(edge, Mapping):
                edges.append(edge)
                continue
            edge = dict(edge)
            source = edge.get("from")
            if source in self.fan_ins:
                if edge.get("to") == self.fan_ins[source]:
                    continue  # the map leads there already
                raise YAMLError(
                    f"edges[{index}]: node '{source}' fans out and continues at its fan_in "
                    f"'{self.fan_ins[source]}': an edge from it to {edge.get('to')!r} has no place"
                )
            target = edge.get("to")
            if isinstance(target, str):
                edge["to"] = self.renamed.get(target, target)
            elif isinstance(target, list):
                edge["to"] = [self.renamed.get(t, t) for t in target]
            edges.append(edge)
        return edges + maps

    def _plain(self, node: dict[str, Any]) -> dict[str, Any]:
        """A node of no fan-out kind: a registry action becomes an ``ActionCall``."""
        uses = node.get("uses")
        if isinstance(uses, str) and uses in self.registry:
            name = str(node.get("name"))
            self.actions[name] = ActionSpec(uses, node.get("with") or {}, _output(node))
            return {**_keep(node), "uses": None, "run": _placeholder(uses)}
        return node

    # -- one node of a kind --

    def _kind(self, node: dict[str, Any], kind: str) -> tuple[list[dict[str, Any]], dict]:
        name = str(node.get("name"))
        if kind == "dynamic_parallel":
            fan_in, expression, config, keys = self._dynamic(node, name)
            body = self._dynamic_body(node, name, fan_in)
        elif kind == "parallel_each":
            fan_in, expression, config = self._each(node, name)
            keys = ("item", "item_index")
            body = self._own_body(node, name, fan_in, kind)
        else:
            fan_in, combos, config = self._matrix(node, name)
            expression = None
            keys = ("matrix", "matrix_index")
            body = self._own_body(node, name, fan_in, kind)
        items_node = f"{name}.items"
        for made in (items_node, *(b["name"] for b in body[1:])):
            if made in self.names:
                raise YAMLError(f"node '{name}': the name '{made}' it needs is taken")
        key = f"__tea_items_{name}"
        if expression is not None:
            value = f"_tea.items({expression!r}, state, variables, {name!r}, {kind!r})"
        else:
            value = _literal(combos)
        items = {"name": items_node, "run": _code(f"return {{{key!r}: {value}}}")}
        self.renamed[name] = items_node
        self.fan_ins[name] = fan_in
        edge = {
            "from": items_node,
            "to": name,
            "parallel": True,
            "fan_in": fan_in,
            "map": key,
            "item_key": keys[0],
            "index_key": keys[1],
        }
        batch = config.pop("batch_size", node.get("batch_size"))
        if batch is not None:  # celery: items per task
            edge["batch_size"] = batch
        if config:
            edge["parallel_config"] = config
        return [items, *body], edge

    def _check_fan_in(self, kind: str, name: str, fan_in: Any, example: str) -> str:
        if not fan_in:
            if kind == "dynamic_parallel":
                raise _error(
                    f"dynamic_parallel node '{name}': missing required key 'fan_in'.",
                    "  Add a sibling 'fan_in' naming the node that collects the",
                    "  parallel results, e.g.:",
                    f"      fan_in: {example}",
                    f"  See {_DOC}",
                )
            raise YAMLError(f"{kind} node '{name}' requires 'fan_in' target node")
        if fan_in not in self.names:
            declared = sorted(str(n) for n in self.names)
            raise _error(
                f"{kind} node '{name}': fan_in target '{fan_in}'",
                "  is not a defined node.",
                f"  Declared nodes: {declared}",
                "  Pick one of the declared nodes, e.g.:",
                f"      fan_in: {declared[-1] if declared else 'collect'}",
                f"  See {_DOC}",
            )
        return str(fan_in)

    def _dynamic(self, node: dict[str, Any], name: str) -> tuple[str, str, dict, tuple]:
        if not node.get("items"):
            raise _error(
                f"dynamic_parallel node '{name}': missing required key 'items'.",
                "  Add an items expression beside action/steps/subgraph, e.g.:",
                '      items: "{{ state.batches }}"',
                f"  See {_DOC}",
            )
        modes = [m for m in ("action", "steps", "subgraph") if node.get(m) is not None]
        if not modes:
            raise _error(
                f"dynamic_parallel node '{name}': missing branch-body key.",
                "  Add exactly one of: 'action', 'steps' or 'subgraph':",
                "      action:   one registered action call per item",
                "      steps:    a list of steps run in order per item",
                "      subgraph: another agent file run per item",
                f"  See {_DOC}",
            )
        if len(modes) > 1:
            raise _error(
                f"dynamic_parallel node '{name}': conflicting branch-body keys.",
                f"  Conflicting keys: {', '.join(repr(m) for m in modes)}.",
                "  Exactly one of action/steps/subgraph is allowed: remove one.",
                f"  See {_DOC}",
            )
        fan_in = self._check_fan_in("dynamic_parallel", name, node.get("fan_in"), "collect")
        settings = dict(node.get("parallel_config") or {})
        limit = node.get("max_concurrency", settings.pop("max_concurrency", None))
        settings.pop("fail_fast", None)  # TEA's meaning: the fan-in runs with every result
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise YAMLError(
                    f"dynamic_parallel node '{name}': max_concurrency must be "
                    f"positive integer, got {limit}"
                )
            settings["max_workers"] = limit
        keys = (str(node.get("item_var") or "item"), str(node.get("index_var") or "index"))
        return fan_in, str(node["items"]), settings, keys

    def _each(self, node: dict[str, Any], name: str) -> tuple[str, str, dict]:
        expression = node.get("parallel_each")
        if not expression:
            raise YAMLError(f"parallel_each node '{name}' requires 'parallel_each' expression")
        fan_in = self._check_fan_in("parallel_each", name, node.get("fan_in"), "collect")
        limit = node.get("max_workers")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise YAMLError(
                f"parallel_each node '{name}': max_workers must be positive integer, got {limit}"
            )
        return fan_in, str(expression), {"max_workers": limit} if limit else {}

    def _matrix(self, node: dict[str, Any], name: str) -> tuple[str, list, dict]:
        strategy = node["strategy"]
        matrix = strategy.get("matrix")
        if not isinstance(matrix, Mapping) or not matrix:
            raise YAMLError(f"Matrix strategy node '{name}' requires 'strategy.matrix' values")
        for key, values in matrix.items():
            if not isinstance(values, list):
                raise YAMLError(
                    f"Matrix strategy node '{name}': matrix.{key} must be a list, "
                    f"got {type(values).__name__}"
                )
            if not values:
                raise YAMLError(f"Matrix strategy node '{name}': matrix.{key} cannot be empty")
        fan_in = node.get("fan_in")
        if not fan_in:
            raise YAMLError(f"Matrix strategy node '{name}' requires 'fan_in' target node")
        fan_in = self._check_fan_in("matrix", name, fan_in, "collect")
        combos = [dict(zip(matrix, c, strict=True)) for c in itertools.product(*matrix.values())]
        limit = strategy.get("max_parallel")
        return fan_in, combos, {"max_workers": limit} if limit else {}

    # -- the branch's nodes --

    def _dynamic_body(self, node: dict[str, Any], name: str, fan_in: str) -> list[dict]:
        if node.get("action") is not None:
            action = node["action"]
            if not isinstance(action, Mapping) or not action.get("uses"):
                raise YAMLError(f"dynamic_parallel node '{name}' action requires 'uses' field")
            step = {"uses": action["uses"], "with": action.get("with") or {}}
            body = [self._step(name, {**step, "output": action.get("output")}, None)]
        elif node.get("steps") is not None:
            steps = node["steps"]
            if not isinstance(steps, list) or not steps:
                raise YAMLError(f"dynamic_parallel node '{name}': 'steps' must be a list of steps")
            body = []
            for index, step in enumerate(steps):
                if not isinstance(step, Mapping):
                    raise YAMLError(f"dynamic_parallel node '{name}': steps[{index}] must be a map")
                label = step.get("name") or f"step_{index}"
                step_name = name if index == 0 else f"{name}.{label}"
                body.append(self._step(step_name, step, None))
        else:
            path = Path(str(node["subgraph"]))
            path = path if path.is_absolute() else self.base / path
            mapping = _literal(node.get("input") or {})
            call = f"_subgraph({str(path)!r}, {mapping}, state, variables)"
            load = "from tea_dist.interfaces.tea.yaml_engine import subgraph as _subgraph"
            body = [{"name": name, "run": _code(load, f"return {call}")}]
        return _chain(body, fan_in)

    def _own_body(self, node: dict[str, Any], name: str, fan_in: str, kind: str) -> list[dict]:
        if isinstance(node.get("run"), str):
            inner = textwrap.indent(textwrap.dedent(node["run"]).strip() or "pass", "    ")
            run = _code(
                "def _tea_body(state):",
                inner,
                f"return _tea.each_result(_tea_body(state), state, {kind!r})",
            )
            return _chain([{"name": name, "run": run}], fan_in)
        if isinstance(node.get("uses"), str):
            step = {"uses": node["uses"], "with": node.get("with") or {}, "output": _output(node)}
            return _chain([self._step(name, step, kind)], fan_in)
        raise YAMLError(f"{kind} node '{name}' requires one of: run, uses")

    def _step(self, name: str, step: Mapping[str, Any], each: str | None) -> dict[str, Any]:
        """One node of a branch: inline ``run``, or an action (``uses``, ``with``, ``output``)."""
        if isinstance(step.get("run"), str) and step.get("uses") is None:
            if each is not None:
                raise YAMLError(f"node '{name}': internal: a shaped step must be an action")
            return {"name": name, "run": step["run"]}
        uses = step.get("uses")
        if not isinstance(uses, str) or not uses:
            raise YAMLError(f"node '{name}': a step needs 'run' (inline code) or 'uses'")
        params, output = step.get("with") or {}, step.get("output")
        if uses in self.registry:
            self.actions[name] = ActionSpec(uses, params, output, each)
            return {"name": name, "run": _placeholder(uses)}
        if ":" not in uses:
            raise YAMLError(
                f"node '{name}': unknown action '{uses}': pass it in "
                "YAMLEngine(actions_registry={...}) or name a function as 'module:callable'"
            )
        call = f"_tea.call_action({uses!r}, {_literal(params)}, {_literal(output)}, "
        call += "state, variables)"
        value = f"_tea.each_result({call}, state, {each!r})" if each else call
        return {"name": name, "run": _code(f"return {value}")}


def _chain(body: list[dict[str, Any]], fan_in: str) -> list[dict[str, Any]]:
    """The branch's nodes, each going to the next and the last to the fan-in."""
    for node, following in zip(body, [*(b["name"] for b in body[1:]), fan_in], strict=True):
        node["goto"] = following
    return body


def _keep(node: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k in _NODE_KEYS}


def _output(node: Mapping[str, Any]) -> Any:
    return node.get("output", node.get("output_key"))


def _placeholder(action: str) -> str:
    """The file's stand-in for a registry action (the graph runs the callable itself)."""
    message = f"action {action!r} runs only in the process whose YAMLEngine was given it"
    return f"raise RuntimeError({message!r})\n"


def translate(
    doc: Mapping[str, Any], registry: Mapping[str, Any] | None = None, base: Path | None = None
) -> Translation:
    """TEA's document in tea_dist's YAML (see the module docstring); ``registry`` is
    ``YAMLEngine``'s ``actions_registry``, ``base`` the folder relative paths start from."""
    return _Translator(doc, registry or {}, base or Path.cwd()).run()
