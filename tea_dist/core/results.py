"""What a branch produces: ``ParallelFlowResult`` and ``CircuitState``.

Results are data: errors travel as type name, message and optional traceback, never as
pickled exceptions. ``ParallelFlowResult`` is also the wire format (JSON) and reads like the
branch state dict it replaces, so fan-in code written for plain dicts keeps working.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CircuitState(StrEnum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


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

    # -- dict-like access (backwards compatible with plain branch-state dicts) --

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise KeyError(key)
        if key in type(self).model_fields:
            return getattr(self, key)
        if self.state is not None and key in self.state:
            return self.state[key]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        """Like ``dict.get``: a result field, else a key of the branch state, else ``default``."""
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
