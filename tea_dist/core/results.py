"""What a branch produces: ``ParallelFlowResult``, its ``Outcome``, and ``CircuitState``.

Results are data: errors travel as type name, message and optional traceback, never as
pickled exceptions. ``ParallelFlowResult`` is also the wire format (JSON) and reads like the
branch state dict it replaces, so fan-in code written for plain dicts keeps working.

A result's ``outcome`` says how its branch ended, once, where the result is built; metrics,
tracing, fail-fast and the Celery task states read it rather than guess from ``error_type``.
"""

from __future__ import annotations

import traceback as tb
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CircuitState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    """How a branch ended."""

    SUCCESS = "success"
    ERROR = "error"  # its node raised (or its result could not be carried back)
    TIMEOUT = "timeout"  # an attempt or the whole branch passed its timeout
    CIRCUIT_OPEN = "circuit_open"  # refused by its open circuit: nothing ran
    CANCELLED = "cancelled"  # stopped by the caller, a sibling's failure or the end of the run
    LOST = "lost"  # its attempt ended without a word (its process died, its task vanished)

    @classmethod
    def implied(cls, success: bool, error_type: str | None, timeout: bool) -> Outcome:
        """The outcome that a result's other fields imply: what a result made without one (by
        an older tea_dist, or by The Edge Agent's builders) is read as."""
        if success:
            return cls.SUCCESS
        if timeout:
            return cls.TIMEOUT
        return _IMPLIED.get(error_type or "", cls.ERROR)


_IMPLIED = {
    "CircuitOpenError": Outcome.CIRCUIT_OPEN,
    "CancelledError": Outcome.CANCELLED,
    "WorkerLostError": Outcome.LOST,
}


RESERVED = frozenset(
    {
        "branch",
        "success",
        "state",
        "error",
        "error_type",
        "traceback",
        "timeout",
        "timing_ms",
        "retry_count",
        "circuit_state",
        "attempt_errors",
    }
)
"""Keys that ``r[key]`` and ``r.get(key)`` read from the result, never from the branch state:
the field names The Edge Agent's results had."""


class ParallelFlowResult(BaseModel):
    """The outcome of one fan-out branch, successful or not.

    Attribute access is the primary interface; dict-like access falls through to the branch
    state: ``r["state"]``, ``r["success"]``, ``r.get("value", 0)`` (``r.state["value"]``),
    ``"value" in r``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    branch: str
    success: bool
    state: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    traceback: str | None = None
    timeout: bool = False
    timing_ms: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    retry_count: int = 0
    circuit_state: CircuitState | None = None
    attempt_errors: list[dict[str, Any]] = Field(default_factory=list)
    worker: str | None = None
    outcome: Outcome = Outcome.SUCCESS  # when not given: implied by the fields above

    @model_validator(mode="before")
    @classmethod
    def _implied_outcome(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("outcome") is None:
            implied = Outcome.implied(
                bool(data.get("success")), data.get("error_type"), bool(data.get("timeout"))
            )
            data = {**data, "outcome": implied}
        return data

    @model_validator(mode="after")
    def _outcome_agrees(self) -> ParallelFlowResult:
        if self.success != (self.outcome is Outcome.SUCCESS):
            raise ValueError(
                f"outcome '{self.outcome}' contradicts success={self.success} "
                f"(branch '{self.branch}')"
            )
        return self

    # -- dict-like access (backwards compatible with plain branch-state dicts) --

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise KeyError(key)
        if key in RESERVED:
            return getattr(self, key)
        if self.state is not None and key in self.state:
            return self.state[key]
        if key in type(self).model_fields:  # start_time, end_time, worker: a state key wins
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get``: a result field, else a key of the branch state, else ``default``.

        The Edge Agent's field names (``RESERVED``) always mean the field; the fields tea_dist
        added (``start_time``, ``end_time``, ``worker``) yield to a branch-state key of the
        same name.
        """
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return key in type(self).model_fields or (self.state is not None and key in self.state)

    def keys(self) -> list[str]:
        """Result field names followed by the branch state's keys."""
        return [*type(self).model_fields, *(self.state or {})]

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready dict of every field."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ParallelFlowResult:
        """The inverse of ``to_dict``."""
        return cls.model_validate(data)

    @classmethod
    def built(cls, **fields: Any) -> ParallelFlowResult:
        """A result from values that are already what the fields hold (the lifecycle's own:
        strings, floats, an ``Outcome`` agreeing with ``success``), unvalidated: pydantic's
        ``model_construct`` without its pass over every field's default, for the thousands
        of results a fan-out makes. Fields not given take their defaults and are not set."""
        result = object.__new__(cls)
        _set(result, "__dict__", {**_DEFAULTS, "attempt_errors": [], **fields})
        # one set per combination of names, shared: a frozen result never adds to it
        names = _FIELDS_SET.get(tuple(fields)) or _FIELDS_SET.setdefault(tuple(fields), set(fields))
        _set(result, "__pydantic_fields_set__", names)
        _set(result, "__pydantic_extra__", None)
        _set(result, "__pydantic_private__", None)
        return result

    # -- builders (The Edge Agent's names) --

    @classmethod
    def from_success(
        cls, branch: str, state: dict[str, Any], timing_ms: float = 0.0, **fields: Any
    ) -> ParallelFlowResult:
        """A successful branch that ended with ``state``."""
        return cls(branch=branch, success=True, state=state, timing_ms=timing_ms, **fields)

    @classmethod
    def from_error(
        cls,
        branch: str,
        exception: BaseException,
        state: dict[str, Any] | None = None,
        timing_ms: float = 0.0,
        include_traceback: bool = False,
        **fields: Any,
    ) -> ParallelFlowResult:
        """A branch that failed with ``exception`` (its traceback only when asked)."""
        text = None
        if include_traceback:
            text = "".join(tb.format_exception(type(exception), exception, exception.__traceback__))
        return cls(
            branch=branch,
            success=False,
            state=state,
            error=str(exception),
            error_type=getattr(exception, "error_type", None) or type(exception).__name__,
            traceback=text,
            timing_ms=timing_ms,
            **fields,
        )

    @classmethod
    def from_timeout(
        cls,
        branch: str,
        state: dict[str, Any] | None = None,
        timing_ms: float = 0.0,
        timeout_seconds: float | None = None,
        **fields: Any,
    ) -> ParallelFlowResult:
        """A branch stopped by its timeout."""
        limit = f" after {timeout_seconds:g}s" if timeout_seconds else ""
        return cls(
            branch=branch,
            success=False,
            state=state,
            error=f"branch '{branch}' timed out{limit}",
            error_type="TimeoutError",
            timeout=True,
            timing_ms=timing_ms,
            **fields,
        )

    @classmethod
    def from_circuit_open(cls, branch: str, circuit_name: str, **fields: Any) -> ParallelFlowResult:
        """A branch refused, without running, by the open circuit ``circuit_name``."""
        return cls(
            branch=branch,
            success=False,
            error=f"Circuit breaker '{circuit_name}' is open; branch '{branch}' was not run",
            error_type="CircuitOpenError",
            circuit_state=CircuitState.OPEN,
            **fields,
        )


_set = object.__setattr__  # what pydantic's model_construct sets a model's internals with
_FIELDS_SET: dict[tuple[str, ...], set[str]] = {}
# every field in declaration order (a model's __dict__ order), required ones overwritten
_DEFAULTS: dict[str, Any] = {
    name: None if field.is_required() else field.get_default(call_default_factory=True)
    for name, field in ParallelFlowResult.model_fields.items()
}
