"""``RedisBreakerStore``: circuits in Redis, shared by every worker and caller.

Each circuit is one hash (``Keys.circuit(name)``: state, failures, opened_at, probes) and its
name is kept in the set ``Keys.circuits_index()`` so listing circuits needs no SCAN. Every
``acquire``, ``record`` and ``reset`` is one EVALSHA of a Lua script from ``breaker.lua``, so
a transition is atomic across processes and machines. Without an injected clock the scripts
read the Redis server's clock, so workers with skewed clocks agree on when a circuit may
half-open. Circuit hashes never expire.

Redis errors are translated to ``TeaDistError`` naming the server by its URL, password
redacted; no repr shows a password either. The store pickles as its URL, key prefix and clock,
so it can be sent to another process, which connects on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from importlib import resources
from typing import Any

import redis
from redis.commands.core import Script

from tea_dist.core.config import CircuitBreakerConfig
from tea_dist.core.errors import ConfigError, TeaDistError
from tea_dist.core.results import CircuitState
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.settings import redact
from tea_dist.policies.breaker import Admission, CircuitSnapshot, Clock, Transition

_SECTION = "--@ "


@cache
def lua_sources() -> dict[str, str]:
    """The scripts of ``breaker.lua`` by section name, each prefixed by the shared prelude."""
    lua = resources.files("tea_dist.distributed").joinpath("breaker.lua")
    text = lua.read_text(encoding="utf-8")
    prelude, *sections = text.split(f"\n{_SECTION}")
    scripts = {}
    for section in sections:
        name, _, body = section.partition("\n")
        scripts[name.strip()] = f"{prelude}\n{body}"
    return scripts


def _text(value: Any) -> str:
    """A Redis reply item as ``str`` (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _url_of(client: redis.Redis) -> str:
    """A password-free URL describing where ``client`` connects (for messages only)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


class RedisBreakerStore:
    """Circuit breakers in Redis; one Lua script per transition.

    ``client_or_url`` is a ``redis.Redis`` or a URL (``redis://[:password@]host:port/db``);
    ``keys`` gives the namespace (default prefix ``"tea"``); ``clock`` returns epoch seconds,
    ``None`` meaning the Redis server's clock (``TIME``). Raises ``ConfigError`` when the URL
    is malformed; no connection is made until the first call.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        keys: Keys | None = None,
        clock: Clock | None = None,
    ) -> None:
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
            self._where = _url_of(client_or_url)
        self._keys = keys or Keys()
        self._clock = clock
        self._scripts: dict[str, Script] = {
            name: self._client.register_script(source) for name, source in lua_sources().items()
        }

    def __repr__(self) -> str:
        return f"RedisBreakerStore({self._where!r}, prefix={self._keys.prefix!r})"

    def __reduce__(self) -> tuple[Callable[..., RedisBreakerStore], tuple[Any, ...]]:
        if self._url is None:
            raise TypeError(
                "a RedisBreakerStore built from a client cannot be pickled; build it from a URL"
            )
        return (type(self), (self._url, self._keys, self._clock))

    @property
    def keys(self) -> Keys:
        """The key namespace of this store."""
        return self._keys

    # -- the BreakerStore interface --

    def acquire(self, circuit: str, cfg: CircuitBreakerConfig) -> Admission:
        """Ask ``circuit`` whether a call may run now (creating it, closed, when unknown)."""
        args = [circuit, repr(cfg.reset_timeout), cfg.half_open_max_calls, self._now()]
        allowed, probe, state, previous = self._run("acquire", self._circuit_keys(circuit), args)
        after = CircuitState(_text(state))
        transition = (CircuitState(_text(previous)), after) if _text(previous) else None
        return Admission(bool(allowed), bool(probe), after, transition)

    def record(
        self, circuit: str, cfg: CircuitBreakerConfig, success: bool, probe: bool
    ) -> Transition | None:
        """Record the outcome of an admitted call; returns the transition it caused, if any."""
        args = [circuit, cfg.failure_threshold, int(success), int(probe), self._now()]
        before, after = self._run("record", self._circuit_keys(circuit), args)
        old, new = CircuitState(_text(before)), CircuitState(_text(after))
        return None if old is new else (old, new)

    def release(self, circuit: str, probe: bool) -> None:
        """An admitted call ended with no outcome: give back its probe slot, count nothing."""
        if probe:
            self._run("release", self._circuit_keys(circuit), [])

    def reset(self, circuit: str | None = None) -> list[tuple[str, CircuitState, CircuitState]]:
        """Close one known circuit (every circuit when ``None``); returns the transitions made."""
        if circuit is None:
            index = self._keys.circuits_index()
            reply = self._run("reset_all", [index], [self._keys.circuit_prefix()])
        else:
            reply = self._run("reset_one", self._circuit_keys(circuit), [circuit])
        return [
            (_text(name), CircuitState(_text(old)), CircuitState.CLOSED)
            for name, old in zip(reply[::2], reply[1::2], strict=True)
        ]

    def forget(self, circuits: Iterable[str]) -> None:
        """Drop circuits entirely: their hashes and their place in the index."""
        names = list(circuits)
        if not names:
            return
        with self._translated():
            pipe = self._client.pipeline()
            pipe.delete(*[self._keys.circuit(name) for name in names])
            pipe.srem(self._keys.circuits_index(), *names)
            pipe.execute()

    def states(self) -> dict[str, CircuitState]:
        """Every known circuit and its stored state (one atomic read)."""
        reply = self._run("states", [self._keys.circuits_index()], [self._keys.circuit_prefix()])
        return {
            _text(name): CircuitState(_text(state))
            for name, state in zip(reply[::2], reply[1::2], strict=True)
        }

    def snapshot(self, circuit: str) -> CircuitSnapshot:
        """The stored state of ``circuit`` (a fresh closed snapshot when unknown)."""
        with self._translated():
            fields = self._client.hgetall(self._keys.circuit(circuit))
        data = {_text(k): _text(v) for k, v in fields.items()}
        if not data:
            return CircuitSnapshot()
        return CircuitSnapshot(
            state=CircuitState(data.get("state", CircuitState.CLOSED)),
            failures=int(data.get("failures") or 0),
            opened_at=float(data["opened_at"]) if data.get("opened_at") else None,
            probes_in_flight=int(data.get("probes") or 0),
        )

    # -- helpers --

    def _circuit_keys(self, circuit: str) -> list[str]:
        return [self._keys.circuit(circuit), self._keys.circuits_index()]

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
                f"circuit breaker store at {self._where} failed: {type(exc).__name__}: {exc}"
            ) from exc
