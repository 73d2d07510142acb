"""Every Redis key name tea_dist uses, built from one namespace.

No other module spells a key: it asks ``Keys``. One prefix (``Settings.key_prefix``, default
``"tea"``) scopes a deployment, so two deployments (or two test runs) can share a server, and
``SCAN prefix*`` finds everything one of them wrote.
"""

from __future__ import annotations

from dataclasses import dataclass

from tea_dist.core.errors import ConfigError

DEFAULT_PREFIX = "tea"
LIMIT_PARTS = ("holders", "starts", "waiting", "info")
"""The keys of one resource limit: leases (zset holder -> expiry), starts of the rate window
(zset seq -> time), waiters (zset holder -> until), and a hash of its settings and counters."""


@dataclass(frozen=True)
class Keys:
    """Redis key names under one ``prefix``.

    Raises ``ConfigError`` when the prefix is empty or ends with ``":"`` (it would make keys
    such as ``"tea::circuit:x"`` or collide with another namespace).
    """

    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        if not self.prefix or self.prefix.endswith(":"):
            raise ConfigError(
                f"Redis key prefix must be non-empty without a trailing ':': {self.prefix!r}"
            )

    # -- circuit breakers --

    def circuit(self, name: str) -> str:
        """The hash holding one circuit's state (fields state, failures, opened_at, probes)."""
        return f"{self.circuit_prefix()}{name}"

    def circuit_prefix(self) -> str:
        """The start of every circuit hash name: ``circuit(name) == circuit_prefix() + name``."""
        return f"{self.prefix}:circuit:"

    def circuits_index(self) -> str:
        """The set of every circuit name, so listing circuits needs no SCAN."""
        return f"{self.prefix}:circuits"

    # -- runs and fan-outs --

    def events(self, run_id: str) -> str:
        """The stream of lifecycle events of one run (expires with the run)."""
        return f"{self.prefix}:run:{run_id}:events"

    def heartbeat(self, fanout_id: str, index: int) -> str:
        """Kept alive (short TTL) by the worker running branch ``index`` of a fan-out."""
        return f"{self.prefix}:fanout:{fanout_id}:hb:{index}"

    def batch_heartbeat(self, fanout_id: str, batch: str) -> str:
        """Kept alive by the worker running batch task ``batch`` of a fan-out's map, from its
        first item to its last (gone: the batch is over, or its process died)."""
        return f"{self.prefix}:fanout:{fanout_id}:hb:batch:{batch}"

    def worker_inbox(self, worker: str) -> str:
        """The list a worker process (``host/pid``) takes cancel requests from."""
        return f"{self.prefix}:inbox:{worker}"

    def fanout_finished(self, fanout_id: str) -> str:
        """Set when a fan-out's driver is done; a late delivery of its branches is skipped."""
        return f"{self.prefix}:fanout:{fanout_id}:finished"

    def crashes(self, fanout_id: str, index: int) -> str:
        """How many times a branch's attempt died with the worker process running it while
        the worker itself lived on (its node aborted, exited, segfaulted), across every
        delivery of it: workers quarantine a branch at its third start after two."""
        return f"{self.prefix}:fanout:{fanout_id}:crashes:{index}"

    def batch_item(self, batch: str) -> str:
        """The index of the item a batch task is running: whom a crash of its process blames."""
        return f"{self.prefix}:batch:{batch}:item"

    # -- submitted workflow runs --

    def run(self, run_id: str) -> str:
        """The hash of a submitted run: status, graph, timestamps, result or error."""
        return f"{self.prefix}:run:{run_id}"

    def runs_index(self) -> str:
        """Sorted set: every submitted run's id, scored by when it was submitted (epoch s);
        ids older than the runs' retention are trimmed at each submit."""
        return f"{self.prefix}:runs:index"

    def run_owner(self, run_id: str) -> str:
        """The lease of the run worker driving a run: its fencing token, with a short TTL
        (renewed while it drives the run; lapsed, another run worker takes the run over)."""
        return f"{self.prefix}:run:{run_id}:owner"

    def runs_running(self, queue: str) -> str:
        """Sorted set: the runs of runs queue ``queue`` being driven, scored by when their
        owner's lease lapses (epoch ms); run workers look here for runs to take over."""
        return f"{self.prefix}:runs:{queue}:running"

    def run_cancelled(self, run_id: str) -> str:
        """Set by ``WorkflowRun.cancel()``; the driver stops the run when it sees it."""
        return f"{self.prefix}:run:{run_id}:cancel"

    def run_lease(self, run_id: str) -> str:
        """Key: alive while the caller driving a run renews it (workers stop orphans)."""
        return f"{self.prefix}:run:{run_id}:lease"

    # -- workers --

    def queue_workers(self, queue: str) -> str:
        """Sorted set: live workers consuming ``queue``, scored by when they stop counting."""
        return f"{self.prefix}:queue:{queue}:workers"

    def queue_slots(self, queue: str) -> str:
        """Hash: worker (as in ``queue_workers``) -> its concurrency, the slots it consumes
        ``queue`` with (the live ones count: see ``presence.live_slots``)."""
        return f"{self.prefix}:queue:{queue}:slots"

    # -- resource limits --

    def limit(self, name: str, part: str) -> str:
        """One of a limit's keys (``holders``, ``starts``, ``waiting``, ``info``).

        The limit's name is the hash tag, ``{name}``: all its keys sit in one Redis Cluster
        slot, so one script may use them all. The tag follows the prefix so that ``SCAN
        prefix*`` still finds every key of a deployment.
        """
        return f"{self.prefix}:limit:{{{name}}}:{part}"

    def limit_keys(self, name: str) -> list[str]:
        """Every key of one limit, in the order its Lua scripts take them (``KEYS[1..4]``)."""
        return [self.limit(name, part) for part in LIMIT_PARTS]

    def limits_index(self) -> str:
        """The set of limit names, so listing limits needs no SCAN."""
        return f"{self.prefix}:limits"
