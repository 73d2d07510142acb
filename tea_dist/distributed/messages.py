"""The messages between caller and workers: pydantic models, JSON on the wire.

- ``BranchMessage``: what the driver sends a flow worker to run one branch (the argument of
  ``tea_dist.run_flow``). Code is named, never carried (``graph``, see ``wire``).
- ``BranchEvent``: what a worker publishes on the run's Redis stream as a branch lives: every
  lifecycle event, each with the branch's ``AttemptState``; ``on_flow_complete`` carries the
  branch's one result (a first attempt's ``on_attempt_start`` is not sent: ``on_flow_start``
  implies it, and the driver emits both). The stream is the only channel results take to the
  driver. In a durable run, the driver adds ``on_flow_queued`` when it sends a branch (its task
  id), so that a driver taking the run over knows which branches were sent. A branch that a
  worker takes out of a batch (to wait for a permit, or because the batch was cut short) is
  announced with ``on_flow_requeued``.

Both are registered with kombu's JSON (``register_type``), so they cross Celery as themselves
with no hand-written conversion on either side.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from kombu.utils.json import register_type
from pydantic import BaseModel, ConfigDict, field_validator

from tea_dist.core.config import ParallelConfig
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.distributed.signing import Secret, sign, verify
from tea_dist.engine.attempt import ErrorInfo
from tea_dist.engine.lifecycle import AttemptState
from tea_dist.observe.events import FlowContext

EventName = Literal[
    "on_flow_queued",  # the driver sent the branch (durable runs): never a callback
    "on_flow_requeued",  # a worker sent it again itself (out of a batch): never a callback
    "on_flow_start",
    "on_attempt_start",
    "on_flow_error",
    "on_flow_timeout",
    "on_flow_retry",
    "on_circuit_state_change",
    "on_flow_complete",
]


class BranchMessage(BaseModel):
    """One attempt of one branch, as a flow worker receives it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str
    graph_name: str
    fanout: str
    index: int
    branch: str
    node: str = ""  # the node the branch starts at, when ``branch`` is a map's ``target[i]``
    fan_in: str
    graph: str  # ``wire.encode_branch``'s description as JSON text, encoded once per fan-out
    state: dict[str, Any]
    run_config: dict[str, Any]
    config: ParallelConfig
    circuit: str | None = None
    probe: bool = False  # this attempt holds a half-open probe slot of its circuit
    attempt: AttemptState
    signature: str = ""  # HMAC of the rest under TEA_DIST_SECRET, when one is set
    trace: dict[str, str] = {}  # W3C trace context of the branch's span (observe.tracing)

    @field_validator("graph", mode="before")
    @classmethod
    def _graph_text(cls, value: Any) -> Any:
        """A description sent as a JSON object (an earlier release's shape) is kept as text."""
        return json.dumps(value) if isinstance(value, dict) else value

    def retried(self, attempt: AttemptState, secret: Secret | None) -> BranchMessage:
        """The message of the next attempt (it asks its circuit again: no probe yet)."""
        return self.model_copy(update={"attempt": attempt, "probe": False}).signed(secret)

    def signed(self, secret: Secret | None) -> BranchMessage:
        """This message signed with ``secret`` (as it is, without one)."""
        if secret is None:
            return self
        return self.model_copy(update={"signature": sign(self._body(), secret)})

    def check_signature(self, secret: Secret | None) -> None:
        """``SignatureError`` unless signed with ``secret`` (nothing to check without one)."""
        if secret is not None:
            verify(self._body(), self.signature or None, secret)

    def _body(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    def describe(self) -> str:
        """What Flower and logs show of this message: names, never state."""
        return f"(run={self.run[:8]}, graph={self.graph_name}, branch={self.branch})"


class BranchEvent(BaseModel):
    """One lifecycle event of a branch, published by the worker that runs it (or, for
    ``on_flow_queued``, by the driver that sent it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    event: EventName
    fanout: str
    index: int
    branch: str
    task_id: str  # the branch's task (a batch item's own id): a superseded one's is ignored
    worker: str
    batch: str = ""  # the batch task it runs in (empty: a task of its own)
    attempt: AttemptState
    error: ErrorInfo | None = None

    delay: float | None = None
    seconds: float | None = None
    transition: tuple[CircuitState, CircuitState] | None = None
    result: ParallelFlowResult | None = None

    @field_validator("error", mode="before")
    @classmethod
    def _earlier_shape(cls, value: Any) -> Any:
        """An error from a worker of an earlier release (``{"type", "message", "timeout"}``),
        as a rolling upgrade meets it."""
        if isinstance(value, dict) and "type" in value and "type_name" not in value:
            value = dict(value)
            value["type_name"] = value.pop("type")
        return value

    def callback_args(self, ctx: FlowContext) -> tuple[Any, ...]:
        """The arguments a ``ParallelFlowCallback`` method takes for this event."""
        error = self.error.as_exception() if self.error else None
        attempts = self.attempt.attempts
        if self.event == "on_flow_error":
            return (ctx, error, attempts)
        if self.event == "on_flow_timeout":
            return (ctx, self.seconds)
        if self.event == "on_flow_retry":
            return (ctx, attempts, self.delay, error)
        if self.event == "on_circuit_state_change" and self.transition:
            return (ctx, *self.transition)
        if self.event == "on_flow_complete":
            return (ctx, self.result)
        return (ctx,)


for _model, _marker in ((BranchMessage, "tea_dist.branch"), (BranchEvent, "tea_dist.event")):
    register_type(_model, _marker, lambda m: m.model_dump(mode="json"), _model.model_validate)
