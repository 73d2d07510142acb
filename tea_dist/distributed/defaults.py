"""The process's default cluster: the clusters of the open ``Cluster.as_default()`` blocks,
innermost last.

A module of its own, below ``cluster``: naming a YAML agent before a cluster is chosen
(``trust.agent_ref``, through ``wire.encode_branch``) reads the default cluster's settings,
while a cluster decodes its workers' branches through ``wire``. Read here, the default needs
no import of ``cluster`` from below it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Protocol, TypeVar

from tea_dist.distributed.settings import Settings


class Configured(Protocol):
    """What the layers below ``cluster`` read of a default cluster."""

    settings: Settings


C = TypeVar("C", bound=Configured)

_OPEN: list[Configured] = []
_LOCK = threading.Lock()


@contextlib.contextmanager
def opened(cluster: C) -> Iterator[C]:
    """``cluster`` is the default within the block (blocks nest)."""
    with _LOCK:
        _OPEN.append(cluster)
    try:
        yield cluster
    finally:
        with _LOCK:
            if cluster in _OPEN:
                _OPEN.remove(cluster)


def innermost() -> Configured | None:
    """The cluster of the innermost open block, if any."""
    with _LOCK:
        return _OPEN[-1] if _OPEN else None
