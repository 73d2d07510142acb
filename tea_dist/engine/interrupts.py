"""SIGTERM and SIGHUP end a run the way Ctrl-C does: its branches are stopped, not orphaned.

Python's default for SIGTERM and SIGHUP is to die on the spot, leaving every branch a run
sent running on its workers. While a run is driven from the main thread, ``terminating_runs``
turns them into ``SystemExit(128 + signal)``, so the run's cleanup (cancel every branch, flush
callbacks) happens and the process still exits with the conventional status. A handler the
application installed itself is left alone.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)


def _exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def terminating_runs() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise ``SystemExit`` (main thread, default handlers)."""
    installed: list[int] = []
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _exit)
                installed.append(signum)
    try:
        yield
    finally:
        for signum in installed:
            if signal.getsignal(signum) is _exit:
                signal.signal(signum, signal.SIG_DFL)
