"""The Edge Agent's ``YAMLEngine``: ``load_from_file`` and ``load_from_dict``, on tea_dist's
YAML loader.

Both return TEA's ``StateGraph`` (``tea_dist.interfaces.tea.StateGraph``), ready to ``invoke``.
A document given as a dict is written to a file first (one per document, named by its hash,
in a directory of this process removed at exit): Celery workers load YAML agents from files
by path and hash, so an agent built from a dict runs on every strategy.
"""

from __future__ import annotations

import atexit
import hashlib
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import YAMLError
from tea_dist.core.graph import StateGraph as _StateGraph
from tea_dist.core.yaml_loader import load_yaml
from tea_dist.distributed.trust import agents_dir
from tea_dist.interfaces.tea.graph import StateGraph

_lock = threading.Lock()
_directory: Path | None = None


def agent_file(text: str, name: str) -> Path:
    """The file holding ``text`` (written once per content) in this process's agent folder."""
    global _directory
    with _lock:
        if _directory is None:
            # inside the agents directory: celery workers find agents by their path there
            _directory = Path(tempfile.mkdtemp(prefix=".tea-dist-agents-", dir=agents_dir()))
            atexit.register(shutil.rmtree, _directory, True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)[:40] or "agent"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        path = _directory / f"{stem}-{digest}.yaml"
        if not path.exists():
            path.write_text(text, encoding="utf-8")
        return path


class YAMLEngine:
    """Loads YAML agents into TEA-style graphs.

    ``variables`` is the dict the agent's code sees as ``variables`` (the document's
    ``variables:``), shared by its nodes in this process; ``_current_graph`` is the graph
    loaded last.
    """

    def __init__(self) -> None:
        self.variables: dict[str, Any] = {}
        self._current_graph: StateGraph | None = None

    def load_from_file(self, path: str | Path) -> StateGraph:
        """Load and validate an agent file (``YAMLError``, also a ``ValueError``, naming the
        place of a problem)."""
        self.variables = {}
        graph = load_yaml(path, variables=self.variables)
        return self._tea_graph(graph, Path(path).read_text(encoding="utf-8"))

    def load_from_dict(self, config: Mapping[str, Any]) -> StateGraph:
        """Load and validate an agent given as a dict (as ``yaml.safe_load`` returns it)."""
        if not isinstance(config, Mapping):
            raise YAMLError(f"an agent must be a mapping, got {type(config).__name__}")
        try:
            text = yaml.safe_dump(dict(config), sort_keys=False, allow_unicode=True)
        except yaml.YAMLError as exc:
            raise YAMLError(f"the agent cannot be written as YAML: {exc}") from None
        name = str(config.get("name") or "agent")
        return self.load_from_file(agent_file(text, name))

    def _tea_graph(self, graph: _StateGraph, text: str) -> StateGraph:
        values = {f.name: getattr(graph, f.name) for f in fields(_StateGraph) if f.init}
        settings = (yaml.safe_load(text) or {}).get("settings") or {}
        if "failed_branches" not in settings:
            values["failed_branches"] = "tea"
        values["parallel_config"] = graph.parallel_config or ParallelConfig()
        values["max_workers"] = values["parallel_config"].max_workers
        tea = StateGraph(**values)
        self._current_graph = tea
        return tea
