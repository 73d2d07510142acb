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
def redis_url() -> str:
    """URL of a live Redis server for this test session."""
    if not _redis_answers(TEST_REDIS_URL):
        pytest.fail(f"no Redis answers at {TEST_REDIS_URL}")
    return TEST_REDIS_URL


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
