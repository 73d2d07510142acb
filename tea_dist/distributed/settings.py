"""Distributed settings, read from the environment (``TEA_DIST_*``) and overridable in code.

Defaults live here and nowhere else. Nothing connects at import time, and no repr or log line
ever shows a password: URLs are printed through ``redact``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from tea_dist.core.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
URL_FIELDS = ("broker_url", "result_backend", "redis_url")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")  # what redis-py's ``from_url`` reads
AMQP_SCHEMES = ("amqp://", "amqps://", "pyamqp://", "librabbitmq://")  # RabbitMQ
# kombu transports that deliver again a message unacknowledged for the visibility timeout
VISIBILITY_SCHEMES = (*REDIS_SCHEMES, "redis+socket://", "sentinel://", "sqs://")


def is_redis_url(url: str) -> bool:
    """Whether ``url`` names a Redis server redis-py can connect to."""
    return url.strip().lower().startswith(REDIS_SCHEMES)


_SECRET_QUERY = re.compile(r"(?i)([?&;][^&=#;]*(?:pass|secret|token)[^&=#;]*=)[^&#;]*")


def redact(url: str) -> str:
    """``url`` with every password replaced by ``***``.

    Covers ``user:pass@``, ``:pass@`` and a bare ``pass@`` (Redis reads a lone user part as the
    password), any query parameter whose name holds ``pass``, ``secret`` or ``token``
    (``?password=``, ``ssl_keyfile_password=``), and each URL of a ``;``-separated failover list.
    An ``@`` anywhere after ``://`` is taken as the end of credentials: a URL is over-redacted
    rather than leaked.
    """
    pieces = []
    for piece in url.split(";"):
        scheme, sep, rest = piece.partition("://")
        if sep and "@" in rest:
            userinfo, _, host = rest.rpartition("@")
            user = userinfo.partition(":")[0] if ":" in userinfo else ""
            rest = f"{user}:***@{host}" if user else f":***@{host}"
        pieces.append(scheme + sep + rest)
    return _SECRET_QUERY.sub(r"\1***", ";".join(pieces))


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` (URL-encoded) in it, unless it names one already."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    host, slash, tail = rest.partition("/")
    if "@" in host:
        userinfo, _, hostport = host.rpartition("@")
        if ":" in userinfo:
            return url
        host = f"{userinfo}:{quote(password, safe='')}@{hostport}"
    else:
        host = f":{quote(password, safe='')}@{host}"
    return f"{scheme}{sep}{host}{slash}{tail}"


class Settings(BaseSettings):
    """Where the broker, result backend and breaker Redis are, and the limits of a run.

    Environment: ``TEA_DIST_BROKER_URL``, ``TEA_DIST_RESULT_BACKEND``, ``TEA_DIST_REDIS_URL``,
    ``TEA_DIST_FLOWS_QUEUE``, ``TEA_DIST_MAX_STATE_BYTES``, ... (the field name, upper-cased).
    The Redis URL (tea_dist's own state: run streams, heartbeats, circuits, limits, leases,
    presence) follows the broker URL when that is Redis (``redis://``, ``rediss://``,
    ``unix://``); with any other broker it must be set, and using it unset raises
    ``ConfigError`` (a driver does before it sends anything, a worker before it starts). An
    unset result backend follows the Redis URL (tea_dist's tasks ignore their results).
    ``TEA_DIST_CONSUMER_TIMEOUT`` is RabbitMQ's ``consumer_timeout`` in seconds (set it to your
    broker's): a delivery unacknowledged longer has its channel closed and comes back, so a
    branch's time limit plus its longest retry delay must stay below it, as below
    ``TEA_DIST_VISIBILITY_TIMEOUT`` on Redis.

    Security: ``TEA_DIST_ALLOWED`` (modules and packages a worker may import from a message,
    comma-separated), ``TEA_DIST_SECRET`` (signs and verifies every message),
    ``TEA_DIST_AGENTS_DIR`` (where YAML agents are found, default: the working directory) and
    ``TEA_DIST_REDIS_PASSWORD`` (URL-encoded into every URL that names no password, so a
    password with ``@ / : #`` needs no escaping by hand).
    ``TEA_DIST_TASK_EVENTS=1`` keeps Celery task events on in workers and callers (otherwise only
    an attached Flower turns them on).
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
    visibility_timeout: float = Field(3600.0, gt=0)  # Redis (and SQS) brokers: kombu's
    consumer_timeout: float = Field(1800.0, gt=0)  # RabbitMQ brokers: the server's, in seconds
    hard_limit_grace: float = Field(0.5, gt=0)
    heartbeat_seconds: float = Field(0.5, gt=0)
    heartbeat_ttl: float = Field(2.0, gt=0)
    cancel_grace: float = Field(0.3, gt=0)
    broker_grace: float = Field(10.0, gt=0)  # a Redis or broker outage a run rides out
    caller_lease: float = Field(10.0, gt=0)  # branches of a silent caller stop after this
    # security: what a worker runs, how messages are signed, where the Redis password comes from
    allowed: Annotated[tuple[str, ...], NoDecode] = ()
    secret: SecretStr | None = None
    agents_dir: str | None = None
    redis_password: SecretStr | None = None

    @field_validator("allowed", mode="before")
    @classmethod
    def _split_allowed(cls, value: Any) -> Any:
        """``TEA_DIST_ALLOWED`` is a comma-separated list of modules or packages."""
        if isinstance(value, str):
            value = value.split(",")
        return tuple(item.strip() for item in value if item and item.strip())

    @field_validator("secret", "redis_password", "agents_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        """``TEA_DIST_SECRET=`` (as a compose file's ``${VAR:-}`` gives) means no secret."""
        return None if value == "" else value

    @model_validator(mode="after")
    def _follow_broker(self) -> Settings:
        """Redis follows a Redis broker; the result backend follows Redis."""
        if self.redis_url is None and is_redis_url(self.broker):
            object.__setattr__(self, "redis_url", self.broker_url)
        if self.result_backend is None and self.redis_url is not None:
            object.__setattr__(self, "result_backend", self.redis_url)
        if self.redis_password is not None:
            password = self.redis_password.get_secret_value()
            for name in URL_FIELDS:
                value = getattr(self, name)
                if value is not None and is_redis_url(value.get_secret_value()):
                    url = with_password(value.get_secret_value(), password)
                    object.__setattr__(self, name, SecretStr(url))
        return self

    @property
    def broker(self) -> str:
        return self.broker_url.get_secret_value()

    @property
    def names_broker(self) -> bool:
        """Whether a broker was named (``TEA_DIST_BROKER_URL``, or in code), not defaulted."""
        return "broker_url" in self.model_fields_set

    @property
    def broker_is_redis(self) -> bool:
        return is_redis_url(self.broker)

    @property
    def backend(self) -> str | None:
        """The result backend's URL (``None``: no Redis named, so no result backend)."""
        return self.result_backend.get_secret_value() if self.result_backend else None

    @property
    def redis(self) -> str:
        """The Redis holding tea_dist's state (``ConfigError`` when none is named and the
        broker is not Redis)."""
        if self.redis_url is None:
            raise ConfigError(
                f"the broker {redact(self.broker)} is not Redis, and tea_dist keeps its state "
                "(run streams, heartbeats, circuits, limits, leases, presence) in Redis: set "
                "TEA_DIST_REDIS_URL (or redis_url=) to a Redis server, e.g. "
                "redis://127.0.0.1:6379/0"
            )
        return self.redis_url.get_secret_value()

    def hold_limit(self) -> tuple[float, str, str] | None:
        """How long this broker lets a worker hold a message unacknowledged: seconds, the
        setting that says so, what happens past it; ``None`` when it sets no such limit."""
        broker = self.broker.strip().lower()
        if broker.startswith(VISIBILITY_SCHEMES):
            return (
                self.visibility_timeout,
                "TEA_DIST_VISIBILITY_TIMEOUT",
                "the broker visibility timeout: it would be delivered twice",
            )
        if broker.startswith(AMQP_SCHEMES):
            return (
                self.consumer_timeout,
                "TEA_DIST_CONSUMER_TIMEOUT",
                "RabbitMQ's consumer timeout: RabbitMQ would close the worker's channel and "
                "deliver it again (raise consumer_timeout in rabbitmq.conf, then "
                "TEA_DIST_CONSUMER_TIMEOUT to match)",
            )
        return None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if isinstance(value, SecretStr):
                value = redact(value.get_secret_value()) if name in URL_FIELDS else "***"
            yield name, value

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced, validated like the original: what was named stays,
        what followed (the Redis URL a Redis broker gives, the result backend) follows again,
        and settings made in code read no environment variable for the rest."""
        data = {
            name: value.get_secret_value() if isinstance(value, SecretStr) else value
            for name in self.model_fields_set
            if (value := getattr(self, name)) is not None  # None: it follows again
        }
        data.update(changes)
        return type(self).model_validate(data)
