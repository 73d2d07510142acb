"""Issue 11, security: workers run only what is allowed and the code the caller means; messages
can be signed; no password shows in a repr or on a command line.

The distributed cases use the real Redis and real worker processes (tests/cluster.py).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tea_dist import ParallelConfig, load_yaml
from tea_dist.core.errors import GraphError, RunFailedError, TeaDistError
from tea_dist.distributed.children import stop_groups
from tea_dist.distributed.cluster import explicit_settings
from tea_dist.distributed.settings import Settings, redact
from tea_dist.distributed.signing import SignatureError, sign, verify
from tea_dist.distributed.trust import (
    Allowlist,
    CodeMismatchError,
    NotAllowedError,
    fingerprint,
)
from tea_dist.distributed.wire import decode_branch, encode_branch
from tests import celery_nodes as cn
from tests import nodes
from tests.nodes import fan_graph, final_state

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = 'p@ss/w:rd#1 "q" \\x'  # every character that breaks a URL or a config line


# -- helpers --------------------------------------------------------------------------------


def send_branch_message(
    app: Any,
    queue: str,
    graph: dict[str, Any],
    state: dict[str, Any],
    run_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send one ``tea_dist.run_flow`` message shaped as the driver builds it (a
    ``BranchMessage``), as anyone who can write to the broker could, and return the branch's
    result as the worker publishes it on the run's stream. The one place to adapt when the
    branch message format changes."""
    import redis as redis_client

    from tea_dist.distributed.keys import Keys
    from tea_dist.distributed.messages import BranchEvent, BranchMessage
    from tea_dist.engine.lifecycle import AttemptState
    from tests.cluster import current_settings

    message = BranchMessage(
        run=uuid.uuid4().hex,
        graph_name="raw",
        fanout=uuid.uuid4().hex,
        index=0,
        branch="a",
        fan_in="merge",
        graph=graph,
        state=state,
        run_config=run_config or {},
        config=ParallelConfig(strategy="celery"),
        attempt=AttemptState(branch="a", dispatched_at=time.time()),
    )
    settings = current_settings()
    keys = Keys(settings.key_prefix)
    client = redis_client.Redis.from_url(settings.redis)
    client.set(keys.run_lease(message.run), 1, ex=60)  # a live caller
    app.send_task("tea_dist.run_flow", args=(message,), queue=queue, argsrepr="(raw)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for _id, fields in client.xrange(keys.events(message.run)):
            event = BranchEvent.model_validate_json(fields[b"e"])
            if event.event == "on_flow_complete" and event.result is not None:
                return event.result.to_dict()
        time.sleep(0.1)
    raise AssertionError("the worker published no result")


def one_node_graph(path: str) -> dict[str, Any]:
    """An encoded branch whose node ``a`` runs ``path``, with a correct code fingerprint."""
    return {
        "name": "raw",
        "nodes": {"a": {"run": path, "fan_in": False}},
        "edges": {"a": ["merge"]},
        "conditionals": {},
        "fanouts": {},
        "code": fingerprint([path.partition(":")[0]]),
    }


def cmdlines(pid: int) -> list[str]:
    """The command line of ``pid`` and of every process below it."""
    root = psutil.Process(pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.append(" ".join(proc.cmdline()))
    return found


def http_status(url: str, auth: str | None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, ConnectionError):
        return 0


def wait_http(url: str, proc: subprocess.Popen[Any], timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while http_status(url, None) != 200:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{url} did not answer"
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen[Any]) -> None:
    stop_groups([proc], 15)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEA_DIST_", "FLOWER_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


@pytest.fixture
def own_worker(cluster: Any, tmp_path: Path) -> Iterator[Any]:
    """Start extra flow workers on queues of their own; stop them after the test."""
    from tea_dist.distributed.worker import spawn_worker

    started: list[subprocess.Popen[bytes]] = []

    def start(allowed: str, pythonpath: str = str(ROOT), **env: str) -> tuple[str, Any]:
        queue = f"{cluster.env['TEA_DIST_FLOWS_QUEUE']}.{uuid.uuid4().hex[:6]}"
        settings = cluster.settings().with_overrides(flows_queue=queue, allowed=allowed)
        name = f"sec{len(started)}-{cluster.tag}@%h"
        started.append(
            spawn_worker(
                settings,
                "flows",
                concurrency=1,
                name=name,
                log_path=tmp_path / f"{name.split('@')[0]}.log",
                extra_env={"PYTHONPATH": pythonpath, **env},
            )
        )
        return queue, started[-1]

    yield start
    for proc in started:
        stop_group(proc)


# -- item 1: workers run only what the operator allows ---------------------------------------


def test_allowlist_names_modules_and_packages() -> None:
    allow = Allowlist(("tests", "examples.nodes"))
    assert allow.allows("tests.nodes") and allow.allows("tests") and allow.allows("examples.nodes")
    assert not allow.allows("tests_evil") and not allow.allows("examples.other")
    assert not allow.allows("logging.config") and not allow.allows("subprocess")
    assert allow.allows("tea_dist.policies.merge")  # tea_dist's node helpers, always
    assert not allow.allows("tea_dist.interfaces.cli")  # not the rest of tea_dist


def test_allowed_setting_is_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEA_DIST_ALLOWED", "pkg.nodes, other ,,")
    assert Settings().allowed == ("pkg.nodes", "other")


def test_refused_callable_is_never_imported(tmp_path: Path) -> None:
    """The check comes before the import: a module's top-level code never runs."""
    name = f"sec_side_effect_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "imported"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def node(state):\n    return {}\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        data = one_node_graph("tests.nodes:double")
        data["nodes"]["a"]["run"] = f"{name}:node"
        with pytest.raises(NotAllowedError) as info:
            decode_branch(data, "a", explicit_settings(allowed=("tests",)))
    finally:
        sys.path.remove(str(tmp_path))
    message = str(info.value)
    assert f"'{name}:node'" in message and f"--allow {name}" in message
    assert "TEA_DIST_ALLOWED" in message
    assert isinstance(info.value, GraphError)
    assert not marker.exists() and name not in sys.modules


def test_rce_repro_is_refused_on_a_real_worker(cluster: Any, tmp_path: Path) -> None:
    """Issue 11, item 1: a raw message naming ``logging.config:dictConfig`` (whose parameter
    ``config`` receives the run config) with a ``subprocess.getoutput`` factory ran a shell
    command on the worker (it did on the code before the allowlist). Now it is refused."""
    from tests.cluster import current_app

    app = current_app()

    marker = tmp_path / "owned"
    logging_config = {
        "version": 1,
        "handlers": {"x": {"()": "subprocess.getoutput", "cmd": f"touch {marker}"}},
    }
    graph = one_node_graph("logging.config:dictConfig")
    queue = cluster.env["TEA_DIST_FLOWS_QUEUE"]
    outcome = send_branch_message(app, queue, graph, logging_config, logging_config)
    assert not marker.exists(), "the worker ran the shell command"
    assert outcome["success"] is False and outcome["error_type"] == "NotAllowedError"
    assert "logging.config:dictConfig" in outcome["error"] and "--allow" in outcome["error"]
    time.sleep(0.5)  # nothing ran later either (a retry, a redelivery)
    assert not marker.exists()


def test_worker_allow_option_is_all_it_runs(cluster: Any, tmp_path: Path) -> None:
    """``tea-dist worker --allow tests.nodes``: a tests.nodes branch runs, a branch of another
    module of the same package is refused naming it."""
    from tea_dist.distributed.worker import wait_ready

    queue = f"{cluster.env['TEA_DIST_FLOWS_QUEUE']}.allow"
    name = f"allow-{cluster.tag}"
    env = {k: v for k, v in cluster.env.items() if k != "TEA_DIST_ALLOWED"}
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tea_dist", "worker", "--allow", "tests.nodes"),
            *("--queues", queue, "--name", f"{name}@%h", "--concurrency", "1"),
            *("--loglevel", "WARNING"),
        ],
        env=clean_env(**env),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "worker.log", "wb"),
        start_new_session=True,
    )
    try:
        wait_ready(cluster.settings(), name, proc, 60)
        config = ParallelConfig(strategy="celery", queue=queue)
        app = fan_graph(
            {"a": nodes.double, "b": cn.whoami}, config=config, fan_in=cn.collect
        ).compile()
        state = final_state(list(app.invoke({"value": 2})))
    finally:
        stop_group(proc)
    a, b = state["results"]
    assert a["success"] and a["state"]["value"] == 4
    assert not b["success"] and b["error_type"] == "NotAllowedError"
    assert "tests.celery_nodes:whoami" in b["error"] and "--allow tests.celery_nodes" in b["error"]
    assert "allowing tests.nodes" in (tmp_path / "worker.log").read_text()


def test_submitted_graph_outside_the_allowlist_is_refused(cluster: Any) -> None:
    """A run worker resolves a submitted ref only from an allowed module."""
    from tea_dist.distributed.apps import submit
    from tests.cluster import configure, current_settings

    previous = current_settings()
    runs_queue = f"{cluster.env['TEA_DIST_RUNS_QUEUE']}.narrow"
    worker = cluster.start_worker(
        "narrow", role="runs", runs_queue=runs_queue, allowed="tests.nodes"
    )
    configure(previous.with_overrides(runs_queue=runs_queue))
    try:
        run = submit("tests.apps_graphs:quick", {"value": 1})
        with pytest.raises(RunFailedError) as info:
            run.result(timeout=30)
    finally:
        configure(previous)
        cluster.workers.remove(worker)
        stop_group(worker)
    assert "NotAllowedError" in str(info.value) and "tests.apps_graphs:quick" in str(info.value)


@pytest.mark.celery
def test_local_cluster_of_tea_dist_run_allows_the_agent_it_runs(tmp_path: Path) -> None:
    """``tea-dist run AGENT --strategy celery`` with no broker: its own cluster runs the
    agent's ``uses:`` modules and inline code, and nothing else was allowed."""
    (tmp_path / "agent.yaml").write_text(
        "name: local\n"
        "nodes:\n"
        '  - {name: start, run: \'return {"value": state["value"] + 1}\'}\n'
        "  - {name: a, uses: 'tests.nodes:double'}\n"
        "  - name: b\n    run: |\n      return {'value': 100}\n"
        "  - name: merge\n    fan_in: true\n    run: |\n"
        "      return {'got': sorted(r.state['value'] for r in parallel_results if r.success),\n"
        "              'errors': [r.error for r in parallel_results if not r.success]}\n"
        "edges:\n"
        "  - {from: __start__, to: start}\n"
        "  - {from: start, to: [a, b], parallel: true, fan_in: merge}\n"
        "  - {from: a, to: merge}\n  - {from: b, to: merge}\n"
        "  - {from: merge, to: __end__}\n"
    )
    done = subprocess.run(
        [
            *(sys.executable, "-m", "tea_dist", "run", "agent.yaml"),
            *("--strategy", "celery", "--input", '{"value": 1}'),
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads(done.stdout)
    assert state["got"] == [4, 100] and state["errors"] == []


# -- item 4: workers run the code the caller means -------------------------------------------


def test_fingerprint_mismatch_is_refused_naming_the_module() -> None:
    data = encode_branch(
        fan_graph({"a": nodes.double}, config=ParallelConfig(strategy="celery")).to_spec(),
        "a",
        "merge",
    )
    allow = explicit_settings(allowed=("tests",))
    assert set(data["code"]["modules"]) == {"tests.nodes"}
    decode_branch(data, "a", allow)  # the same code: accepted

    tampered = json.loads(json.dumps(data))
    tampered["code"]["modules"]["tests.nodes"] = "0" * 64
    with pytest.raises(CodeMismatchError, match=r"module 'tests\.nodes' on this worker differs"):
        decode_branch(tampered, "a", allow)

    other_version = json.loads(json.dumps(data))
    other_version["code"]["tea_dist"] = "0.0.1"
    with pytest.raises(CodeMismatchError, match=r"tea_dist .* differs from the caller's 0\.0\.1"):
        decode_branch(other_version, "a", allow)

    unvouched = json.loads(json.dumps(data))
    unvouched["code"]["modules"] = {}
    with pytest.raises(CodeMismatchError, match=r"'tests\.nodes' without its code fingerprint"):
        decode_branch(unvouched, "a", allow)

    unsigned = {k: v for k, v in data.items() if k != "code"}
    with pytest.raises(CodeMismatchError, match="no code fingerprint"):
        decode_branch(unsigned, "a", allow)


def test_a_fan_outs_branches_share_one_decoding_and_refusals_are_never_kept() -> None:
    """A worker decodes a fan-out's description once per process (every branch's message
    carries the same text); a refused one is refused again every time, not remembered as
    accepted, and a description that is no graph is a ``GraphError`` naming what it lacks."""
    from tea_dist.distributed.wire import DecodedBranches

    data = encode_branch(
        fan_graph({"a": nodes.double}, config=ParallelConfig(strategy="celery")).to_spec(),
        "a",
        "merge",
    )
    branches = DecodedBranches(explicit_settings(allowed=("tests",)))
    text = json.dumps(data)
    first = branches.get(text, "a")
    assert branches.get(text, "a") is first  # not decoded (imported, checked) again
    assert branches.get(json.dumps(data, indent=1), "a") is not first  # other text: decoded

    tampered = json.loads(text)
    tampered["code"]["modules"]["tests.nodes"] = "0" * 64
    for _ in range(2):
        with pytest.raises(CodeMismatchError, match=r"module 'tests\.nodes' on this worker"):
            branches.get(json.dumps(tampered), "a")
    refused = DecodedBranches(explicit_settings(allowed=("bench",)))
    for _ in range(2):
        with pytest.raises(NotAllowedError, match="tests"):
            refused.get(text, "a")
    with pytest.raises(GraphError, match="not JSON"):
        branches.get("{nodes", "a")
    with pytest.raises(GraphError, match="lacks 'nodes'"):
        branches.get(json.dumps({k: v for k, v in data.items() if k != "nodes"}), "a")


def test_a_decoded_branch_cache_keeps_at_most_its_size() -> None:
    from tea_dist.distributed.wire import DecodedBranches

    spec = fan_graph({"a": nodes.double}, config=ParallelConfig(strategy="celery")).to_spec()
    data = encode_branch(spec, "a", "merge")
    branches = DecodedBranches(explicit_settings(allowed=("tests",)), size=2)
    texts = [json.dumps(data, indent=i) for i in range(3)]
    first = branches.get(texts[0], "a")
    branches.get(texts[1], "a")
    branches.get(texts[2], "a")  # the oldest goes
    assert branches.get(texts[0], "a") is not first


def test_node_module_edited_after_the_worker_imported_it_is_refused(
    own_worker: Any, tmp_path: Path
) -> None:
    """Issue 11, item 4: the caller runs version 2 of a node module while the worker still
    has version 1 loaded; the branch is refused naming the module instead of running v1."""
    name = f"sec_nodes_{uuid.uuid4().hex[:8]}"
    source = tmp_path / "code" / f"{name}.py"
    source.parent.mkdir()
    source.write_text("def step(state):\n    return {'version': 1}\n")
    queue, _ = own_worker(f"tests,{name}", pythonpath=f"{ROOT}{os.pathsep}{source.parent}")
    config = ParallelConfig(strategy="celery", queue=queue)
    sys.path.insert(0, str(source.parent))
    try:
        module = importlib.import_module(name)
        app = fan_graph({"a": module.step}, config=config, fan_in=cn.collect).compile()
        first = final_state(list(app.invoke({})))["results"][0]
        assert first["success"] and first["state"]["version"] == 1

        source.write_text("def step(state):\n    return {'version': 2, 'edited': True}\n")
        module = importlib.reload(module)
        app = fan_graph({"a": module.step}, config=config, fan_in=cn.collect).compile()
        second = final_state(list(app.invoke({})))["results"][0]
    finally:
        sys.path.remove(str(source.parent))
        sys.modules.pop(name, None)
    assert not second["success"] and second["error_type"] == "CodeMismatchError"
    assert f"module '{name}' on this worker differs from the caller's" in second["error"]
    assert "version" not in (second["state"] or {})  # version 1 did not run


AGENT = (
    "name: rel\n"
    "settings: {parallel: {strategy: celery}}\n"
    "nodes:\n"
    "  - {name: start}\n"
    "  - {name: a, uses: 'tests.nodes:add_one'}\n"
    "  - name: merge\n    fan_in: true\n    run: |\n"
    "      return {'ok': [r.success for r in parallel_results],\n"
    "              'value': [r.state.get('value') for r in parallel_results]}\n"
    "edges:\n"
    "  - {from: __start__, to: start}\n"
    "  - {from: start, to: [a], parallel: true, fan_in: merge}\n"
    "  - {from: a, to: merge}\n"
    "  - {from: merge, to: __end__}\n"
)


def test_yaml_agent_found_relative_to_agents_dir_on_the_worker(cluster: Any) -> None:
    """Caller and worker keep the agent at different absolute paths, the same relative one."""
    from tests.cluster import configure, current_settings

    previous = current_settings()
    relative = Path("agents", uuid.uuid4().hex[:8], "agent.yaml")
    worker_copy = Path(cluster.env["TEA_DIST_AGENTS_DIR"]) / relative
    worker_copy.parent.mkdir(parents=True)
    worker_copy.write_text(AGENT)
    with tempfile.TemporaryDirectory() as caller_dir:
        caller_copy = Path(caller_dir) / relative
        caller_copy.parent.mkdir(parents=True)
        caller_copy.write_text(AGENT)
        configure(previous.with_overrides(agents_dir=caller_dir))
        try:
            spec = load_yaml(caller_copy).to_spec()
            assert encode_branch(spec, "a", "merge")["yaml"] == relative.as_posix()
            state = final_state(list(load_yaml(caller_copy).compile().invoke({"value": 1})))
        finally:
            configure(previous)
    assert state["ok"] == [True] and state["value"] == [2]


def test_yaml_agent_outside_the_agents_dir_fails_at_compile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a cluster named (here by the environment), its workers find agents only under
    its agents directory: one outside fails at compile (a private cluster would serve it)."""
    monkeypatch.setenv("TEA_DIST_BROKER_URL", "redis://127.0.0.1:6379/13")
    with tempfile.TemporaryDirectory() as elsewhere:
        path = Path(elsewhere) / "agent.yaml"
        path.write_text(AGENT)
        with pytest.raises(GraphError, match="outside TEA_DIST_AGENTS_DIR"):
            load_yaml(path).compile()


@pytest.mark.parametrize("ref", ["../agent.yaml", "/etc/agent.yaml", "a/../../agent.yaml"])
def test_yaml_agent_ref_cannot_leave_the_agents_dir(ref: str) -> None:
    data = {"yaml": ref, "sha256": "0" * 64, "name": "x", "code": fingerprint([])}
    with pytest.raises(NotAllowedError, match="inside TEA_DIST_AGENTS_DIR"):
        decode_branch(data, "a", explicit_settings(allowed=("tests",)))


def test_yaml_agent_uses_pass_the_allowlist() -> None:
    import hashlib
    import shutil

    from tea_dist.distributed.trust import agents_dir

    text = AGENT.replace("tests.nodes:add_one", "logging.config:dictConfig")
    worker = explicit_settings(allowed=("tests",))
    folder = agents_dir(worker) / f".sec-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        (folder / "agent.yaml").write_text(text)
        ref = f"{folder.name}/agent.yaml"
        data = {
            "yaml": ref,
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "name": "rel",
            "code": fingerprint(["logging.config"]),
        }
        with pytest.raises(NotAllowedError) as info:
            decode_branch(data, "a", worker)
    finally:
        shutil.rmtree(folder)
    assert f"'uses:' of the YAML agent '{ref}'" in str(info.value)
    assert "module 'logging.config' is not allowed" in str(info.value)


# -- item 2: signing --------------------------------------------------------------------------


MESSAGE = {"run": "r1", "branch": "a", "state": {"n": 1.5, "s": "é"}, "ledger": {"errors": []}}


def test_signed_message_verifies_after_a_json_round_trip() -> None:
    signature = sign(MESSAGE, "s3cret")
    assert len(signature) == 64
    received = json.loads(json.dumps(MESSAGE, indent=2))  # what a worker decodes
    verify(dict(reversed(list(received.items()))), signature, "s3cret")  # key order is no matter


def test_unsigned_message_is_refused() -> None:
    for missing in (None, ""):
        with pytest.raises(SignatureError, match="unsigned"):
            verify(MESSAGE, missing, "s3cret")


def test_forged_or_altered_message_is_refused() -> None:
    signature = sign(MESSAGE, "s3cret")
    altered = {**MESSAGE, "branch": "b"}
    with pytest.raises(SignatureError, match="does not match"):
        verify(altered, signature, "s3cret")
    with pytest.raises(SignatureError, match="does not match"):
        verify(MESSAGE, sign(MESSAGE, "another"), "s3cret")
    with pytest.raises(SignatureError, match="does not match"):
        verify(MESSAGE, "zz" * 32, "s3cret")


def test_signing_accepts_secret_forms_and_refuses_what_cannot_be_signed() -> None:
    from pydantic import SecretStr

    assert sign(MESSAGE, SecretStr("k")) == sign(MESSAGE, b"k") == sign(MESSAGE, "k")
    assert issubclass(SignatureError, TeaDistError)
    with pytest.raises(SignatureError, match="empty"):
        sign(MESSAGE, "")
    with pytest.raises(SignatureError, match="not plain JSON"):
        sign({"when": object()}, "k")
    with pytest.raises(SignatureError, match="not plain JSON"):
        sign({"x": float("nan")}, "k")


def test_secret_setting_is_optional_and_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEA_DIST_SECRET", "")
    assert Settings().secret is None
    monkeypatch.setenv("TEA_DIST_SECRET", "hunter2")
    settings = Settings()
    assert settings.secret is not None and settings.secret.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)


# -- item 3: passwords -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://user:hunter2@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://hunter2@h/0", "redis://:***@h/0"),
        ("redis://h:6379/0?password=hunter2", "redis://h:6379/0?password=***"),
        ("redis://h/0?db=1&password=hunter2&x=1", "redis://h/0?db=1&password=***&x=1"),
        ("rediss://h/0?ssl_keyfile_password=hunter2", "rediss://h/0?ssl_keyfile_password=***"),
        ("redis://:hunter2@a;redis://:hunter2@b", "redis://:***@a;redis://:***@b"),
        ("redis://:p@hunter2@h/0", "redis://:***@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_hides_every_password_form(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_settings_repr_shows_no_password() -> None:
    settings = Settings(
        broker_url="redis://h:6379/0?password=hunter2",
        result_backend="redis://:hunter2@h/1",
        redis_url="redis://u:hunter2@h/2",
        redis_password="hunter3",
    )
    assert "hunter" not in repr(settings) and "hunter" not in str(settings)


def test_redis_password_is_url_encoded_into_urls_without_one() -> None:
    settings = Settings(broker_url="redis://redis:6379/0", redis_password="p@s/s:w#rd")
    encoded = "redis://:p%40s%2Fs%3Aw%23rd@redis:6379/0"
    assert settings.broker == settings.backend == settings.redis == encoded
    explicit = Settings(broker_url="redis://:given@redis/0", redis_password="other")
    assert explicit.broker == "redis://:given@redis/0"
    assert settings.with_overrides(key_prefix="x").broker == encoded


def compose_service(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"][name]


def test_compose_puts_no_password_on_a_command_line() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, service in services.items():
        argv = [*service.get("command", []), *service.get("healthcheck", {}).get("test", [])]
        for part in argv:
            for variable in ("REDIS_PASSWORD", "FLOWER_PASSWORD", "TEA_DIST_SECRET"):
                # "${VAR}" is filled in by compose (on the command line); "$$VAR" is left to
                # the container's shell, which reads it from the environment
                assert "${" + variable not in part, f"{name}: {variable} on a command line"
        assert "-a" not in service.get("healthcheck", {}).get("test", [])
    worker_env = services["flow-worker"]["environment"]
    assert "@" not in worker_env["TEA_DIST_BROKER_URL"]
    assert "REDIS_PASSWORD" in worker_env["TEA_DIST_REDIS_PASSWORD"]
    assert "FLOWER_PASSWORD" in services["flower"]["environment"]["FLOWER_BASIC_AUTH"]


@pytest.mark.celery
def test_compose_redis_takes_a_password_with_special_characters(tmp_path: Path) -> None:
    """The compose file's own Redis command, run here: the password goes in on stdin, works
    with ``@ / : # " \\``, and tea_dist reaches it through TEA_DIST_REDIS_PASSWORD, a real
    worker included; no process shows the password on its command line."""
    import redis
    from kombu import Connection

    from tea_dist.distributed.local_cluster import free_port, redis_server_binary
    from tea_dist.distributed.worker import spawn_worker

    command = compose_service("redis")["command"]
    assert command[:2] == ["sh", "-c"]
    script = command[2].replace("$$", "$")  # what compose hands the container
    port = free_port()
    path = f"{Path(redis_server_binary()).parent}{os.pathsep}{os.environ['PATH']}"
    server = subprocess.Popen(
        [
            *("sh", "-c", script, "redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--dir", str(tmp_path), "--save", "", "--appendonly", "no"),
        ],
        env={"PATH": path, "REDIS_PASSWORD": PASSWORD},
        stdout=open(tmp_path / "redis.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = None
    try:
        settings = Settings(
            broker_url=f"redis://127.0.0.1:{port}/0",
            redis_password=PASSWORD,
            key_prefix=f"tea-sec-{uuid.uuid4().hex[:6]}",
            flows_queue="tea.sec",
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                assert redis.Redis.from_url(settings.redis).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).get("x")  # no password: refused
        with Connection(settings.broker) as conn:
            conn.ensure_connection(max_retries=1)
        worker = spawn_worker(
            settings, "flows", concurrency=1, name=f"pw-{port}@%h", log_path=tmp_path / "w.log"
        )
        shown = cmdlines(server.pid) + cmdlines(worker.pid)
        assert shown and all(PASSWORD not in line and "p%40ss" not in line for line in shown)
    finally:
        if worker is not None:
            stop_group(worker)
        stop_group(server)


AUTH = f"ops:{PASSWORD}"


def test_flower_auth_from_environment_not_command_line(cluster: Any, tmp_path: Path) -> None:
    from tea_dist.distributed.local_cluster import free_port
    from tea_dist.distributed.worker import spawn_flower

    port = free_port()
    proc = spawn_flower(cluster.settings(), port, auth=AUTH, log_path=tmp_path / "flower.log")
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthcheck", proc)
        shown = cmdlines(proc.pid)
        assert shown and all(PASSWORD not in line for line in shown), shown
        assert http_status(f"{base}/api/workers", AUTH) == 200
        assert http_status(f"{base}/api/workers", None) == 401
        assert http_status(f"{base}/api/workers", "ops:wrong") == 401
    finally:
        stop_group(proc)


@pytest.mark.celery
def test_cluster_flower_auth_from_a_file(tmp_path: Path) -> None:
    """``tea-dist cluster --flower-auth @FILE``: no process of the cluster shows the password;
    Flower answers with it and 401 without; the password itself as a value is refused."""
    from tea_dist.distributed.local_cluster import free_port

    refused = subprocess.run(
        [sys.executable, "-m", "tea_dist", "cluster", "--flower-auth", AUTH],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "@FILE" in refused.stderr
    assert PASSWORD not in refused.stderr

    secret_file = tmp_path / "flower-auth"
    secret_file.write_text(AUTH + "\n")
    secret_file.chmod(0o600)
    port = free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tea_dist", "cluster", "--flower-port", str(port)),
            *("--flower-auth", f"@{secret_file}"),
        ],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthcheck", proc, timeout=90)
        shown = cmdlines(proc.pid)
        assert len(shown) >= 4  # the command, Redis, workers, Flower
        assert all(PASSWORD not in line for line in shown), shown
        assert http_status(f"http://127.0.0.1:{port}/api/workers", AUTH) == 200
        assert http_status(f"http://127.0.0.1:{port}/api/workers", None) == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            stop_group(proc)
