"""The caller process of the chaos script: invokes its graph once on the celery strategy.

    python -m bench.chaoscaller CONFIG_JSON   # run_id, marker_dir, sleep: {branch: seconds}

It prints one JSON line before invoking and one with the run's last event (``type``,
``error_type``, ``error``, and the branches that failed); the broker comes from the
environment (``TEA_DIST_*``), as for any app.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    from bench.chaosnodes import graph

    config = json.loads(sys.argv[1])
    compiled = graph(len(config["sleep"])).compile()
    print(json.dumps({"type": "invoking", "at": time.time()}), flush=True)
    events = list(compiled.invoke({"value": 0}, config, run_id=config["run_id"]))
    last = events[-1]
    summary = {k: last.get(k) for k in ("type", "error_type", "error", "node")}
    if last["type"] == "final":
        summary["failed"] = sorted(b for b, ok in last["state"].get("ok", {}).items() if not ok)
    print(json.dumps({**summary, "at": time.time()}, default=str), flush=True)


if __name__ == "__main__":
    main()
