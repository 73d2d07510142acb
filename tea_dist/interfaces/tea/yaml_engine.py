"""The Edge Agent's ``YAMLEngine``: ``load_from_file`` and ``load_from_dict``, on tea_dist's
YAML loader.

Both return TEA's ``StateGraph`` (``tea_dist.interfaces.tea.StateGraph``), ready to ``invoke``.
A document given as a dict is written to a file first (one per document, named by its hash,
in a directory of this process removed at exit): Celery workers load YAML agents from files
by path and hash, so an agent built from a dict runs on every strategy. A document with TEA's
run-time fan-out kinds (``dynamic_parallel``, ``parallel_each``, ``matrix``) or with actions of
``actions_registry`` is first rewritten into tea_dist's YAML (``fanout.py``) and written so.

``YAMLEngine(actions_registry=..., enable_tracing=..., trace_exporter=..., trace_callback=...,
trace_file=...)`` take TEA's meaning: registry actions are Python callables nodes call by name
(they run on the thread, asyncio and process strategies; Celery workers, which import code,
refuse them naming the node); tracing hands every event ``invoke()`` and ``stream()`` yield to
a callback, to stderr (``console``) or to a JSON-lines file (``file``). TEA's other exporters
have no equivalent here and are refused by name (tea_dist traces with OpenTelemetry).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import re
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError, NodeError, YAMLError
from tea_dist.core.graph import Node
from tea_dist.core.graph import StateGraph as _StateGraph
from tea_dist.core.yaml_loader import load_yaml
from tea_dist.distributed.trust import agents_dir
from tea_dist.interfaces.tea.branches import ActionCall
from tea_dist.interfaces.tea.fanout import Translation, kind_of, translate
from tea_dist.interfaces.tea.graph import StateGraph
from tea_dist.interfaces.tea.templates import render_params

TRACE_EXPORTERS = ("console", "callback", "file")

_lock = threading.Lock()
_directories: dict[Path, Path] = {}  # agents directory -> this process's folder inside it


def agent_file(text: str, name: str) -> Path:
    """The file holding ``text`` (written once per content) in this process's agent folder
    inside the current agents directory (``TEA_DIST_AGENTS_DIR``, else the working
    directory), where celery workers find agents by their path."""
    base = agents_dir()
    with _lock:
        directory = _directories.get(base)
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix=".tea-dist-agents-", dir=base))
            atexit.register(shutil.rmtree, directory, True)
            _directories[base] = directory
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40] or "agent"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = directory / f"{stem}-{digest}.yaml"
        if not path.exists():
            path.write_text(text, encoding="utf-8")
        return path


class YAMLEngine:
    """Loads YAML agents into TEA-style graphs.

    ``variables`` is the dict the agent's code sees as ``variables`` (the document's
    ``variables:``), shared by its nodes in this process; ``_current_graph`` is the graph
    loaded last; ``actions_registry`` maps action names (``uses:``) to callables.
    """

    def __init__(
        self,
        actions_registry: Mapping[str, Callable[..., Any]] | None = None,
        enable_tracing: bool = True,
        trace_exporter: str | None = None,
        trace_file: str | None = None,
        trace_callback: Callable[[dict[str, Any]], None] | None = None,
        trace_verbose: bool = False,
    ) -> None:
        self.variables: dict[str, Any] = {}
        self._current_graph: StateGraph | None = None
        self.actions_registry: dict[str, Callable[..., Any]] = dict(actions_registry or {})
        for name, action in self.actions_registry.items():
            if not callable(action):
                raise ConfigError(f"actions_registry['{name}'] is not callable: {action!r}")
        self._trace = _trace_sink(enable_tracing, trace_exporter, trace_file, trace_callback)

    def load_from_file(self, path: str | Path) -> StateGraph:
        """Load and validate an agent file (``YAMLError``, also a ``ValueError``, naming the
        place of a problem)."""
        file = Path(path)
        text = file.read_text(encoding="utf-8") if file.is_file() else None
        doc = _safe_load(text) if text is not None else None
        if isinstance(doc, Mapping) and self._needs_translation(doc):
            return self._load_translated(doc, file.resolve().parent)
        self.variables = {}
        graph = load_yaml(path, variables=self.variables)
        return self._tea_graph(graph, text or "")

    def load_from_dict(self, config: Mapping[str, Any]) -> StateGraph:
        """Load and validate an agent given as a dict (as ``yaml.safe_load`` returns it)."""
        if not isinstance(config, Mapping):
            raise YAMLError(f"an agent must be a mapping, got {type(config).__name__}")
        if self._needs_translation(config):
            return self._load_translated(config, Path.cwd())
        return self.load_from_file(_write(config))

    def _needs_translation(self, doc: Mapping[str, Any]) -> bool:
        nodes = doc.get("nodes")
        if not isinstance(nodes, list):
            return False
        nodes = [n for n in nodes if isinstance(n, Mapping)]
        return any(kind_of(n) for n in nodes) or any(
            n.get("uses") in self.actions_registry for n in nodes
        )

    def _load_translated(self, doc: Mapping[str, Any], base: Path) -> StateGraph:
        done = translate(doc, self.actions_registry, base)
        file = _write(done.doc)
        self.variables = {}
        graph = load_yaml(file, variables=self.variables)
        tea = self._tea_graph(graph, file.read_text(encoding="utf-8"), done)
        return tea

    def _tea_graph(
        self, graph: _StateGraph, text: str, done: Translation | None = None
    ) -> StateGraph:
        values = {f.name: getattr(graph, f.name) for f in fields(_StateGraph) if f.init}
        settings = (_safe_load(text) or {}).get("settings") or {}
        if "failed_branches" not in settings:
            # TEA's maps hand every result to the fan-in; its parallel edges stop at a failure
            values["failed_branches"] = "fan_in" if done and done.has_maps else "tea"
        values["parallel_config"] = graph.parallel_config or ParallelConfig()
        values["max_workers"] = values["parallel_config"].max_workers
        tea = StateGraph(**values)
        if done is not None and done.actions:
            for name, spec in done.actions.items():
                action = self.actions_registry[spec.action]
                run = ActionCall(
                    action, spec.action, spec.params, spec.output, self.variables, spec.each
                )
                tea._nodes[name] = Node(name, run, fan_in=tea._nodes[name].fan_in)
            tea.origin = None  # its actions are Python callables: the file alone is not the graph
        tea.trace = self._trace
        self._current_graph = tea
        return tea


def _safe_load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None  # the loader reports it, with its place


def _write(config: Mapping[str, Any]) -> Path:
    """``config`` written as an agent file in this process's agent folder."""
    try:
        text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as exc:
        raise YAMLError(f"the agent cannot be written as YAML: {exc}") from None
    return agent_file(text, str(config.get("name") or "agent"))


def _trace_sink(
    enabled: bool,
    exporter: str | None,
    file: str | None,
    callback: Callable[[dict[str, Any]], None] | None,
) -> Callable[[dict[str, Any]], None] | None:
    """Where TEA's tracing sends each event, or None (no exporter: nothing to send)."""
    if not enabled or exporter is None:
        return None
    if exporter not in TRACE_EXPORTERS:
        raise ConfigError(
            f"trace_exporter {exporter!r} has no tea_dist equivalent (use one of "
            f"{', '.join(TRACE_EXPORTERS)}, or OpenTelemetry: pip install tea-dist[otel])"
        )
    if exporter == "callback":
        if callback is None:
            raise ConfigError("trace_exporter='callback' needs trace_callback=")
        return callback
    if exporter == "file":
        if not file:
            raise ConfigError("trace_exporter='file' needs trace_file=")
        return functools.partial(_append_json_line, Path(file))
    return _print_event


def _print_event(event: dict[str, Any]) -> None:
    print(json.dumps(event, default=str), file=sys.stderr)


def _append_json_line(path: Path, event: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(event, default=str) + "\n")


def subgraph(
    path: str,
    mapping: Mapping[str, Any],
    state: Mapping[str, Any],
    variables: Mapping[str, Any],
) -> dict[str, Any]:
    """Run the agent file ``path`` on the input ``mapping`` gives (templates rendered for
    ``state``); its final state. Its failure fails the branch, naming the file."""
    graph = YAMLEngine().load_from_file(Path(path))
    start = render_params(dict(mapping), state, variables)
    final: dict[str, Any] = {}
    for event in graph.invoke(start):
        if event.get("type") == "final":
            final = event.get("state") or {}
        elif event.get("type") == "error":
            raise NodeError(f"subgraph {path}: {event.get('error') or 'failed'}")
    return final
