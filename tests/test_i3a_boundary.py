"""The trust boundary: a reference resolves only through what its module defines, for every
message kind a worker acts on; submitted runs are signed; forged messages kill no worker.

Each case was first tried as an attacker with broker access would (an unsigned JSON message
naming ``allowed_module:logging.config.dictConfig``, ``allowed_module:os.abort``, a forged
``tea_dist.run_workflow``). Unit cases need no service; the others use the session's real
Redis and real worker processes (tests/cluster.py).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FunctionType, MethodType, ModuleType
from typing import Any

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tea_dist import StateGraph
from tea_dist.core import references
from tea_dist.core.errors import GraphError, NotAllowedError, RunFailedError
from tea_dist.core.references import resolve
from tea_dist.distributed.cluster import explicit_settings
from tea_dist.distributed.trust import Allowlist, fingerprint
from tea_dist.distributed.wire import DecodedBranches, encode_branch
from tests import boundary_nodes as bn
from tests.test_security import one_node_graph, send_branch_message

ALLOWED = "tests.boundary_nodes"

# What an attacker reached through allowed modules before: every one must be refused.
ESCAPES = [
    f"{ALLOWED}:logging.config.dictConfig",
    f"{ALLOWED}:subprocess.getoutput",
    f"{ALLOWED}:os.abort",
    f"{ALLOWED}:os.system",
    f"{ALLOWED}:dumps",  # imported, not defined there
    f"{ALLOWED}:StateGraph",  # a class it imported
    f"{ALLOWED}:__builtins__",
    f"{ALLOWED}:ok.__globals__",
    f"{ALLOWED}:ok.__code__",
    f"{ALLOWED}:Steps.__init__",
    f"{ALLOWED}:Steps.mro",  # a builtin method of the class's metaclass
    f"{ALLOWED}:Steps.__subclasses__",
    f"{ALLOWED}:GRAPH.compile",  # through an instance
    f"{ALLOWED}:Any",
    "tea_dist.policies.merge:json.codecs.sys.exit",
    "tea_dist.policies.merge:annotations",
    f"{ALLOWED}:ok.__class__",
]


# -- the rule, unit ---------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ESCAPES)
def test_i3a_a_reference_never_leaves_its_module(ref: str) -> None:
    with pytest.raises(GraphError) as info:
        resolve(ref, check=Allowlist((ALLOWED,)).check)
    assert ref in str(info.value)


def test_i3a_refusals_say_where_the_name_is_defined() -> None:
    with pytest.raises(NotAllowedError) as info:
        resolve(f"{ALLOWED}:dumps")
    assert "defined in module 'json'" in str(info.value) and "'json:dumps'" in str(info.value)
    with pytest.raises(NotAllowedError, match="'os' is a module"):
        resolve(f"{ALLOWED}:os.abort")


def test_i3a_functions_classes_and_methods_defined_there_resolve() -> None:
    assert resolve(f"{ALLOWED}:ok") is bn.ok
    assert resolve(f"{ALLOWED}:Steps") is bn.Steps
    assert resolve(f"{ALLOWED}:Steps.add_one") is bn.Steps.add_one
    assert resolve(f"{ALLOWED}:Steps.add_two")({"value": 1}) == {"value": 3}
    assert resolve(f"{ALLOWED}:GRAPH", instances=(StateGraph,)) is bn.GRAPH
    with pytest.raises(NotAllowedError):  # an instance only where the caller accepts one
        resolve(f"{ALLOWED}:GRAPH")


@pytest.mark.parametrize("ref", ["", "x", "a:", ":b", "a:b c", "a;b:c", "a:b..c", "../x:y", "a:1b"])
def test_i3a_a_malformed_reference_is_a_clear_error(ref: str) -> None:
    with pytest.raises(GraphError, match="is not a reference of the form"):
        resolve(ref)


def test_i3a_the_allowlist_is_asked_before_anything_is_imported(tmp_path: Path) -> None:
    name = f"i3a_side_effect_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("raise SystemExit('imported')\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(NotAllowedError):
            resolve(f"{name}:x", check=Allowlist((ALLOWED,)).check)
    finally:
        sys.path.remove(str(tmp_path))
    assert name not in sys.modules


# -- fuzzing the worker's decode-verify-resolve path -------------------------------------------


def _reachable_names(module: ModuleType) -> list[str]:
    """Attribute names an attacker could walk from ``module`` (two levels deep), as refs."""
    names: list[str] = []
    for name in dir(module):
        names.append(name)
        try:
            value = getattr(module, name)
        except AttributeError:
            continue
        names.extend(f"{name}.{inner}" for inner in dir(value)[:60])
    return names


FUZZ_MODULES = [ALLOWED, "tea_dist.policies.merge", "tests.nodes"]
ALLOW = Allowlist((ALLOWED, "tests.nodes"))
WORKER = explicit_settings(allowed=ALLOW.entries)  # a worker allowing just that
NAMES = sorted(
    {f"{m}:{n}" for m in FUZZ_MODULES for n in _reachable_names(importlib.import_module(m))}
)
REFS = st.one_of(
    st.sampled_from(NAMES),
    st.sampled_from(ESCAPES),
    st.sampled_from(["os:system", "builtins:exec", "importlib:import_module", "subprocess:run"]),
    st.from_regex(r"[a-z_.]{1,20}:[A-Za-z_.]{1,20}", fullmatch=True),
)


@pytest.fixture
def imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every module the resolver and the fingerprint check import, in order."""
    seen: list[str] = []
    real = importlib.import_module

    def recording(name: str, package: str | None = None) -> ModuleType:
        seen.append(name)
        return real(name, package)

    monkeypatch.setattr(references.importlib, "import_module", recording)
    from tea_dist.distributed import trust

    monkeypatch.setattr(trust.importlib, "import_module", recording)
    yield seen


def _defined_in_allowed(value: Any) -> bool:
    if isinstance(value, MethodType):  # a class method, bound to its class
        value = value.__func__
    if isinstance(value, StateGraph):
        return True
    return isinstance(value, FunctionType | type) and ALLOW.allows(value.__module__)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(ref=REFS)
def test_i3a_fuzz_resolve_reaches_only_what_allowed_modules_define(
    ref: str, imports: list[str]
) -> None:
    imports.clear()
    try:
        value = resolve(ref, check=ALLOW.check, instances=(StateGraph,))
    except GraphError:
        value = None
    assert all(ALLOW.allows(name) for name in imports), imports
    if value is not None:
        assert _defined_in_allowed(value), (ref, value)
        assert ref.partition(":")[0] == getattr(value, "__module__", ref.partition(":")[0])


def _genuine_branch() -> dict[str, Any]:
    return json.loads(json.dumps(encode_branch(bn.GRAPH.to_spec(), "a", "merge")))


MUTATIONS = st.lists(
    st.tuples(st.sampled_from(["run", "module", "fingerprint", "conditional", "map"]), REFS),
    min_size=1,
    max_size=4,
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations=MUTATIONS)
def test_i3a_fuzz_mutated_branch_messages_run_nothing_outside_the_allowlist(
    mutations: list[tuple[str, str]], imports: list[str]
) -> None:
    """Genuine encoded branches, mutated where they name code: decoding imports only allowed
    modules, and every callable it returns is defined in one."""
    data = _genuine_branch()
    for where, ref in mutations:
        module = ref.partition(":")[0]
        if where == "run":
            data["nodes"]["a"]["run"] = ref
        elif where == "module":
            data["code"]["modules"][module] = "0" * 64
        elif where == "fingerprint":  # an attacker copies a genuine fingerprint
            data["code"] = fingerprint([module]) if ALLOW.allows(module) else data["code"]
            data["code"]["modules"].update(fingerprint([ALLOWED])["modules"])
        elif where == "conditional":
            data["conditionals"]["a"] = {"func": ref, "targets": [["x", "merge"]]}
        else:
            data["fanouts"]["a"] = {
                "fan_in": "merge",
                "branches": ["merge"],
                "configs": [{}],
                "map": {"items": ref, "call": True, "item_key": "i", "index_key": "n"},
            }
    imports.clear()
    try:  # as a worker decodes a message's description: through its process's cache
        spec = DecodedBranches(WORKER).get(json.dumps(data), "a")
    except (GraphError, KeyError, TypeError, ValueError):
        spec = None
    assert all(ALLOW.allows(name) for name in imports), imports
    if spec is not None:
        for node in spec.nodes.values():
            assert node.run is None or _defined_in_allowed(node.run)
        for conditional in spec.conditionals.values():
            assert _defined_in_allowed(conditional.func)
        for fanout in spec.fanouts.values():
            if fanout.map is not None and callable(fanout.map.items):
                assert _defined_in_allowed(fanout.map.items)


# -- on real workers --------------------------------------------------------------------------


def _pool(cluster: Any) -> set[int]:
    """Every process of the session's workers (main processes and pool children)."""
    pids = set()
    for proc in cluster.workers:
        with contextlib.suppress(psutil.NoSuchProcess):  # one an earlier test stopped
            root = psutil.Process(proc.pid)
            pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}
    return pids


@pytest.mark.celery
def test_i3a_rce_through_a_module_an_allowed_module_imports_is_refused(
    cluster: Any, tmp_path: Path
) -> None:
    """An unsigned JSON message naming ``allowed:logging.config.dictConfig`` with a handler
    factory ``subprocess.getoutput`` ran a shell command on the worker. Now it is refused."""
    from tests.cluster import current_app

    app = current_app()

    marker = tmp_path / "owned"
    config = {
        "version": 1,
        "handlers": {"x": {"()": "subprocess.getoutput", "cmd": f"touch {marker}"}},
    }
    graph = one_node_graph(f"{ALLOWED}:ok")
    graph["nodes"]["a"]["run"] = f"{ALLOWED}:logging.config.dictConfig"
    outcome = send_branch_message(app, cluster.env["TEA_DIST_FLOWS_QUEUE"], graph, config, config)
    assert outcome["success"] is False and outcome["error_type"] == "NotAllowedError"
    assert (
        "logging.config.dictConfig" in outcome["error"]
        and "'logging' is a module" in outcome["error"]
    )
    time.sleep(0.5)  # nothing ran later either (a retry, a redelivery)
    assert not marker.exists(), "the worker ran the shell command"


@pytest.mark.celery
def test_i3a_a_message_naming_os_abort_kills_no_worker_process(cluster: Any) -> None:
    from tests.cluster import current_app

    app = current_app()

    before = _pool(cluster)
    queue = cluster.env["TEA_DIST_FLOWS_QUEUE"]
    for ref in (f"{ALLOWED}:os.abort", "tea_dist.policies.merge:json.codecs.sys.exit"):
        outcome = send_branch_message(app, queue, one_node_graph(ref), {})
        assert outcome["error_type"] == "NotAllowedError", outcome
    assert _pool(cluster) == before  # no pool child died and was replaced


@pytest.mark.celery
@pytest.mark.parametrize(
    ("task", "args"),
    [
        ("tea_dist.run_flow", [{"forged": "os:system", "cmd": "touch pwned"}]),
        ("tea_dist.run_batch", [[["x.0", {"forged": "os:system"}]]]),
    ],
)
def test_i3a_a_task_sent_by_hand_without_a_branch_message_is_refused_naming_it(
    cluster: Any, task: str, args: list[Any]
) -> None:
    """Anyone with broker access can send tea_dist's task names with any JSON: the worker
    runs nothing, and says why (a warning naming the task, not an unexpected exception)."""
    from tests.cluster import current_app

    app = current_app()
    sent = app.send_task(task, args=args, queue=cluster.env["TEA_DIST_FLOWS_QUEUE"])
    wanted = f"refused: {task} takes branch messages, got dict"
    # whichever of the cluster's workers took it logged the refusal, naming the task
    deadline = time.monotonic() + 30
    logs = cluster.log_files()
    while not any(f"{wanted} (task {sent.id})" in log.read_text() for log in logs):
        assert time.monotonic() < deadline, f"no refusal of {sent.id} in {logs}"
        time.sleep(0.1)
        logs = cluster.log_files()
    assert not any(f"{task}[{sent.id}] raised unexpected" in log.read_text() for log in logs)


def _forge_run(cluster: Any, graph_ref: str, queue: str, **kwargs: Any) -> Any:
    """A ``tea_dist.run_workflow`` message and a pending record, as anyone with broker and
    Redis access could write them; returns the run's handle."""
    from tea_dist.distributed.apps import RunStatus, WorkflowRun
    from tests.cluster import current_app

    app = current_app()

    run = WorkflowRun(uuid.uuid4().hex)
    run.client.hset(
        run.key,
        mapping={
            "status": RunStatus.PENDING,
            "graph": graph_ref,
            "queue": queue,
            "input": "{}",
            "config": "{}",
            "trace": "{}",
            "created": time.time(),
        },
    )
    run.client.expire(run.key, 600)
    app.send_task(
        "tea_dist.run_workflow",
        args=(run.run_id, graph_ref, {}, {}),
        kwargs=kwargs,
        queue=queue,
        task_id=run.run_id,
    )
    return run


@pytest.mark.celery
def test_i3a_a_forged_submitted_run_naming_os_abort_kills_no_run_worker(cluster: Any) -> None:
    before = _pool(cluster)
    run = _forge_run(cluster, f"{ALLOWED}:os.abort", cluster.env["TEA_DIST_RUNS_QUEUE"])
    with pytest.raises(RunFailedError) as info:
        run.result(timeout=30)
    assert "NotAllowedError" in str(info.value) and "'os' is a module" in str(info.value)
    assert _pool(cluster) == before


@pytest.fixture
def signed_runs(cluster: Any) -> Iterator[str]:
    """A run worker of its own that holds a secret; its queue."""
    from tea_dist.distributed.children import stop_groups

    queue = f"{cluster.env['TEA_DIST_RUNS_QUEUE']}.signed"
    worker = cluster.start_worker("signedruns", role="runs", runs_queue=queue, secret="s3cret")
    yield queue
    cluster.workers.remove(worker)
    stop_groups([worker], 10)


@pytest.mark.celery
def test_i3a_submitted_runs_are_signed_and_unsigned_ones_refused(
    cluster: Any, signed_runs: str
) -> None:
    """With ``TEA_DIST_SECRET`` on the run workers, a run submitted with it succeeds, one
    submitted without it fails saying why, and a forged unsigned message naming a genuine
    pending run neither runs nor spoils it."""
    from tea_dist.distributed.apps import RunStatus, WorkflowRun, submit
    from tests.cluster import configure, current_settings

    previous = current_settings()
    try:
        configure(previous.with_overrides(runs_queue=signed_runs, secret="s3cret"))
        good = submit(f"{ALLOWED}:GRAPH", {"value": 1})
        assert [r["state"]["value"] for r in good.result(timeout=30)["results"]] == [3, 3]
        configure(previous.with_overrides(runs_queue=signed_runs))  # no secret
        unsigned = submit(f"{ALLOWED}:GRAPH", {"value": 1})
        with pytest.raises(RunFailedError, match="SignatureError") as info:
            unsigned.result(timeout=30)
        assert "unsigned" in str(info.value)
        # a forged message (another secret) for a run whose record is genuine: refused, the
        # run is left for its own message
        configure(previous.with_overrides(runs_queue=signed_runs, secret="s3cret"))
        genuine = WorkflowRun(uuid.uuid4().hex)
        from tea_dist.distributed.apps import run_body
        from tea_dist.distributed.signing import sign

        body = run_body(genuine.run_id, f"{ALLOWED}:GRAPH", {"value": 1}, {}, {})
        genuine.client.hset(
            genuine.key,
            mapping={
                "status": RunStatus.PENDING,
                "graph": f"{ALLOWED}:GRAPH",
                "queue": signed_runs,
                "input": json.dumps({"value": 1}),
                "config": "{}",
                "trace": "{}",
                "signature": sign(body, "s3cret"),
                "created": time.time(),
            },
        )
        genuine.client.expire(genuine.key, 600)
        from tests.cluster import current_app

        app = current_app()

        forged_args = (genuine.run_id, f"{ALLOWED}:GRAPH", {"value": 1}, {})
        app.send_task(
            "tea_dist.run_workflow",
            args=forged_args,
            kwargs={"signature": sign(body, "not-the-secret")},
            queue=signed_runs,
        )
        time.sleep(2)
        assert genuine.status() == RunStatus.PENDING
        app.send_task(
            "tea_dist.run_workflow",
            args=forged_args,
            kwargs={"signature": sign(body, "s3cret")},
            queue=signed_runs,
        )
        assert genuine.result(timeout=30)["results"][0]["success"]
    finally:
        configure(previous)


@pytest.mark.celery
def test_i3a_a_run_config_over_the_size_limit_fails_before_anything_is_sent(
    cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers refuse a branch message whose run config is over TEA_DIST_MAX_STATE_BYTES: the
    caller says so first, naming it, instead of sending what will be refused."""
    from tea_dist import Cluster, ParallelConfig
    from tea_dist.core.errors import StateTooLargeError
    from tests import celery_nodes as cn
    from tests.nodes import fan_graph

    small = Cluster(settings=cluster.settings().with_overrides(max_state_bytes=1000))
    graph = fan_graph({"a": cn.whoami}, config=ParallelConfig(strategy="celery"))
    compiled = graph.compile(cluster=small)
    with pytest.raises(StateTooLargeError, match=r"run config of 'a'.*TEA_DIST_MAX_STATE_BYTES"):
        list(compiled.invoke({"value": 1}, {"blob": "x" * 2000}, raise_exceptions=True))
