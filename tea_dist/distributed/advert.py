"""Where a running ``tea-dist cluster`` says it is, as ``ray start --head`` does.

One file, ``cluster.json`` (broker URL, PID, Flower URL, logs folder), under the user's runtime
directory: ``TEA_DIST_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/tea-dist``, else
``<tmp>/tea-dist-<uid>`` (folder 0700, file 0600). The cluster removes it when it stops (its
reaper, after a SIGKILL); a file whose process is gone is ignored and removed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tea_dist.core.errors import ConfigError
from tea_dist.core.processes import pid_alive


def runtime_dir() -> Path:
    """Where a running ``tea-dist cluster`` is advertised (created private to the user)."""
    if configured := os.environ.get("TEA_DIST_RUNTIME_DIR"):
        return Path(configured)
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "tea-dist"
    return Path(tempfile.gettempdir()) / f"tea-dist-{os.getuid()}"


def advert_path() -> Path:
    return runtime_dir() / "cluster.json"


def advertise(broker_url: str, flower_url: str | None, logs: Path) -> Path:
    """Advertise this process's cluster (atomically, readable by this user only)."""
    folder = runtime_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_uid != os.getuid():
        raise ConfigError(f"{folder} belongs to another user: set TEA_DIST_RUNTIME_DIR")
    record = {
        "broker_url": broker_url,
        "pid": os.getpid(),
        "flower_url": flower_url,
        "logs": str(logs),
        "started": time.time(),
    }
    path = advert_path()
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(json.dumps(record), encoding="utf-8")
    temp.chmod(0o600)
    os.replace(temp, path)
    return path


def withdraw(url: str) -> None:
    """Remove the advertisement if it still names ``url`` (another cluster may own it now)."""
    record = _read_advert()
    if record is not None and record.get("broker_url") == url:
        advert_path().unlink(missing_ok=True)


def _read_advert() -> dict[str, Any] | None:
    try:
        record = json.loads(advert_path().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def advertised() -> dict[str, Any] | None:
    """The advertised cluster's record (``broker_url``, ``pid``, ``flower_url``, ``logs``) when
    it answers; a file whose owner process is gone is removed."""
    import redis

    record = _read_advert()
    if record is None:
        if advert_path().exists():
            advert_path().unlink(missing_ok=True)  # unreadable: nobody can use it
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        withdraw(str(record.get("broker_url")))
        return None
    try:
        client = redis.Redis.from_url(str(record["broker_url"]), socket_connect_timeout=1)
        client.ping()
        client.close()
    except (redis.RedisError, KeyError, ValueError):
        return None  # its owner lives: starting or stopping, left alone
    return record
