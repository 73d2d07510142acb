"""A message a worker cannot even decode is refused, and its caller is told at once.

Workers accept JSON only; a pickle message (or any other content type) is dropped by Celery
with a log line while its caller would wait for a result that never comes. ``Refusals``, a
bootstep of the worker's consumer, hooks Celery's handlers of undecodable and invalid task
messages: from the routing headers every branch message carries (``tea_run``, ``tea_fanout``,
``tea_index``, ``tea_branch``, or a batch's ``tea_items``; readable without decoding the body)
it publishes each branch's failed result on the run's stream, then lets Celery drop the
message as before.

It also wraps the consumer's strategies for tea_dist's branch tasks: a message whose raw body
is larger than ``TEA_DIST_MAX_STATE_BYTES`` allows is refused before anything decodes it
(neither kombu nor pydantic builds its state), reported the same way and acknowledged, so it
is never delivered again.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from celery import bootsteps

from tea_dist.core.errors import StateTooLargeError
from tea_dist.core.results import ParallelFlowResult
from tea_dist.distributed.connections import redis_for
from tea_dist.distributed.keys import Keys
from tea_dist.distributed.messages import BranchEvent
from tea_dist.engine.attempt import worker_id
from tea_dist.engine.lifecycle import AttemptState

logger = logging.getLogger("tea_dist.worker")


BRANCH_TASKS = ("tea_dist.run_flow", "tea_dist.run_batch")
ENVELOPE_BYTES = 64 * 1024  # a branch message besides its state and run config: graph, config


class Refusals(bootsteps.StartStopStep):  # type: ignore[misc]
    """Tell the caller of a branch message this worker refused to decode."""

    requires = {"celery.worker.consumer.tasks:Tasks"}  # its strategies exist when it starts

    def start(self, c: Any) -> None:
        """Check each branch message's size before its task's strategy sees it (again after
        a reconnection: the strategies are built anew)."""
        for name in BRANCH_TASKS:
            strategy = c.strategies.get(name)
            if strategy is not None and not getattr(strategy, "tea_sized", False):
                c.strategies[name] = _sized(c, strategy)

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


def size_limit(settings: Any, headers: dict[str, Any]) -> int:
    """The most bytes a worker reads of a branch message: per branch it names, the state
    and run config (``TEA_DIST_MAX_STATE_BYTES`` each, as callers check them) and the rest."""
    items = headers.get("tea_items")
    count = len(items) if isinstance(items, list) and items else 1
    return count * (2 * int(settings.max_state_bytes) + ENVELOPE_BYTES)


def _sized(c: Any, strategy: Any) -> Any:
    """``strategy``, refusing first a message over ``size_limit``."""

    def sized(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        settings = c.app.tea_settings
        headers = dict(message.headers or {})
        size, limit = len(message.body or b""), size_limit(settings, headers)
        if size <= limit:
            return strategy(message, body, ack, reject, callbacks, **kw)
        exc = StateTooLargeError(
            f"the branch message is {size} bytes, over the {limit} bytes a worker reads "
            f"(TEA_DIST_MAX_STATE_BYTES={settings.max_state_bytes} for a branch's state, as "
            f"much for its run config, plus {ENVELOPE_BYTES // 1024} KiB); not run"
        )
        with contextlib.suppress(Exception):  # telling is best effort; acknowledging is not
            tell_caller(settings, headers, exc)
        message.ack_log_error(logger, c.connection_errors)  # never delivered again
        return None

    sized.tea_sized = True  # type: ignore[attr-defined]
    return sized


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
