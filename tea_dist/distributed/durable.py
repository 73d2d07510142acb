"""Durable runs: a submitted run survives the death of the run worker driving it.

**Ownership.** Exactly one process drives a submitted run at a time. It holds the run's lease
(``Keys.run_owner``: its fencing token, with a TTL of ``TEA_DIST_HEARTBEAT_TTL``) and renews it
every ``TEA_DIST_HEARTBEAT_SECONDS`` on a thread of its own (``RunLease``); the run sits in its
runs queue's index of running runs, a sorted set scored by when the lease lapses. Taking a run
(``claim``), renewing, writing, releasing and finishing it are each one Lua script checking the
run's token (field ``token`` of the run hash, incremented by every claim): a driver that lost the
run (it stalled and another took over) has its writes refused, and stops (``Detached``).

**Checkpoints.** The run's event stream is its checkpoint. Every graph event its driver appends
is fenced; a ``state`` event (the state after a main-path node) also records its stream id and
the number of main-path nodes done in the run hash (``checkpoint``, ``steps``). A celery
fan-out's driver records each branch it sends (``on_flow_queued``, with its task id), and the
fan-out's id is ``{run_id}.{steps}``: a resumed run finds the branches of its fan-out in flight.

**Hand-over.** Every run worker process keeps one ``Adopter`` thread: every heartbeat period it
looks for runs of its queue whose lease lapsed, claims them and resumes each on a thread of its
own, from the last checkpoint. A worker shutting down (SIGTERM) hands its runs over at once: its
drivers stop and release their runs, which the other run workers take over on their next look.

**Quarantine.** A lease that lapsed (not released) means the driver's process died or froze.
The run hash's ``busy`` field says whether one of the run's main-path nodes was running in that
process when it went: set when a node starts after the driver waited (``on_node_start``, a
listener of every run), cleared when the driver waits on remote branches (a celery fan-out's
``check``) and by every claim. A lapsed lease while ``busy`` is a crash the run may have caused
(``crashes``); the second one fails the run as quarantined instead of handing its poison to the
next run worker. A run worker killed while its runs wait on their branches or are being resumed
(an OOM kill, a lost host, a deploy's SIGKILL) counts against none of them, and a graceful
release (``released``) never counts. Each transition is one fenced write, so a run pays one per
fan-out, not one per node.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import redis

from tea_dist.distributed.cluster import Cluster
from tea_dist.distributed.keys import Keys
from tea_dist.engine.attempt import worker_id
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.runtime import Detached
from tea_dist.observe.events import FlowContext, add_listener

MAX_HANDOVERS = 20  # a run whose drivers keep dying (it kills them?) then fails
MAX_CRASHES = 2  # a run whose driver died this many times while running its code: quarantined
QUARANTINED = (
    "quarantined: it crashed its run worker {times} (the process driving it died while running "
    "the run's own nodes, {where}); not resumed again"
)
SCAN_BATCH = 16  # lapsed runs claimed per look, per queue
LEAVE_GRACE = 2.0  # seconds a shutting-down worker's drivers have to release their runs

logger = logging.getLogger("tea_dist.durable")

_NOW_MS = "local t = redis.call('TIME')\nlocal now = t[1] * 1000 + math.floor(t[2] / 1000)\n"
_OWNED = "redis.call('HGET', KEYS[1], 'token') == ARGV[1]"

CLAIM = (
    _NOW_MS
    + """
-- KEYS: run hash, owner lease, running index, event stream
-- ARGV: 'start' or 'resume', worker, lease ms, run id, most hand-overs, epoch seconds, most
-- crashes, the quarantine error before and after where it crashed. Returns {token, previous};
-- {0, ''}: not taken; {-1, ''}: failed, handed over too often; {-2, ''}: failed, quarantined
local status = redis.call('HGET', KEYS[1], 'status')
if ARGV[1] == 'start' then
  if status ~= 'pending' then return {0, ''} end
  redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[6])
else
  if status ~= 'running' then
    redis.call('ZREM', KEYS[3], ARGV[4])
    return {0, ''}
  end
  if redis.call('EXISTS', KEYS[2]) == 1 then return {0, ''} end
  -- released: a graceful hand-over; else the lease lapsed, and if the run's own code was
  -- running in its driver's process then, the run may be what killed it
  local released = redis.call('HDEL', KEYS[1], 'released') == 1
  if not released and redis.call('HGET', KEYS[1], 'busy') == '1' then
    local crashes = redis.call('HINCRBY', KEYS[1], 'crashes', 1)
    if crashes >= tonumber(ARGV[7]) then
      local where, checkpoint = 'in its first node', redis.call('HGET', KEYS[1], 'checkpoint')
      local entry = checkpoint and redis.call('XRANGE', KEYS[4], checkpoint, checkpoint)[1]
      if entry then
        for j = 1, #entry[2], 2 do
          if entry[2][j] == 'data' then
            local ok, event = pcall(cjson.decode, entry[2][j + 1])
            if ok and type(event) == 'table' and type(event.node) == 'string' then
              where = "after node '" .. event.node .. "'"
            end
          end
        end
      end
      redis.call('HSET', KEYS[1], 'status', 'failed', 'ended', ARGV[6], 'quarantined', 1,
        'error', ARGV[8] .. where .. ARGV[9])
      redis.call('ZREM', KEYS[3], ARGV[4])
      return {-2, ''}
    end
  end
  local n = redis.call('HINCRBY', KEYS[1], 'handovers', 1)
  if n > tonumber(ARGV[5]) then
    redis.call('HSET', KEYS[1], 'status', 'failed', 'ended', ARGV[6], 'error',
      'the run worker driving it stopped ' .. n .. ' times; not taken over again')
    redis.call('ZREM', KEYS[3], ARGV[4])
    return {-1, ''}
  end
end
local previous = redis.call('HGET', KEYS[1], 'worker') or ''
local token = redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'worker', ARGV[2], 'busy', 0)
redis.call('SET', KEYS[2], token, 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[4])
return {token, previous}
"""
)

RENEW = (
    _NOW_MS
    + f"""
-- KEYS: run hash, owner lease, running index, cancel flag, event stream
-- ARGV: token, lease ms, run id, retention s; returns {{still owned, cancel asked}}
local cancelled = redis.call('EXISTS', KEYS[4])
if not ({_OWNED}) or redis.call('HGET', KEYS[1], 'status') ~= 'running' then
  return {{0, cancelled}}
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])  -- a run alive keeps its record and checkpoints
redis.call('EXPIRE', KEYS[5], ARGV[4])
return {{1, cancelled}}
"""
)

APPEND = f"""
-- KEYS: run hash, event stream
-- ARGV: token, retention s, main-path nodes done ('' unless a checkpoint), then every entry as
-- its number of fields followed by its fields and values
if not ({_OWNED}) then return 0 end
local i, id = 4, 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local fields = {{}}
  for j = 1, 2 * n do fields[j] = ARGV[i + j] end
  id = redis.call('XADD', KEYS[2], '*', unpack(fields))
  i = i + 2 * n + 1
end
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'checkpoint', id, 'steps', ARGV[3]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
"""

FINISH = f"""
-- KEYS: run hash, owner lease, running index, event stream, cancel flag
-- ARGV: token, run id, retention s, then the outcome's fields and values
if not ({_OWNED}) or redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local fields = {{}}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('DEL', KEYS[2], KEYS[5])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

RELEASE = f"""
-- KEYS: run hash, owner lease, running index; ARGV: token, run id
if not ({_OWNED}) then return 0 end
redis.call('HINCRBY', KEYS[1], 'token', 1)
redis.call('HSET', KEYS[1], 'released', 1)
redis.call('DEL', KEYS[2])
if redis.call('HGET', KEYS[1], 'status') == 'running' then
  redis.call('ZADD', KEYS[3], 0, ARGV[2])
end
return 1
"""

BUSY = f"""
-- KEYS: run hash; ARGV: token, 1 (a node of the run runs in the driver's process now) or 0
-- (the driver waits on remote branches: a crash now is not the run's doing)
if not ({_OWNED}) then return 0 end
redis.call('HSET', KEYS[1], 'busy', ARGV[2])
return 1
"""

LAPSED = (
    _NOW_MS
    + """
-- KEYS: running index; ARGV: how many at most
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, ARGV[1])
"""
)

CANCEL_UNOWNED = """
-- KEYS: run hash, owner lease, cancel flag, caller lease; ARGV: epoch seconds
if redis.call('HGET', KEYS[1], 'status') ~= 'running' or redis.call('EXISTS', KEYS[2]) == 1
    or redis.call('EXISTS', KEYS[3]) == 0 then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'ended', ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""


def _script(client: Any, source: str) -> Any:
    """Script ``source`` on ``client`` (run with EVALSHA, loaded when the server lacks it)."""
    return client.register_script(source)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the lease of one run --


class RunLease:
    """This process's hold on a run it drives (a ``RunOwner``).

    Used as a context manager around the drive: a thread renews the lease every heartbeat period
    and turns ``WorkflowRun.cancel()`` into ``cancel`` (the run's cancel token). ``lost``: another
    process drives the run now, or it ended elsewhere. On the way out of a shutting-down worker the
    run is released for another run worker to take over at once.
    """

    def __init__(
        self, cluster: Cluster, run_id: str, queue: str, token: int, previous: str = ""
    ) -> None:
        settings = cluster.settings
        self.cluster = cluster
        self.run_id, self.queue, self.token, self.previous = run_id, queue, str(token), previous
        self.worker = worker_id()
        self.client = cluster.client
        self.keys = cluster.keys
        self.cancel = CancelToken()
        self.lost = False
        self.every = settings.heartbeat_seconds
        self.lease_ms = int(settings.heartbeat_ttl * 1000)
        self.retention = int(settings.run_expires)
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._busy = False  # a node of the run runs in this process (as the run hash says)

    def __repr__(self) -> str:
        return f"RunLease({self.run_id!r}, token={self.token})"

    # -- RunOwner --

    def check(self) -> None:
        """``Detached`` when another process drives the run, or this worker is leaving.

        Called by a celery fan-out's driver while it sends and waits on the branches: the
        first call after a node records that no node of the run runs here now."""
        if self.lost:
            raise Detached(f"run {self.run_id} is driven by another run worker now")
        if LEAVING.is_set():
            raise Detached(f"run {self.run_id} is handed over: this run worker shuts down")
        if self._busy:
            self._mark_busy(False)

    def node_starts(self) -> None:
        """A main-path node of the run is about to run in this process (a crash from now on
        may be the run's doing): recorded unless it already is. Never raises: a lost run is
        seen at the driver's next write."""
        if not self._busy and not self.lost:
            with contextlib.suppress(Detached):
                self._mark_busy(True)

    def _mark_busy(self, busy: bool) -> None:
        if self._call(BUSY, [self.keys.run(self.run_id)], [self.token, int(busy)]) == 0:
            self.lost = True
            raise Detached(f"run {self.run_id} was taken over by another run worker")
        self._busy = busy

    def append(self, entries: Sequence[Mapping[str, str]], steps: int | None = None) -> None:
        """Add ``entries`` to the run's stream, fenced; ``steps``: this is a checkpoint (a
        ``state`` event) with that many main-path nodes done."""
        if self.lost or LEAVING.is_set():
            self.check()
        args: list[Any] = [self.token, self.retention, "" if steps is None else steps]
        for entry in entries:
            args.append(len(entry))
            for field, value in entry.items():
                args += [field, value]
        keys = [self.keys.run(self.run_id), self.keys.events(self.run_id)]
        if self._call(APPEND, keys, args) == 0:
            self.lost = True
            raise Detached(f"run {self.run_id} was taken over by another run worker")

    def _lease_keys(self, *more: str) -> list[str]:
        """The keys every lease script names first: run hash, owner lease, running index."""
        run_id = self.run_id
        return [
            self.keys.run(run_id),
            self.keys.run_owner(run_id),
            self.keys.runs_running(self.queue),
            *more,
        ]

    # -- the end of a drive --

    def finish(self, outcome: Mapping[str, Any]) -> bool:
        """Record the run's outcome and let go of it; False if this process no longer owns it."""
        keys = self._lease_keys(self.keys.events(self.run_id), self.keys.run_cancelled(self.run_id))
        args: list[Any] = [self.token, self.run_id, self.retention]
        for field, value in outcome.items():
            args += [field, value]
        done = bool(self._call(FINISH, keys, args))
        self.lost = True  # over, one way or the other
        return done

    def release(self) -> bool:
        """Hand the run over: another run worker takes it on its next look (this process is
        fenced out at once). False if it was not this process's any more."""
        keys = self._lease_keys()
        released = bool(self._call(RELEASE, keys, [self.token, self.run_id]))
        self.lost = True
        return released

    # -- renewal --

    def __enter__(self) -> RunLease:
        with _DRIVING_LOCK:
            _DRIVING.add(self)
            _BY_RUN[self.run_id] = self
        self._renew()
        self._thread = threading.Thread(target=self._keep, name="tea-dist-run-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(self.every * 2 + 1)
        try:
            if LEAVING.is_set() and not self.lost:
                self.release()
        finally:
            with _DRIVING_LOCK:
                _DRIVING.discard(self)
                if _BY_RUN.get(self.run_id) is self:
                    del _BY_RUN[self.run_id]

    def _renew(self) -> None:
        keys = self._lease_keys(self.keys.run_cancelled(self.run_id), self.keys.events(self.run_id))
        owned, cancelled = _script(self.client, RENEW)(
            keys=keys, args=[self.token, self.lease_ms, self.run_id, self.retention]
        )
        if cancelled:
            self.cancel.cancel()
        if not owned:
            self.lost = True

    def _keep(self) -> None:
        while not self._done.wait(self.every) and not self.lost:
            try:
                self._renew()
            except redis.RedisError:  # a hiccup: the next renewal tries again
                continue

    def _call(self, source: str, keys: list[str], args: list[Any]) -> Any:
        script = partial(_script(self.client, source), keys=keys, args=args)
        return self.cluster.ride_out(script)


def claim(cluster: Cluster, run_id: str, queue: str, how: str) -> RunLease | None:
    """Take run ``run_id`` of runs queue ``queue``: ``how="start"`` a pending run (its first
    driver), ``"resume"`` a running one whose lease lapsed. None when it is not to be taken (it
    runs elsewhere, ended, was handed over too often, or is quarantined: the last two fail it)."""
    settings, client, keys = cluster.settings, cluster.client, cluster.keys
    args = [how, worker_id(), int(settings.heartbeat_ttl * 1000), run_id, MAX_HANDOVERS]
    times = "twice" if MAX_CRASHES == 2 else f"{MAX_CRASHES} times"
    quarantined = QUARANTINED.format(times=times, where="\0").split("\0")
    args += [repr(time.time()), MAX_CRASHES, *quarantined]
    run_keys = [keys.run(run_id), keys.run_owner(run_id), keys.runs_running(queue)]
    run_keys.append(keys.events(run_id))
    token, previous = _script(client, CLAIM)(keys=run_keys, args=args)
    if int(token) == -1:
        logger.error("run %s: its run worker stopped %d times; failed", run_id, MAX_HANDOVERS + 1)
    elif int(token) == -2:
        error = _text(client.hget(keys.run(run_id), "error") or "")
        logger.error("run %s failed, %s", run_id, error)
    if int(token) < 0:  # failed: its branches in flight stop (their caller's lease goes)
        client.delete(keys.run_lease(run_id))
    if int(token) <= 0:
        return None
    return RunLease(cluster, run_id, queue, int(token), _text(previous))


def cancel_unowned(client: Any, keys: Keys, run_id: str) -> bool:
    """A running run whose cancel was asked and that no process drives now (its driver
    stopped, no other took it over yet) ends ``cancelled`` here; its branches stop within a
    heartbeat period (their caller's lease goes). False otherwise: a driver sees the cancel."""
    run_keys = [
        keys.run(run_id),
        keys.run_owner(run_id),
        keys.run_cancelled(run_id),
        keys.run_lease(run_id),
    ]
    return bool(_script(client, CANCEL_UNOWNED)(keys=run_keys, args=[repr(time.time())]))


# -- the runs this process drives, and taking over the runs of others --

LEAVING = threading.Event()  # this worker shuts down: its drivers hand their runs over
_DRIVING: set[RunLease] = set()
_BY_RUN: dict[str, RunLease] = {}  # run id -> the lease this process drives it with
_DRIVING_LOCK = threading.Lock()


class _NodeWatch:
    """A listener of every run in this process: a node of a run it drives is about to start."""

    def on_node_start(self, run: FlowContext, node: str) -> None:
        lease = _BY_RUN.get(run.run_id)
        if lease is not None:
            lease.node_starts()


_WATCH = _NodeWatch()
add_listener(lambda: _WATCH)


class Adopter:
    """One thread per run worker process: takes over the runs of ``queues`` whose driver
    stopped, ``resume(lease)`` driving each on a thread of its own; on ``LEAVING``, hands over
    the runs this process drives."""

    def __init__(
        self, cluster: Cluster, queues: Sequence[str], resume: Callable[[RunLease], Any]
    ) -> None:
        self.cluster, self.queues, self.resume = cluster, list(queues), resume
        self.client, self.keys = cluster.client, cluster.keys
        self.every = cluster.settings.heartbeat_seconds
        self.thread = threading.Thread(target=self._loop, name="tea-dist-adopter", daemon=True)

    def start(self) -> Adopter:
        self.thread.start()
        return self

    def _loop(self) -> None:
        while not LEAVING.is_set():
            try:
                self.look()
            except redis.RedisError as exc:  # an outage: look again next time
                logger.warning("looking for runs to take over failed: %s", exc)
            LEAVING.wait(self.every)
        hand_over(LEAVE_GRACE)

    def look(self) -> list[RunLease]:
        """Claim and resume the runs whose lease lapsed; returns their leases."""
        taken: list[RunLease] = []
        for queue in self.queues:
            lapsed = _script(self.client, LAPSED)(
                keys=[self.keys.runs_running(queue)], args=[SCAN_BATCH]
            )
            for run_id in map(_text, lapsed):
                if LEAVING.is_set():
                    return taken
                lease = claim(self.cluster, run_id, queue, "resume")
                if lease is None:
                    continue
                logger.info("run %s: taken over from %s", run_id, lease.previous or "?")
                threading.Thread(
                    target=self.resume, args=(lease,), name="tea-dist-resumed", daemon=True
                ).start()
                taken.append(lease)
        return taken


def hand_over(grace: float) -> None:
    """This worker shuts down: every run it drives is released for another run worker. Drivers
    stop at their next check and release their own runs; a driver still busy in a node after
    ``grace`` seconds has its run released under it (the node may then run twice)."""
    LEAVING.set()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with _DRIVING_LOCK:
            if not _DRIVING:
                return
        time.sleep(0.05)
    with _DRIVING_LOCK:
        stuck = list(_DRIVING)
    for lease in stuck:
        try:
            if lease.release():
                logger.warning("run %s: released while its node still runs", lease.run_id)
        except Exception as exc:  # nothing may stop the others being released
            logger.warning("releasing run %s failed: %s", lease.run_id, exc)


_ADOPTER: Adopter | None = None


def start_adopter(
    cluster: Cluster, queues: Sequence[str], resume: Callable[[RunLease], Any]
) -> Adopter:
    """Start this process's adopter (once)."""
    global _ADOPTER
    if _ADOPTER is None:
        _ADOPTER = Adopter(cluster, queues, resume).start()
    return _ADOPTER


def stop_adopter(timeout: float) -> None:
    """The worker stops: hand the runs over and wait (up to ``timeout``) until that is done."""
    LEAVING.set()
    if _ADOPTER is not None:
        _ADOPTER.thread.join(timeout)
