"""The raw Celery app of ``bench/rawtasks.py`` plus a bootstep that refills the pool promptly.

A prefork worker replaces a killed child either at once (the child's sentinel fd wakes the
event loop) or only at the pool's periodic ``maintain_pool`` timer (every 5 s): measured here,
the next task starts 0.1-0.3 s or 1-5 s after a hard time limit or ``revoke(terminate=True)``.
``PromptRefill`` calls ``maintain_pool`` 0.15, 0.3 and 0.6 s after every task failure (a hard
time limit fires ``task_failure`` in the worker's main process) and every revoke, so the slot
is refilled within ~0.3 s every time. This is the fix ``bench/refill_probe.py`` measures; it is
a proposal for tea_dist's flow workers, not part of tea_dist.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps, signals

from bench.rawtasks import app

REFILL_DELAYS = (0.15, 0.3, 0.6)  # after billiard's TERM, 0.1 s wait, KILL


class PromptRefill(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool", "celery.worker.components:Hub"}

    def start(self, worker: Any) -> None:
        pool, hub = worker.pool, worker.hub
        if hub is None:  # not the event-loop (prefork) worker
            return

        def refill(*args: Any, **kwargs: Any) -> None:
            for delay in REFILL_DELAYS:
                hub.call_later(delay, pool.maintain_pool)

        signals.task_failure.connect(refill, weak=False)
        signals.task_revoked.connect(refill, weak=False)


app.steps["worker"].add(PromptRefill)
