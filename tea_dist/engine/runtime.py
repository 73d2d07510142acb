"""What one invocation shares with its executors: events, circuits, and the fan-out entry.

A ``Runtime`` is made per ``invoke()``/``stream()``. Executors ask it to ``admit`` a branch
through its circuit breaker and to ``record`` outcomes (transitions become events), and
``emit`` lifecycle events through it. ``fanout`` is where the walker hands over a fan-out:
it builds one ``BranchTask`` per branch, runs them on their strategies' executors and, under
``fail_fast``, turns the first failure into a ``BranchError``.

In a process running a branch attempt for another (the ``process`` strategy's workers), the
runtime of the attempt's nested fan-outs takes the caller's run id and relays their events
back with the attempt's outcome (``tea_dist.engine.attempt.Relay``).

A durable run (``submit()``) has an ``owner``, its process's hold on the run: its fan-outs are
named ``{run_id}.{steps}`` (``steps``: main-path nodes done before the fan-out), so that the
process that takes the run over finds the branches its predecessor sent, and an executor that
writes for the run checks it still owns it (``Detached`` when not).

``ParallelExecutor`` is what a strategy's executor is (the protocol the built-in ones and
``register_executor``'s classes follow); ``get_executor(name)`` gives the shared instance of a
strategy registered by name (``tea_dist.core.strategies``). An executor whose branches run in
other processes also ``SharesStores``.
"""

from __future__ import annotations

import contextvars
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast, runtime_checkable

from tea_dist.core import strategies
from tea_dist.core.config import ParallelConfig
from tea_dist.core.errors import (
    BranchError,
    BranchTimeoutError,
    CircuitOpenError,
    GraphRecursionError,
    TeaDistError,
)
from tea_dist.core.graph import FanOut, GraphSpec
from tea_dist.core.results import CircuitState, Outcome, ParallelFlowResult
from tea_dist.engine.attempt import RELAY, BranchTask
from tea_dist.engine.lifecycle import stops_siblings
from tea_dist.engine.nodes import CancelToken
from tea_dist.observe.events import Dispatcher, Event, FlowContext
from tea_dist.policies.breaker import Admission, BreakerStore, MemoryBreakerStore
from tea_dist.policies.limits import PROCESS_LIMITS, LimitStore


@runtime_checkable
class ParallelExecutor(Protocol):
    """Runs the branches of one fan-out and returns one result per branch, in order."""

    def check(self, spec: GraphSpec, fanout: FanOut) -> None:
        """Refuse, at compile time, a graph this strategy cannot run (raise ``GraphError``)."""
        ...

    def execute(
        self,
        tasks: Sequence[BranchTask],
        configs: Sequence[ParallelConfig],
        runtime: Runtime,
    ) -> list[ParallelFlowResult]:
        """Run every task (honouring its config) and return results in task order."""
        ...


@runtime_checkable
class SharesStores(Protocol):
    """An executor whose branches run in other processes, which must share its circuits and
    its limits' permits."""

    def shared_breakers(self, cluster: object | None) -> BreakerStore:
        """The store every process running its branches on ``cluster`` (None: the default
        one) records circuits in."""
        ...

    def check_breakers(self, graph: str, store: BreakerStore) -> None:
        """Refuse (``GraphError``) a store its branches' processes cannot reach."""
        ...

    def shared_limits(self, cluster: object | None) -> LimitStore:
        """The store of ``ResourceLimit`` permits every process running its branches on
        ``cluster`` uses."""
        ...


def get_executor(strategy: str) -> ParallelExecutor:
    """The shared executor instance of a registered strategy."""
    return cast(ParallelExecutor, strategies.get_executor(strategy))


class Detached(TeaDistError):
    """Raised inside a durable run when this process stops driving it and leaves it to another
    (the run was taken over, or this worker hands its runs over as it shuts down). It ends the
    walk without ending the run: nothing is cancelled or recorded, and users never see it."""


class RunOwner(Protocol):
    """A process's hold on a durable run it drives (``tea_dist.distributed.durable``)."""

    def check(self) -> None:
        """Raise ``Detached`` when this process no longer drives the run."""
        ...

    def append(self, entries: Sequence[Mapping[str, str]]) -> None:
        """Add entries to the run's event stream, fenced: ``Detached`` (and nothing written)
        when another process drives the run now."""
        ...


@dataclass(frozen=True)
class Durable:
    """How ``stream()`` drives a durable run: ``owner`` holds it, and it starts after main-path
    node ``after`` ("": at the entry), ``steps`` main-path nodes being done (a resumed run)."""

    owner: RunOwner
    after: str = ""
    steps: int = 0


_BLANK_CONTEXT = FlowContext(branch="")


@dataclass
class Runtime:
    """Per-invocation services for executors."""

    graph_name: str = "graph"
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    shared_breakers: BreakerStore = field(default_factory=MemoryBreakerStore)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cancel_token: CancelToken = field(default_factory=CancelToken)
    limits: Callable[[], LimitStore] = field(default=lambda: PROCESS_LIMITS)
    owner: RunOwner | None = None  # a durable run's hold (None: not durable)
    steps: int = 0  # main-path nodes done so far (the runner counts them)
    resumed_steps: int | None = None  # ``steps`` where a resumed run picked up
    fanout_id: str = ""  # the running fan-out's id in a durable run ("": make one up)
    cluster: object | None = None  # where distributed branches go (None: the default one)
    _invocation_breakers: MemoryBreakerStore = field(default_factory=MemoryBreakerStore)
    _run_circuits: set[str] = field(default_factory=set)
    _closed: bool = False

    def limit_store(self) -> LimitStore:
        """Where the permits of ``ResourceLimit``s are kept (made on first use)."""
        return self.limits()

    # -- events --

    def context(self, task: BranchTask, config: ParallelConfig, attempt: int = 1) -> FlowContext:
        """The callback context of a branch (a copy of a blank one: a thousand at a time)."""
        return _BLANK_CONTEXT.but(
            branch=task.branch,
            fan_in_node=task.fan_in,
            state_snapshot=task.state,
            start_time=time.time(),
            config=config,
            graph_name=self.graph_name,
            run_id=self.run_id,
            attempt=attempt,
            circuit=self.circuit_name(task.start, config),  # a whole map shares one
        )

    @property
    def emit(self) -> Callable[..., None]:
        """Fire a lifecycle event through the dispatcher: ``emit(event, *args)`` (its
        ``emit`` itself, not a call passing its arguments on: five per branch)."""
        return self.dispatcher.emit

    # -- circuits --

    def circuit_name(self, branch: str, config: ParallelConfig) -> str | None:
        """The circuit guarding a branch: the configured name, else graph:branch."""
        breaker = config.circuit_breaker
        if breaker is None:
            return None
        name = breaker.name or f"{self.graph_name}:{branch}"
        if breaker.scope == "invocation" and not isinstance(
            self.shared_breakers, MemoryBreakerStore
        ):
            name = f"{self.run_id}/{name}"  # a fresh circuit per run in the shared store
            self._run_circuits.add(name)
        return name

    def breakers(self, config: ParallelConfig) -> BreakerStore:
        """The store holding a config's circuits (fresh per invocation for that scope)."""
        breaker = config.circuit_breaker
        if (
            breaker is not None
            and breaker.scope == "invocation"
            and isinstance(self.shared_breakers, MemoryBreakerStore)
        ):
            return self._invocation_breakers
        return self.shared_breakers

    def admit(self, ctx: FlowContext, config: ParallelConfig) -> Admission | None:
        """Ask the branch's circuit for admission (None: no breaker configured)."""
        breaker, name = config.circuit_breaker, ctx.circuit
        if breaker is None or name is None:
            return None
        admission = self.breakers(config).acquire(name, breaker)
        if admission.transition:
            self.emit(Event.CIRCUIT_STATE_CHANGE, ctx, *admission.transition)
        return admission

    def record(
        self, ctx: FlowContext, config: ParallelConfig, success: bool, admission: Admission | None
    ) -> CircuitState | None:
        """Record an attempt's outcome on its circuit; returns the circuit state after it."""
        breaker, name = config.circuit_breaker, ctx.circuit
        if breaker is None or name is None or admission is None:
            return None
        store = self.breakers(config)
        transition = store.record(name, breaker, success, admission.probe)
        if transition:
            self.emit(Event.CIRCUIT_STATE_CHANGE, ctx, *transition)
            return transition[1]
        return store.snapshot(name).state

    def release(
        self, ctx: FlowContext, config: ParallelConfig, admission: Admission | None
    ) -> None:
        """An admitted attempt ended with no outcome (cancelled): free its probe slot."""
        if config.circuit_breaker is None or ctx.circuit is None or admission is None:
            return
        self.breakers(config).release(ctx.circuit, admission.probe)

    def close(self) -> None:
        """End of the run: callbacks catch up, per-invocation circuits in a shared store go.

        Idempotent: the run's end and its ``finally`` may both call it.
        """
        if self._closed:
            return
        self._closed = True
        self.dispatcher.close()
        self.shared_breakers.forget(self._run_circuits)

    def detach(self) -> None:
        """This process leaves a durable run to another: the run's circuits stay."""
        self._run_circuits.clear()

    @property
    def adopting(self) -> bool:
        """A resumed run's first fan-out: its predecessor may have sent its branches already."""
        return self.owner is not None and self.steps == self.resumed_steps

    # -- fan-out --

    def fanout(
        self,
        spec: GraphSpec,
        fan: FanOut,
        state: dict[str, Any],
        run_config: Mapping[str, Any],
    ) -> list[ParallelFlowResult]:
        """Run a fan-out's branches, one result per branch in declaration order."""
        relay = RELAY.get()  # nested in an attempt relaying its events to the caller's run
        if relay is not None and self.run_id != relay.run_id:
            self.run_id, self.dispatcher = relay.run_id, Dispatcher(listeners=[relay])
        ctx = FlowContext(
            branch="", fan_in_node=fan.fan_in, graph_name=self.graph_name, run_id=self.run_id
        )
        if self.owner is not None:
            self.fanout_id = f"{self.run_id}.{self.steps}"
        self.emit(Event.FANOUT_START, ctx, fan)
        results: list[ParallelFlowResult] = []
        error: BaseException | None = None
        tasks, configs = self.branches(spec, fan, state, run_config)
        try:
            results = self._run_fanout(tasks, configs)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.emit(Event.FANOUT_END, ctx, fan, results, error)
        _raise_for_fail_fast(results, configs)
        return results

    def branches(
        self, spec: GraphSpec, fan: FanOut, state: dict[str, Any], run_config: Mapping[str, Any]
    ) -> tuple[list[BranchTask], list[ParallelConfig]]:
        """A fan-out's branches and their configs: its parallel edges, or a map's items."""
        if fan.map is None:
            pairs = list(zip(fan.branches, fan.configs, strict=True))
            states: list[dict[str, Any]] = [state] * len(pairs)
            nodes, batch = [""] * len(pairs), 1
        else:
            target, config = fan.branches[0], fan.configs[0]
            items = fan.map.of(state, fan.source)
            pairs = [(f"{target}[{i}]", config) for i in range(len(items))]
            states = [fan.map.branch_state(state, i, item) for i, item in enumerate(items)]
            nodes, batch = [target] * len(items), fan.map.batch_for(len(items))
        first = BranchTask(spec, "", fan.fan_in, state, run_config, batch=batch, run_id=self.run_id)
        tasks = [
            first.but(
                branch=branch,
                state=branch_state,
                include_traceback=config.include_traceback,
                index=i,
                node=node,
            )
            for i, ((branch, config), branch_state, node) in enumerate(
                zip(pairs, states, nodes, strict=True)
            )
        ]
        return tasks, [config for _, config in pairs]

    def _run_fanout(
        self,
        tasks: list[BranchTask],
        configs: list[ParallelConfig],
    ) -> list[ParallelFlowResult]:
        if not tasks:  # a map over no items
            return []
        groups: dict[str, list[int]] = {}
        for i, config in enumerate(configs):
            groups.setdefault(config.strategy, []).append(i)
        results: list[ParallelFlowResult | None] = [None] * len(tasks)

        # strategy groups run side by side; a fail-fast failure in one stops the others too
        fan_token = CancelToken(parent=self.cancel_token)
        runtime = replace(self, cancel_token=fan_token) if len(groups) > 1 else self

        def run_group(strategy: str, indices: Sequence[int]) -> None:
            done = get_executor(strategy).execute(
                [tasks[i] for i in indices], [configs[i] for i in indices], runtime
            )
            for i, result in zip(indices, done, strict=True):
                results[i] = result
                if stops_siblings(configs[i], result):
                    fan_token.cancel(f"cancelled: fail_fast after branch '{result.branch}' failed")

        if len(groups) == 1:
            ((strategy, indices),) = groups.items()
            run_group(strategy, indices)
        else:
            with ThreadPoolExecutor(len(groups), thread_name_prefix="tea-dist-group") as pool:
                futures = [  # each group in the fan-out's context (its trace, for one)
                    pool.submit(contextvars.copy_context().run, run_group, s, ix)
                    for s, ix in groups.items()
                ]
                for future in futures:
                    future.result()
        return [r for r in results if r is not None]


def _raise_for_fail_fast(
    results: Sequence[ParallelFlowResult], configs: Sequence[ParallelConfig]
) -> None:
    """Under ``fail_fast``, the first failed branch ends the run; a branch that hit its
    ``recursion_limit`` always does (a cycle without an exit is a bug, not a partial result)."""
    for result in results:
        if result.error_type == GraphRecursionError.__name__:
            raise GraphRecursionError(f"branch '{result.branch}': {result.error}")
    for result, config in zip(results, configs, strict=True):
        if stops_siblings(config, result):
            cls = {Outcome.TIMEOUT: BranchTimeoutError, Outcome.CIRCUIT_OPEN: CircuitOpenError}.get(
                result.outcome, BranchError
            )
            raise cls(
                f"branch '{result.branch}' failed ({result.error_type}: {result.error}); "
                "fail_fast stopped the other branches",
                branch=result.branch,
                error_type=result.error_type,
            )
