"""``tea-dist cluster --reload``: an edit to an allowed module restarts the cluster's workers,
so the next run runs the new code instead of failing with ``CodeMismatchError``."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CALLER = """
import json
from tea_dist import ParallelConfig, StateGraph
import {module} as m

g = StateGraph({{"value": int}})
g.add_node("start")
g.add_node("a", run=m.answer)
g.add_fanin_node("merge", run=m.collect)
g.add_parallel_edge("start", "a", "merge", config=ParallelConfig(strategy="celery"))
g.add_edge("a", "merge")
g.set_entry_point("start")
g.set_finish_point("merge")
print(json.dumps(list(g.compile().invoke({{"value": 1}}))[-1]["state"]["results"]))
"""

NODES = """
def answer(state):
    return {{"answer": {value}}}

def collect(state, parallel_results):
    return {{"results": [r.to_dict() for r in parallel_results]}}
"""


def _lines(stream: object, into: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def _wait_for(lines: queue.Queue[str], text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text in lines.get(timeout=0.5):
                return
        except queue.Empty:
            continue
    raise AssertionError(f"the cluster never said {text!r}")


@pytest.mark.celery
def test_i3b_cluster_reload_runs_the_edited_code(tmp_path: Path) -> None:
    module = f"reload_nodes_{uuid.uuid4().hex[:8]}"
    source = tmp_path / f"{module}.py"
    source.write_text(NODES.format(value=1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEA_DIST_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), str(tmp_path)]),
        TEA_DIST_RUNTIME_DIR=str(tmp_path / "runtime"),
    )
    cluster = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tea_dist",
            "cluster",
            "--flower-port",
            "0",
            "--reload",
            "--allow",
            module,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    said: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(cluster.stderr, said), daemon=True).start()

    def run() -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", CALLER.format(module=module)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (result,) = json.loads(done.stdout.strip().splitlines()[-1])
        return result  # type: ignore[no-any-return]

    try:
        _wait_for(said, "watching:", 90)
        first = run()
        assert first["success"] and first["state"]["answer"] == 1, first
        source.write_text(NODES.format(value=2))
        _wait_for(said, "reloaded", 90)
        second = run()
        assert second["success"], second["error"]  # not CodeMismatchError
        assert second["state"]["answer"] == 2
    finally:
        cluster.send_signal(signal.SIGINT)
        cluster.wait(60)
