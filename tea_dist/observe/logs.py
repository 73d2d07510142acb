"""The logging listener: one log record per lifecycle event, naming its run and branch.

Installed on every ``Dispatcher`` (``tea_dist`` adds it with ``add_listener`` when imported),
on the caller and on workers alike.
Records go to the ``tea_dist.events`` logger and carry ``event``, ``run_id``, ``branch``,
``attempt`` and ``circuit`` as attributes, for handlers and formatters that correlate a run's
events. They never carry branch state, inputs or results: only names, outcomes and timing.
"""

from __future__ import annotations

import logging

from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.observe.events import FlowContext, Listener

logger = logging.getLogger("tea_dist.events")


def _extra(event: str, ctx: FlowContext) -> dict[str, object]:
    return {
        "event": event,
        "run_id": ctx.run_id,
        "branch": ctx.branch,
        "attempt": ctx.attempt,
        "circuit": ctx.circuit,
    }


def _where(ctx: FlowContext) -> str:
    return f"run {ctx.run_id} branch {ctx.branch}" if ctx.run_id else f"branch {ctx.branch}"


def _error_name(error: BaseException) -> str:
    """The user-facing type name: the original one for errors carried across processes."""
    return getattr(error, "error_type", None) or type(error).__name__


class LogListener(Listener):
    """Logs each callback event at a level that says how much it matters."""

    def on_flow_start(self, ctx: FlowContext) -> None:
        if logger.isEnabledFor(logging.DEBUG):  # the common case: build nothing for nobody
            logger.debug("%s: on_flow_start", _where(ctx), extra=_extra("on_flow_start", ctx))

    def on_flow_error(self, ctx: FlowContext, error: BaseException, attempt: int) -> None:
        logger.info(
            "%s: attempt %d failed (%s: %s)",
            _where(ctx),
            attempt,
            _error_name(error),
            error,
            extra=_extra("on_flow_error", ctx),
        )

    def on_flow_retry(
        self, ctx: FlowContext, attempt: int, delay: float, error: BaseException | None
    ) -> None:
        logger.warning(
            "%s: attempt %d failed (%s: %s); retry %d in %.3fs",
            _where(ctx),
            attempt,
            _error_name(error) if error else "Error",
            error,
            attempt,
            delay,
            extra=_extra("on_flow_retry", ctx),
        )

    def on_flow_timeout(self, ctx: FlowContext, seconds: float | None) -> None:
        logger.warning(
            "%s: timed out after %ss", _where(ctx), seconds, extra=_extra("on_flow_timeout", ctx)
        )

    def on_circuit_state_change(
        self, ctx: FlowContext, old: CircuitState, new: CircuitState
    ) -> None:
        by = f" ({_where(ctx)})" if ctx.branch else ""  # a reset names no branch
        logger.warning(
            "circuit %s%s: %s -> %s",
            ctx.circuit,
            by,
            old,
            new,
            extra=_extra("on_circuit_state_change", ctx),
        )

    def on_flow_complete(self, ctx: FlowContext, result: ParallelFlowResult) -> None:
        if not logger.isEnabledFor(logging.DEBUG):
            return
        outcome = "succeeded" if result.success else f"failed ({result.error_type})"
        logger.debug(
            "%s: %s in %.1f ms",
            _where(ctx),
            outcome,
            result.timing_ms,
            extra=_extra("on_flow_complete", ctx),
        )
