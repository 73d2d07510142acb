"""tea_dist's Celery configuration: an app of its own built from ``Settings``, JSON only.

``make_app(settings)`` builds the app a ``Cluster`` owns; ``add_steps`` adds tea_dist's worker
steps to any app (a user's own, ``Cluster(app=...)``). There is no process-wide app: a worker
loads ``tea_dist.distributed.worker_app``, which builds one from the environment. Building an
app makes no connection. Worker-side policy: late acknowledgement and reject-on-worker-lost
(a branch whose worker dies is delivered again), prefetch 1 (a long branch never holds short ones
back), no pickle anywhere. Celery task events cost a message per task state, so they are off
unless ``TEA_DIST_TASK_EVENTS`` is set: Flower turns them on in every worker when it attaches
(it broadcasts ``enable_events``), and the driver learns when an attempt starts from the branch
task's own lifecycle events, so ``task_track_started`` is not needed either.
"""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery, bootsteps, signals
from celery.concurrency.prefork import TaskPool as PreforkPool

from tea_dist.distributed.presence import Presence
from tea_dist.distributed.refusals import Refusals
from tea_dist.distributed.settings import VISIBILITY_SCHEMES, Settings

REFILL_DELAYS = (0.15, 0.3, 0.6)  # billiard sends TERM, waits 0.1 s, then KILL


class PromptRefill(bootsteps.StartStopStep):  # type: ignore[misc]
    """Refill a prefork slot right after a kill, not at the pool's next 5-second check.

    A child killed at its hard time limit or by ``revoke(terminate=True)`` is replaced either
    at once or only when the pool's periodic ``maintain_pool`` runs: measured, the next branch
    started 1-5 s later about half the time. Calling ``maintain_pool`` shortly after every
    failure and revoke brings that to ~0.3 s every time (``bench/refill_probe.py``).
    """

    requires = {"celery.worker.components:Pool", "celery.worker.components:Hub"}

    def start(self, worker: Any) -> None:
        pool, hub = worker.pool, worker.hub
        if hub is None or not isinstance(pool, PreforkPool):  # threads, solo: nothing to refill
            return

        def refill(*args: Any, **kwargs: Any) -> None:
            for delay in REFILL_DELAYS:
                hub.call_later(delay, pool.maintain_pool)

        signals.task_failure.connect(refill, weak=False)
        signals.task_revoked.connect(refill, weak=False)


# Celery imports these when a worker starts (``include``), so this module imports no task.
TASK_MODULES = ["tea_dist.distributed.tasks", "tea_dist.distributed.apps"]


def celery_config(settings: Settings) -> dict[str, object]:
    """Celery configuration for ``settings``.

    The result backend is the Redis URL unless one is named (never an AMQP broker's URL:
    Celery has no ``amqp`` result backend); tea_dist's tasks ignore their results, except a
    submitted run's status string. Without a Redis URL there is none, and the first use of
    Redis fails with ``ConfigError``, not the import of this module."""
    return {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_send_sent_event": settings.task_events,
        "worker_send_task_events": settings.task_events,
        "result_expires": int(settings.result_expires),
        "result_extended": False,
        # a Redis (or SQS) broker's: other transports take no visibility timeout
        "broker_transport_options": (
            {"visibility_timeout": settings.visibility_timeout}
            if settings.broker.strip().lower().startswith(VISIBILITY_SCHEMES)
            else {}
        ),
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": settings.flows_queue,
        "task_routes": {
            "tea_dist.run_flow": {"queue": settings.flows_queue},
            "tea_dist.run_workflow": {"queue": settings.runs_queue},
        },
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


def make_app(settings: Settings) -> Celery:
    """A Celery app of tea_dist's own, configured from ``settings`` (makes no connection)."""
    celery = Celery("tea_dist", set_as_current=False, include=TASK_MODULES)
    celery.conf.update(celery_config(settings))
    add_steps(celery)
    return celery


def add_steps(celery: Celery) -> None:
    """tea_dist's worker steps: prompt refill of killed slots, presence, refused messages."""
    celery.steps["worker"].add(PromptRefill)
    celery.steps["consumer"].add(Presence)
    celery.steps["consumer"].add(Refusals)


def __getattr__(name: str) -> Any:
    """``celery -A tea_dist.distributed.celery_app`` (the entry point of earlier releases):
    the worker app of ``tea_dist.distributed.worker_app``, built from the environment."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module("tea_dist.distributed.worker_app").app
