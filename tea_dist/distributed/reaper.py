"""The local cluster's reaper: cleans up after a parent that died without doing it itself.

A tiny standard-library-only process (run by path with ``python -I``, so it starts in a few
milliseconds and imports nothing of tea_dist). Its parent writes JSON lines to its stdin:

    {"group": 1234}              kill this process group if the parent goes away
    {"forget": 1234}             the parent stopped that group itself
    {"path": "/tmp/tea-..."}     remove this folder if the parent goes away
    {"advert": "/run/...", "url": "redis://..."}   remove this advertisement file if it still
                                                   names this URL
    {"release": true}            the parent cleaned up everything: exit without acting

The parent is gone when its end of the pipe closes (any death, SIGKILL included: the kernel
closes the descriptor) or when this process is re-parented. Then every registered group gets
SIGKILL and every registered path and advertisement is removed. ``Reaper`` is the parent's
side of the pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any


class Reaper:
    """The parent's side of ``reaper.py``: tells it what to clean if this process dies."""

    def __init__(self) -> None:
        read, write = os.pipe()
        script = Path(__file__).resolve()
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(script), str(os.getpid())],
            stdin=read,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C on the terminal must not reach it
        )
        os.close(read)
        self._pipe = os.fdopen(write, "w", buffering=1)
        self._lock = threading.Lock()

    def tell(self, **message: Any) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._pipe.write(json.dumps(message) + "\n")

    def release(self) -> None:
        """Everything is cleaned: let the reaper exit without acting."""
        self.tell(release=True)
        with contextlib.suppress(OSError):
            self._pipe.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)


def _reap(groups: set[int], paths: list[str], adverts: dict[str, str]) -> None:
    for group in groups:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for path, url in adverts.items():
        with contextlib.suppress(OSError, ValueError):
            with open(path, encoding="utf-8") as file:
                named = json.load(file).get("broker_url")
            if named == url:
                os.unlink(path)
    deadline = time.monotonic() + 5
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        while os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)  # a dying child may still have added a file
            shutil.rmtree(path, ignore_errors=True)


def main(parent: int) -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # only the parent's fate decides
    groups: set[int] = set()
    paths: list[str] = []
    adverts: dict[str, str] = {}
    pending = b""
    stdin = sys.stdin.fileno()
    while os.getppid() == parent:
        ready, _, _ = select.select([stdin], [], [], 0.2)
        if not ready:
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            break  # the parent's end closed: it is gone
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            message = json.loads(line)
            if message.get("release"):
                return
            if "group" in message:
                groups.add(int(message["group"]))
            if "forget" in message:
                groups.discard(int(message["forget"]))
            if "path" in message:
                paths.append(str(message["path"]))
            if "advert" in message:
                adverts[str(message["advert"])] = str(message["url"])
    _reap(groups, paths, adverts)


if __name__ == "__main__":
    main(int(sys.argv[1]))
