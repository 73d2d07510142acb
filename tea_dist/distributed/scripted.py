"""What the Redis stores (circuit breakers, resource limits) share: a client or URL, a key
namespace, a clock, and their Lua scripts.

A store's ``.lua`` file is a prelude followed by sections that start with a line ``--@ name``;
every section becomes one script, run atomically with ``EVALSHA``. ``clock.lua`` is prepended
to every prelude: ``now_from(arg)`` is the injected epoch time, or the Redis server's clock
when the argument is empty, so that machines with skewed clocks agree. Redis errors become a
``TeaDistError`` naming the server, its password redacted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, partial
from importlib import resources
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script

from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.settings import redact

_SECTION = "--@ "


def _read(name: str) -> str:
    return resources.files("tea_dist.distributed").joinpath(name).read_text(encoding="utf-8")


@cache
def lua_sources(filename: str) -> dict[str, str]:
    """The scripts of ``filename`` by section name, each prefixed by the shared prelude."""
    prelude, *sections = _read(filename).split(f"\n{_SECTION}")
    prelude = f"{_read('clock.lua')}\n{prelude}"
    scripts = {}
    for section in sections:
        name, _, body = section.partition("\n")
        scripts[name.strip()] = f"{prelude}\n{body}"
    return scripts


def text(value: Any) -> str:
    """A Redis reply item as ``str`` (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def where(client: redis.Redis | RedisCluster) -> str:
    """A password-free description of where ``client`` connects (for messages only)."""
    if isinstance(client, RedisCluster):
        node = client.get_default_node()
        return f"redis cluster {node.host}:{node.port}" if node else "redis cluster"
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


class ScriptedStore:
    """A store kept in Redis by the Lua scripts of ``SCRIPTS``; ``WHAT`` names it in errors.

    ``client_or_url`` is a ``redis.Redis`` (or ``RedisCluster``) or a URL; ``keys`` gives the
    namespace (default prefix ``"tea"``); ``clock`` returns epoch seconds, ``None`` meaning the
    Redis server's clock. Raises ``ConfigError`` when the URL is malformed; no connection is
    made until the first call. Built from a URL, a store pickles as its URL.
    """

    SCRIPTS = ""
    WHAT = "store"

    def __init__(
        self,
        client_or_url: redis.Redis | RedisCluster | str,
        keys: Keys | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._client: redis.Redis | RedisCluster
        if isinstance(client_or_url, str):
            self._url: str | None = client_or_url
            self._where = redact(client_or_url).split("?", 1)[0]  # a query may hold a password
            try:
                self._client = redis.Redis.from_url(client_or_url)
            except ValueError as exc:
                raise ConfigError(f"invalid Redis URL {self._where!r}: {exc}") from exc
        else:
            self._url = None
            self._client = client_or_url
            self._where = where(client_or_url)
        self._keys = keys or Keys()
        self._clock = clock
        self._scripts: dict[str, Script] = {
            name: self._client.register_script(source)
            for name, source in lua_sources(self.SCRIPTS).items()
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._where!r}, prefix={self._keys.prefix!r})"

    def _init_kwargs(self) -> dict[str, Any]:
        """What ``__init__`` needs besides the URL, to rebuild this store after pickling."""
        return {"keys": self._keys, "clock": self._clock}

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        if self._url is None:
            raise TypeError(
                f"a {type(self).__name__} built from a client cannot be pickled; "
                "build it from a URL"
            )
        return (partial(type(self), **self._init_kwargs()), (self._url,))

    @property
    def keys(self) -> Keys:
        """The key namespace of this store."""
        return self._keys

    def _now(self) -> str:
        """The time to pass to a script: injected epoch seconds, or "" for the server's clock."""
        return "" if self._clock is None else repr(float(self._clock()))

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        with self._translated():
            return self._scripts[script](keys=keys, args=args)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Raise ``TeaDistError`` (from the Redis error) naming the server, password redacted."""
        try:
            yield
        except redis.RedisError as exc:
            raise TeaDistError(
                f"{self.WHAT} at {self._where} failed: {type(exc).__name__}: {exc}"
            ) from exc
