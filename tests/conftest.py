"""Shared fixtures: a real Redis for the tests that need one, real Celery workers, RabbitMQ.

The machine's Redis (``TEA_DIST_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/13``) is
used when it answers; every test gets its own key prefix and deletes only its own keys.

Every test is marked ``integration`` (it needs a service: Redis, worker processes, a broker)
or ``unit`` (it needs nothing but this process and its children); ``-m unit`` runs on a
machine with no service at all.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEST_REDIS_URL = os.environ.get("TEA_DIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")

# A test that uses one of these fixtures, or carries one of these marks, needs a service.
SERVICE_FIXTURES = frozenset({"redis_url", "redis_prefix", "cluster", "rabbitmq_url"})
SERVICE_MARKS = ("redis", "celery", "rabbitmq")


def pytest_configure(config: pytest.Config) -> None:
    # A non-interactive shell starts its background jobs with SIGINT ignored, and children
    # inherit that: a caller or app started by a test would then never see the Ctrl-C the
    # test sends it. Tests start their processes with Ctrl-C's usual meaning.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        needs = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if needs or any(item.get_closest_marker(name) for name in SERVICE_MARKS):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


# With TEA_DIST_TEST_NO_SERVICES=1 (CI's unit lane), a unit test that starts a Redis server or a
# Celery worker, itself or through a child process, fails: it should carry the mark `celery`.
SERVICE_PROCESSES = ("redis-server", "worker_app worker", "celery worker", "worker_app flower")


class _ServiceWatch:
    def __init__(self) -> None:
        import threading

        import psutil

        self.me = psutil.Process()
        self.seen: list[str] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        import psutil

        while not self.done.wait(0.1):
            try:
                children = self.me.children(recursive=True)
            except psutil.Error:
                continue
            for child in children:
                try:
                    command = " ".join(child.cmdline())
                except psutil.Error:
                    continue
                if any(name in command for name in SERVICE_PROCESSES):
                    self.seen.append(command[:200])

    def stop(self) -> list[str]:
        self.done.set()
        self.thread.join(5)
        return sorted(set(self.seen))


_WATCH = pytest.StashKey["_ServiceWatch"]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    if os.environ.get("TEA_DIST_TEST_NO_SERVICES") == "1" and item.get_closest_marker("unit"):
        item.stash[_WATCH] = _ServiceWatch()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        result = yield
    finally:
        watch = item.stash.get(_WATCH, None)
        seen = watch.stop() if watch is not None else []
    if seen:
        pytest.fail(
            "a test marked unit started service processes (mark it celery or redis): "
            + "; ".join(seen),
            pytrace=False,
        )
    return result


def pytest_runtest_teardown(item: pytest.Item) -> None:
    watch = item.stash.get(_WATCH, None)
    if watch is not None:  # its setup failed: the call never ran
        watch.stop()


@pytest.fixture(scope="session", autouse=True)
def _worker_logs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Worker logs go under this session's basetemp (pytest keeps its last few)."""
    from tests import cluster

    cluster.LOG_DIR = tmp_path_factory.getbasetemp() / "worker-logs"
    cluster.KEEP_LOGS = True


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    logs = sys.modules.get("tests.cluster")
    folder = getattr(logs, "LOG_DIR", None)
    if exitstatus != 0 and folder is not None and Path(folder).is_dir():
        terminalreporter.write_line(f"worker logs: {folder}")


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a live Redis server for this test session.

    The machine's server when it answers; otherwise the embedded server of the local
    cluster, started for the session (a fresh machine needs nothing but Python).
    """
    if _redis_answers(TEST_REDIS_URL):
        yield TEST_REDIS_URL
        return
    from tea_dist.distributed.local_cluster import EmbeddedRedis

    server = EmbeddedRedis().start()
    try:
        yield server.url.rsplit("/", 1)[0] + "/13"
    finally:
        server.stop()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix owned by one test; its keys are deleted afterwards."""
    import redis

    prefix = f"tea-test:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=500))
    if keys:
        client.delete(*keys)


CELERY_REDIS_URL = os.environ.get("TEA_DIST_TEST_CELERY_URL", "redis://127.0.0.1:6379/14")


@pytest.fixture(scope="session")
def cluster(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real flow worker (prefork, 2 processes) on its own queue and key prefix.

    The test process's Celery app is pointed at the same settings. The workers allow the
    repository's test, bench and example modules, and find YAML agents under the session's
    temporary directory (every ``tmp_path`` is inside it).
    """
    import redis

    from tests.cluster import TestCluster, cluster_for

    url = (
        CELERY_REDIS_URL
        if _redis_answers(CELERY_REDIS_URL)
        else redis_url.rsplit("/", 1)[0] + "/14"
    )
    test_cluster = TestCluster(url, agents_dir=str(tmp_path_factory.getbasetemp()))
    default = cluster_for(test_cluster.settings()).as_default()
    default.__enter__()  # the test process's default cluster for the session
    test_cluster.start_worker("flows", concurrency=2)
    test_cluster.start_worker("runs", concurrency=4, role="runs")
    try:
        yield test_cluster
    finally:
        test_cluster.stop_all()
        default.__exit__(None, None, None)
        client = redis.Redis.from_url(url)
        for pattern in (f"{test_cluster.env['TEA_DIST_KEY_PREFIX']}*", f"*{test_cluster.tag}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)


IN_PROCESS_STRATEGIES = ("thread", "process", "asyncio")
STRATEGIES = (*IN_PROCESS_STRATEGIES, pytest.param("celery", marks=[pytest.mark.celery]))


@pytest.fixture(params=STRATEGIES)
def strategy(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each strategy in turn: the same behavioural test runs on all of them (celery on the
    session's real workers, with the session's circuits forgotten before and after)."""
    if request.param != "celery":
        yield str(request.param)
        return
    test_cluster = request.getfixturevalue("cluster")
    _forget_circuits(test_cluster)
    yield "celery"
    _forget_circuits(test_cluster)


@pytest.fixture(params=IN_PROCESS_STRATEGIES)
def local_strategy(request: pytest.FixtureRequest) -> str:
    """Each in-process strategy: for behaviour that depends on ``max_workers`` slots."""
    return str(request.param)


def _forget_circuits(test_cluster: object) -> None:
    import redis

    from tea_dist.distributed.keys import Keys

    settings = test_cluster.settings()  # type: ignore[attr-defined]
    keys = Keys(settings.key_prefix)
    client = redis.Redis.from_url(settings.redis)
    names = list(client.scan_iter(match=f"{keys.circuit_prefix()}*", count=1000))
    client.delete(keys.circuits_index(), *names)


# -- RabbitMQ -----------------------------------------------------------------------------------

RABBITMQ_HOST = os.environ.get("TEA_DIST_TEST_RABBITMQ_HOST", "127.0.0.1")
RABBITMQ_PORT = int(os.environ.get("TEA_DIST_TEST_RABBITMQ_PORT", "5672"))
RABBITMQ_VHOST = "tea-dist-test"


def _port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _amqp_error(url: str) -> str | None:
    """Why an AMQP login to ``url`` fails, or None when it works."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.connect()
        return None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _add_vhost(vhost: str) -> bool:
    """Create ``vhost`` with rabbitmqctl (it is idempotent) and let guest use it."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    try:
        for args in (
            ["add_vhost", vhost],
            ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        ):
            subprocess.run([ctl, *args], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="session")
def rabbitmq_url() -> str:
    """``amqp://guest:guest@HOST:5672/VHOST`` of the machine's RabbitMQ.

    The vhost is ``tea-dist-test``, created with rabbitmqctl when it is missing; where it
    cannot be created, ``/`` (tests then use queue names of their own, as they always should).
    ``TEA_DIST_TEST_RABBITMQ_URL`` names another server. Skips when nothing answers; under
    ``CI=true`` a server that answers but refuses the login fails the test instead.
    """
    explicit = os.environ.get("TEA_DIST_TEST_RABBITMQ_URL")
    if explicit:
        error = _amqp_error(explicit)
        if error is None:
            return explicit
        pytest.skip(f"RabbitMQ at TEA_DIST_TEST_RABBITMQ_URL does not answer: {error}")
    if not _port_answers(RABBITMQ_HOST, RABBITMQ_PORT):
        pytest.skip(f"RabbitMQ does not answer on {RABBITMQ_HOST}:{RABBITMQ_PORT}")
    base = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"
    own = base + RABBITMQ_VHOST
    if _amqp_error(own) is None or (_add_vhost(RABBITMQ_VHOST) and _amqp_error(own) is None):
        return own
    error = _amqp_error(base)
    if error is None:
        return base
    message = f"RabbitMQ answers on {RABBITMQ_HOST}:{RABBITMQ_PORT} but refuses guest: {error}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
