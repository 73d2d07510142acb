"""The ``inline`` strategy: branches run one after another in the caller's thread.

A test double for users' unit tests and for debugging (a breakpoint in a node just works):
the same supervisor, policies and events as the other strategies, but each attempt runs to
completion inside ``start()``, so a timeout is noticed only after the attempt returns and
cannot stop it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING

from tea_dist.core.config import ParallelConfig
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import ParallelFlowResult
from tea_dist.engine.attempt import AttemptOutcome, BranchTask, run_attempt
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.supervisor import supervise

if TYPE_CHECKING:
    from tea_dist.engine.runtime import Runtime


class InlineExecutor:
    """Branches in the caller's thread, in declaration order."""

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Runs any graph."""

    def execute(
        self, tasks: Sequence[BranchTask], configs: Sequence[ParallelConfig], runtime: Runtime
    ) -> list[ParallelFlowResult]:
        return supervise(tasks, configs, runtime, self, slots=1)

    reports_start = False  # an attempt begins when it is started

    def start(
        self,
        task: BranchTask,
        token: CancelToken,
        runtime: Runtime,
        began: Callable[[float], None],
    ) -> Future[AttemptOutcome]:
        future: Future[AttemptOutcome] = Future()
        future.set_result(run_attempt(task, runtime.fanout, token))
        return future

    def stop(self, future: Future[AttemptOutcome], token: CancelToken) -> None:
        token.cancel()
