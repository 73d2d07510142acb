"""The ``asyncio`` strategy: branches are tasks on one shared event loop.

The loop runs in a daemon thread of its own, started on first use and shared by every
invocation. Each attempt is ``arun_attempt`` scheduled with ``run_coroutine_threadsafe``, so
``async def`` nodes are awaited on the loop while sync nodes run off it, on daemon threads
(``asyncio.to_thread`` through the loop's default executor). At most ``max_workers`` attempts
of a fan-out run at once (default: all its branches); the shared supervisor's slots are that
bound, so no semaphore is needed on top of them.

A timed-out or fail-fast-cancelled attempt has its ``cancel_token`` set and its task
cancelled: an ``async def`` node gets ``CancelledError`` at its current ``await`` (its
``finally`` blocks run). A sync node cannot be interrupted: it keeps its thread until it
returns (or checks ``cancel_token``), but ``invoke()`` does not wait for it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import ConfigError
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, arun_attempt
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.supervisor import supervise
from tea_dist.executors.thread import DaemonPool

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime


class _DaemonThreads(ThreadPoolExecutor):
    """The loop's default executor (sync nodes): daemon threads from a ``DaemonPool``.

    ``ThreadPoolExecutor``'s own threads are joined at interpreter exit, so one sync node that
    ignored its timeout would hang the exit; daemon threads do not.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1)  # required by set_default_executor; never starts threads
        self._daemons = DaemonPool(name="tea-dist-asyncio-sync")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._daemons.submit(functools.partial(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Nothing to join: the daemon threads end with their work or with the process."""


class AsyncioExecutor:
    """Branches as tasks on one event loop, supervised by the shared local supervisor."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The shared event loop, started (in a daemon thread) on first use."""
        with self._lock:
            if self._loop is None or self._thread is None or not self._thread.is_alive():
                loop = asyncio.new_event_loop()
                loop.set_default_executor(_DaemonThreads())
                thread = threading.Thread(
                    target=loop.run_forever, name="tea-dist-asyncio", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """The event loop runs any graph (sync nodes run on threads)."""

    def execute(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> list[ParallelFlowResult]:
        """Run every task on the loop; at most ``max_workers`` (default: all) at once."""
        if self._thread is not None and threading.current_thread() is self._thread:
            raise ConfigError(
                "an asyncio-strategy fan-out was started from inside the strategy's own event "
                "loop (an async node blocking on invoke()); run it from a sync node or through "
                "asyncio.to_thread"
            )
        slots = max((c.max_workers or len(tasks) for c in configs), default=1)
        return supervise(tasks, configs, runtime, self, slots)

    # -- Backend --

    reports_start = False  # an attempt begins when it is started

    def start(
        self,
        task: BranchTask,
        token: CancelToken,
        runtime: Runtime,
        began: Callable[[float], None],
    ) -> Future[AttemptOutcome]:
        return asyncio.run_coroutine_threadsafe(
            arun_attempt(task, runtime.fanout, token), self.loop
        )

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
        future.cancel()  # cancels the task on the loop
