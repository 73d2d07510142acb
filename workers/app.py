"""Entry point for ``celery -A workers.app worker``: the tea_dist app with its tasks.

Configured from the environment (``TEA_DIST_BROKER_URL``, ``TEA_DIST_RESULT_BACKEND``,
``TEA_DIST_REDIS_URL``, ``TEA_DIST_FLOWS_QUEUE``, ...). ``tea-dist worker`` is the same worker
with tea_dist's defaults (queue, pool, events) already applied.
"""

from tea_dist.distributed.worker_app import app

__all__ = ["app"]
