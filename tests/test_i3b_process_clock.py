"""The process strategy times an attempt from when it begins in its worker process, not while
the process starts (a cold pool under load timed out a fast branch with a 0.5 s timeout)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

from tea_dist import ParallelConfig
from tea_dist.core.strategies import get_executor
from tests.nodes import fan_graph, final_state

SLOW_TO_IMPORT = """
import time
time.sleep(1.5)  # a worker process takes this long to load the branch's code


def quick(state):
    return {"done": True}


def collect(state, parallel_results):
    return {"results": [r.to_dict() for r in parallel_results]}
"""


def test_i3b_process_attempt_is_timed_from_its_start_in_the_worker(tmp_path: Path) -> None:
    name = f"slow_import_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(SLOW_TO_IMPORT)
    sys.path.insert(0, str(tmp_path))
    executor = get_executor("process")
    executor.shutdown()  # type: ignore[attr-defined]  # a cold pool: new worker processes
    try:
        module = __import__(name)
        graph = fan_graph(
            {"a": module.quick, "b": module.quick},
            config=ParallelConfig(strategy="process", timeout_seconds=0.5),
            fan_in=module.collect,
        )
        state = final_state(list(graph.compile().invoke({})))
    finally:
        sys.path.remove(str(tmp_path))
        executor.shutdown()  # type: ignore[attr-defined]  # its processes know the path
    assert [r["success"] for r in state["results"]] == [True, True], state["results"]
