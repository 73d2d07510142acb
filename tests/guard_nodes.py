"""Module-level nodes that misbehave on a worker (imported by the worker processes too), and a
caller process that runs one of them:

    python -m tests.guard_nodes fan|map CONFIG_JSON

Each node counts its runs in ``config['marker_dir']`` (``<name>.runs``) so that a test sees
how often it ran across processes. Broker settings come from the environment (``TEA_DIST_*``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tea_dist import ParallelConfig


def _count(config: dict[str, Any], name: str) -> int:
    path = Path(config["marker_dir"], f"{name}.runs")
    runs = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(runs))
    return runs


def _stubborn(config: dict[str, Any], name: str) -> None:
    """Marks its start, swallows every exception for ``config['hold']`` seconds, then writes
    its side effect (``<name>.done``): only a kill stops it."""
    Path(config["marker_dir"], f"{name}.start").write_text(str(os.getpid()))
    end = time.time() + float(config.get("hold", 12))
    while time.time() < end:
        with contextlib.suppress(BaseException):  # deliberately ignores every interrupt
            time.sleep(0.05)
    Path(config["marker_dir"], f"{name}.done").write_text(str(os.getpid()))


def stubborn(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    _stubborn(config, node)
    return {"done": True}


def stubborn_item(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A map item: item 0 is stubborn, the others return at once."""
    if state["index"] == 0:
        _stubborn(config, "item0")
    return {"done": state["index"]}


def uncarried(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Returns a value JSON cannot carry (``config['value']``: "set" or "object")."""
    _count(config, node)
    if config.get("value") == "object":
        return {"handle": object()}
    return {"tags": {1, 2}}


def crash(state: dict[str, Any], config: dict[str, Any], node: str) -> dict[str, Any]:
    """Kills its own process (``config['how']``: "exit" or "abort"), every run or, with
    ``config['once']``, on its first run only."""
    runs = _count(config, node)
    if runs == 1 or not config.get("once"):
        if config.get("how") == "abort":
            os.abort()
        os._exit(3)
    return {"survived": runs}


def crash_item(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """A map item: item 0 exits its process every run, the others return at once."""
    if state["index"] == 0:
        _count(config, "item0")
        os._exit(3)
    return {"done": state["index"]}


def quick(state: dict[str, Any]) -> dict[str, Any]:
    return {"pid": os.getpid()}


def main() -> None:
    from tests import celery_nodes as cn
    from tests import guard_nodes as nodes  # by name: a worker cannot import __main__
    from tests.nodes import fan_graph, map_graph

    kind, config = sys.argv[1], json.loads(sys.argv[2])
    celery = ParallelConfig(strategy="celery")
    if kind == "map":
        graph = map_graph(
            nodes.stubborn_item, cn.collect, config=celery, batch_size=2, name="orphan"
        )
        events = list(graph.compile().invoke({"docs": [0, 1]}, config))
    else:
        graph = fan_graph({"a": nodes.stubborn}, config=celery, fan_in=cn.collect, name="orphan")
        events = list(graph.compile().invoke({"value": 0}, config))
    print(json.dumps(events[-1], default=str), flush=True)


if __name__ == "__main__":
    main()
