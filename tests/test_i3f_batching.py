"""The adaptive batch size of a map (``tea_dist.policies.batching``): the pure rule, its
measurements on an injected clock, a simulated cluster driven by it (no sleep, no service),
then a map with default settings on a real worker."""

from __future__ import annotations

import heapq
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from tea_dist import ParallelConfig, StateGraph
from tea_dist.core.graph import ADAPTIVE, MapItems
from tea_dist.policies.batching import BatchPolicy, ItemTimes

POLICY = BatchPolicy()
CELERY = ParallelConfig(strategy="celery")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the rule --


def test_i3f_default_batch_size_is_adaptive_and_an_integer_is_exact() -> None:
    assert MapItems("docs").batch_size == "auto"
    assert MapItems("docs").batch_for(1000) == ADAPTIVE
    assert MapItems("docs", batch_size="auto").batch_for(5) == ADAPTIVE
    assert MapItems("docs", batch_size=7).batch_for(1000) == 7
    assert MapItems("docs", batch_size=1).batch_for(1000) == 1


def test_i3f_nothing_measured_one_item_per_task() -> None:
    assert POLICY.size(pending=1000, slots=2, item_seconds=None, measured=0) == 1
    assert POLICY.size(pending=0, slots=2, item_seconds=None, measured=0) == 0


def test_i3f_short_items_grow_batches_by_what_was_measured() -> None:
    sizes, measured = [], 0
    for _ in range(6):
        size = POLICY.size(pending=100_000, slots=2, item_seconds=0.0001, measured=measured)
        sizes.append(size)
        measured = size
    # x4 per measured batch, up to target / the per-item floor (0.1 s / 1 ms)
    assert sizes == [4, 16, 64, 100, 100, 100]


def test_i3f_batch_aims_at_target_seconds() -> None:
    assert POLICY.size(pending=10_000, slots=2, item_seconds=0.01, measured=1000) == 10
    assert POLICY.size(pending=10_000, slots=2, item_seconds=0.04, measured=1000) == 2


def test_i3f_long_items_go_alone() -> None:
    for seconds in (0.1, 1.0, 60.0):
        assert POLICY.size(pending=10_000, slots=2, item_seconds=seconds, measured=1000) == 1


def test_i3f_what_is_left_spreads_over_every_slot() -> None:
    size = POLICY.size
    assert size(pending=40, slots=4, item_seconds=0.0001, measured=1000) == 10
    assert size(pending=7, slots=4, item_seconds=0.0001, measured=1000) == 2
    assert size(pending=3, slots=4, item_seconds=0.0001, measured=1000) == 1
    assert size(pending=100, slots=0, item_seconds=0.0001, measured=1000) == 100  # unknown


def test_i3f_window_is_two_tasks_per_slot() -> None:
    assert [POLICY.window(s) for s in (0, 1, 2, 64)] == [2, 2, 4, 128]


@pytest.mark.parametrize(
    "fields",
    [{"target_seconds": 0}, {"item_floor_seconds": -1}, {"growth": 0}, {"per_slot": 0}],
)
def test_i3f_policy_rejects_nonsense(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        BatchPolicy(**fields)


# -- measurements --


def test_i3f_item_times_average_short_runs_and_believe_a_long_one_at_once() -> None:
    times = ItemTimes(clock=Clock(), long_seconds=0.1)
    assert times.item_seconds() is None
    times.ended(0, 0.001)
    assert times.item_seconds() == 0.001
    times.ended(1, 0.011)  # a hiccup of a short item: averaged
    assert times.item_seconds() == pytest.approx(0.003)
    times.ended(2, 1.0)  # a long item is believed at once
    assert times.item_seconds() == 1.0
    times.ended(3, 0.0)
    assert times.item_seconds() == pytest.approx(0.8)


def test_i3f_an_item_running_long_makes_items_long() -> None:
    clock = Clock()
    times = ItemTimes(clock=clock, long_seconds=0.1)
    times.started(0)
    clock.now += 5.0
    assert times.item_seconds() is None and times.running_seconds() == pytest.approx(5.0)
    times.ended(1, 0.001)
    times.started(2)
    size = POLICY.size
    short = {"pending": 1000, "slots": 2, "item_seconds": times.item_seconds(), "measured": 64}
    assert size(**short, running_seconds=times.running_seconds()) == 1  # item 0: 5 s so far
    times.forget(0)
    clock.now += 0.01  # item 2, now the oldest running: a few ms are no news
    assert size(**short, running_seconds=times.running_seconds()) == 100
    clock.now += 0.5
    assert size(**short, running_seconds=times.running_seconds()) == 1
    times.ended(2, 0.5)
    assert times.running == {} and times.running_seconds() == 0.0


def test_i3f_batch_done_records_the_largest_batch() -> None:
    times = ItemTimes(clock=Clock())
    for size in (1, 4, 2):
        times.batch_done(size)
    assert times.measured == 4


# -- a simulated cluster, driven by the policy as the driver does --


@dataclass
class Simulation:
    """``slots`` worker slots take tasks from one FIFO queue; a task costs ``task_cost``
    seconds plus each item's run, ``item_cost`` per item of a batch besides; the driver
    reacts to each event at once, as ``_Driver`` does (window, size, measurements)."""

    items: list[float]  # each item's run time
    slots: int
    task_cost: float = 0.005
    item_cost: float = 0.001
    policy: BatchPolicy = field(default_factory=BatchPolicy)

    def run(self) -> tuple[float, list[int]]:
        clock = Clock()
        clock.now = 0.0
        times = ItemTimes(clock=clock)
        pending = deque(range(len(self.items)))
        queue: deque[list[int]] = deque()
        outstanding: dict[int, int] = {}  # task -> items not over
        sizes: dict[int, int] = {}
        free = self.slots
        events: list[tuple[float, int, str, int, int]] = []  # (when, seq, kind, task, item)
        seq = 0

        def push(at: float, kind: str, task: int, item: int) -> None:
            nonlocal seq
            seq += 1
            heapq.heappush(events, (at, seq, kind, task, item))

        def top_up() -> None:
            nonlocal free
            while pending and len(outstanding) < self.policy.window(self.slots):
                size = self.policy.size(
                    pending=len(pending),
                    slots=self.slots,
                    item_seconds=times.item_seconds(),
                    measured=times.measured,
                    running_seconds=times.running_seconds(),
                )
                task = len(sizes)
                batch = [pending.popleft() for _ in range(min(size, len(pending)))]
                sizes[task], outstanding[task] = len(batch), len(batch)
                queue.append([task, *batch])
            while free and queue:
                free -= 1
                task, *batch = queue.popleft()
                at = clock.now + self.task_cost
                for item in batch:
                    push(at, "start", task, item)
                    at += self.items[item] + self.item_cost
                    push(at, "end", task, item)
                push(at, "free", task, -1)

        top_up()
        while events:
            clock.now, _, kind, task, item = heapq.heappop(events)
            if kind == "start":
                times.started(item)
            elif kind == "end":
                times.ended(item, self.items[item])
                outstanding[task] -= 1
                if not outstanding[task]:
                    del outstanding[task]
                    times.batch_done(sizes[task])
            else:
                free += 1
            top_up()
        return clock.now, list(sizes.values())


def test_i3f_short_items_go_in_few_tasks_close_to_the_ideal_time() -> None:
    makespan, sizes = Simulation([0.0] * 1000, slots=2).run()
    assert sum(sizes) == 1000
    assert len(sizes) < 60  # against 1000 tasks of one
    ideal = 1000 * 0.001 / 2
    assert makespan < 1.6 * ideal + 0.05


def test_i3f_long_items_fill_every_slot_and_never_share_a_task() -> None:
    makespan, sizes = Simulation([1.0] * 640, slots=64).run()
    assert set(sizes) == {1}
    assert makespan < 10.2  # ideal 10 s: 10 waves of 64
    makespan, sizes = Simulation([1.0] * 16, slots=4).run()
    assert set(sizes) == {1} and makespan < 4.1


def test_i3f_items_that_grow_long_stop_the_growth() -> None:
    items = [0.0] * 200 + [0.5] * 200
    makespan, sizes = Simulation(items, slots=4).run()
    assert sizes[-1] == 1
    # a few batches of short items may hold long ones, never more than a window's worth
    assert makespan < 200 * 0.5 / 4 * 1.5


# -- on a real worker --


def sleep_item(state: dict[str, Any]) -> dict[str, Any]:
    """A map item that sleeps ``state['sleep']`` seconds, then doubles its item."""
    time.sleep(float(state.get("sleep", 0.0)))
    return {"doubled": state["item"] * 2}


def gather(state: dict[str, Any], parallel_results: list[Any]) -> dict[str, Any]:
    return {
        "doubled": [r.get("doubled") for r in parallel_results],
        "ok": all(r.success for r in parallel_results),
    }


def item_map(name: str, **options: Any) -> StateGraph:
    """prepare -> ``sleep_item`` per item of ``docs`` -> gather; ``options`` of the map (none:
    its defaults)."""
    g = StateGraph({"docs": list}, name=name, parallel_config=CELERY)
    g.add_node("prepare", run=None)
    g.add_node("work", run=sleep_item)
    g.add_fanin_node("merge", run=gather)
    g.add_parallel_map("prepare", "work", "merge", "docs", **options)
    g.add_edge("work", "merge")
    g.set_entry_point("prepare")
    g.set_finish_point("merge")
    return g


class RunIds:
    """The run id of the runs it sees (callbacks know it)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()

    def on_flow_complete(self, ctx: Any, result: Any) -> None:
        self.ids.add(ctx.run_id)


def tasks_of(cluster: Any, run_id: str) -> dict[str, list[int]]:
    """The Celery tasks the items of a run ran in, as its event stream in Redis records them
    (what an operator reads): task id -> its items' indexes, in the order they started."""
    import redis

    from tea_dist.distributed.keys import Keys

    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    tasks: dict[str, list[int]] = {}
    for _id, fields in client.xrange(Keys(settings.key_prefix).events(run_id)):
        if b"e" not in fields:
            continue
        event = json.loads(fields[b"e"])
        if event["event"] == "on_flow_start":
            tasks.setdefault(event["batch"] or event["task_id"], []).append(event["index"])
    return tasks


def run_map(graph: StateGraph, state: dict[str, Any]) -> tuple[dict[str, Any], str, float]:
    ids = RunIds()
    app = graph.compile(parallel_callbacks=[ids])
    started = time.monotonic()
    events = list(app.invoke(state))
    took = time.monotonic() - started
    assert events[-1]["type"] == "final", events[-1]
    (run_id,) = ids.ids
    return events[-1]["state"], run_id, took


def test_i3f_slots_count_live_workers_only(redis_url: str, redis_prefix: str) -> None:
    import redis

    from tea_dist.distributed.keys import Keys
    from tea_dist.distributed.presence import Presence, live_slots

    client, keys = redis.Redis.from_url(redis_url), Keys(redis_prefix)
    step = Presence(None)
    step.client, step.keys, step.queues = client, keys, ["q"]
    step.name, step.slots = "live@host#1", 8
    step._announce()
    # a worker killed a while ago: its presence lapsed, its slots are still in the hash
    client.zadd(keys.queue_workers("q"), {"dead@host#2": time.time() - 60})
    client.hset(keys.queue_slots("q"), mapping={"dead@host#2": 32, "old@host#3": 4})
    assert live_slots(client, keys, "q") == {"live@host#1": 8}
    step._prune()
    assert client.hgetall(keys.queue_slots("q")) == {b"live@host#1": b"8"}
    step.stop(None)
    assert live_slots(client, keys, "q") == {}


@pytest.mark.celery
def test_i3f_workers_announce_their_slots(cluster: Any) -> None:
    import redis

    from tea_dist.distributed.keys import Keys
    from tea_dist.distributed.presence import live_slots

    settings = cluster.settings()
    client = redis.Redis.from_url(settings.redis)
    found = live_slots(client, Keys(settings.key_prefix), settings.flows_queue)
    assert list(found.values()) == [2]  # the fixture's one flow worker, -c 2


@pytest.mark.celery
def test_i3f_default_map_batches_short_items_in_order(cluster: Any) -> None:
    items = list(range(400))
    state, run_id, _ = run_map(item_map("i3f-short"), {"docs": items})
    assert state["ok"] and state["doubled"] == [2 * i for i in items]
    tasks = tasks_of(cluster, run_id)
    assert sorted(i for batch in tasks.values() for i in batch) == items
    assert len(tasks) < len(items) / 4, f"{len(tasks)} tasks for {len(items)} items"
    assert max(len(batch) for batch in tasks.values()) > 1


@pytest.mark.celery
def test_i3f_default_map_keeps_long_items_apart(cluster: Any) -> None:
    items = list(range(6))
    state, run_id, took = run_map(item_map("i3f-long"), {"docs": items, "sleep": 0.6})
    assert state["doubled"] == [2 * i for i in items]
    assert [len(batch) for batch in tasks_of(cluster, run_id).values()] == [1] * 6
    assert took < 3 * 0.6 + 1.5  # 3 waves on 2 slots, never 6 items in a row


@pytest.mark.celery
def test_i3f_default_map_keeps_within_max_workers(cluster: Any) -> None:
    config = ParallelConfig(strategy="celery", max_workers=3)
    g = item_map("i3f-window", config=config)
    state, run_id, _ = run_map(g, {"docs": list(range(30))})
    assert state["doubled"] == [2 * i for i in range(30)]
    assert max(len(batch) for batch in tasks_of(cluster, run_id).values()) <= 3


@pytest.mark.celery
def test_i3f_explicit_batch_size_is_kept(cluster: Any) -> None:
    state, run_id, _ = run_map(item_map("i3f-exact", batch_size=5), {"docs": list(range(20))})
    assert state["doubled"] == [2 * i for i in range(20)]
    assert sorted(len(b) for b in tasks_of(cluster, run_id).values()) == [5, 5, 5, 5]
