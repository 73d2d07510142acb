"""The ``process`` strategy: branches run in worker processes that can really be stopped.

``concurrent.futures.ProcessPoolExecutor`` cannot kill one task, so this module keeps its own
small pool of long-lived worker processes (start method ``forkserver`` where available, else
``spawn``; never ``fork``, the caller is multithreaded). Each worker runs one ``BranchTask``
at a time, received pickled over a pipe, through the shared ``run_attempt`` and sends back the
``AttemptOutcome``; a thread per worker resolves the attempt's future. Then:

- a timed-out or fail-fast-cancelled attempt has its worker killed (SIGKILL); a fresh worker
  replaces it on the next start, so a node that ignores cancellation can neither outlive its
  timeout nor write anything after it;
- a worker that dies mid-attempt (``os._exit``, a segfault, the OOM killer) gives that attempt
  a failed outcome (``WorkerCrashedError``, naming the exit code or signal), never a hung run;
- every task is pickled before anything starts, with cloudpickle: lambdas and closures travel
  by value, as with Ray, Dask or loky (the workers are the caller's own children, in its trust
  domain); a state value that still cannot cross (a lock, a socket, an open file) raises
  ``SerializationError`` naming the key and the branch, and ``compile()`` refuses a branch
  whose node or condition callables cannot be pickled, naming the node. (The ``celery``
  strategy keeps refusing lambdas and closures: its workers import code, never receive it.)

Only the nodes a branch can reach travel with it (``GraphSpec.branch_part``), so lambdas
elsewhere in the graph do not matter. A nested fan-out inside a branch runs in the worker
under the caller's run id; its events come back with the attempt and reach the caller's
callbacks (``engine.attempt.Relay``).
Workers are reused across invocations; idle ones stay (up to the largest ``max_workers`` seen)
and all are killed at interpreter exit. As with ``multiprocessing``, a script using this
strategy needs the ``if __name__ == "__main__":`` guard (workers import the main module, so
node functions defined there work).

Public helpers: ``dump_task`` (the pickle pre-check), ``check_branch`` (the compile-time
check); ``WorkerPool`` and ``ProcessExecutor.shutdown`` for tests and tools.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, cast

import cloudpickle

from tea_dist.core.config import ParallelConfig, exception_names
from tea_dist.core.errors import ConfigError, GraphError, SerializationError
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, ErrorInfo, run_attempt
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.supervisor import supervise

if TYPE_CHECKING:
    from multiprocessing.context import ForkServerContext, SpawnContext

    Context = SpawnContext | ForkServerContext

    from tea_dist.engine.runtime import Runtime

logger = logging.getLogger("tea_dist.executors.process")

CRASH_ERROR = "WorkerCrashedError"


@functools.cache
def default_workers() -> int:
    """Workers per fan-out when ``max_workers`` is not set: the CPU count."""
    return os.cpu_count() or 1


# -- what travels: the branch's part of the graph, pickled once per fan-out --


def _dumps(value: Any) -> bytes:
    """``value`` pickled: by the standard pickler when it can (module-level code, by
    reference, three times faster), else by cloudpickle (lambdas and closures, by value)."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, AttributeError, TypeError):
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


def _pickle_error(value: Any) -> str | None:
    """Why ``value`` cannot be pickled, or None when it can."""
    try:
        _dumps(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _callables(spec: GraphSpec) -> list[tuple[str, Callable[..., Any] | None]]:
    """(description, callable) of every node and condition of ``spec``."""
    found: list[tuple[str, Callable[..., Any] | None]] = [
        (f"node '{name}'", node.run) for name, node in spec.nodes.items()
    ]
    found += [
        (f"the condition after node '{name}'", c.func) for name, c in spec.conditionals.items()
    ]
    return found


def check_branch(spec: GraphSpec, branch: str, fan_in: str) -> None:
    """Raise ``GraphError`` naming the node when a branch's graph cannot be pickled."""
    part = spec.branch_part(branch, fan_in)
    for what, fn in _callables(part):
        error = _pickle_error(fn)
        if error is not None:
            raise GraphError(
                f"{what} of branch '{branch}' cannot run with the process strategy: its callable "
                f"{fn!r} cannot be pickled ({error}); use a module-level function or a "
                "closure over picklable values"
            )
    error = _pickle_error(part)
    if error is not None:
        raise GraphError(f"branch '{branch}' cannot be pickled for the process strategy: {error}")


def dump_task(task: BranchTask) -> bytes:
    """The pickled task a worker runs; ``SerializationError`` naming the culprit otherwise.

    This is the pre-check: ``execute`` dumps every task before any branch starts.
    """
    task = replace(task, spec=task.spec.branch_part(task.start, task.fan_in))
    try:
        return _dumps(task)
    except Exception as exc:
        raise SerializationError(_culprit(task, exc)) from exc


def _culprit(task: BranchTask, exc: Exception) -> str:
    places: list[tuple[str, Any]] = [(f"state key '{k}'", v) for k, v in task.state.items()]
    places += [(f"config key '{k}'", v) for k, v in task.run_config.items()]
    places += _callables(task.spec)
    for what, value in places:
        error = _pickle_error(value)
        if error is not None:
            return (
                f"{what} of branch '{task.branch}' cannot be pickled for the process strategy: "
                f"{error}"
            )
    error = f"{type(exc).__name__}: {exc}"
    return f"branch '{task.branch}' cannot be pickled for the process strategy: {error}"


BEGAN = b"\x00began"  # a worker process's word that it begins the attempt it was sent
Job = tuple[bytes, str, "Future[AttemptOutcome]", Callable[[float], None]]


# -- the worker process --


def _failure(
    started: float, type_name: str, message: str, names: Sequence[str] = ()
) -> AttemptOutcome:
    error = ErrorInfo(type_name, message, names=tuple(names) or (type_name,))
    return AttemptOutcome(False, None, started, time.time(), error=error)


def _run_payload(data: bytes, began: Callable[[], None] = lambda: None) -> bytes:
    """Run one pickled task in this (worker) process; the pickled outcome. ``began`` is
    called when the attempt begins (its code imported and its task unpickled)."""
    from tea_dist.engine.runtime import Runtime  # the worker's own runtime, for nested fan-outs

    started = time.time()
    serialization = exception_names(SerializationError)
    try:
        task: BranchTask = pickle.loads(data)
    except Exception as exc:
        message = f"the branch could not be unpickled in the worker: {type(exc).__name__}: {exc}"
        return pickle.dumps(_failure(started, "SerializationError", message, serialization))
    began()
    outcome = run_attempt(task, Runtime(graph_name=task.spec.name).fanout, CancelToken())
    try:
        return pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        state = outcome.state or {}
        bad = [k for k, v in state.items() if _pickle_error(v) is not None]
        what = f"state key '{bad[0]}'" if bad else "the outcome"
        message = (
            f"{what} of branch '{task.branch}' cannot be pickled back from the worker: "
            f"{type(exc).__name__}: {exc}"
        )
        return pickle.dumps(_failure(started, "SerializationError", message, serialization))


def _worker_main(conn: Connection) -> None:
    """A worker process: run tasks until the parent hangs up (or sends an empty message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if not data:
            return
        conn.send_bytes(_run_payload(data, functools.partial(conn.send_bytes, BEGAN)))


# -- the parent side --


def _resolve(future: Future[AttemptOutcome], outcome: AttemptOutcome) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled or resolved: nobody waits
        future.set_result(outcome)


class _Worker:
    """One worker process and the daemon thread that feeds it and reads its answers."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        parent, child = pool.context.Pipe()
        self.process = pool.context.Process(
            target=_worker_main, args=(child,), name="tea-dist-process-worker"
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.jobs: queue.SimpleQueue[Job | None]
        self.jobs = queue.SimpleQueue()
        self.future: Future[AttemptOutcome] | None = None  # the attempt running (pool lock)
        self.killed = False
        name = f"tea-dist-process-{self.process.pid}"
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            payload, branch, future, began = job
            outcome = self._exchange(payload, began)
            if outcome is None:
                self.pool.discard(self)
                _resolve(future, self._crashed(branch))
                break
            self.pool.release(self)
            _resolve(future, outcome)
        else:
            with contextlib.suppress(OSError):
                self.conn.send_bytes(b"")  # retire: the worker exits on its own
        self.conn.close()
        self.process.join(timeout=5)

    def _exchange(self, payload: bytes, began: Callable[[float], None]) -> AttemptOutcome | None:
        """Send a task and wait for its outcome (telling ``began`` when the process begins
        the attempt); None when the process died meanwhile."""
        started = time.time()
        try:
            self.conn.send_bytes(payload)
            while True:
                if self.conn not in wait([self.conn, self.process.sentinel]):
                    return None
                data = self.conn.recv_bytes()
                if data != BEGAN:
                    break
                began(time.monotonic())
        except (EOFError, OSError):
            return None
        try:
            outcome: AttemptOutcome = pickle.loads(data)
        except Exception as exc:
            message = f"the outcome could not be unpickled: {type(exc).__name__}: {exc}"
            names = exception_names(SerializationError)
            return _failure(started, "SerializationError", message, names)
        return outcome

    def _crashed(self, branch: str) -> AttemptOutcome:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if self.killed:
            how = "was killed (timeout or fail-fast)"
        elif code is not None and code < 0:
            number = -code
            name = signal.Signals(number).name if number in signal.valid_signals() else number
            how = f"died (killed by signal {name})"
        else:
            how = f"died (exit code {code})"
        message = f"worker process {self.pid} running branch '{branch}' {how}"
        if not self.killed:
            logger.warning("%s", message)
        return _failure(time.time(), CRASH_ERROR, message)

    def kill(self) -> None:
        """SIGKILL the process; the serving thread then reports the attempt and exits."""
        with contextlib.suppress(OSError, ValueError):  # already gone, or already closed
            self.process.kill()


class WorkerPool:
    """Long-lived worker processes, each running one attempt at a time.

    ``submit`` takes an idle worker or starts one; ``kill`` stops the worker of one attempt.
    Idle workers are kept up to ``keep`` (the largest reservation seen) and reused.
    """

    def __init__(self, context: Context) -> None:
        self.context = context
        self.keep = 0
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._busy: dict[Future[AttemptOutcome], _Worker] = {}
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """Pids of the live workers, idle and busy."""
        with self._lock:
            workers = [*self._idle, *self._busy.values()]
        return [w.pid for w in workers if w.pid is not None and w.process.is_alive()]

    def reserve(self, count: int) -> None:
        """Keep at least ``count`` workers idle from now on; start the missing ones now."""
        with self._lock:
            self.keep = max(self.keep, count)
            missing = count - len(self._idle)
        started = [_Worker(self) for _ in range(max(0, missing))]
        for worker in started:
            self.release(worker)

    def submit(
        self, payload: bytes, branch: str, began: Callable[[float], None] = lambda at: None
    ) -> Future[AttemptOutcome]:
        """Run a pickled task on a worker; the future resolves to its outcome, never raises.
        ``began(monotonic)`` is called once the worker process begins the attempt."""
        future: Future[AttemptOutcome] = Future()
        future.set_running_or_notify_cancel()
        with self._lock:
            worker = None
            while self._idle and worker is None:
                candidate = self._idle.pop()
                if candidate.process.is_alive():
                    worker = candidate
                else:
                    candidate.jobs.put(None)
        if worker is None:
            worker = _Worker(self)
        with self._lock:
            worker.future = future
            self._busy[future] = worker
        worker.jobs.put((payload, branch, future, began))
        return future

    def kill(self, future: Future[AttemptOutcome]) -> None:
        """Kill the worker running ``future``'s attempt (if it still is); it is not reused."""
        with self._lock:
            worker = self._busy.pop(future, None)
            if worker is not None:
                worker.killed = True
        if worker is not None:
            logger.info("killing worker process %s (timeout or fail-fast)", worker.pid)
            worker.kill()

    def release(self, worker: _Worker) -> None:
        """A worker finished its attempt: back to the idle list, or retired."""
        with self._lock:
            if worker.future is not None:
                self._busy.pop(worker.future, None)
            worker.future = None
            if not (self._closed or worker.killed) and len(self._idle) < self.keep:
                self._idle.append(worker)
                return
        worker.jobs.put(None)

    def discard(self, worker: _Worker) -> None:
        """Forget a worker whose process died."""
        with self._lock:
            if worker.future is not None:
                self._busy.pop(worker.future, None)
            if worker in self._idle:
                self._idle.remove(worker)

    def shutdown(self) -> None:
        """Kill every worker (used at interpreter exit); the pool takes no more work."""
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy.values()]
            self._idle.clear()
            self._busy.clear()
        for worker in workers:
            worker.killed = True
            worker.kill()
            worker.jobs.put(None)  # an idle worker's thread exits too
        for worker in workers:
            worker.process.join(timeout=1)


def _context(start_method: str | None) -> Context:
    methods = multiprocessing.get_all_start_methods()
    method = start_method or ("forkserver" if "forkserver" in methods else "spawn")
    if method not in ("forkserver", "spawn"):
        raise ConfigError(
            f"the process strategy needs the 'forkserver' or 'spawn' start method, not {method!r}"
            " (the caller is multithreaded: 'fork' could deadlock)"
        )
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Workers fork from a server that already imported tea_dist and the main module.
        context.set_forkserver_preload(["__main__", __name__])
    return cast("Context", context)


@dataclass
class _Session:
    """The ``Backend`` of one ``execute``: the pool plus the fan-out's pickled tasks."""

    pool: WorkerPool
    payloads: dict[int, bytes]

    reports_start = True  # a worker process may still be starting: timed from its word

    def start(
        self,
        task: BranchTask,
        token: CancelToken,
        runtime: Runtime,
        began: Callable[[float], None],
    ) -> Future[AttemptOutcome]:
        return self.pool.submit(self.payloads[id(task)], task.branch, began)

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
        self.pool.kill(future)


class ProcessExecutor:
    """Branches in worker processes, supervised by the shared local supervisor."""

    def __init__(self, start_method: str | None = None) -> None:
        self.start_method = start_method
        self._pool: WorkerPool | None = None
        self._lock = threading.Lock()

    @property
    def pool(self) -> WorkerPool:
        """The worker pool, created on first use and shut down at interpreter exit."""
        with self._lock:
            if self._pool is None:
                self._pool = WorkerPool(_context(self.start_method))
                atexit.register(self._pool.shutdown)
            return self._pool

    def shutdown(self) -> None:
        """Kill every worker now; a later ``execute`` starts a new pool."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            atexit.unregister(pool.shutdown)
            pool.shutdown()

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Refuse branches on this strategy whose nodes or conditions cannot be pickled."""
        from tea_dist.core.strategies import get_executor

        for branch, config in zip(fanout.branches, fanout.configs, strict=True):
            if get_executor(config.strategy) is self:
                check_branch(spec, branch, fanout.fan_in)

    def execute(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> list[ParallelFlowResult]:
        """Pickle every task (raising before anything starts), then run them on the pool."""
        payloads = {id(task): dump_task(task) for task in tasks}
        slots = max((c.max_workers or default_workers() for c in configs), default=1)
        pool = self.pool
        pool.reserve(min(slots, len(tasks)))
        return supervise(tasks, configs, runtime, _Session(pool, payloads), slots)
