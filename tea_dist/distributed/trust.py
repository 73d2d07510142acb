"""What a worker agrees to run: allowed modules, code fingerprints, YAML agents' home.

A message is data anyone with broker access can write, so a worker trusts none of the code it
names until three checks pass, all before the code is imported:

- **Allowed.** Every module a message names must be in the operator's allowlist
  (``tea-dist worker --allow pkg.module,...`` or ``TEA_DIST_ALLOWED``; a package allows its
  submodules). tea_dist's own node helpers (``tea_dist.policies.merge``) are always allowed;
  nothing else of tea_dist is, since its other functions are plumbing that no graph names.
  A YAML agent is allowed by where it lives: under ``TEA_DIST_AGENTS_DIR`` (default: the
  working directory), named by a relative path that cannot climb out of it; the modules its
  ``uses:`` name pass the allowlist like any other.
- **The same code.** The caller sends a fingerprint: tea_dist's version and the SHA-256 of each
  node module's source file. A worker compares it with the source *it loaded* (hashed when it
  first imported or first saw the module), so a module edited on disk after the worker
  imported it is refused, naming the module, instead of silently running the old version.
- A refusal is a ``GraphError`` (``NotAllowedError`` or ``CodeMismatchError``) naming the
  callable or module and what to change; the branch fails with it like any other error.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from tea_dist.core.errors import FinalError, GraphError, NotAllowedError
from tea_dist.distributed import defaults
from tea_dist.distributed.settings import Settings

ALWAYS_ALLOWED = ("tea_dist.policies.merge",)
NO_SOURCE = "no-source"


class CodeMismatchError(GraphError, FinalError):
    """Raised on a worker when its copy of a module, or its tea_dist version, differs from
    the caller's fingerprint in the message."""


@dataclass(frozen=True)
class Allowlist:
    """Modules and packages a worker may import from a message (tea_dist's helpers always)."""

    entries: tuple[str, ...] = ()

    def allows(self, module: str) -> bool:
        return any(
            module == entry or module.startswith(entry + ".")
            for entry in (*ALWAYS_ALLOWED, *self.entries)
        )

    def check(self, path: str, context: str = "") -> None:
        """``NotAllowedError`` unless the module of ``path`` (``module:qualname`` or a module
        name) is allowed; ``context`` says where ``path`` came from, in the message."""
        module = path.partition(":")[0]
        if self.allows(module):
            return
        top = module.split(".")[0]
        allowed = ", ".join(self.entries) or "nothing but tea_dist's helpers"
        raise NotAllowedError(
            f"this worker does not run '{path}'{context}: module '{module}' is not allowed "
            f"(allowed: {allowed}); to allow it, start the worker with "
            f"'tea-dist worker --allow {module}' (or '--allow {top}' for the whole package) "
            "or set TEA_DIST_ALLOWED"
        )


def worker_allowlist(settings: Settings) -> Allowlist:
    """The allowlist a worker of ``settings`` applies (``TEA_DIST_ALLOWED``)."""
    return Allowlist(tuple(settings.allowed))


# -- fingerprints --


@cache  # reading the installed metadata costs ~0.2 ms; it does not change under a process
def tea_dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tea-dist")
    except PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=4096)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_digest(module_name: str) -> str:
    """SHA-256 of ``module_name``'s source file as it is on disk now (the caller's view)."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    path = _source_file(module)
    if path is None:
        return NO_SOURCE
    try:
        stat = os.stat(path)
    except OSError:
        return NO_SOURCE
    return _file_digest(path, stat.st_mtime_ns, stat.st_size)


_loaded: dict[str, str] = {}
_loaded_lock = threading.Lock()


def loaded_digest(module_name: str) -> str:
    """SHA-256 of ``module_name``'s source as this process loaded it (the worker's view).

    Hashed once, right after this process first imported the module (through ``import_checked``)
    or first saw it imported; later edits on disk do not change it.
    """
    with _loaded_lock:
        digest = _loaded.get(module_name)
        if digest is None:
            path = _source_file(sys.modules[module_name])
            try:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else NO_SOURCE
            except OSError:
                digest = NO_SOURCE
            _loaded[module_name] = digest
        return digest


def _source_file(module: Any) -> str | None:
    path = getattr(module, "__file__", None)
    return str(path) if path else None


def fingerprint(modules: Iterable[str]) -> dict[str, Any]:
    """What a message carries so the worker can tell it runs the caller's code."""
    return {
        "tea_dist": tea_dist_version(),
        "modules": {name: source_digest(name) for name in sorted(set(modules))},
    }


def check_fingerprint(code: Mapping[str, Any] | None, allowlist: Allowlist) -> None:
    """Import every module ``code`` names (allowed ones only) and compare their sources."""
    if not isinstance(code, Mapping) or not isinstance(code.get("modules"), Mapping):
        raise CodeMismatchError(
            "the message carries no code fingerprint; this worker runs only branches sent by "
            "a tea_dist caller of the same version"
        )
    here = tea_dist_version()
    if code.get("tea_dist") != here:
        raise CodeMismatchError(
            f"tea_dist {here} on this worker differs from the caller's {code.get('tea_dist')}; "
            "run the same tea_dist version on callers and workers"
        )
    for name, sent in code["modules"].items():
        allowlist.check(name)
        import_checked(name)
        mine = loaded_digest(name)
        if mine != sent:
            raise CodeMismatchError(
                f"module '{name}' on this worker differs from the caller's (sha256 "
                f"{mine[:12]} here, {str(sent)[:12]} sent); refusing to run other code: deploy "
                "the same code to callers and workers and restart the workers after a change "
                "('tea-dist cluster --reload' restarts its workers by itself)"
            )


def import_checked(module_name: str) -> Any:
    """Import a module and fix its digest as loaded (``GraphError`` if it cannot)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise GraphError(f"cannot import module '{module_name}' on this worker: {exc}") from exc
    loaded_digest(module_name)
    return module


# -- YAML agents --


def agents_dir(settings: Settings | None = None) -> Path:
    """Where YAML agents live: ``TEA_DIST_AGENTS_DIR`` (of ``settings``, else of the default
    cluster named by ``Cluster.as_default()``, else of the environment), else the working
    directory."""
    folder = (settings or _caller_settings()).agents_dir
    return Path(folder or os.getcwd()).resolve()


def _caller_settings() -> Settings:
    """The settings a caller compiles under before it picks a cluster: those of an open
    ``Cluster.as_default()`` block, else the environment's."""
    default = defaults.innermost()
    return default.settings if default is not None else Settings()


def agent_ref(path: str | Path, settings: Settings | None = None) -> str:
    """The caller's name for an agent: its path relative to the agents directory of
    ``settings`` (a cluster's; None: the environment's, before any cluster is chosen).

    An agent outside it is fine when this process will start a private cluster (no cluster
    given, no agents directory, no broker named, no ``tea-dist cluster`` running): that cluster
    serves the folders of the agents compiled here (``private_agents_dir``)."""
    base, file = agents_dir(settings), Path(path).resolve()
    if file.is_relative_to(base):
        return file.relative_to(base).as_posix()
    if settings is None and _private_cluster_ahead():
        _agent_folders.add(str(file.parent))
        return file.relative_to(file.parent).as_posix()
    raise GraphError(
        f"the YAML agent '{path}' is outside TEA_DIST_AGENTS_DIR ({base}): celery workers "
        "find agents by their path relative to it; run from the agent's folder or set "
        "TEA_DIST_AGENTS_DIR on callers and workers"
    )


_agent_folders: set[str] = set()


def _private_cluster_ahead() -> bool:
    from tea_dist.distributed.advert import advertised

    settings = Settings()
    if defaults.innermost() is not None or settings.agents_dir or settings.names_broker:
        return False
    return advertised() is None


def private_agents_dir() -> str | None:
    """Where a private cluster finds the agents compiled in this process outside the working
    directory: their folders' common parent (None: there were none)."""
    if not _agent_folders:
        return None
    return os.path.commonpath([os.getcwd(), *_agent_folders])


def agent_path(ref: str, settings: Settings) -> Path:
    """The worker's file for an agent ``ref``; ``NotAllowedError`` if it leaves the directory."""
    base = agents_dir(settings)
    path = (base / ref).resolve()
    if Path(ref).is_absolute() or not path.is_relative_to(base):
        raise NotAllowedError(
            f"this worker does not run the YAML agent '{ref}': agents are named by a path "
            f"inside TEA_DIST_AGENTS_DIR ({base}) on the worker"
        )
    return path


# -- what this process's graphs need (the local cluster allows it) --

_branch_modules: set[str] = set()


def note_branch_modules(modules: Iterable[str]) -> None:
    """Record modules that celery branches compiled in this process name."""
    _branch_modules.update(modules)


def branch_modules() -> tuple[str, ...]:
    """Every module celery branches compiled in this process name, for a local cluster."""
    return tuple(sorted(_branch_modules))
