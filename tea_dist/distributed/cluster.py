"""A cluster: where celery branches and submitted runs go, as an explicit object.

``Cluster`` owns what talking to one deployment takes: its settings (read once, when it is
made), its Celery app (its own, or the user's), and its Redis side (client, key names, circuit
and limit stores). Nothing here is process-wide: two clusters in one process work side by side,
each with its own app, and making one connects to nothing and writes no environment variable.

```python
Cluster(broker="amqp://guest:guest@127.0.0.1:5672//", redis="redis://127.0.0.1:6379/0")
Cluster.from_env()                       # the TEA_DIST_* variables, read here
Cluster(app=my_celery_app, redis="redis://127.0.0.1:6379/0")
```

With a user's app, tea_dist's task modules join the app's ``include`` (Celery imports them when
a worker of that app starts; their tasks are ``shared_task``s, bound to every app that loads
them), its worker steps (presence, refusals, prompt refill) join the app's steps, and nothing
else of the app's configuration is touched: tea_dist's task options (late ack, reject on worker
lost, JSON) travel with each task and each message it sends.

Which cluster is used when none is given (``compile()``, ``submit()``, ``WorkflowRun()`` without
``cluster=``) is decided in ``tea_dist.distributed.local_cluster`` (``default_cluster``).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import redis
from celery import Celery

from tea_dist.core.errors import ConfigError
from tea_dist.distributed import defaults
from tea_dist.distributed.breaker_redis import RedisBreakerStore
from tea_dist.distributed.celery_app import TASK_MODULES, add_steps, make_app
from tea_dist.distributed.connections import redis_for, ride_out
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.limits_redis import RedisLimitStore
from tea_dist.distributed.settings import Settings, redact
from tea_dist.distributed.wire import DecodedBranches

T = TypeVar("T")

ATTRIBUTE = "tea_cluster"  # the attribute of a Celery app naming its cluster


@dataclass(frozen=True)
class Stores:
    """A cluster's side in one process: Redis client, key names, circuit and limit stores
    (built once per process: a store registers its Lua scripts when built), and the branches
    a worker decoded."""

    client: redis.Redis
    keys: Keys
    breakers: RedisBreakerStore
    limits: RedisLimitStore
    branches: DecodedBranches


class Cluster:
    """Where celery branches and submitted runs go; see the module docstring.

    ``broker``: the Celery broker URL (Redis or RabbitMQ); ``redis``: the Redis holding
    tea_dist's state (defaults to the broker when that is Redis); ``app``: your own Celery app
    instead of a broker URL; every other keyword is a setting named like its ``TEA_DIST_*``
    variable without the prefix, lower case (``key_prefix``, ``flows_queue``, ``secret``,
    ``allowed``, ...). An unknown keyword is a ``ConfigError`` naming it.
    """

    def __init__(
        self,
        broker: str | None = None,
        redis: str | None = None,
        *,
        app: Celery | None = None,
        settings: Settings | None = None,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(Settings.model_fields))
        if unknown:
            raise ConfigError(
                f"Cluster() got unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(Settings.model_fields))}"
            )
        if app is not None and broker is not None:
            raise ConfigError("Cluster(): give broker= or app=, not both (the app names one)")
        if app is not None:
            broker = str(app.conf.broker_url or "amqp://guest:guest@localhost:5672//")
        changes = {
            **options,
            **({"broker_url": broker} if broker is not None else {}),
            **({"redis_url": redis} if redis is not None else {}),
        }
        if settings is None:
            settings = explicit_settings(**changes)
        elif changes:
            settings = settings.with_overrides(**changes)
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.owns_app = app is None
        self.app = make_app(settings) if app is None else app
        self._stores: dict[int, Stores] = {}
        self._lock = threading.Lock()
        install(self.app, self)

    @classmethod
    def from_env(cls, **options: Any) -> Cluster:
        """A cluster from the ``TEA_DIST_*`` environment variables (read now), with
        ``options`` overriding them."""
        return cls(settings=Settings(), **options)

    @contextlib.contextmanager
    def as_default(self) -> Iterator[Cluster]:
        """Within the block, this cluster is the default one of the process: every
        ``compile()``, ``submit()`` and ``WorkflowRun()`` given no ``cluster=`` uses it (as a
        Dask client's ``as_current``). Blocks nest; the cluster itself is never changed."""
        with defaults.opened(self):
            yield self

    @staticmethod
    def current_default() -> Cluster | None:
        """The cluster of the innermost ``as_default()`` block, if any."""
        return cast("Cluster | None", defaults.innermost())

    def __repr__(self) -> str:
        where = redact(self.settings.broker)
        app = "" if self.owns_app else f", app={self.app.main!r}"
        return f"Cluster(broker={where!r}, key_prefix={self.settings.key_prefix!r}{app})"

    # -- its Redis side --

    @property
    def stores(self) -> Stores:
        """This process's client, keys and stores (made on first use, again after a fork)."""
        pid = os.getpid()
        stores = self._stores.get(pid)
        if stores is None:
            with self._lock:
                stores = self._stores.get(pid)
                if stores is None:
                    client, keys = redis_for(self.settings.redis), self.keys
                    stores = Stores(
                        client,
                        keys,
                        RedisBreakerStore(client, keys),
                        RedisLimitStore(client, keys),
                        DecodedBranches(self.settings),
                    )
                    self._stores = {pid: stores}
        return stores

    @property
    def client(self) -> redis.Redis:
        return self.stores.client

    def ride_out(self, operation: Callable[[], T]) -> T:
        """A Redis operation that rides out an outage shorter than ``broker_grace``."""
        return ride_out(operation, self.settings.redis, self.settings.broker_grace)

    # -- sending --

    def send(self, name: str, args: tuple[Any, ...], **options: Any) -> Any:
        """Send tea_dist's task ``name``: JSON whatever the app's own serializer setting."""
        return self.app.send_task(name, args, **{"serializer": "json", **options})


def explicit_settings(**values: Any) -> Settings:
    """``Settings`` from ``values`` and the defaults only, whatever the environment says."""
    return _Explicit(**values)


class _Explicit(Settings):
    """Settings that read no environment variable (a ``Cluster(...)`` made in code)."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: Any, init_settings: Any, *others: Any, **named: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)


def install(app: Celery, cluster: Cluster) -> None:
    """Make ``app`` serve ``cluster``: tea_dist's task modules in its ``include``, its worker
    steps added, and the app naming its cluster (what its tasks read their settings from)."""
    current = getattr(app, ATTRIBUTE, None)
    if current is not None and current is not cluster:
        raise ConfigError(
            f"the Celery app {app.main!r} already serves {current!r}: one app serves one cluster"
        )
    setattr(app, ATTRIBUTE, cluster)
    app.tea_settings = cluster.settings  # what its worker steps read (presence, refusals)
    if cluster.owns_app:
        return  # ``make_app`` set it up
    include = list(app.conf.include or ())
    app.conf.include = [*include, *(m for m in TASK_MODULES if m not in include)]
    add_steps(app)


def cluster_of(app: Celery) -> Cluster:
    """The cluster a Celery app serves (``ConfigError`` saying how when it serves none)."""
    cluster = getattr(app, ATTRIBUTE, None)
    if cluster is None:
        raise ConfigError(
            f"the Celery app {app.main!r} serves no tea_dist cluster: make "
            "Cluster(app=your_app, redis=...) in the module the worker loads (-A)"
        )
    return cluster  # type: ignore[no-any-return]
