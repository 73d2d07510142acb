"""Distributed settings, read from the environment (``TEA_DIST_*``) and overridable in code.

Defaults live here and nowhere else. Nothing connects at import time, and no repr or log line
ever shows a password: URLs are printed through ``redact``.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class Settings(BaseSettings):
    """Where the broker, result backend and breaker Redis are, and the limits of a run.

    Environment: ``TEA_DIST_BROKER_URL``, ``TEA_DIST_RESULT_BACKEND``, ``TEA_DIST_REDIS_URL``,
    ``TEA_DIST_FLOWS_QUEUE``, ``TEA_DIST_MAX_STATE_BYTES``, ... (the field name, upper-cased).
    An unset result backend or Redis URL follows the broker URL. ``TEA_DIST_TASK_EVENTS=1`` keeps
    Celery task events on in workers and callers (otherwise only an attached Flower turns them on).
    """

    model_config = SettingsConfigDict(env_prefix="TEA_DIST_", frozen=True, extra="ignore")

    broker_url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    result_backend: SecretStr | None = None
    redis_url: SecretStr | None = None
    key_prefix: str = "tea"
    flows_queue: str = "tea.flows"
    runs_queue: str = "tea.runs"
    task_events: bool = False
    max_state_bytes: int = Field(1_000_000, gt=0)
    result_expires: float = Field(3600.0, gt=0)
    run_expires: float = Field(86400.0, gt=0)
    visibility_timeout: float = Field(3600.0, gt=0)
    hard_limit_grace: float = Field(0.5, gt=0)
    heartbeat_seconds: float = Field(0.5, gt=0)
    heartbeat_ttl: float = Field(2.0, gt=0)
    cancel_grace: float = Field(0.3, gt=0)

    @model_validator(mode="after")
    def _follow_broker(self) -> Settings:
        if self.result_backend is None:
            object.__setattr__(self, "result_backend", self.broker_url)
        if self.redis_url is None:
            object.__setattr__(self, "redis_url", self.broker_url)
        return self

    @property
    def broker(self) -> str:
        return self.broker_url.get_secret_value()

    @property
    def backend(self) -> str:
        return (self.result_backend or self.broker_url).get_secret_value()

    @property
    def redis(self) -> str:
        return (self.redis_url or self.broker_url).get_secret_value()

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if isinstance(value, SecretStr):
                value = redact(value.get_secret_value())
            yield name, value

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (validated like the environment)."""
        data = {
            k: v.get_secret_value() if isinstance(v, SecretStr) else v
            for k, v in self.__dict__.items()
        }
        data.update(changes)
        return Settings.model_validate(data)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
