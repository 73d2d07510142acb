"""The limit metrics move when runs hold, wait for and give back a ``ResourceLimit``'s permits:
the lifecycle's admission emits them through the dispatcher, the metrics listener counts them."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tea_dist import ParallelConfig, ResourceLimit
from tea_dist.engine.attempt import AttemptOutcome, BranchTask
from tea_dist.engine.lifecycle import Lifecycle
from tea_dist.engine.runtime import Runtime
from tea_dist.observe import metrics
from tea_dist.observe.events import Dispatcher
from tea_dist.policies.limits import MemoryLimitStore
from tests import celery_nodes as cn
from tests import test_metrics
from tests.nodes import fan_graph, final_state


@pytest.fixture
def recording() -> Iterator[None]:
    metrics.enable()
    yield
    metrics.disable()


def value(name: str, limit: str) -> float:
    return REGISTRY.get_sample_value(name, {"limit": limit}) or 0.0


def read(limit: str) -> dict[str, float]:
    return {
        "held": value("tea_dist_limit_permits_held", limit),
        "waiting": value("tea_dist_limit_permits_waiting", limit),
        "taken": value("tea_dist_limit_wait_seconds_count", limit),
        "waited": value("tea_dist_limit_wait_seconds_sum", limit),
    }


def test_a_limited_run_moves_the_limit_metrics(recording: None) -> None:
    name = f"i3d-{uuid.uuid4().hex[:8]}"
    seen: list[dict[str, float]] = []

    def work(state: dict[str, Any]) -> dict[str, Any]:
        seen.append(read(name))  # while this branch holds the limit's one permit
        time.sleep(0.2)
        return {}

    config = ParallelConfig(limits=(ResourceLimit(name=name, max_concurrent=1),))
    graph = fan_graph({"a": work, "b": work}, config=config, name="i3d-limited")
    before = read(name)
    events = list(graph.compile().invoke({"value": 0}))
    assert events[-1]["type"] == "final", events[-1]
    after = read(name)

    assert len(seen) == 2
    assert all(s["held"] == before["held"] + 1 for s in seen)  # one permit held at a time
    assert seen[0]["waiting"] == before["waiting"] + 1  # the other branch waited for it
    assert after["held"] == before["held"]  # every permit given back
    assert after["waiting"] == before["waiting"]
    assert after["taken"] == before["taken"] + 2
    assert after["waited"] - before["waited"] >= 0.1  # the second waited for the first


def _lifecycle(store: MemoryLimitStore, limit: ResourceLimit) -> tuple[Lifecycle, Runtime]:
    runtime = Runtime(dispatcher=Dispatcher(), limits=lambda: store)
    spec = fan_graph({"a": lambda state: {}}).to_spec()
    config = ParallelConfig(limits=(limit,))
    tasks = [
        BranchTask(spec=spec, branch=b, fan_in="merge", state={}, run_config={}) for b in ("a", "b")
    ]
    return Lifecycle.for_fanout(tasks, [config, config], runtime), runtime


def test_a_branch_that_stops_waiting_leaves_the_waiting_gauge(recording: None) -> None:
    name = f"i3d-{uuid.uuid4().hex[:8]}"
    store = MemoryLimitStore()
    life, runtime = _lifecycle(store, ResourceLimit(name=name, max_concurrent=1))
    first, second = life.runs
    before = read(name)
    assert life.admit(first)
    assert read(name)["held"] == before["held"] + 1
    assert not life.admit(second) and second.wait is not None
    assert not life.admit(second)  # asking again is not waiting twice
    assert read(name)["waiting"] == before["waiting"] + 1
    life.cancel_all("cancelled: the run ended")  # the waiter ends without a permit
    runtime.close()
    after = read(name)
    assert after["waiting"] == before["waiting"]
    assert after["held"] == before["held"]


def test_a_permit_is_given_back_when_its_attempt_ends(recording: None) -> None:
    name = f"i3d-{uuid.uuid4().hex[:8]}"
    life, runtime = _lifecycle(MemoryLimitStore(), ResourceLimit(name=name, max_concurrent=2))
    run = life.runs[0]
    before = read(name)
    assert life.admit(run)
    life.begin(run)
    assert read(name)["held"] == before["held"] + 1
    life.end(run, AttemptOutcome(True, {}, time.time(), time.time()))
    runtime.close()
    after = read(name)
    assert after["held"] == before["held"]
    assert after["taken"] == before["taken"] + 1 and after["waited"] == before["waited"]


# -- on a real worker: a celery branch takes its permits where it runs --

metrics_worker = test_metrics.metrics_worker  # a flow worker started with --metrics-port


def _limit_samples(port: int, limit: str) -> dict[str, float | None]:
    """The limit's samples on the worker's ``/metrics`` (None: never touched there)."""
    found = test_metrics.scrape(port)

    def sample(name: str) -> float | None:
        values = [s.value for s in found.get(name, []) if s.labels.get("limit") == limit]
        return sum(values) if values else None

    return {
        "held": sample("tea_dist_limit_permits_held"),
        "waiting": sample("tea_dist_limit_permits_waiting"),
        "taken": sample("tea_dist_limit_wait_seconds_count"),
    }


@pytest.mark.celery
def test_a_limited_celery_run_moves_the_limit_metrics_on_its_worker(
    metrics_worker: tuple[int, str], tmp_path: Path
) -> None:
    port, queue = metrics_worker
    name = f"i3d-worker-{uuid.uuid4().hex[:8]}"
    limit = ResourceLimit(name=name, max_concurrent=1)
    config = ParallelConfig(strategy="celery", queue=queue, limits=(limit,))
    branches = {b: cn.sleep_then_mark for b in ("a", "b", "c")}
    graph = fan_graph(branches, config=config, fan_in=cn.collect, name="i3d-worker-limited")
    run_config = {"marker_dir": str(tmp_path), "sleep": dict.fromkeys(branches, 0.8)}
    events: list[Any] = []
    caller = threading.Thread(
        target=lambda: events.extend(graph.compile().invoke({}, run_config)), daemon=True
    )
    caller.start()
    held_seen: set[float] = set()
    while caller.is_alive():  # the worker's view while the branches take turns
        held = _limit_samples(port, name)["held"]
        if held is not None:
            held_seen.add(held)
        time.sleep(0.1)
    caller.join()
    assert events and events[-1]["type"] == "final", events[-1:]
    assert final_state(events)["ok"] == [True, True, True]
    assert held_seen and max(held_seen) == 1.0  # one permit held at a time, on the worker
    after = _limit_samples(port, name)
    assert after["held"] == 0.0  # every permit given back
    assert after["taken"] == 3.0  # one permit per branch, each observed once
    # two worker slots, one permit: a branch was refused and waited (in the broker, so the
    # gauge went up and back down on the worker)
    assert after["waiting"] == 0.0
