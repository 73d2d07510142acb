"""A caller process for the signal tests: runs one graph and prints its final event.

    python -m tests.caller_script STRATEGY CONFIG_JSON

Broker settings come from the environment (``TEA_DIST_*``), as for any app.
"""

from __future__ import annotations

import faulthandler
import json
import signal
import sys

from tea_dist import ParallelConfig
from tests import celery_nodes as cn
from tests.nodes import fan_graph


def main() -> None:
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a test that times out asks
    strategy, config = sys.argv[1], json.loads(sys.argv[2])
    graph = fan_graph(
        {"a": cn.start_sleep_done, "b": cn.start_sleep_done},
        config=ParallelConfig(strategy=strategy),
        fan_in=cn.collect,
        name="caller",
    )
    events = list(graph.compile().invoke({"value": 0}, config))
    print(json.dumps(events[-1], default=str), flush=True)


if __name__ == "__main__":
    main()
