"""The worker's listener that turns a branch's lifecycle events into ``BranchEvent``s for the
run's Redis stream, the one channel a driver hears its branches on."""

from __future__ import annotations

from typing import Any

from tea_dist.core.results import CircuitState, Outcome, ParallelFlowResult
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.messages import BranchEvent, BranchMessage
from tea_dist.engine.attempt import ErrorInfo, worker_id
from tea_dist.engine.lifecycle import BranchRun
from tea_dist.observe.events import FlowContext


class StreamPublisher:
    """Collects a branch's lifecycle events as ``BranchEvent`` JSON for the run's stream
    (serialised as they happen: each carries the ``AttemptState`` of its moment)."""

    def __init__(
        self, message: BranchMessage, run: BranchRun, task_id: str, batch: str = ""
    ) -> None:
        self.message, self.run, self.task_id, self.batch = message, run, task_id, batch
        self.events: list[str] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append(
            BranchEvent(
                event=event,  # type: ignore[arg-type]
                fanout=self.message.fanout,
                index=self.message.index,
                branch=self.message.branch,
                task_id=self.task_id,
                worker=worker_id(),
                attempt=self.run.state,
                batch=self.batch,
                **fields,
            ).model_dump_json()
        )

    def on_flow_start(self, ctx: FlowContext) -> None:
        self._add("on_flow_start")

    def on_attempt_start(self, ctx: FlowContext) -> None:
        if self.run.state.attempts > 1:  # the first comes with on_flow_start (the driver's)
            self._add("on_attempt_start")

    def on_flow_error(self, ctx: FlowContext, error: BaseException, attempt: int) -> None:
        self._add("on_flow_error", error=ErrorInfo.from_exception(error))

    def on_flow_timeout(self, ctx: FlowContext, seconds: float | None) -> None:
        self._add("on_flow_timeout", seconds=seconds)

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException | None
    ) -> None:
        self._add("on_flow_retry", delay=delay, error=_info(error))

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        self._add("on_circuit_state_change", transition=(old, new))

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        try:
            self._add("on_flow_complete", result=result)
        except ValueError as exc:  # a value ``uncarried`` let through: the branch still ends
            why = f"the result of branch '{result.branch}' cannot be carried as JSON: {exc}"
            update = {"success": False, "state": None, "error_type": "SerializationError"}
            update["outcome"] = Outcome.ERROR
            self._add("on_flow_complete", result=result.model_copy(update={**update, "error": why}))

    def requeued(self, batch: str = "", delay: float | None = None) -> None:
        """The worker sent the branch again itself: as a task of its own (``batch`` empty) or
        in the rest of a batch cut short (``batch``, that task's id)."""
        self.batch = batch
        self._add("on_flow_requeued", delay=delay)

    def queue(self, pipe: Any, keys: Keys, run_id: str, expires: int) -> None:
        """Queue the collected events on the run's stream in ``pipe`` (``events`` is cleared
        by the caller once the pipeline went through)."""
        stream = keys.events(run_id)
        for event in self.events:
            pipe.xadd(stream, {"e": event}, maxlen=100_000, approximate=True)
        pipe.expire(stream, expires)


def _info(error: BaseException | None) -> ErrorInfo | None:
    return None if error is None else ErrorInfo.from_exception(error)
