"""Issue 14 (TD.13-INT-021): OpenTelemetry spans of parallel flows, for every strategy.

One trace per run: ``tea_dist.invoke`` > ``tea_dist.node`` and ``tea_dist.fanout`` >
``tea_dist.branch`` > ``tea_dist.attempt``. The caller's spans go to an in-memory exporter; a
real Celery worker started with OpenTelemetry configured (``tests/otel_worker.py``, its spans in
a JSON-lines file) traces the attempts it runs inside the caller's trace.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tea_dist import ParallelConfig, RetryPolicy, StateGraph
from tea_dist.distributed.children import stop_groups
from tea_dist.observe import tracing
from tea_dist.observe.events import Dispatcher
from tests import nodes
from tests.nodes import fan_graph, final_state
from tests.otel_worker import as_dict, traced_work

ROOT = Path(__file__).resolve().parent.parent


class Spans:
    """The caller's finished spans, as ``as_dict`` rows."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def all(self) -> list[dict[str, Any]]:
        return [as_dict(s) for s in self.exporter.get_finished_spans()]


@pytest.fixture
def spans() -> Iterator[Spans]:
    found = Spans()
    tracing.set_tracer_provider(found.provider)
    yield found
    tracing.set_tracer_provider(None)


def named(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["name"] == name]


def by_branch(rows: list[dict[str, Any]], name: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for row in named(rows, name):
        found.setdefault(row["attributes"]["tea_dist.branch"], []).append(row)
    return found


def check_run_shape(rows: list[dict[str, Any]], branches: list[str]) -> dict[str, Any]:
    """One trace: invoke > nodes, invoke > fanout > one branch span per branch."""
    assert len({r["trace_id"] for r in rows}) == 1, rows
    (invoke,) = named(rows, "tea_dist.invoke")
    (fanout,) = named(rows, "tea_dist.fanout")
    assert fanout["parent_id"] == invoke["span_id"]
    nodes_run = {r["attributes"]["tea_dist.node"]: r for r in named(rows, "tea_dist.node")}
    assert set(nodes_run) == {"start", "merge"}
    assert all(n["parent_id"] == invoke["span_id"] for n in nodes_run.values())
    spans_of = by_branch(rows, "tea_dist.branch")
    assert sorted(spans_of) == sorted(branches)
    assert all(len(s) == 1 and s[0]["parent_id"] == fanout["span_id"] for s in spans_of.values())
    return {"invoke": invoke, "fanout": fanout, "branches": {b: s[0] for b, s in spans_of.items()}}


def test_td13_int_021_tracing_spans_for_parallel_flows(spans: Spans, local_strategy: str) -> None:
    retry = RetryPolicy(max_retries=1, base_delay=0.0)
    config = ParallelConfig(strategy=local_strategy)
    graph = fan_graph(
        {"a": nodes.add_one, "b": nodes.double, "c": nodes.fail},
        config=config,
        edge_configs={"c": ParallelConfig(strategy=local_strategy, retry_policy=retry)},
        name="traced",
    )
    with spans.tracer.start_as_current_span("caller") as caller:
        events = list(graph.compile().invoke({"value": 1}))
    final_state(events)
    rows = spans.all()
    (outer,) = named(rows, "caller")
    run = check_run_shape([r for r in rows if r["name"] != "caller"], ["a", "b", "c"])
    assert run["invoke"]["parent_id"] == outer["span_id"] == f"{caller.context.span_id:016x}"
    assert run["invoke"]["attributes"]["tea_dist.graph"] == "traced"
    run_id = run["invoke"]["attributes"]["tea_dist.run_id"]

    branch = run["branches"]
    for name in ("a", "b"):
        attributes = branch[name]["attributes"]
        assert attributes["tea_dist.success"] is True
        assert attributes["tea_dist.strategy"] == local_strategy
        assert attributes["tea_dist.run_id"] == run_id
        assert attributes["tea_dist.retry_count"] == 0
    failed = branch["c"]
    assert failed["status"] == "ERROR"
    assert failed["attributes"]["tea_dist.success"] is False
    assert failed["attributes"]["tea_dist.error_type"] == "ValueError"
    assert failed["attributes"]["tea_dist.retry_count"] == 1
    assert failed["attributes"]["tea_dist.outcome"] == "error"

    attempts = by_branch(rows, "tea_dist.attempt")
    assert {b: len(a) for b, a in attempts.items()} == {"a": 1, "b": 1, "c": 2}
    for name, rows_of in attempts.items():
        assert all(a["parent_id"] == branch[name]["span_id"] for a in rows_of)
    assert sorted(a["attributes"]["tea_dist.attempt"] for a in attempts["c"]) == [1, 2]
    assert all(a["attributes"]["tea_dist.worker"] for a in attempts["c"])


def line_graph(*steps: Any, name: str = "line") -> Any:
    """step0 -> step1 -> ... -> END, no fan-out."""
    graph = StateGraph({"value": int}, name=name)
    names = [f"step{i}" for i in range(len(steps))]
    for node, fn in zip(names, steps, strict=True):
        graph.add_node(node, run=fn)
    for first, second in itertools.pairwise(names):
        graph.add_edge(first, second)
    graph.set_entry_point(names[0])
    graph.set_finish_point(names[-1])
    return graph


def test_i14_node_span_is_current_while_the_node_runs(spans: Spans) -> None:
    def work(state: dict[str, Any]) -> dict[str, Any]:
        with spans.tracer.start_as_current_span("user.work"):  # an instrumented client's span
            return {"value": 1}

    final_state(list(line_graph(nodes.add_one, work).compile().invoke({})))
    rows = spans.all()
    (user,) = named(rows, "user.work")
    work = {r["attributes"]["tea_dist.node"]: r for r in named(rows, "tea_dist.node")}
    assert user["parent_id"] == work["step1"]["span_id"]
    (invoke,) = named(rows, "tea_dist.invoke")
    assert work["step0"]["parent_id"] == work["step1"]["parent_id"] == invoke["span_id"]


def test_i14_failing_node_marks_node_and_invoke_spans(spans: Spans) -> None:
    events = list(line_graph(nodes.add_one, nodes.fail).compile().invoke({}))
    assert events[-1]["type"] == "error"
    rows = spans.all()
    work = {r["attributes"]["tea_dist.node"]: r for r in named(rows, "tea_dist.node")}
    (invoke,) = named(rows, "tea_dist.invoke")
    assert work["step0"]["status"] == "UNSET"
    assert work["step1"]["status"] == invoke["status"] == "ERROR"
    assert work["step1"]["attributes"]["tea_dist.error_type"] == "ValueError"


def test_i14_no_tracing_listener_without_a_configured_provider() -> None:
    tracing.set_tracer_provider(None)  # the global provider is OpenTelemetry's default proxy
    dispatcher = Dispatcher()
    assert not any(isinstance(x, tracing.TracingListener) for x in dispatcher.listeners)
    assert tracing.carrier("a") == {}
    final_state(list(fan_graph({"a": nodes.add_one}).compile().invoke({})))


# -- a real Celery worker with OpenTelemetry configured --


class OtelWorkers:
    """A flows worker and a runs worker running ``tests.otel_worker``, on queues of their own."""

    def __init__(self, cluster: Any, directory: Path) -> None:
        self.cluster = cluster
        self.tag = f"{cluster.tag}-otel"
        self.queue = f"tea.flows.{self.tag}"
        self.runs_queue = f"tea.runs.{self.tag}"
        self.spans_file = directory / "worker-spans.jsonl"
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, role: str, queue: str) -> None:
        from tea_dist.distributed.worker import settings_env, wait_ready, worker_argv

        settings = self.cluster.settings()
        name = f"otel-{role}-{self.tag}@%h"
        argv = worker_argv(settings, role, concurrency=2, name=name, queues=queue)
        argv[argv.index("tea_dist.distributed.worker_app")] = "tests.otel_worker"
        env = {
            **os.environ,
            **settings_env(settings),
            "PYTHONPATH": str(ROOT),
            "TEA_TEST_SPANS": str(self.spans_file),
            "TEA_TEST_OTEL_QUEUE": self.queue,
        }
        log = open(self.spans_file.with_name(f"{role}.log"), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", *argv],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        wait_ready(settings, name, proc, 60)

    def stop(self) -> None:
        stop_groups(self.procs, 10)

    def spans(self, trace_id: str, until: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The worker spans of ``trace_id``, once ``until(rows)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.spans_file.read_text() if self.spans_file.exists() else ""
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            rows = [r for r in rows if r["trace_id"] == trace_id]
            if until(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture(scope="module")
def otel_workers(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtelWorkers]:
    workers = OtelWorkers(cluster, tmp_path_factory.mktemp("otel"))
    try:
        workers.start("flows", workers.queue)
        workers.start("runs", workers.runs_queue)
        yield workers
    finally:
        workers.stop()


@pytest.mark.celery
def test_i14_celery_worker_spans_join_the_callers_trace(
    spans: Spans, otel_workers: OtelWorkers
) -> None:
    config = ParallelConfig(strategy="celery", queue=otel_workers.queue)
    graph = fan_graph(
        {"a": traced_work, "b": traced_work, "c": nodes.fail}, config=config, name="remote"
    )
    events = list(graph.compile().invoke({}))
    final_state(events)
    rows = spans.all()
    run = check_run_shape(rows, ["a", "b", "c"])
    assert not named(rows, "tea_dist.attempt")  # celery attempts are the worker's to trace
    trace_id = run["invoke"]["trace_id"]

    remote = otel_workers.spans(trace_id, lambda r: len(named(r, "tea_dist.attempt")) >= 3)
    attempts = by_branch(remote, "tea_dist.attempt")
    assert sorted(attempts) == ["a", "b", "c"]
    for branch, (attempt,) in attempts.items():
        assert attempt["trace_id"] == trace_id
        assert attempt["parent_id"] == run["branches"][branch]["span_id"]
        assert attempt["pid"] != os.getpid()
        assert attempt["attributes"]["tea_dist.worker"].endswith(f"/{attempt['pid']}")
    assert attempts["c"][0]["status"] == "ERROR"
    assert run["branches"]["c"]["attributes"]["tea_dist.error_type"] == "ValueError"
    users = named(remote, "user.work")  # the nodes' own spans nest in the worker's attempts
    assert sorted(u["parent_id"] for u in users) == sorted(
        attempts[b][0]["span_id"] for b in ("a", "b")
    )


@pytest.mark.celery
def test_i14_submitted_run_keeps_the_submitters_trace(
    spans: Spans, otel_workers: OtelWorkers, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tea_dist import submit
    from tests.cluster import configure, current_settings

    monkeypatch.setenv("TEA_TEST_OTEL_QUEUE", otel_workers.queue)
    previous = current_settings()
    configure(previous.with_overrides(runs_queue=otel_workers.runs_queue))
    try:
        with spans.tracer.start_as_current_span("submitter") as submitter:
            run = submit("tests.otel_worker:submitted_graph", {})
        run.result(timeout=60)
    finally:
        configure(previous)
    trace_id = f"{submitter.context.trace_id:032x}"
    remote = otel_workers.spans(trace_id, lambda r: len(named(r, "tea_dist.attempt")) >= 2)
    (invoke,) = named(remote, "tea_dist.invoke")
    assert invoke["parent_id"] == f"{submitter.context.span_id:016x}"
    branches = by_branch(remote, "tea_dist.branch")
    assert sorted(branches) == ["a", "b"]
    for branch, (attempt,) in by_branch(remote, "tea_dist.attempt").items():
        assert attempt["parent_id"] == branches[branch][0]["span_id"]
