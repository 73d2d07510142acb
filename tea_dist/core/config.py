"""Policy models: ``ParallelConfig``, ``RetryPolicy``, ``CircuitBreakerConfig``, ``ResourceLimit``.

All are frozen pydantic models validated on construction (a negative timeout or an unknown
field is an error naming it). Policies carry pure decision methods so that tests call them
directly, with no loop and no sleep. ``resolve_config`` is the one place where the precedence
edge config > graph config > defaults is applied, for Python and YAML graphs alike.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tea_dist.core.errors import BranchTimeoutError

PositiveSeconds = Annotated[float, Field(gt=0)]


def qualified_name(cls: type) -> str:
    """``module.QualName`` of a class; plain ``QualName`` for builtins."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def exception_names(exc_type: type[BaseException]) -> tuple[str, ...]:
    """Every name an exception class answers to: its MRO, qualified and bare.

    This is what crosses process boundaries so that ``retry_on`` can be matched by name
    where the exception class itself cannot travel.
    """
    names: list[str] = []
    for cls in exc_type.__mro__:
        if cls is object:
            continue
        names.append(qualified_name(cls))
        if cls.__qualname__ not in names:
            names.append(cls.__qualname__)
    return tuple(names)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)


class RetryPolicy(_Frozen):
    """How a failed branch attempt is retried.

    Delay of retry ``n`` (0-based) is ``min(base_delay * backoff_multiplier**n, max_delay)``;
    with ``jitter`` it is uniform in ``[delay/2, delay]``.
    """

    max_retries: int = Field(0, ge=0)
    base_delay: float = Field(1.0, ge=0)
    max_delay: float = Field(60.0, ge=0)
    backoff_multiplier: float = Field(2.0, ge=1)
    jitter: bool = False
    retry_on: tuple[str, ...] | None = None
    retry_on_timeout: bool = False
    max_stored_errors: int = Field(5, ge=0)

    @field_validator("retry_on", mode="before")
    @classmethod
    def _names(cls, value: Any) -> tuple[str, ...] | None:
        if value is None:
            return None
        if isinstance(value, (str, type)):
            value = [value]
        names = []
        for item in value:
            if isinstance(item, type) and issubclass(item, BaseException):
                names.append(qualified_name(item))
            elif isinstance(item, str) and item.strip():
                names.append(item.strip())
            else:
                raise ValueError(
                    f"retry_on entries must be exception classes or names, got {item!r}"
                )
        return tuple(names)

    def delay_for(self, retry: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        delay = min(self.base_delay * self.backoff_multiplier**retry, self.max_delay)
        if self.jitter:
            return delay / 2 + rand() * delay / 2
        return delay

    def get_delay(self, attempt: int) -> float:
        """The Edge Agent's name for ``delay_for``."""
        return self.delay_for(attempt)

    def matches(self, error_names: Sequence[str], timeout: bool = False) -> bool:
        """Whether an error (given by ``exception_names``) is retryable under this policy."""
        if timeout:
            return self.retry_on_timeout
        if self.retry_on is None:
            return True
        return any(name in error_names for name in self.retry_on)

    def should_retry(
        self, error: BaseException | Sequence[str], attempt: int, *, timeout: bool = False
    ) -> bool:
        """Whether the attempt numbered ``attempt`` (0-based) that failed with ``error`` is retried.

        ``error`` is the original exception, or its ``exception_names`` when it crossed a
        process boundary (then ``timeout`` says whether it was tea_dist's timeout). A
        ``BranchTimeoutError`` counts as a timeout.
        """
        if attempt >= self.max_retries:
            return False
        if isinstance(error, BaseException):
            timeout = isinstance(error, BranchTimeoutError)
            return self.matches(exception_names(type(error)), timeout)
        return self.matches(tuple(error), timeout)


class CircuitBreakerConfig(_Frozen):
    """When a circuit opens and how it recovers.

    ``name=None`` gives each branch its own circuit; a name is shared by every branch using it.
    ``scope="shared"`` keeps state across invocations (in Redis for celery); ``"invocation"``
    starts every ``invoke()`` with fresh circuits.
    """

    failure_threshold: int = Field(5, ge=1)
    reset_timeout: float = Field(30.0, gt=0)
    half_open_max_calls: int = Field(1, ge=1)
    name: str | None = None
    scope: Literal["shared", "invocation"] = "shared"


_RATE = re.compile(r"^\s*(\d+)\s*(?:/\s*([smh]))?\s*$")
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(rate: str) -> tuple[int, float]:
    """``"100/m"`` -> ``(100, 60.0)``: starts allowed per period of seconds (Celery's notation;
    a bare ``"5"`` is per second). Raises ``ValueError`` saying what is accepted."""
    match = _RATE.match(rate)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"rate must look like '100/m', '5/s' or '1000/h' (a whole number >= 1 per "
            f"second, minute or hour), got {rate!r}"
        )
    return int(match.group(1)), _PERIODS[match.group(2) or "s"]


class ResourceLimit(_Frozen):
    """A cluster-wide limit on branch attempts, shared by everything that names it.

    ``max_concurrent``: attempts holding a permit at once; ``rate``: attempt starts per period,
    in Celery's notation (``"100/m"``, ``"5/s"``, ``"1000/h"``). At least one must be given;
    an attempt under a limit with both needs both.
    """

    name: str = Field(min_length=1)
    max_concurrent: int | None = Field(None, ge=1)
    rate: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value.strip()

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is None:
            return None
        count, period = parse_rate(value)
        unit = next(u for u, seconds in _PERIODS.items() if seconds == period)
        return f"{count}/{unit}"

    @model_validator(mode="after")
    def _something_to_limit(self) -> ResourceLimit:
        if self.max_concurrent is None and self.rate is None:
            raise ValueError(f"limit {self.name!r} needs max_concurrent or rate (or both)")
        return self

    @property
    def window(self) -> tuple[int, float] | None:
        """``(starts, period_seconds)`` of ``rate``, or ``None`` without a rate."""
        return None if self.rate is None else parse_rate(self.rate)


class ParallelConfig(_Frozen):
    """How the branches of a fan-out run. Every field is optional.

    Set on the graph (``compile(parallel_config=...)``, YAML ``settings.parallel``) and
    overridden per parallel edge; see ``resolve_config``.
    """

    strategy: str = "thread"
    max_workers: int | None = Field(None, ge=1)
    timeout_seconds: PositiveSeconds | None = None
    timeout_total: PositiveSeconds | None = None
    fail_fast: bool = False
    retry_policy: RetryPolicy | None = None
    circuit_breaker: CircuitBreakerConfig | None = None
    include_traceback: bool = False
    queue: str | None = None
    limits: tuple[ResourceLimit, ...] = ()

    @field_validator("limits")
    @classmethod
    def _distinct_limits(cls, value: tuple[ResourceLimit, ...]) -> tuple[ResourceLimit, ...]:
        names = [limit.name for limit in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"limit {twice[0]!r} is named twice; give each limit once")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        value = value.strip().lower()
        if not value:
            raise ValueError("strategy must not be empty")
        return value

    def retry(self) -> RetryPolicy:
        """The retry policy in force (no retries when none is set)."""
        return self.retry_policy or _NO_RETRY


_NO_RETRY = RetryPolicy()


def resolve_config(*layers: ParallelConfig | None) -> ParallelConfig:
    """Merge configs, later layers winning for the fields they set explicitly.

    ``resolve_config(graph_config, edge_config)``: edge > graph > defaults.
    """
    merged = ParallelConfig()
    for layer in layers:
        if layer is None:
            continue
        update = {name: getattr(layer, name) for name in layer.model_fields_set}
        merged = merged.model_copy(update=update)
    return merged
