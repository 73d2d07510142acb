"""A message a worker cannot even decode is refused, and its caller is told at once.

Workers accept JSON only; a pickle message (or any other content type) is dropped by Celery
with a log line while its caller would wait for a result that never comes. ``Refusals``, a
bootstep of the worker's consumer, hooks Celery's handlers of undecodable and invalid task
messages: from the routing headers every branch message carries (``tea_run``, ``tea_fanout``,
``tea_index``, ``tea_branch``, or a batch's ``tea_items``; readable without decoding the body)
it publishes each branch's failed result on the run's stream, then lets Celery drop the
message as before.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import bootsteps

from tea_dist.core.results import ParallelFlowResult
from tea_dist.distributed.connections import redis_for
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.messages import BranchEvent
from tea_dist.engine.attempt import worker_id
from tea_dist.engine.lifecycle import AttemptState

logger = logging.getLogger("tea_dist.worker")


class Refusals(bootsteps.StartStopStep):  # type: ignore[misc]
    """Tell the caller of a branch message this worker refused to decode."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        undecodable, invalid = c.on_decode_error, c.on_invalid_task

        def tell(message: Any, exc: Exception) -> None:
            with contextlib.suppress(Exception):  # telling is best effort; dropping is not
                tell_caller(c.app.tea_settings, dict(message.headers or {}), exc)

        def on_decode_error(message: Any, exc: Exception) -> None:
            tell(message, exc)
            undecodable(message, exc)

        def on_invalid_task(body: Any, message: Any, exc: Exception) -> None:
            tell(message, exc)  # e.g. ContentDisallowed: a pickle body
            invalid(body, message, exc)

        c.on_decode_error, c.on_invalid_task = on_decode_error, on_invalid_task


def tell_caller(settings: Any, headers: dict[str, Any], exc: Exception) -> None:
    """Publish a failed result for each branch the ``headers`` name (a batch's ``tea_items``;
    nothing if they name none)."""
    run, fanout = headers.get("tea_run"), headers.get("tea_fanout")
    if not run or not fanout:
        return
    task_id = str(headers.get("id") or "")
    items = headers.get("tea_items") or [
        [headers.get("tea_index") or 0, headers.get("tea_branch") or "", task_id]
    ]
    now = time.time()
    stream = Keys(settings.key_prefix).events(str(run))
    pipe = redis_for(settings.redis).pipeline(transaction=False)
    for index, branch, item in items:
        result = ParallelFlowResult(
            branch=str(branch),
            success=False,
            error_type=type(exc).__name__,
            error=f"the worker refused the branch message: {exc}",
            start_time=now,
            end_time=now,
            worker=worker_id(),
        )
        event = BranchEvent(
            event="on_flow_complete",
            fanout=str(fanout),
            index=int(index),
            branch=str(branch),
            task_id=str(item),
            worker=worker_id(),
            attempt=AttemptState(branch=str(branch), dispatched_at=now),
            batch=task_id if headers.get("tea_items") else "",
            result=result,
        )
        pipe.xadd(stream, {"e": event.model_dump_json()})
    pipe.expire(stream, int(settings.run_expires))
    pipe.execute()
    logger.warning("refused a branch message of run %s: %s", run, exc)
