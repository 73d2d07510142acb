"""The Celery, kombu and billiard internals tea_dist relies on, as it uses them.

tea_dist reaches past Celery's documented API in a few places: the worker's consumer, the
prefork pool's soft-limit signal, bootstep names, the request class. pyproject pins Celery and
kombu below their next major; these tests make any upgrade (a minor one included) fail here,
naming what tea_dist needs, rather than in a worker at run time. No service is needed: a worker
is built in this process on the ``memory://`` transport and never started.
"""

from __future__ import annotations

import inspect
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, bootsteps, signals

from tea_dist import Cluster


def params(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def takes_keywords(function: Any) -> bool:
    kinds = [p.kind for p in inspect.signature(function).parameters.values()]
    return inspect.Parameter.VAR_KEYWORD in kinds


@pytest.fixture(scope="module")
def worker() -> Iterator[Any]:
    """A Celery worker of a tea_dist cluster's app, built (its blueprint applied, its steps
    made) but never started: no connection, no process."""
    cluster = Cluster(broker="memory://", redis="redis://127.0.0.1:1/0", key_prefix="internals")
    yield cluster.app.WorkController(
        pool_cls="solo",
        concurrency=1,
        hostname="internals@probe",
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        loglevel="WARNING",
    )


# -- billiard: the prefork child's soft-limit signal (tea_dist.distributed.beater) -------------


def test_i3c_billiard_soft_limit_handler_is_on_sigusr1() -> None:
    """The heartbeat thread interrupts a branch in place by sending its own prefork child
    SIGUSR1: ``_guard_soft_limit`` recognises a prefork child by billiard's
    ``soft_timeout_sighandler`` on that signal and replaces it."""
    from billiard import pool
    from billiard.exceptions import SoftTimeLimitExceeded

    assert pool.SIG_SOFT_TIMEOUT == signal.SIGUSR1
    assert params(pool.soft_timeout_sighandler) == ["signum", "frame"]
    with pytest.raises(SoftTimeLimitExceeded):
        pool.soft_timeout_sighandler(signal.SIGUSR1, None)
    # installed in every pool child (what the identity check in the beater depends on)
    assert "signal.signal(SIG_SOFT_TIMEOUT, soft_timeout_sighandler)" in inspect.getsource(
        pool.Worker
    )


def test_i3c_billiard_exceptions_are_celerys() -> None:
    """tasks.py tells a soft limit, a hard limit and a lost child apart by billiard's
    exception classes, the ones Celery raises and reports."""
    from billiard import exceptions as billiard_exceptions
    from billiard.einfo import ExceptionWithTraceback
    from celery import exceptions as celery_exceptions

    for name in ("SoftTimeLimitExceeded", "TimeLimitExceeded", "WorkerLostError"):
        cls = getattr(billiard_exceptions, name)
        assert issubclass(cls, BaseException), name
        assert getattr(celery_exceptions, name) is cls, name
    # BranchRequest.on_failure unwraps a pool child's exception with ``.exc``
    error = billiard_exceptions.WorkerLostError("gone")
    assert ExceptionWithTraceback(error, "tb").exc is error
    assert issubclass(celery_exceptions.Ignore, Exception)


def test_i3c_prefork_pool_keeps_maintain_pool() -> None:
    """PromptRefill calls the prefork pool's ``maintain_pool`` on the worker's hub right after
    a kill (``hub.call_later``), to refill the slot at once instead of at the 5 s check."""
    from billiard.pool import Pool
    from celery.concurrency import asynpool, base, prefork
    from kombu.asynchronous.hub import Hub

    assert callable(Pool.maintain_pool) and params(Pool.maintain_pool) == ["self"]
    assert issubclass(asynpool.AsynPool, Pool)
    assert "self.maintain_pool = P.maintain_pool" in inspect.getsource(prefork.TaskPool.on_start)
    assert callable(base.BasePool.maintain_pool)  # other pools: there, and a no-op
    assert params(Hub.call_later)[:3] == ["self", "delay", "callback"]


# -- bootsteps: tea_dist's worker and consumer steps ----------------------------------------


def test_i3c_bootstep_names_tea_dist_requires_exist() -> None:
    """PromptRefill requires the worker's Pool and Hub steps; Presence and Refusals the
    consumer's Tasks step (its queues and task strategies exist when they start)."""
    from celery.utils.imports import symbol_by_name

    from tea_dist.distributed.celery_app import PromptRefill
    from tea_dist.distributed.presence import Presence
    from tea_dist.distributed.refusals import Refusals

    known = {
        "celery.worker.components:Pool",
        "celery.worker.components:Hub",
        "celery.worker.consumer.tasks:Tasks",
    }
    required = {name for step in (PromptRefill, Presence, Refusals) for name in step.requires}
    assert required == known, "a step requires a name this test does not check yet"
    for name in required:
        step = symbol_by_name(name)
        assert issubclass(step, bootsteps.Step), name
        assert step.name == name.replace(":", "."), name  # how blueprints match requires


def test_i3c_tea_dist_steps_are_built_into_the_worker(worker: Any) -> None:
    """``app.steps['worker']`` and ``app.steps['consumer']`` still reach the blueprints."""
    worker_steps = set(worker.blueprint.steps)
    consumer_steps = set(worker.consumer.blueprint.steps)
    assert "tea_dist.distributed.celery_app.PromptRefill" in worker_steps
    assert {
        "tea_dist.distributed.presence.Presence",
        "tea_dist.distributed.refusals.Refusals",
    } <= consumer_steps


def test_i3c_consumer_hooks_refusals_wraps(worker: Any) -> None:
    """Refusals wraps the consumer's ``on_decode_error(message, exc)`` and
    ``on_invalid_task(body, message, exc)`` (a refused message is told to its caller),
    replaces task strategies in ``c.strategies`` (a size check first), and acknowledges an
    oversized message with ``message.ack_log_error(logger, c.connection_errors)``."""
    from celery.worker import strategy
    from celery.worker.consumer.consumer import Consumer
    from kombu.message import Message

    assert params(Consumer.on_decode_error) == ["self", "message", "exc"]
    assert params(Consumer.on_invalid_task) == ["self", "body", "message", "exc"]
    c = worker.consumer
    assert c.on_decode_error.__module__ == "tea_dist.distributed.refusals"
    assert c.on_invalid_task.__module__ == "tea_dist.distributed.refusals"
    assert isinstance(c.strategies, dict)
    assert "self.strategies[name] = task.start_strategy(" in inspect.getsource(
        Consumer.update_strategies
    )
    assert "def task_message_handler(message, body, ack, reject, callbacks," in (
        inspect.getsource(strategy.default)
    )
    assert isinstance(c.connection_errors, tuple)
    assert params(Message.ack_log_error)[:3] == ["self", "logger", "errors"]


def test_i3c_consumer_attributes_presence_reads(worker: Any) -> None:
    """Presence announces ``c.hostname``, the queues of ``c.task_consumer``, the concurrency
    of ``c.controller``, on ``c.timer.call_repeatedly``; the run worker's ``worker_ready``
    handler reads the queues of ``sender.task_consumer``."""
    from celery.worker.consumer.consumer import Consumer
    from kombu.asynchronous.timer import Timer

    c = worker.consumer
    assert c.hostname == "internals@probe"
    assert c.controller is worker and worker.concurrency == 1
    assert callable(c.timer.call_repeatedly)  # celery's timer2, handing it on to kombu's Timer
    assert params(Timer.call_repeatedly)[:3] == ["self", "secs", "fun"]
    assert hasattr(c, "task_consumer")  # None until started
    assert "self.task_consumer" in inspect.getsource(Consumer.add_task_queue)
    assert worker.pool is not None and hasattr(worker, "hub")


# -- tasks, requests, signals -----------------------------------------------------------------


def test_i3c_request_class_hook_and_on_failure() -> None:
    """BranchCeleryTask names its request class (``Task.Request``, a dotted name) to count a crashed
    pool child against its branch in ``BranchRequest.on_failure``."""
    from celery import Task
    from celery.worker import strategy
    from celery.worker.request import Request

    from tea_dist.distributed.tasks import BranchCeleryTask, BranchRequest

    assert Task.Request == "celery.worker.request:Request"
    assert "task.Request" in inspect.getsource(strategy.default)
    assert params(Request.on_failure) == ["self", "exc_info", "send_failed_event", "return_ok"]
    assert issubclass(BranchRequest, Request)
    assert BranchCeleryTask.Request == "tea_dist.distributed.tasks:BranchRequest"


def test_i3c_shared_tasks_bind_to_every_app() -> None:
    """tea_dist's tasks are ``shared_task``s: every app that loads them has them, bound to
    that app (what ``Cluster(app=your_app)`` and two clusters in one process rely on)."""
    import tea_dist.distributed.apps
    import tea_dist.distributed.tasks  # noqa: F401  (registers the shared tasks)

    apps = [Celery(f"internals-{i}", broker="memory://", set_as_current=False) for i in (1, 2)]
    for app in apps:
        for name in ("tea_dist.run_flow", "tea_dist.run_batch", "tea_dist.run_workflow"):
            assert name in app.tasks, name
            assert app.tasks[name].app is app, name


def test_i3c_task_retry_takes_a_countdown_and_options() -> None:
    """run_flow's retry is ``self.retry(args=, countdown=, argsrepr=)``: re-published with a
    countdown, the argsrepr passed on as a message option."""
    from celery import Task

    assert {"args", "countdown"} <= set(params(Task.retry))
    assert takes_keywords(Task.retry)


def test_i3c_signals_and_their_arguments() -> None:
    """The signal handlers tea_dist connects, and the arguments they read."""
    assert {"request", "expired"} <= set(signals.task_revoked.providing_args)  # cancelled
    assert {"task_id", "task", "args"} <= set(signals.task_prerun.providing_args)  # trace
    assert "task_id" in signals.task_postrun.providing_args
    for signal_ in (
        signals.task_failure,  # PromptRefill: refill after a hard limit
        signals.worker_ready,  # a run worker takes over orphaned runs
        signals.worker_shutting_down,  # a deploy hands runs over at once
        signals.worker_shutdown,
    ):
        assert callable(signal_.connect)


# -- the app: sending, control and events ------------------------------------------------------


def test_i3c_sending_uses_a_pooled_producer() -> None:
    """The driver sends a fan-out's tasks through one ``producer_or_acquire()`` producer,
    ``send_task(name, args, producer=, task_id=, countdown=, ...)``."""
    from kombu import Producer

    app = Celery("internals-send", broker="memory://", set_as_current=False)
    with app.producer_or_acquire() as producer:
        assert isinstance(producer, Producer)
    accepted = set(params(app.send_task))
    assert {"name", "args", "kwargs", "producer", "task_id", "countdown"} <= accepted
    assert takes_keywords(app.send_task)  # queue, serializer, argsrepr, headers


def test_i3c_events_default_dispatcher_sends_task_failed() -> None:
    """The driver closes a lost branch's task in Flower with
    ``app.events.default_dispatcher(hostname=...)`` sending ``task-failed``."""
    app = Celery("internals-events", broker="memory://", set_as_current=False)
    assert "hostname" in params(app.events.default_dispatcher)
    with app.events.default_dispatcher(hostname="tea-dist-driver@probe") as events:
        assert params(events.send)[:1] == ["type"] and takes_keywords(events.send)
        events.send("task-failed", uuid="x", exception="WorkerLostError('lost')", traceback="")


def test_i3c_control_revoke_and_ping() -> None:
    """Cancel and fail-fast revoke with ``terminate=True, signal="SIGKILL"``; readiness and
    ``tea-dist ping`` use ``control.ping(destination=, timeout=)``."""
    app = Celery("internals-control", broker="memory://", set_as_current=False)
    assert {"task_id", "terminate", "signal"} <= set(params(app.control.revoke))
    assert {"destination", "timeout"} <= set(params(app.control.ping))


def test_i3c_config_keys_are_celery_settings() -> None:
    """Every key tea_dist sets on its app is a Celery setting (a renamed one would be
    ignored without a word)."""
    from celery.app.defaults import NAMESPACES, flatten

    from tea_dist.distributed.celery_app import celery_config
    from tea_dist.distributed.settings import Settings

    known = {key for key, _ in flatten(NAMESPACES)}
    config = celery_config(Settings(broker_url="redis://h/0"))
    assert sorted(set(config) - known) == []


def test_i3c_worker_command_line_options_exist() -> None:
    """``tea-dist worker`` runs ``celery -A ... worker`` with these options."""
    from celery.bin.worker import worker as worker_command

    from tea_dist.distributed.settings import Settings
    from tea_dist.distributed.worker import worker_argv

    options = {opt for param in worker_command.params for opt in param.opts}
    settings = Settings(broker_url="redis://h/0", task_events=True)
    used = {
        arg
        for role in ("flows", "runs")
        for arg in worker_argv(settings, role, concurrency=1, name="x@h")
        if arg.startswith("--")
    }
    assert sorted(used - options) == []


# -- kombu ---------------------------------------------------------------------------------


def test_i3c_kombu_json_register_type_and_queue_counts() -> None:
    """messages.py makes tea_dist's models JSON on the wire with ``register_type(cls, marker,
    encoder, decoder)``; ``queue_depths`` reads ``message_count`` of a passive declare."""
    import amqp.protocol
    from kombu.exceptions import OperationalError
    from kombu.transport.virtual.base import queue_declare_ok_t
    from kombu.utils.json import register_type

    assert params(register_type) == ["t", "marker", "encoder", "decoder"]
    assert "message_count" in amqp.protocol.queue_declare_ok_t._fields  # RabbitMQ
    assert "message_count" in queue_declare_ok_t._fields  # kombu's virtual transports
    assert issubclass(OperationalError, Exception)  # a broker outage, translated in apps.py
