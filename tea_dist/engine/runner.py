"""Running a compiled graph: ``CompiledGraph.invoke`` and ``stream``.

Both are generators of The Edge Agent's event dicts and share one walk, so the fan-in gets
the same ``parallel_results`` either way:

- ``{"type": "final", "state": {...}}`` when the run ends;
- ``{"type": "error", "node": n, "error": "...", "error_type": "...", "state": {...}}`` when
  it fails, with the last state reached (raised instead with ``raise_exceptions=True``);
- in ``stream`` only: ``{"type": "state", "node": n, "state": {...}}`` after each node, and for
  each branch of a fan-out ``{"type": "parallel_state", "branch": b, "node": b, "state": {...},
  "result": r}`` or ``{"type": "parallel_error", "branch": b, "node": b, "error": ...,
  "error_type": ..., "timeout": bool, "state": {...}, "result": r}`` (a branch is reported
  once, when it is done; ``node`` names the branch).

``get_circuit_states()`` maps each circuit's name to its ``CircuitState``;
``get_circuit_info()`` to The Edge Agent's description (``{"name", "state", "failure_count",
...}``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack
from typing import Any, Literal

from tea_dist.core.errors import (
    BranchError,
    BrokerError,
    ConfigError,
    GraphError,
    NodeError,
    NoWorkerError,
    TeaDistError,
)
from tea_dist.core.graph import END, FanOut, GraphSpec
from tea_dist.core.graph import Event as StreamEvent
from tea_dist.core.results import CircuitState, ParallelFlowResult
from tea_dist.core.strategies import check_strategy
from tea_dist.engine.interrupts import terminating_runs
from tea_dist.engine.nodes import CancelToken
from tea_dist.engine.runtime import Detached, Durable, Runtime, SharesStores, get_executor
from tea_dist.engine.walk import Cursor, FanOutRunner, Walk, walk
from tea_dist.observe.events import Dispatcher, Event, FlowContext
from tea_dist.policies.breaker import BreakerStore, MemoryBreakerStore
from tea_dist.policies.limits import PROCESS_LIMITS, LimitStore

FailedBranches = Literal["fan_in", "tea"]


def circuit_info(name: str, store: BreakerStore) -> dict[str, Any]:
    """One circuit as The Edge Agent describes it: ``{"name", "state", "failure_count",
    "opened_at", "half_open_active"}`` (``state`` is the ``CircuitState`` value, a str)."""
    snap = store.snapshot(name)
    return {
        "name": name,
        "state": snap.state.value,
        "failure_count": snap.failures,
        "opened_at": snap.opened_at,
        "half_open_active": snap.probes_in_flight,
    }


NO_NESTING = frozenset({"celery"})  # strategies whose branches cannot carry a nested fan-out


def check_nesting(spec: GraphSpec) -> None:
    """Refuse a fan-out nested in a branch on a strategy of ``NO_NESTING``: it would run on the
    worker under a run of its own, unheard by this run's callbacks and ``stream()``.

    A fan-out nested in a ``thread``, ``asyncio`` or ``inline`` branch runs in the caller; in a
    ``process`` branch, its events come back with the attempt (``engine.attempt.Relay``).
    """
    for source, fan in spec.fanouts.items():
        for branch, config in zip(fan.branches, fan.configs, strict=True):
            if config.strategy not in NO_NESTING:
                continue
            for node in spec.branch_nodes(branch, fan.fan_in)[0]:
                inner = spec.fanouts.get(node)
                if inner is None:
                    continue
                raise GraphError(
                    f"fan-out '{source}' -> '{fan.fan_in}' runs branch '{branch}' on the "
                    f"{config.strategy} strategy, and node '{node}' inside it fans out again "
                    f"(to {', '.join(repr(b) for b in inner.branches)} -> '{inner.fan_in}'): "
                    f"a fan-out nested in a {config.strategy} branch is not supported (it would "
                    "run on the worker unheard by this run's callbacks); run the outer fan-out "
                    "on thread, asyncio or process, or fan out from the main path"
                )


class CompiledGraph:
    """A validated graph, ready to ``invoke`` and ``stream`` any number of times."""

    def __init__(
        self,
        spec: GraphSpec,
        *,
        raise_exceptions: bool = False,
        callbacks: Iterable[Any] = (),
        callback_timeout: float = 5.0,
        breaker_store: BreakerStore | None = None,
        failed_branches: FailedBranches = "fan_in",
        cluster: object | None = None,
    ) -> None:
        if callback_timeout <= 0:
            raise TeaDistError(f"callback_timeout must be > 0, got {callback_timeout}")
        if failed_branches not in ("fan_in", "tea"):
            raise ConfigError(f"failed_branches must be 'fan_in' or 'tea', got {failed_branches!r}")
        self.spec = spec
        self.raise_exceptions = raise_exceptions
        self.failed_branches = failed_branches
        self.callbacks = list(callbacks)
        self.callback_timeout = callback_timeout
        self.cluster = cluster  # where celery branches go (a ``Cluster``; None: the default)
        strategies = {
            check_strategy(c.strategy) for fan in spec.fanouts.values() for c in fan.configs
        }
        check_nesting(spec)
        for fan in spec.fanouts.values():
            for strategy in {c.strategy for c in fan.configs}:
                get_executor(strategy).check(spec, fan)
        # an executor whose branches run elsewhere names the store they share (celery: Redis)
        self._store_owner = next(
            (e for s in sorted(strategies) if isinstance(e := get_executor(s), SharesStores)),
            None,
        )
        if self._store_owner is not None and breaker_store is not None:
            self._store_owner.check_breakers(spec.name, breaker_store)
        self._breakers = breaker_store

    @property
    def breakers(self) -> BreakerStore:
        """Where this graph's circuits live (Redis when it has celery branches)."""
        if self._breakers is None:
            owner = self._store_owner
            self._breakers = owner.shared_breakers(self.cluster) if owner else MemoryBreakerStore()
        return self._breakers

    def _limits(self) -> LimitStore:
        """Permits of graphs with celery branches live in Redis; else in this process."""
        owner = self._store_owner
        return owner.shared_limits(self.cluster) if owner else PROCESS_LIMITS

    @property
    def name(self) -> str:
        return self.spec.name

    def invoke(
        self,
        state: Mapping[str, Any],
        config: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        cancel_token: CancelToken | None = None,
        raise_exceptions: bool | None = None,
    ) -> Iterator[StreamEvent]:
        """Run the graph; yields the ``final`` event (or an ``error`` event).

        ``run_id`` names the run (events of celery branches go to its stream);
        ``cancel_token`` stops the run between nodes and cancels running branches;
        ``raise_exceptions`` overrides the graph's for this run (see ``StateGraph``).
        """
        return self._run(
            state,
            config,
            False,
            run_id=run_id,
            cancel_token=cancel_token,
            raise_exceptions=raise_exceptions,
        )

    def stream(
        self, state: Mapping[str, Any], config: Mapping[str, Any] | None = None, **options: Any
    ) -> Iterator[StreamEvent]:
        """Run the graph, yielding an event after every node and every branch (``options``:
        ``run_id``, ``cancel_token`` and ``raise_exceptions``, as for ``invoke``; ``durable``:
        a submitted run, driven
        by its owner, maybe resumed after a node with ``state`` the state after it, see
        ``tea_dist.distributed.durable``)."""
        return self._run(state, config, True, **options)

    def _run(
        self,
        state: Mapping[str, Any],
        config: Mapping[str, Any] | None,
        detailed: bool,
        run_id: str | None = None,
        cancel_token: CancelToken | None = None,
        durable: Durable | None = None,
        raise_exceptions: bool | None = None,
    ) -> Iterator[StreamEvent]:
        if raise_exceptions is None:
            raise_exceptions = self.raise_exceptions
        after = durable.after if durable is not None else ""
        if after and after not in self.spec.nodes:
            raise GraphError(
                f"cannot resume graph '{self.spec.name}' after node '{after}': no such node"
            )
        runtime = Runtime(
            graph_name=self.spec.name,
            dispatcher=Dispatcher(self.callbacks, self.callback_timeout),
            shared_breakers=self.breakers,
            run_id=run_id or uuid.uuid4().hex,
            cancel_token=CancelToken(parent=cancel_token),  # the run's own, cancelled at its end
            limits=self._limits,
            cluster=self.cluster,
        )
        if durable is not None:
            runtime.owner, runtime.steps = durable.owner, durable.steps
            runtime.resumed_steps = durable.steps if after else None
        run = FlowContext(branch="", graph_name=self.spec.name, run_id=runtime.run_id)
        runtime.emit(Event.INVOKE_START, run)
        cursor = _NodeCursor(runtime, run)
        final = dict(state)
        failed: list[ParallelFlowResult] = []  # "tea" rule in stream(): left out of the fan-in
        steps = walk(
            Walk(
                self.spec,
                after or self.spec.entry,
                END,
                final,
                fanout=self._fanout(runtime.fanout, detailed, failed),
                run_config=config,
                cancel_token=runtime.cancel_token,
                cursor=cursor,
                after=bool(after),
            )
        )
        interrupts = ExitStack()
        interrupts.enter_context(terminating_runs())
        try:
            for step in steps:
                cursor.ended()
                if step.results or failed:
                    if detailed:
                        yield from (_branch_event(r, step.state) for r in (*step.results, *failed))
                    failed.clear()
                else:
                    final = step.state
                    runtime.steps += 1
                    if detailed:
                        yield {"type": "state", "node": step.node, "state": step.state}
        except Detached:  # another process drives the run on: nothing ends here
            runtime.detach()
            raise
        except Exception as exc:
            cursor.ended(exc)
            runtime.emit(Event.INVOKE_END, run, exc)
            runtime.close()
            tea = self.failed_branches == "tea"
            node: str | None = exc.branch if tea and isinstance(exc, _FailedBranch) else cursor.node
            if isinstance(exc, BrokerError | NoWorkerError):
                node = None  # the infrastructure failed, not a node (the last one had ended)
            if raise_exceptions:
                if node is None:
                    raise
                if tea:
                    raise NodeError(f"Error in node '{node}': {exc}") from exc
                if isinstance(exc, TeaDistError):
                    raise
                raise NodeError(
                    f"node '{cursor.node}' failed: {type(exc).__name__}: {exc}"
                ) from exc
            yield _error_event(node, exc, final)
            return
        else:
            runtime.emit(Event.INVOKE_END, run, None)
        finally:  # also when the caller abandons or closes the generator, or Ctrl-C
            interrupts.close()
            runtime.cancel_token.cancel("cancelled: the caller went away")
            runtime.close()
        yield {"type": "final", "state": final}

    def _fanout(
        self, fanout: FanOutRunner, detailed: bool, failed: list[ParallelFlowResult]
    ) -> FanOutRunner:
        """The fan-out runner of one run, applying the ``"tea"`` rule for failed branches."""
        if self.failed_branches != "tea":
            return fanout

        def tea_fanout(
            spec: GraphSpec, fan: FanOut, state: dict[str, Any], run_config: Mapping[str, Any]
        ) -> list[ParallelFlowResult]:
            results = fanout(spec, fan, state, run_config)
            bad = [r for r in results if not r.success]
            if bad and not detailed:
                raise _FailedBranch(
                    bad[0].error or "failed", branch=bad[0].branch, error_type=bad[0].error_type
                )
            failed.extend(bad)
            return [r for r in results if r.success]

        return tea_fanout

    # -- circuits --

    def reset_circuit(self, name: str | None = None) -> None:
        """Close one circuit (by name, or by branch name), or every circuit when None."""
        names = (
            [name]
            if name is None or name in self.breakers.states()
            else [f"{self.spec.name}:{name}"]
        )
        dispatcher = Dispatcher(self.callbacks, self.callback_timeout)
        for circuit_name in names:
            for circuit, old, new in self.breakers.reset(circuit_name):
                dispatcher.emit(
                    Event.CIRCUIT_STATE_CHANGE, FlowContext(branch="", circuit=circuit), old, new
                )
        dispatcher.close()

    def get_circuit_states(self) -> dict[str, CircuitState]:
        """Every known circuit and its state."""
        return self.breakers.states()

    def get_circuit_info(self) -> dict[str, dict[str, Any]]:
        """Every known circuit described as The Edge Agent does (see ``circuit_info``)."""
        store = self.breakers
        return {name: circuit_info(name, store) for name in store.states()}


class _NodeCursor(Cursor):
    """The run's cursor, which times its nodes: the walk sets ``node`` just before it calls a
    node (``on_node_start``); the runner calls ``ended`` when the node's step comes back, or
    its error (``on_node_end``)."""

    runtime: Runtime
    run: FlowContext
    running: str

    def __init__(self, runtime: Runtime, run: FlowContext) -> None:
        self.__dict__.update(runtime=runtime, run=run, running="")
        super().__init__()

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "node" and value:
            self.__dict__["running"] = value
            self.runtime.emit(Event.NODE_START, self.run, value)

    def ended(self, error: BaseException | None = None) -> None:
        if self.running:
            node, self.__dict__["running"] = self.running, ""
            self.runtime.emit(Event.NODE_END, self.run, node, error)


class _FailedBranch(BranchError):
    """A failed branch ending the run under the ``"tea"`` rule (never leaves this module)."""


def _branch_event(result: ParallelFlowResult, state: dict[str, Any]) -> StreamEvent:
    if result.success:
        return {
            "type": "parallel_state",
            "branch": result.branch,
            "node": result.branch,
            "state": result.state,
            "result": result,
        }
    return {
        "type": "parallel_error",
        "branch": result.branch,
        "node": result.branch,
        "error": result.error,
        "error_type": result.error_type,
        "timeout": result.timeout,
        "state": result.state if result.state is not None else state,
        "result": result,
    }


def _error_event(node: str | None, exc: BaseException, state: dict[str, Any]) -> StreamEvent:
    error_type = exc.error_type if isinstance(exc, BranchError) else type(exc).__name__
    event: StreamEvent = {
        "type": "error",
        "node": node,
        "error": str(exc),
        "error_type": error_type,
        "state": state,
    }
    if isinstance(exc, BranchError):
        event["branch"] = exc.branch
    return event
