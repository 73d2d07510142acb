"""The celery strategy against a real Redis and real prefork worker processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tea_dist import CircuitBreakerConfig, ParallelConfig, RetryPolicy, StateGraph
from tea_dist.core.errors import GraphError, SerializationError, StateTooLargeError
from tests import celery_nodes as cn
from tests import nodes
from tests.nodes import fan_graph, final_state

pytestmark = [pytest.mark.redis, pytest.mark.celery]

CELERY = ParallelConfig(strategy="celery")


def celery_graph(
    branches: dict[str, Any], config: ParallelConfig = CELERY, **kw: Any
) -> StateGraph:
    return fan_graph(branches, config=config, fan_in=cn.collect, **kw)


def queue_length(cluster: Any) -> int:
    import redis

    return int(redis.Redis.from_url(cluster.redis_url).llen(cluster.env["TEA_DIST_FLOWS_QUEUE"]))


def test_celery_branches_run_in_worker_processes(cluster: Any) -> None:
    app = celery_graph({"a": cn.whoami, "b": cn.whoami, "c": cn.whoami}).compile()
    state = final_state(list(app.invoke({"value": 1})))
    assert state["branches"] == ["a", "b", "c"] and state["ok"] == [True] * 3
    pids = {r["state"][f"pid_{r['branch']}"] for r in state["results"]}
    assert os.getpid() not in pids
    assert all(
        r["worker"] and r["worker"].endswith(tuple(f"/{p}" for p in pids)) for r in state["results"]
    )
    assert state["total"] == 6


def test_celery_results_match_thread_strategy(cluster: Any) -> None:
    branches = {"a": nodes.add_one, "b": nodes.fail, "c": nodes.double}
    drop = {"timing_ms", "start_time", "end_time", "worker"}

    def run(config: ParallelConfig) -> list[dict[str, Any]]:
        state = final_state(list(fan_graph(branches, config=config).compile().invoke({"value": 3})))
        return [{k: v for k, v in r.items() if k not in drop} for r in state["results"]]

    assert run(CELERY) == run(ParallelConfig())


def test_celery_timeout_kills_the_work_and_frees_the_slot(cluster: Any, tmp_path: Path) -> None:
    """A branch ignoring the soft limit is killed at the hard limit; its slot runs the next one."""
    config = ParallelConfig(strategy="celery", timeout_seconds=0.5)
    # two worker slots: 'stuck' and 'x' start at once; 'y' waits for a free slot.
    app = celery_graph(
        {
            "stuck": cn.ignore_soft_limit,
            "x": cn.mark_start_then_sleep,
            "y": cn.mark_start_then_sleep,
        },
        config,
    ).compile()
    started = time.time()
    run_config = {"marker_dir": str(tmp_path), "sleep": {"stuck": 5, "x": 1.2, "y": 0.1}}
    state = final_state(list(app.invoke({}, config=run_config)))
    elapsed = time.time() - started
    stuck, x, y = state["results"]
    assert stuck["timeout"] is True and stuck["error_type"] == "TimeoutError"
    assert x["success"] is False and x["timeout"] is True  # 1.2 s > 0.5 s: soft limit stopped it
    assert y["success"] is True
    assert not (tmp_path / "stuck.done").exists()  # the process was killed, not abandoned
    # 'y' waited for a slot; 'x' freed one at its soft limit (0.5 s) and 'stuck' at its hard
    # limit (0.5 s + grace): the freed slot starts 'y' within a second or two
    stuck_start = float((tmp_path / "stuck.start").read_text())
    y_start = float((tmp_path / "y.start").read_text())
    assert y_start - (stuck_start + 0.5) < 2.0
    time.sleep(5)
    assert not (tmp_path / "stuck.done").exists()
    assert elapsed < 8


def test_celery_soft_timeout_reports_timeout(cluster: Any, tmp_path: Path) -> None:
    config = ParallelConfig(strategy="celery", timeout_seconds=0.3)
    app = celery_graph({"slow": cn.sleep_then_mark, "fast": cn.whoami}, config).compile()
    state = final_state(
        list(app.invoke({}, config={"marker_dir": str(tmp_path), "sleep": {"slow": 3}}))
    )
    slow, fast = state["results"]
    assert slow["timeout"] is True and slow["error_type"] == "TimeoutError"
    assert fast["success"] is True
    assert not (tmp_path / "slow.done").exists()


def test_celery_retry_waits_without_blocking_a_sibling(cluster: Any, tmp_path: Path) -> None:
    """The retry is re-published with a countdown: on a worker with one slot, the sibling
    takes that slot and completes meanwhile."""
    queue = f"tea.one-slot.{cluster.tag}"
    cluster.start_worker("one-slot", concurrency=1, flows_queue=queue)
    policy = RetryPolicy(max_retries=2, base_delay=1.0)
    config = ParallelConfig(strategy="celery", retry_policy=policy, queue=queue)
    app = celery_graph({"flaky": cn.flaky_file, "sib": cn.mark_start_then_sleep}, config).compile()
    run_config = {"marker_dir": str(tmp_path), "fail_times": 1, "sleep": {"sib": 0.2}}
    state = final_state(list(app.invoke({}, config=run_config)))
    flaky, sib = state["results"]
    assert (
        flaky["success"] is True and flaky["retry_count"] == 1 and flaky["state"]["attempts"] == 2
    )
    assert sib["success"] is True
    # the sibling ended before the retry's 1 s countdown was over
    assert sib["end_time"] < flaky["end_time"] - 0.5


def test_celery_retry_exhausted_keeps_every_attempt_error(cluster: Any, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=2, base_delay=0.1, retry_on=["ConnectionError"])
    config = ParallelConfig(strategy="celery", retry_policy=policy)
    app = celery_graph({"flaky": cn.flaky_file}, config).compile()
    state = final_state(list(app.invoke({}, config={"marker_dir": str(tmp_path), "fail_times": 5})))
    (flaky,) = state["results"]
    assert flaky["success"] is False and flaky["retry_count"] == 2
    assert [e["attempt"] for e in flaky["attempt_errors"]] == [1, 2, 3]
    assert all(e["error_type"] == "ConnectionError" for e in flaky["attempt_errors"])


def test_celery_retry_on_names_the_original_exception(cluster: Any, tmp_path: Path) -> None:
    policy = RetryPolicy(max_retries=3, base_delay=0.1, retry_on=["KeyError"])
    app = celery_graph(
        {"flaky": cn.flaky_file}, ParallelConfig(strategy="celery", retry_policy=policy)
    ).compile()
    state = final_state(list(app.invoke({}, config={"marker_dir": str(tmp_path), "fail_times": 5})))
    assert state["results"][0]["retry_count"] == 0  # ConnectionError does not match KeyError


def test_celery_fail_fast_prevents_sibling_side_effects(cluster: Any, tmp_path: Path) -> None:
    config = ParallelConfig(strategy="celery", fail_fast=True)
    app = celery_graph({"bad": cn.fail, "slow": cn.sleep_then_mark}, config).compile()
    started = time.time()
    events = list(app.invoke({}, config={"marker_dir": str(tmp_path), "sleep": {"slow": 3}}))
    assert events[-1]["type"] == "error" and events[-1]["error_type"] == "ValueError"
    assert time.time() - started < 3
    time.sleep(3.5)
    assert not (tmp_path / "slow.done").exists()


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.workers: dict[str, str] = {}
        self.lock = threading.Lock()

    def _add(self, name: str, branch: str) -> None:
        with self.lock:
            self.events.append((name, branch))

    def on_flow_start(self, ctx: Any) -> None:
        self.workers[ctx.branch] = ctx.worker
        self._add("start", ctx.branch)

    def on_flow_error(self, ctx: Any, error: BaseException, attempt: int) -> None:
        self._add(
            f"error:{type(error).__name__}:{getattr(error, 'error_type', '')}:{attempt}", ctx.branch
        )

    def on_flow_retry(self, ctx: Any, attempt: int, delay: float, error: BaseException) -> None:
        self._add(f"retry:{attempt}", ctx.branch)

    def on_flow_complete(self, ctx: Any, result: Any) -> None:
        self._add(f"complete:{result.success}", ctx.branch)


def test_celery_callbacks_fire_for_worker_branches(cluster: Any, tmp_path: Path) -> None:
    recorder = Recorder()
    policy = RetryPolicy(max_retries=1, base_delay=0.1)
    config = ParallelConfig(strategy="celery", retry_policy=policy)
    app = celery_graph({"ok": cn.whoami, "flaky": cn.flaky_file}, config).compile(
        parallel_callbacks=[recorder]
    )
    list(app.invoke({}, config={"marker_dir": str(tmp_path), "fail_times": 1}))
    flaky = [e for e, b in recorder.events if b == "flaky"]
    assert flaky == ["start", "error:RemoteError:ConnectionError:1", "retry:1", "complete:True"]
    assert [e for e, b in recorder.events if b == "ok"] == ["start", "complete:True"]


def test_celery_circuit_is_shared_by_two_caller_processes(cluster: Any, tmp_path: Path) -> None:
    """Process A trips the circuit; process B's branch is refused before dispatch."""
    script = tmp_path / "caller.py"
    script.write_text(
        "import json, sys\n"
        "from tea_dist import ParallelConfig, CircuitBreakerConfig\n"
        "from tests.nodes import fan_graph\n"
        "from tests import celery_nodes as cn\n"
        "name = sys.argv[1]\n"
        "cb = CircuitBreakerConfig(failure_threshold=2, reset_timeout=60, name=name)\n"
        "cfg = ParallelConfig(strategy='celery', circuit_breaker=cb)\n"
        "app = fan_graph({'bad': cn.fail}, config=cfg, fan_in=cn.collect).compile()\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    ev = list(app.invoke({}))\n"
        "print(json.dumps(ev[-1]['state']['results'][0]))\n"
    )
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    circuit = f"svc-{cluster.tag}"
    first = subprocess.run(
        [sys.executable, str(script), circuit, "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["error_type"] == "ValueError"
    second = subprocess.run(
        [sys.executable, str(script), circuit, "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 0, second.stderr
    refused = json.loads(second.stdout)
    assert refused["error_type"] == "CircuitOpenError" and refused["circuit_state"] == "open"


def test_celery_open_circuit_sends_no_task(cluster: Any, tmp_path: Path) -> None:
    name = f"one-{cluster.tag}"
    cb = CircuitBreakerConfig(failure_threshold=1, reset_timeout=60, name=name)
    app = celery_graph(
        {"bad": cn.mark_and_fail}, ParallelConfig(strategy="celery", circuit_breaker=cb)
    ).compile()
    run_config = {"marker_dir": str(tmp_path)}
    list(app.invoke({}, config=run_config))
    assert app.get_circuit_states()[name] == "open"
    state = final_state(list(app.invoke({}, config=run_config)))
    assert state["results"][0]["error_type"] == "CircuitOpenError"
    assert (tmp_path / "bad.count").read_text() == "1"  # the branch never ran again
    assert queue_length(cluster) == 0
    app.reset_circuit(name)
    assert app.get_circuit_states()[name] == "closed"
    list(app.invoke({}, config=run_config))
    assert (tmp_path / "bad.count").read_text() == "2"


def test_celery_lambda_fails_compile_naming_the_node(cluster: Any) -> None:
    g = celery_graph({"a": cn.whoami, "inline": lambda state: {"x": 1}})
    with pytest.raises(GraphError, match=r"node 'inline' .* cannot import"):
        g.compile()


def test_celery_bad_inputs_leave_the_queue_empty(cluster: Any) -> None:
    app = celery_graph({"a": cn.whoami, "b": cn.whoami}).compile()
    before = queue_length(cluster)
    events = list(app.invoke({"conn": threading.Lock()}))
    assert events[-1]["type"] == "error" and "state key 'conn' of branch 'a'" in events[-1]["error"]
    assert events[-1]["error_type"] == SerializationError.__name__
    from tests.cluster import configure, current_settings

    settings = current_settings()
    configure(settings.with_overrides(max_state_bytes=100))
    try:
        events = list(app.invoke({"blob": "x" * 500}))
        assert (
            events[-1]["type"] == "error"
            and events[-1]["error_type"] == StateTooLargeError.__name__
        )
        assert "over the limit of 100 bytes" in events[-1]["error"]
    finally:
        configure(settings)
    assert queue_length(cluster) == before == 0


def test_celery_yaml_graph_refused_when_worker_file_differs(cluster: Any, tmp_path: Path) -> None:
    from tea_dist import load_yaml

    agent = tmp_path / "agent.yaml"
    agent.write_text(
        "name: y\n"
        "settings: {parallel: {strategy: celery}}\n"
        "nodes:\n"
        "  - {name: start}\n"
        "  - name: a\n    run: |\n      return {'v': 1}\n"
        "  - name: merge\n    fan_in: true\n    run: |\n"
        "      return {'ok': [r.success for r in parallel_results],\n"
        "              'err': [r.error for r in parallel_results]}\n"
        "edges:\n"
        "  - {from: __start__, to: start}\n"
        "  - {from: start, to: [a], parallel: true, fan_in: merge}\n"
        "  - {from: a, to: merge}\n"
        "  - {from: merge, to: __end__}\n"
    )
    app = load_yaml(agent).compile()
    assert final_state(list(app.invoke({})))["ok"] == [True]
    agent.write_text(agent.read_text().replace("'v': 1", "'v': 2"))
    state = final_state(list(app.invoke({})))
    assert state["ok"] == [False] and "differs from the caller's" in state["err"][0]


def test_celery_worker_killed_mid_branch_yields_exactly_one_result(
    cluster: Any, tmp_path: Path
) -> None:
    """SIGKILL the worker running a branch; a second worker finishes it, counted once."""
    spare = cluster.start_worker("spare", concurrency=1)
    victim = None
    try:
        recorder = Recorder()
        app = celery_graph({"long": cn.sleep_then_mark}).compile(parallel_callbacks=[recorder])
        run_config = {"marker_dir": str(tmp_path), "sleep": {"long": 2.0}}
        box: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: box.update(events=list(app.invoke({}, config=run_config)))
        )
        thread.start()
        deadline = time.time() + 15
        while not any(e == "start" for e, _ in recorder.events) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        victim = _worker_of(cluster, recorder.workers["long"])
        cluster.kill(victim)
        thread.join(60)
        assert not thread.is_alive()
        state = final_state(box["events"])
        (long_result,) = state["results"]
        assert long_result["success"] is True
        assert sum(1 for e, b in recorder.events if e.startswith("complete")) == 1
    finally:
        if spare.poll() is None:
            cluster.kill(spare)
        if victim is not None and victim is not spare:  # the session's flow worker is gone
            cluster.start_worker(f"flows-{len(cluster.workers)}", concurrency=2)


def _worker_of(cluster: Any, worker: str) -> Any:
    """The worker process (group leader) whose pool child has the pid in ``host/pid``."""
    import psutil

    parent = psutil.Process(int(worker.rsplit("/", 1)[1])).ppid()
    for proc in cluster.workers:
        if proc.pid == parent:
            return proc
    raise AssertionError(f"no test worker is the parent of {worker}")


def test_celery_branch_revoked_from_outside_still_gets_a_result(
    cluster: Any, tmp_path: Path
) -> None:
    """An operator revokes a running branch (Flower, celery control): the run does not hang."""
    from tests.cluster import current_app

    celery_app = current_app()

    recorder = Recorder()
    graph = celery_graph({"long": cn.sleep_then_mark, "quick": cn.whoami})
    app = graph.compile(parallel_callbacks=[recorder])
    box: dict[str, Any] = {}
    run_config = {"marker_dir": str(tmp_path), "sleep": {"long": 5.0}}
    thread = threading.Thread(target=lambda: box.update(events=list(app.invoke({}, run_config))))
    thread.start()
    deadline = time.time() + 15
    while ("start", "long") not in recorder.events and time.time() < deadline:
        time.sleep(0.05)
    active = celery_app.control.inspect(timeout=1.0).active() or {}
    ids = [
        t["id"]
        for tasks in active.values()
        for t in tasks
        if t["name"].startswith("tea_dist.run_flow[")  # graph/branch in the shown name
    ]
    assert ids
    celery_app.control.revoke(ids, terminate=True, signal="SIGKILL")
    thread.join(15)
    assert not thread.is_alive()
    long_result, quick = final_state(box["events"])["results"]
    assert long_result["success"] is False and long_result["error_type"] == "CancelledError"
    assert quick["success"] is True
    assert not (tmp_path / "long.done").exists()
