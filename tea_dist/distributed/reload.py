"""``tea-dist cluster --reload``: restart the cluster's workers when the code they run changes.

A worker refuses a branch whose module changed on disk since it imported it
(``CodeMismatchError``), so after an edit a long-lived cluster must restart its workers. The
reloader watches, with watchfiles (the operating system's file events, no polling loop of our
own), the files of the modules and packages the cluster allows and the YAML agents under its
agents directory; the cluster restarts its workers after each burst of changes.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import watchfiles

logger = logging.getLogger("tea_dist.reload")

CODE = (".py", ".yaml", ".yml")


def watched_paths(allowed: Iterable[str], agents_dir: Path) -> list[Path]:
    """The folders or files to watch: each allowed module's file or package folder (found
    without importing it; its parent packages are imported), and the agents directory."""
    paths = {agents_dir.resolve()}
    for entry in allowed:
        try:
            spec = importlib.util.find_spec(entry)
        except (ImportError, ValueError) as exc:
            logger.warning("not watching '%s': %s", entry, exc)
            continue
        if spec is None:
            logger.warning("not watching '%s': no such module", entry)
        elif spec.submodule_search_locations:
            paths.update(Path(p).resolve() for p in spec.submodule_search_locations)
        elif spec.origin and spec.has_location:
            paths.add(Path(spec.origin).resolve())
    return sorted(p for p in paths if p.exists())


def _is_code(change: watchfiles.Change, path: str) -> bool:
    return path.endswith(CODE) and "__pycache__" not in path


class Reloader:
    """Watches ``paths`` on a thread of its own; ``changed()`` returns (and forgets) the code
    files changed since it was last asked."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self._changed: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tea-dist-reload", daemon=True)

    def __enter__(self) -> Reloader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        for changes in watchfiles.watch(
            *self.paths, watch_filter=_is_code, stop_event=self._stop, debounce=300
        ):
            with self._lock:
                self._changed.update(path for _change, path in changes)

    def changed(self) -> list[str]:
        with self._lock:
            found, self._changed = sorted(self._changed), set()
        return found
