"""Operations (issue 10): the local cluster dies with its parent on any signal and leaves no
folder (item 1); ``tea-dist cluster`` is found by the other commands and nothing starts a
throwaway cluster (item 6); a cycle without an exit ends at ``recursion_limit`` (item 4).

Real processes and real signals: every test here starts ``tea-dist`` (or an app) as a child
process with no broker configured and its own runtime directory, so no other cluster on the
machine is found and none of its processes is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from tea_dist import ParallelConfig, RetryPolicy, StateGraph
from tests import ops_nodes

ROOT = Path(__file__).resolve().parent.parent
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGKILL]
GONE_WITHIN = 8.0  # seconds: "within a few seconds", with room for a loaded 2-core machine
NO_CLUSTER = "start one with `tea-dist cluster`"


def clean_env(runtime: Path) -> dict[str, str]:
    """No broker configured, this test's own runtime directory, the checkout importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEA_DIST_")}
    # the test graphs' modules are what the cluster's workers may run
    env.update(PYTHONPATH=str(ROOT), TEA_DIST_RUNTIME_DIR=str(runtime), TEA_DIST_ALLOWED="tests")
    return env


def tea_dist(*args: str) -> list[str]:
    return [sys.executable, "-m", "tea_dist", *args]


def wait_for(check: Any, timeout: float, what: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline()[:4])}"
    except psutil.Error as exc:  # gone, or a zombie by now
        return f"{process.pid} ({type(exc).__name__})"


@dataclass
class Started:
    """A parent process and what it started: every descendant, and the cluster's folder."""

    proc: subprocess.Popen[Any]
    descendants: list[psutil.Process]
    folder: Path

    @classmethod
    def of(cls, proc: subprocess.Popen[Any]) -> Started:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        dirs = [p.cwd() for p in descendants if _alive(p) and "redis-server" in p.name()]
        assert len(dirs) == 1, [p.cmdline() for p in descendants]
        names = " ".join(" ".join(p.cmdline()) for p in descendants)
        assert "celery" in names and "worker" in names and "reaper.py" in names
        return cls(proc, descendants, Path(dirs[0]).parent)

    def signal_and_wait(self, signum: int) -> float:
        """Send ``signum`` to the parent alone; seconds until every process and the folder
        are gone (AssertionError naming what is left after ``GONE_WITHIN``)."""
        assert self.folder.is_dir()
        started = time.monotonic()
        os.kill(self.proc.pid, signum)
        with_parent = [psutil.Process(self.proc.pid), *self.descendants]
        while True:
            left = [p for p in with_parent if _alive(p)]
            if not left and not self.folder.exists():
                elapsed = time.monotonic() - started
                break
            if time.monotonic() - started > GONE_WITHIN:
                alive = [_describe(p) for p in left]
                with contextlib.suppress(psutil.Error):  # its stacks, to stderr (APP)
                    os.kill(self.proc.pid, signal.SIGUSR2)
                    time.sleep(1)
                for p in left:  # never leave anything behind, even on failure
                    with contextlib.suppress(psutil.Error):
                        p.kill()
                raise AssertionError(
                    f"after {GONE_WITHIN}s: alive {alive}, "
                    f"folder {'left' if self.folder.exists() else 'gone'}"
                )
            time.sleep(0.02)
        self.proc.wait(5)
        name = signal.Signals(signum).name
        print(f"\nteardown {name}: {elapsed:.2f}s")
        return elapsed


def stop(proc: subprocess.Popen[Any]) -> None:
    """Kill a leftover parent of a failed test (its cluster dies with it)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


# -- item 1: the local cluster dies with its parent, whatever signal ends it ----------------


@pytest.mark.celery
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_item1_tea_dist_cluster_dies_with_its_parent(signum: int, tmp_path: Path) -> None:
    runtime, port = tmp_path / "runtime", free_port()
    err, scratch = tmp_path / "stderr", tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen(
        tea_dist("cluster", "--flower-port", str(port)),
        env={**clean_env(runtime), "TMPDIR": str(scratch)},
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=err.open("w"),
        text=True,
    )
    try:
        wait_for(lambda: "ready" in err.read_text(), 90, "cluster ready", proc)
        started = Started.of(proc)
        assert any("flower" in " ".join(p.cmdline()) for p in started.descendants)
        assert (runtime / "cluster.json").exists()
        started.signal_and_wait(signum)
    finally:
        stop(proc)
    assert not (runtime / "cluster.json").exists()  # the advertisement went with it
    assert list(scratch.iterdir()) == []  # no temporary folder of it or of its workers is left
    if signum != signal.SIGKILL:
        assert proc.returncode == 128 + signum, err.read_text()


@pytest.mark.celery
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_item1_run_on_the_automatic_cluster_dies_with_its_parent(
    signum: int, tmp_path: Path
) -> None:
    agent = tmp_path / "slow.yaml"
    agent.write_text(ops_nodes.SLOW_AGENT)
    state = json.dumps({"marker_dir": str(tmp_path), "sleep": 60})
    proc = subprocess.Popen(
        tea_dist("run", str(agent), "--strategy", "celery", "--input", state),
        env=clean_env(tmp_path / "runtime"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        running = [tmp_path / "a.started", tmp_path / "b.started"]
        wait_for(lambda: all(p.exists() for p in running), 90, "branches running", proc)
        Started.of(proc).signal_and_wait(signum)
    finally:
        stop(proc)
    if signum != signal.SIGKILL:
        assert proc.returncode == 128 + signum


APP = """
import faulthandler, signal, sys, threading
faulthandler.register(signal.SIGUSR2, all_threads=True)  # a test that times out asks
from tea_dist import ParallelConfig
from tests import celery_nodes as cn, ops_nodes
from tests.nodes import fan_graph

quick = fan_graph({"q": cn.whoami}, config=ParallelConfig(strategy="celery"), fan_in=cn.collect)
# the cluster starts from a thread that then ends: it must live on for the next run
thread = threading.Thread(target=lambda: list(quick.compile().invoke({"value": 1})))
thread.start(); thread.join()
list(ops_nodes.slow_fanout().compile().invoke({"marker_dir": sys.argv[1], "sleep": 60}))
"""


@pytest.mark.celery
@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_item1_app_on_the_automatic_cluster_dies_with_its_parent(
    signum: int, tmp_path: Path
) -> None:
    errors = tmp_path / "app.stderr"
    with errors.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", APP, str(tmp_path)],
            env=clean_env(tmp_path / "runtime"),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        running = [tmp_path / "a.started", tmp_path / "b.started"]
        wait_for(lambda: all(p.exists() for p in running), 120, "branches running", proc)
        Started.of(proc).signal_and_wait(signum)
    except AssertionError as exc:  # with what the app printed (its stacks, when it hung)
        raise AssertionError(f"{exc}\n{errors.read_text()[-6000:]}") from None
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- item 6: `tea-dist cluster` is found; nothing starts a throwaway cluster ---------------


@dataclass
class Advertised:
    proc: subprocess.Popen[str]
    env: dict[str, str]
    broker: str
    logs: Path
    cwd: Path

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            tea_dist(*args),
            env=self.env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def advertised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Advertised]:
    """A ``tea-dist cluster`` (no Flower) advertised in a runtime directory of its own."""
    base = tmp_path_factory.mktemp("advertised")
    env = clean_env(base / "runtime")
    env["TEA_DIST_AGENTS_DIR"] = str(base)  # its workers find agents written there
    proc = subprocess.Popen(
        tea_dist("cluster", "--flower-port", "0"),
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        broker = re.match(r"broker:\s+(\S+)", lines[0])
        logs = re.match(r"logs:\s+(\S+)", lines[1])
        assert broker and logs, lines
        yield Advertised(proc, env, broker.group(1), Path(logs.group(1)), ROOT)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        finally:
            stop(proc)


def one_error_line(done: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.celery
def test_item6_commands_find_the_advertised_cluster(advertised: Advertised) -> None:
    done = advertised.run("submit", "tests.apps_graphs:quick", "--input", '{"value": 1}', "--wait")
    assert done.returncode == 0, done.stderr
    run_id = done.stderr.strip()  # the id on stderr: stdout is the result JSON alone
    assert json.loads(done.stdout)["total"] == 4
    assert advertised.run("status", run_id).stdout.strip() == "succeeded"
    assert json.loads(advertised.run("result", run_id).stdout)["total"] == 4
    assert advertised.run("circuits").returncode == 0
    # the run really went through the advertised cluster's Redis
    import redis

    client = redis.Redis.from_url(advertised.broker)
    assert client.hget(f"tea:run:{run_id}", "status") == b"succeeded"


@pytest.mark.celery
def test_item6_cancel_of_a_finished_or_unknown_run_says_so(advertised: Advertised) -> None:
    import redis

    done = advertised.run("submit", "tests.apps_graphs:quick", "--wait")
    run_id = done.stderr.strip()
    one_error_line(advertised.run("cancel", run_id), 1, run_id, "already ended (succeeded)")
    one_error_line(advertised.run("cancel", "nosuch"), 2, "no run 'nosuch'")
    client = redis.Redis.from_url(advertised.broker)
    assert list(client.scan_iter(match="*:cancel")) == []  # neither cancel left a key
    one_error_line(advertised.run("circuits", "--reset", "nosuch"), 2, "no circuit 'nosuch'")


@pytest.mark.celery
def test_item6_app_submit_uses_the_advertised_cluster(advertised: Advertised) -> None:
    code = (
        "from tea_dist import submit\n"
        "run = submit('tests.apps_graphs:quick', {'value': 2})\n"
        "print(run.result(timeout=30)['total'], run.cluster.settings.broker)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=advertised.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", advertised.broker]


@pytest.mark.celery
def test_item6_run_uses_the_advertised_cluster_not_a_private_one(
    advertised: Advertised, tmp_path: Path
) -> None:
    agent = Path(advertised.env["TEA_DIST_AGENTS_DIR"]) / "slow.yaml"
    agent.write_text(ops_nodes.SLOW_AGENT)
    state = json.dumps({"marker_dir": str(tmp_path), "sleep": 0.2})
    proc = subprocess.Popen(
        tea_dist("run", str(agent), "--strategy", "celery", "--input", state),
        env=advertised.env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        children = []
        while proc.poll() is None:
            children += psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.05)
        out, err = proc.communicate(30)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    assert not [p for p in children if "redis-server" in p.name()]  # no private cluster
    ran_on = {int(worker.split("/")[1]) for worker in json.loads(out)["workers"]}
    cluster = {p.pid for p in psutil.Process(advertised.proc.pid).children(recursive=True)}
    assert ran_on and ran_on <= cluster  # the advertised cluster's worker processes


@pytest.mark.celery
def test_item6_worker_joins_the_advertised_cluster(advertised: Advertised) -> None:
    proc = subprocess.Popen(
        tea_dist("worker", "--role", "flows", "--name", "extra@%h", "--concurrency", "1"),
        env=advertised.env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        assert line.startswith(f"tea-dist worker flows on {advertised.broker}, allowing tests")
        from tea_dist.distributed.celery_app import make_app
        from tea_dist.distributed.settings import Settings

        probe = make_app(Settings(broker_url=advertised.broker))
        deadline = time.monotonic() + 60
        while not any("extra@" in w for r in probe.control.ping(timeout=0.5) for w in r):
            assert proc.poll() is None and time.monotonic() < deadline
        probe.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        finally:
            stop(proc)


@pytest.mark.celery
def test_item6_a_second_cluster_is_refused_while_one_is_advertised(
    advertised: Advertised,
) -> None:
    done = advertised.run("cluster", "--flower-port", "0")
    one_error_line(done, 2, "already running", advertised.broker)


COMMANDS_NEEDING_A_CLUSTER = [
    ("submit", "tests.apps_graphs:quick"),
    ("status", "someid"),
    ("result", "someid"),
    ("cancel", "someid"),
    ("circuits",),
    ("circuits", "--reset", "x"),
    ("worker",),
]


@pytest.mark.parametrize("args", COMMANDS_NEEDING_A_CLUSTER, ids=lambda a: "-".join(a))
def test_item6_without_a_cluster_commands_say_how_to_start_one(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    done = subprocess.run(
        tea_dist(*args),
        env=clean_env(tmp_path / "runtime"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error_line(done, 2, "no local cluster is running", NO_CLUSTER, "TEA_DIST_BROKER_URL")
    assert "redis-server" not in done.stderr
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_item6_app_submit_without_a_cluster_fails_saying_how(tmp_path: Path) -> None:
    code = (
        "from tea_dist import submit\n"
        "from tea_dist.core.errors import ConfigError\n"
        "try:\n"
        "    submit('tests.apps_graphs:quick', {})\n"
        "except ConfigError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(tmp_path / "runtime"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and NO_CLUSTER in done.stdout, done.stderr


def test_item6_a_stale_advertisement_is_ignored_and_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    record = {"broker_url": f"redis://127.0.0.1:{free_port()}/0", "pid": dead.pid}
    (runtime / "cluster.json").write_text(json.dumps(record))
    done = subprocess.run(
        tea_dist("status", "someid"),
        env=clean_env(runtime),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error_line(done, 2, NO_CLUSTER)
    assert not (runtime / "cluster.json").exists()


# -- item 10: `tea-dist cluster` refuses bad options and says which process failed ----------


@pytest.mark.parametrize(
    ("args", "culprit"),
    [
        (("--workers", "-1"), "--workers must be 0 or more, got -1"),
        (("--concurrency", "0"), "--concurrency must be 1 or more, got 0"),
        (("--flower-port", "70000"), "--flower-port must be between 0"),
    ],
)
def test_item10_cluster_refuses_bad_options(
    args: tuple[str, ...], culprit: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        tea_dist("cluster", *args),
        env=clean_env(tmp_path / "runtime"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    one_error_line(done, 2, culprit)
    assert done.stdout == ""


def test_item10_cluster_reports_a_taken_flower_port_before_anything(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            tea_dist("cluster", "--flower-port", str(port)),
            env=clean_env(tmp_path / "runtime"),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    one_error_line(done, 2, f"Flower's port {port} is already in use")
    assert done.stdout == ""  # nothing printed as ready
    assert not (tmp_path / "runtime" / "cluster.json").exists()


@pytest.mark.celery
def test_item10_cluster_names_the_process_that_exited_and_why(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        tea_dist("cluster", "--flower-port", "0"),
        env=clean_env(tmp_path / "runtime"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        logs = Path(lines[1].split()[1])
        assert lines[1].startswith("logs:") and (logs / "flows1.log").exists(), lines
        worker = next(
            p
            for p in psutil.Process(proc.pid).children()
            if "--queues" in p.cmdline() and "prefork" in p.cmdline()
        )
        os.killpg(worker.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == 1
    line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert f"flow worker 1 (pid {worker.pid}) exited with code -9" in line
    assert "its log ends:" in line and "ready" in line  # the worker log's last lines
    assert not logs.exists()


# -- item 4: recursion_limit ---------------------------------------------------------------


def cycle_graph() -> StateGraph:
    """``prepare => (a, b) => merge -> prepare``: the issue's cycle, with no exit."""
    graph = StateGraph({}, name="cycle")
    graph.add_node("prepare", run=ops_nodes.count)
    graph.add_node("a", run=ops_nodes.count)
    graph.add_node("b", run=ops_nodes.count)
    graph.add_fanin_node("merge", run=ops_nodes.count)
    graph.add_parallel_edge("prepare", "a", "merge")
    graph.add_parallel_edge("prepare", "b", "merge")
    graph.add_edge("a", "merge")
    graph.add_edge("b", "merge")
    graph.add_edge("merge", "prepare")
    graph.set_entry_point("prepare")
    return graph


def test_item4_unconditional_cycle_ends_with_graph_recursion_error() -> None:
    events = list(cycle_graph().compile().invoke({}))
    assert len(events) == 1 and events[0]["type"] == "error"
    assert events[0]["error_type"] == "GraphRecursionError"
    assert events[0]["node"] == "prepare"  # 1000 steps: prepare/merge 500 times each
    assert "recursion limit of 1000 node steps" in events[0]["error"]
    assert "'prepare'" in events[0]["error"]


def test_item4_recursion_limit_per_invoke_counts_node_steps() -> None:
    events = list(cycle_graph().compile().stream({}, config={"recursion_limit": 7}))
    steps = [e["node"] for e in events if e["type"] == "state"]
    assert steps == ["prepare", "merge"] * 3 + ["prepare"]  # exactly 7 steps ran
    assert events[-1]["type"] == "error" and events[-1]["node"] == "merge"
    assert "recursion limit of 7 node steps reached before node 'merge'" in events[-1]["error"]


def test_item4_recursion_limit_raises_with_raise_exceptions() -> None:
    from tea_dist.core.errors import GraphRecursionError, TeaDistError

    graph = cycle_graph()
    graph.raise_exceptions = True
    with pytest.raises(GraphRecursionError) as caught:
        list(graph.compile().invoke({}, config={"recursion_limit": 3}))
    assert isinstance(caught.value, TeaDistError)
    assert caught.value.node == "merge" and caught.value.limit == 3  # prepare, merge, prepare


def test_item4_bad_recursion_limit_is_refused_naming_it() -> None:
    events = list(cycle_graph().compile().invoke({}, config={"recursion_limit": 0}))
    assert events[-1]["error_type"] == "ConfigError"
    assert "recursion_limit" in events[-1]["error"]


def branch_loop_graph(strategy: str) -> StateGraph:
    """A branch ``loop`` whose condition never lets it reach its fan-in."""
    graph = StateGraph({}, name="branchloop", parallel_config=ParallelConfig(strategy=strategy))
    graph.add_node("prepare", run=ops_nodes.count)
    graph.add_node("loop", run=ops_nodes.count)
    graph.add_node("fine", run=ops_nodes.count)
    graph.add_fanin_node("merge", run=ops_nodes.summarise)
    graph.add_parallel_edge("prepare", "loop", "merge")
    graph.add_parallel_edge("prepare", "fine", "merge")
    graph.add_conditional_edges("loop", ops_nodes.never_done, {"again": "loop", "done": "merge"})
    graph.add_edge("fine", "merge")
    graph.set_entry_point("prepare")
    graph.set_finish_point("merge")
    return graph


def test_item4_recursion_limit_applies_in_each_branch(local_strategy: str) -> None:
    """Branch 'loop' never reaches its fan-in: at the limit the run ends (not retried, not
    merged as a partial result) with the error naming the branch, the node and the limit."""
    policy = RetryPolicy(max_retries=3, base_delay=0.01)
    app = branch_loop_graph(local_strategy).compile(
        parallel_config=ParallelConfig(strategy=local_strategy, retry_policy=policy)
    )
    events = list(app.invoke({}, config={"recursion_limit": 5}))
    assert events[-1]["type"] == "error", events[-1]
    assert events[-1]["error_type"] == "GraphRecursionError"
    assert "branch 'loop'" in events[-1]["error"]
    assert "recursion limit of 5 node steps" in events[-1]["error"]
    assert "before node 'loop'" in events[-1]["error"]
