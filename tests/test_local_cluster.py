"""The zero set-up path: a distributed run with no broker configured anywhere.

Each test gets its own ``TEA_DIST_RUNTIME_DIR``, so a ``tea-dist cluster`` running elsewhere
on the machine is neither found nor disturbed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json
from tea_dist import ParallelConfig
from tea_dist.distributed.local_cluster import default_cluster
from tea_dist.distributed.local_cluster import ensure_cluster
from tests import celery_nodes as cn
from tests.nodes import fan_graph

app = fan_graph({"a": cn.whoami, "b": cn.whoami}, config=ParallelConfig(strategy="celery"),
                fan_in=cn.collect).compile()
events = list(app.invoke({"value": 1}))
folder = str(ensure_cluster().workdir)  # the cluster this run started
print(json.dumps({"state": events[-1]["state"], "broker": default_cluster().settings.broker,
                  "folder": folder}))
"""


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEA_DIST_")}
    env.update(PYTHONPATH=str(ROOT), TEA_DIST_RUNTIME_DIR=str(tmp_path / "runtime"))
    return env


@pytest.mark.celery
def test_celery_run_without_broker_starts_and_stops_a_local_cluster(tmp_path: Path) -> None:
    prefix = f"tea-zero-{uuid.uuid4().hex[:8]}"
    env = clean_env(tmp_path)
    env.update(TEA_DIST_KEY_PREFIX=prefix)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["state"]["ok"] == [True, True] and report["state"]["total"] == 4
    pids = {r["state"][f"pid_{r['branch']}"] for r in report["state"]["results"]}
    assert len(pids) >= 1 and all(isinstance(p, int) for p in pids)
    port = int(report["broker"].rsplit(":", 1)[1].split("/")[0])
    assert port != 6379  # an embedded server on its own port, not the machine's Redis
    _assert_machine_redis_untouched(prefix)
    _assert_port_closed(port)  # the cluster was stopped with the process
    assert not Path(report["folder"]).exists()  # and its folder removed


def _assert_machine_redis_untouched(prefix: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=0.5)
        client.ping()
    except redis.ConnectionError:
        return  # no machine Redis at all: nothing could have been used
    for db in range(16):
        keys = list(redis.Redis(host="127.0.0.1", port=6379, db=db).scan_iter(match=f"{prefix}*"))
        assert keys == [], f"the machine's Redis db {db} got keys {keys[:3]}"


def _assert_port_closed(port: int) -> None:
    import socket

    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0


ALLOWED_CALLER = """
import json
from tea_dist import ParallelConfig
from tests import celery_nodes as cn
from tests.nodes import fan_graph

graph = fan_graph({"a": cn.whoami}, config=ParallelConfig(strategy="celery"), fan_in=cn.collect)
print(json.dumps(list(graph.compile().invoke({"value": 1}))[-1]["state"]["results"]))
"""


@pytest.mark.celery
def test_cli_cluster_prints_its_addresses_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    """``tea-dist cluster --allow M``: its workers run branches of M for the apps that find it."""
    runtime = tmp_path / "runtime"
    proc = subprocess.Popen(
        [
            sys.executable,
            *("-m", "tea_dist", "cluster", "--flower-port", "0"),
            *("--allow", "tests.celery_nodes"),
        ],
        cwd=ROOT,
        env=clean_env(tmp_path),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        match = re.match(r"broker:\s+redis://127\.0\.0\.1:(\d+)/0", lines[0])
        assert match, lines
        port = int(match.group(1))
        logs = Path(lines[1].split()[1])
        assert lines[1].startswith("logs:") and (logs / "flows1.log").exists(), lines
        assert str(runtime / "cluster.json") in lines[2]
        advert = json.loads((runtime / "cluster.json").read_text())
        assert advert["broker_url"] == f"redis://127.0.0.1:{port}/0" and advert["pid"] == proc.pid
        import redis

        assert redis.Redis(port=port).ping()
        caller = subprocess.run(
            [sys.executable, "-c", ALLOWED_CALLER],
            cwd=ROOT,
            env=clean_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert caller.returncode == 0, caller.stderr[-3000:]
        (result,) = json.loads(caller.stdout.strip().splitlines()[-1])
        assert result["success"], result["error"]  # the cluster's workers allow the module
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert proc.returncode == 130
    _assert_port_closed(port)
    assert not logs.exists() and not (runtime / "cluster.json").exists()
