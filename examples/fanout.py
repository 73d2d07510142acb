"""A fan-out graph built in Python: square and cube a value in parallel, then add them up.

python -m examples.fanout            # prints {"value": 3, "total": 36}
"""

from __future__ import annotations

import json
from typing import Any

from examples.nodes import cube, square, total
from tea_dist import END, START, ParallelConfig, StateGraph


def seed(state: dict[str, Any]) -> dict[str, Any]:
    """The value to work on (3 unless given)."""
    return {"value": int(state.get("value", 3))}


def build(strategy: str = "thread") -> StateGraph:
    """The example graph; ``strategy`` picks where its two branches run."""
    graph = StateGraph(
        {"value": int, "total": int}, parallel_config=ParallelConfig(strategy=strategy)
    )
    graph.add_node("seed", run=seed)
    graph.add_node("square", run=square)
    graph.add_node("cube", run=cube)
    graph.add_fanin_node("total", run=total)
    graph.add_edge(START, "seed")
    graph.add_parallel_edge("seed", "square", "total")
    graph.add_parallel_edge("seed", "cube", "total", config=ParallelConfig(timeout_seconds=5))
    graph.add_edge("square", "total")
    graph.add_edge("cube", "total")
    graph.add_edge("total", END)
    return graph


def main() -> None:
    """Run the graph once and print its final state."""
    events = list(build().compile().invoke({"value": 3}))
    print(json.dumps(events[-1].get("state", events[-1]), default=str))


if __name__ == "__main__":
    main()
