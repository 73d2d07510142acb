"""The lifecycle's verbs for attempts that run elsewhere (a celery worker): started, retried,
ended, lost, adopted, admitted there. Pure decisions on an injected clock: no process, no
Redis, no sleep."""

from __future__ import annotations

from typing import Any

from tea_dist import CircuitBreakerConfig, ParallelConfig
from tea_dist.core.results import CircuitState, Outcome, ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, ErrorInfo
from tea_dist.engine.lifecycle import AttemptState, BranchRun, Lifecycle
from tea_dist.engine.runtime import Runtime
from tea_dist.observe.events import Dispatcher, Event
from tests import nodes
from tests.test_retry import FakeClock  # epoch = monotonic + 900, moved by tests


class Heard:
    """A listener of every event: (event, branch, worker, further arguments)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda ctx, *args: self.events.append((name, ctx.branch, ctx.worker, args))

    def names(self) -> list[str]:
        return [event for event, *_ in self.events]


def fanout(
    *branches: str, **fields: Any
) -> tuple[Lifecycle, list[BranchRun], FakeClock, Heard, list[str]]:
    """A lifecycle over ``branches`` (one config for all), its clock, what it emitted and the
    branches it asked the executor to stop."""
    clock, heard, stopped = FakeClock(), Heard(), []
    spec = nodes.fan_graph({b: nodes.add_one for b in branches}).to_spec()
    tasks = [BranchTask(spec=spec, branch=b, fan_in="merge", state={}) for b in branches]
    runtime = Runtime(graph_name="g", dispatcher=Dispatcher(listeners=[heard]))
    config = ParallelConfig(strategy="celery", **fields)
    life = Lifecycle.for_fanout(
        tasks,
        [config] * len(tasks),
        runtime,
        stop=lambda run: stopped.append(run.task.branch),
        clock=clock,
    )
    heard.events.clear()  # the on_flow_queued of each
    return life, life.runs, clock, heard, stopped


def on_worker(run: BranchRun, attempts: int) -> AttemptState:
    """The branch's history as a worker reports it, ``attempts`` attempts in."""
    return run.state.model_copy(update={"attempts": attempts, "first_start": 1000.5})


def result(branch: str, success: bool = True) -> ParallelFlowResult:
    if success:
        return ParallelFlowResult(branch=branch, success=True, state={"value": 2})
    return ParallelFlowResult(branch=branch, success=False, error="boom", error_type="ValueError")


def test_a_first_remote_start_tells_flow_start_then_attempt_start() -> None:
    life, (run,), clock, heard, _ = fanout("a")
    clock.now = 101.0
    ctx = life.started_remotely(run, on_worker(run, 1), "host/42", first=True)
    assert heard.names() == ["on_flow_start", "on_attempt_start"]
    assert {worker for *_, worker, _ in heard.events} == {"host/42"}
    assert ctx.worker == "host/42" and ctx.attempt == 1
    assert run.running and run.started == 101.0 and run.admission is None
    assert run.state.attempts == 1


def test_a_later_remote_start_tells_only_attempt_start_at_its_time() -> None:
    life, (run,), _, heard, _ = fanout("a")
    life.started_remotely(run, on_worker(run, 2), "host/42", first=False, at=99.5)
    assert heard.names() == ["on_attempt_start"]
    assert run.started == 99.5 and run.context().attempt == 2


def test_a_retry_scheduled_by_the_worker_is_due_after_its_delay() -> None:
    life, (run,), clock, heard, _ = fanout("a")
    life.started_remotely(run, on_worker(run, 1), "host/42", first=True)
    clock.now = 102.0
    due = life.retry_scheduled_remotely(run, on_worker(run, 1), "host/42", 1.5, ValueError("x"))
    assert due == 103.5
    assert not run.running and not run.done
    event, branch, worker, args = heard.events[-1]
    assert (event, branch, worker) == (Event.FLOW_RETRY, "a", "host/42")
    assert args[:2] == (1, 1.5)


def test_a_remote_end_resolves_the_branch_once() -> None:
    life, (run,), _, heard, _ = fanout("a")
    life.started_remotely(run, on_worker(run, 1), "host/42", first=True)
    life.ended_remotely(run, on_worker(run, 1), "host/42", result("a"))
    life.ended_remotely(run, on_worker(run, 1), "host/7", result("a", success=False))
    assert run.done and run.result is not None and run.result.success
    assert life.pending == 0 and not run.running
    completes = [e for e in heard.events if e[0] == Event.FLOW_COMPLETE]
    assert [(branch, worker) for _, branch, worker, _ in completes] == [("a", "host/42")]


def test_a_remote_failure_under_fail_fast_stops_the_siblings() -> None:
    life, (a, b), _, _, stopped = fanout("a", "b", fail_fast=True)
    life.started_remotely(a, on_worker(a, 1), "host/1", first=True)
    life.started_remotely(b, on_worker(b, 1), "host/2", first=True)
    life.ended_remotely(a, on_worker(a, 1), "host/1", result("a", success=False))
    assert stopped == ["b"]
    assert b.result is not None and b.result.outcome is Outcome.CANCELLED


def test_a_lost_attempt_is_sent_again_until_it_was_lost_too_often() -> None:
    life, (run,), _, heard, _ = fanout("a")
    life.started_remotely(run, on_worker(run, 1), "host/42", first=True)
    assert life.lost(run, resends=0, max_resends=3)
    assert not run.running and not run.done
    assert heard.names()[-1] == Event.BRANCH_REDISPATCHED
    assert not life.lost(run, resends=3, max_resends=3)
    assert run.result is not None and run.result.outcome is Outcome.LOST
    assert run.result.error_type == "WorkerLostError" and "4 times" in (run.result.error or "")
    assert not life.lost(run, resends=0, max_resends=3)  # over: nothing more to send


def test_an_adopted_branch_keeps_its_predecessors_deadline() -> None:
    life, (run,), clock, _, _ = fanout("a", timeout_total=30.0)
    assert run.deadline == 130.0  # dispatched now (monotonic 100.0, epoch 1000.0)
    life.adopt(run, dispatched_at=990.0)  # its predecessor sent it 10 s ago
    assert run.state.dispatched_at == 990.0 and run.deadline == 120.0
    clock.now = 120.0
    assert not life.admit(run, circuit=False, permits=False)  # past it: timed out
    assert run.result is not None and run.result.outcome is Outcome.TIMEOUT


def test_an_admission_decided_by_the_driver_is_recorded_where_the_attempt_ran() -> None:
    breaker = CircuitBreakerConfig(failure_threshold=1, scope="invocation")
    for elsewhere in (True, False):
        life, (run,), _, heard, _ = fanout("a", circuit_breaker=breaker)
        if elsewhere:
            life.admitted_elsewhere(run, probe=False)
        life.begin(run, worker="host/42")
        failed = AttemptOutcome(False, None, 1000.0, 1000.1, ErrorInfo("ValueError", "boom"))
        life.end(run, failed)
        opened = Event.CIRCUIT_STATE_CHANGE in heard.names()
        assert opened is elsewhere
        assert (run.state.circuit_state is CircuitState.OPEN) is elsewhere


def test_a_lifecycle_for_a_message_copies_its_state_and_keeps_its_deadline() -> None:
    clock = FakeClock()
    spec = nodes.fan_graph({"a": nodes.add_one}).to_spec()
    task = BranchTask(spec=spec, branch="a", fan_in="merge", state={})
    config = ParallelConfig(strategy="celery", timeout_total=5.0)
    runtime = Runtime(graph_name="g", dispatcher=Dispatcher(listeners=[]))
    sent = AttemptState(branch="a", dispatched_at=998.0, attempts=1)
    sent.errors.append({"attempt": 1, "error": "x", "error_type": "E", "timeout": False})
    ctx = runtime.context(task, config)
    life = Lifecycle.for_message(3, task, config, ctx, sent, runtime, clock=clock)
    (run,) = life.runs
    assert run.index == 3 and run.deadline == 103.0  # dispatched 2 s ago, 5 s in all
    run.state.note(ErrorInfo("ValueError", "again"), keep=5)
    assert [e["error"] for e in sent.errors] == ["x"]  # the message stays as sent
