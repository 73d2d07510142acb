"""The distributed commands of tea-dist against real Redis and real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tea_dist.interfaces.cli import app

pytestmark = [pytest.mark.redis, pytest.mark.celery]
ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def test_cli_submit_wait_status_result(cluster: Any) -> None:
    out = runner.invoke(
        app, ["submit", "tests.apps_graphs:quick", "--input", '{"value": 1}', "--wait"]
    )
    assert out.exit_code == 0, out.output
    run_id = out.stderr.strip()  # the id on stderr: stdout is the result JSON alone
    assert json.loads(out.stdout)["total"] == 4
    assert runner.invoke(app, ["status", run_id]).stdout.strip() == "succeeded"
    again = runner.invoke(app, ["result", run_id])
    assert again.exit_code == 0 and json.loads(again.stdout)["total"] == 4


def test_cli_result_of_failed_run_is_one_error_line(cluster: Any) -> None:
    run_id = runner.invoke(app, ["submit", "tests.apps_graphs:failing"]).stdout.strip()
    out = runner.invoke(app, ["result", run_id, "--wait", "--timeout", "30"])
    assert out.exit_code == 1
    assert out.stderr.count("\n") == 1 and "(ValueError: remote boom)" in out.stderr


def test_cli_cancel_and_circuits(cluster: Any, tmp_path: Path) -> None:
    config = json.dumps({"marker_dir": str(tmp_path), "sleep": {"a": 5, "b": 5}})
    run_id = runner.invoke(
        app, ["submit", "tests.apps_graphs:two_branches", "--config", config]
    ).stdout.strip()
    assert runner.invoke(app, ["cancel", run_id]).exit_code == 0
    out = runner.invoke(app, ["result", run_id, "--wait", "--timeout", "30"])
    assert out.exit_code == 1 and "cancelled" in out.stderr
    listing = runner.invoke(app, ["circuits"])
    assert listing.exit_code == 0


def test_cli_worker_ping_finds_a_named_worker(cluster: Any) -> None:
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tea_dist", "worker-ping", "--role", "nobody", "--timeout", "1"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "did not answer" in out.stderr


def test_item10_submit_bad_config_blames_config(cluster: Any) -> None:
    out = runner.invoke(app, ["submit", "tests.apps_graphs:quick", "--config", "notjson"])
    assert out.exit_code == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config is not valid JSON"), lines
    assert out.stdout == ""  # nothing was submitted


def test_item6_cancel_unknown_or_finished_run_exits_non_zero(cluster: Any) -> None:
    import redis

    out = runner.invoke(app, ["submit", "tests.apps_graphs:quick", "--wait"])
    run_id = out.stderr.strip().splitlines()[0]  # the id on stderr, the state on stdout
    assert json.loads(out.stdout)
    finished = runner.invoke(app, ["cancel", run_id])
    assert finished.exit_code == 1 and "already ended (succeeded)" in finished.stderr
    unknown = runner.invoke(app, ["cancel", "nosuch"])
    assert unknown.exit_code == 2 and "no run 'nosuch'" in unknown.stderr
    client = redis.Redis.from_url(cluster.settings().redis)
    prefix = cluster.env["TEA_DIST_KEY_PREFIX"]
    assert not client.exists(f"{prefix}:run:{run_id}:cancel", f"{prefix}:run:nosuch:cancel")
    reset = runner.invoke(app, ["circuits", "--reset", "nosuch"])
    assert reset.exit_code == 2 and "no circuit 'nosuch'" in reset.stderr
