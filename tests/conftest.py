"""Shared fixtures: a real Redis for the tests that need one.

The machine's Redis (``TEA_DIST_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/13``) is
used when it answers; every test gets its own key prefix and deletes only its own keys.
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEST_REDIS_URL = os.environ.get("TEA_DIST_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


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

    from tea_dist.distributed.celery_app import configure, current_settings
    from tests.cluster import TestCluster

    url = (
        CELERY_REDIS_URL
        if _redis_answers(CELERY_REDIS_URL)
        else redis_url.rsplit("/", 1)[0] + "/14"
    )
    test_cluster = TestCluster(url, agents_dir=str(tmp_path_factory.getbasetemp()))
    previous = current_settings()
    configure(test_cluster.settings())
    test_cluster.start_worker("flows", concurrency=2)
    test_cluster.start_worker("runs", concurrency=4, role="runs")
    try:
        yield test_cluster
    finally:
        test_cluster.stop_all()
        configure(previous)
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
