"""How a branch travels to a Celery worker: JSON naming code, never carrying it.

A Python graph's branch travels as its nodes and edges, each callable named by
``module:qualname`` (checked at compile time: a lambda, a closure or a ``__main__`` function
fails naming its node). A YAML graph travels as its path relative to ``TEA_DIST_AGENTS_DIR``
plus the file's SHA-256; the worker loads its own copy and refuses a different one. Either
carries a code fingerprint (tea_dist's version, the SHA-256 of each node module's source).
A worker decodes a branch only after ``trust`` has passed it: every module allowed, no agent
outside its agents directory, the same code as the caller. ``check_json_state`` rejects a
state that cannot cross, naming the key and the branch, before anything is sent.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from functools import lru_cache
from pathlib import Path
from typing import Any

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import GraphError, SerializationError, StateTooLargeError
from tea_dist.core.graph import Conditional, FanOut, GraphSpec, MapItems, Node
from tea_dist.core.references import resolve
from tea_dist.core.yaml_code import InlineCode
from tea_dist.distributed.settings import Settings
from tea_dist.distributed.trust import (
    Allowlist,
    CodeMismatchError,
    agent_path,
    agent_ref,
    check_fingerprint,
    fingerprint,
    note_branch_modules,
    worker_allowlist,
)


def callable_path(fn: Callable[..., Any], node: str) -> str:
    """``module:qualname`` of a module-level callable; ``GraphError`` naming the node otherwise."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<lambda>" in qualname or "<locals>" in qualname:
        raise GraphError(
            f"node '{node}' runs {fn!r}, which a Celery worker cannot import: "
            "celery branches need module-level functions (no lambdas or closures)"
        )
    if module == "__main__":
        raise GraphError(
            f"node '{node}' runs {qualname} from __main__, which a Celery worker cannot import: "
            "move it into an importable module"
        )
    try:
        found = resolve(f"{module}:{qualname}")  # uncached: a reloaded module has new objects
    except GraphError:
        found = None
    if found is not fn and getattr(found, "__wrapped__", None) is not fn:
        raise GraphError(
            f"node '{node}' runs {module}:{qualname}, which does not import back to the same "
            "object; celery branches need module-level functions"
        )
    return f"{module}:{qualname}"


@lru_cache(maxsize=1024)
def import_callable(path: str) -> Callable[..., Any]:
    """The function or class ``module:qualname`` names, defined in that module
    (``core.references``); ``GraphError`` saying what could not be imported."""
    return resolve(path)  # type: ignore[no-any-return]


def encode_branch(
    spec: GraphSpec, branch: str, fan_in: str, settings: Settings | None = None
) -> dict[str, Any]:
    """The JSON description of the part of ``spec`` a branch runs, with its code fingerprint
    (a YAML agent named relative to the agents directory of ``settings``, the cluster's)."""
    if spec.origin and "yaml" in spec.origin:
        modules = yaml_uses_modules(Path(spec.origin["yaml"]).read_bytes())
        return {
            "yaml": agent_ref(spec.origin["yaml"], settings),
            "sha256": spec.origin["sha256"],
            "name": spec.name,
            "code": fingerprint(modules),
        }
    names = spec.branch_nodes(branch, fan_in)[0]
    if any(isinstance(spec.nodes[n].run, InlineCode) for n in names):
        raise GraphError(
            f"branch '{branch}' of '{spec.name}' runs inline code of a YAML agent that was not "
            "loaded from a file: Celery workers load YAML agents by path and hash, so load it "
            "with load_yaml(path)"
        )
    nodes = {}
    for name in names:
        node = spec.nodes[name]
        run = callable_path(node.run, name) if node.run is not None else None
        nodes[name] = {"run": run, "fan_in": node.fan_in}
    conditionals = {
        name: {
            "func": callable_path(c.func, name),
            "targets": [[k, t] for k, t in c.targets.items()],
        }
        for name, c in spec.conditionals.items()
        if name in nodes
    }
    fanouts = {
        name: {
            "fan_in": f.fan_in,
            "branches": list(f.branches),
            "configs": [c.model_dump(mode="json", exclude_unset=False) for c in f.configs],
            "map": _encode_map(f.map, name),
        }
        for name, f in spec.fanouts.items()
        if name in nodes
    }
    edges = {name: list(spec.edges[name]) for name in names if name in spec.edges}
    data = {
        "name": spec.name,
        "nodes": nodes,
        "edges": edges,
        "conditionals": conditionals,
        "fanouts": fanouts,
    }
    data["code"] = fingerprint(p.partition(":")[0] for p in _callable_paths(data))
    return data


def _encode_map(mapping: MapItems | None, node: str) -> dict[str, Any] | None:
    """A nested map: its items' state key, or the import path of its ``items`` callable."""
    if mapping is None:
        return None
    items = callable_path(mapping.items, node) if callable(mapping.items) else mapping.items
    return {
        "items": items,
        "call": callable(mapping.items),
        "item_key": mapping.item_key,
        "index_key": mapping.index_key,
        "batch_size": mapping.batch_size,
    }


def _decode_map(data: Mapping[str, Any] | None) -> MapItems | None:
    if not data:
        return None
    items = import_callable(data["items"]) if data["call"] else data["items"]
    return MapItems(items, data["item_key"], data["index_key"], data.get("batch_size", 1))


def _callable_paths(data: Mapping[str, Any]) -> list[str]:
    """Every ``module:qualname`` an encoded Python branch names."""
    runs = [n["run"] for n in data["nodes"].values() if n["run"]]
    maps = [m["items"] for f in data["fanouts"].values() if (m := f.get("map")) and m["call"]]
    return [*runs, *(c["func"] for c in data["conditionals"].values()), *maps]


@lru_cache(maxsize=64)  # parsing costs milliseconds; a worker reads one agent per message
def yaml_uses_modules(raw: bytes) -> frozenset[str]:
    """The modules a YAML agent's ``uses:`` entries name (read without importing anything),
    remembered by the file's content."""
    import yaml

    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError:
        return frozenset()
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    uses = [n.get("uses") for n in nodes or () if isinstance(n, dict)]
    return frozenset(u.partition(":")[0] for u in uses if isinstance(u, str) and u)


def decode_branch(data: Mapping[str, Any], entry: str, settings: Settings) -> GraphSpec:
    """The ``GraphSpec`` a worker of ``settings`` runs for an encoded branch.

    Nothing is imported before every module the message names passes the worker's
    allowlist: a refused one raises ``NotAllowedError`` naming it; a module whose source
    differs from the caller's raises ``CodeMismatchError``; anything else that stops the
    branch from loading raises ``GraphError``.
    """
    allowlist = worker_allowlist(settings)
    if "yaml" in data:
        return load_checked_yaml(data["yaml"], data["sha256"], data.get("code"), settings)
    paths = _callable_paths(data)
    for path in paths:
        allowlist.check(path)
    _check_code(data.get("code"), {p.partition(":")[0] for p in paths}, allowlist)
    nodes = {
        name: Node(name, import_callable(n["run"]) if n["run"] else None, bool(n["fan_in"]))
        for name, n in data["nodes"].items()
    }
    conditionals = {
        name: Conditional(import_callable(c["func"]), {k: t for k, t in c["targets"]})
        for name, c in data["conditionals"].items()
    }
    fanouts = {
        name: FanOut(
            name,
            f["fan_in"],
            tuple(f["branches"]),
            tuple(ParallelConfig.model_validate(c) for c in f["configs"]),
            _decode_map(f.get("map")),
        )
        for name, f in data["fanouts"].items()
    }
    edges = {name: tuple(t) for name, t in data["edges"].items()}
    return GraphSpec(data["name"], nodes, edges, conditionals, fanouts, entry)


class DecodedBranches:
    """A worker process's decoded branches, by their description's JSON text and entry node
    (``BranchMessage.graph``): a map's items, and every run of the same graph, carry the same
    text, so a Python branch's code is checked and imported once per process, not once per
    message. Decoding depends only on the text, the settings and this process's imported code
    (whose digests are fixed once loaded): a hit is what decoding again would give. Of a YAML
    agent only the parsed description is kept: it is decoded every time (its file is read and
    hashed again: it may change on disk). A refusal is never kept (``lru_cache`` keeps no
    exception)."""

    def __init__(self, settings: Settings, size: int = 256) -> None:
        self.settings = settings
        self._read = lru_cache(maxsize=size)(self._decode)

    def get(self, text: str, entry: str) -> GraphSpec:
        read = self._read(text, entry)
        return read if isinstance(read, GraphSpec) else self._decoded(read, entry)

    def _decode(self, text: str, entry: str) -> GraphSpec | dict[str, Any]:
        """The decoded Python branch, or a YAML agent's parsed description."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise GraphError(f"the message's graph description is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise GraphError("the message's graph description is not a JSON object")
        return data if "yaml" in data else self._decoded(data, entry)

    def _decoded(self, data: dict[str, Any], entry: str) -> GraphSpec:
        try:
            return decode_branch(data, entry, self.settings)
        except KeyError as exc:
            raise GraphError(f"the message's graph description lacks {exc}") from exc


def _check_code(code: Any, needed: AbstractSet[str], allowlist: Allowlist) -> None:
    """The fingerprint covers every module in ``needed`` and matches this worker's code."""
    check_fingerprint(code, allowlist)
    missing = sorted(needed - set(code["modules"]))
    if missing:
        raise CodeMismatchError(
            f"the message names module '{missing[0]}' without its code fingerprint; "
            "refusing to run code the caller did not vouch for"
        )


def load_checked_yaml(ref: str, sha256: str, code: Any, settings: Settings) -> GraphSpec:
    """Load a YAML agent found under the agents directory of ``settings``, refusing a file
    whose hash differs from the caller's and ``uses:`` modules the allowlist does not name."""
    allowlist = worker_allowlist(settings)
    path = agent_path(ref, settings)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise GraphError(f"this worker cannot read the YAML agent '{ref}': {exc}") from exc
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise GraphError(
            f"the YAML agent '{ref}' on this worker differs from the caller's "
            f"(sha256 {digest[:12]} here, {sha256[:12]} sent); refusing to run other code"
        )
    uses = yaml_uses_modules(raw)
    for module in sorted(uses):
        allowlist.check(module, f" (a 'uses:' of the YAML agent '{ref}')")
    _check_code(code, uses, allowlist)
    return _load_yaml_spec(str(path), digest)


@lru_cache(maxsize=64)
def _load_yaml_spec(path: str, digest: str) -> GraphSpec:
    from tea_dist.core.yaml_loader import load_yaml

    return load_yaml(path).to_spec()


def first_unjsonable(state: Mapping[str, Any]) -> tuple[str, Exception]:
    """The first key of ``state`` (known not to be JSON) whose value JSON cannot carry, and
    why; the whole state's own error when each value alone can."""
    for key, value in state.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            return str(key), exc
    return "", ValueError("the state is not JSON as a whole")


def check_json_state(state: Mapping[str, Any], where: str, limit: int) -> str:
    """The state as JSON text; ``SerializationError`` naming the key, or size over ``limit``.

    ``where`` names whose state it is in messages, e.g. ``"branch 'b'"``.
    """
    try:
        text = json.dumps(state)
    except (TypeError, ValueError):
        key, exc = first_unjsonable(state)
        raise SerializationError(
            f"state key '{key}' of {where} cannot be sent to a Celery worker as JSON: {exc}"
        ) from exc
    size = len(text.encode())
    if size > limit:
        raise StateTooLargeError(
            f"the state of {where} is {size} bytes of JSON, over the limit of "
            f"{limit} bytes (TEA_DIST_MAX_STATE_BYTES)"
        )
    return text


def check_fanout(spec: GraphSpec, fan: FanOut) -> None:
    """Compile-time check of a celery fan-out: its branches' code can be encoded and
    imported (a fan-out nested in one is refused by ``engine.runner.check_nesting``)."""
    for branch, config in zip(fan.branches, fan.configs, strict=True):
        if config.strategy != "celery":
            continue
        data = encode_branch(spec, branch, fan.fan_in)
        note_branch_modules(data["code"]["modules"])
