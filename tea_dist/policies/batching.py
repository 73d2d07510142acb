"""How many of a map's items go in one Celery task: the adaptive default of ``batch_size``.

A task costs the broker, the worker and the driver a few milliseconds whatever it carries; an
item of a batch costs only its own run. Short items are therefore cheap only in batches, and
long items must not wait behind each other in one. The rule (``BatchPolicy.size``):

- **nothing measured yet: one item per task.** A map starts with single-item tasks, so that
  every free slot gets work at once and no item of unknown length waits behind another;
- **grow while items are short**: a task should last about ``target_seconds``, so a batch holds
  ``target_seconds / item_seconds`` items (an item costs at least ``item_floor_seconds`` in a
  batch, its share of the worker's bookkeeping), but at most ``growth`` times the largest batch
  measured so far (1, 4, 16, 64, ...), so one short item does not vouch for a thousand;
- **never leave free slots idle**: at most ``ceil(pending / slots)`` items, so that what is left
  still spreads over every slot consuming the queue, down to one item each at the end;
- **never serialise long items**: once items are measured at ``target_seconds`` or more, or
  one has been running that long, each goes alone.

The driver keeps ``window(slots)`` tasks outstanding (two per slot: one running, one waiting
for it), asks ``size`` before each task it sends and feeds ``ItemTimes`` what it sees: each
item's start, its run time once over, each batch once all its items are over. ``ItemTimes``
takes the clock it measures running items with, so tests inject one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    """The batch-size rule (see the module docstring); every method is a pure function."""

    target_seconds: float = 0.1  # a task this long makes its fixed cost a few percent
    item_floor_seconds: float = 0.001  # an item's least cost in a batch (events, bookkeeping)
    growth: int = 4  # a batch is at most this many times the largest one measured
    max_size: int = 1000  # items in one task, whatever the measurements say
    per_slot: int = 2  # tasks outstanding per worker slot

    def __post_init__(self) -> None:
        if self.target_seconds <= 0 or self.item_floor_seconds <= 0:
            raise ValueError("target_seconds and item_floor_seconds must be positive")
        if self.growth < 1 or self.max_size < 1 or self.per_slot < 1:
            raise ValueError("growth, max_size and per_slot must be at least 1")

    def window(self, slots: int) -> int:
        """Tasks of one map kept outstanding on a queue consumed by ``slots`` worker slots."""
        return self.per_slot * max(1, slots)

    def size(
        self,
        *,
        pending: int,
        slots: int,
        item_seconds: float | None,
        measured: int,
        running_seconds: float = 0.0,
    ) -> int:
        """Items for the next task: ``pending`` items not sent yet, ``slots`` worker slots on
        the queue, ``item_seconds`` an item's run time as measured (None: nothing yet),
        ``measured`` the most items of a batch whose run was measured whole (0: none),
        ``running_seconds`` how long the oldest item still running has run."""
        if pending <= 0:
            return 0
        long = max(item_seconds or 0.0, running_seconds) >= self.target_seconds
        if item_seconds is None or long:
            return 1
        wanted = int(self.target_seconds / max(item_seconds, self.item_floor_seconds))
        trusted = self.growth * max(1, measured)
        fair = math.ceil(pending / max(1, slots))
        return max(1, min(wanted, trusted, fair, self.max_size))


class ItemTimes:
    """What a running map says of its items' length: a moving average of the run times of
    items that ended (a run of ``long_seconds`` or more is believed at once), how long the
    oldest item still running has run (an item running for a second is not short, whatever
    the average says), and the largest batch measured whole. Times of running items come
    from ``clock`` (monotonic seconds); an item counts as running from its start event to its
    result, which the driver reads a little later than the worker sends it, so only a long
    run of it tells."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        weight: float = 0.2,
        long_seconds: float = BatchPolicy.target_seconds,
    ) -> None:
        self.clock, self.weight, self.long_seconds = clock, weight, long_seconds
        self.average: float | None = None
        self.measured = 0
        self.running: dict[int, float] = {}  # item -> when it started, in start order

    def started(self, item: int) -> None:
        self.running.pop(item, None)
        self.running[item] = self.clock()

    def ended(self, item: int, seconds: float) -> None:
        """Item ``item`` ran ``seconds`` (its own run time, as its worker measured it)."""
        self.running.pop(item, None)
        old = self.average
        if old is None or (seconds >= self.long_seconds and seconds > old):
            self.average = seconds  # a long item is believed at once: the next goes alone
        else:
            self.average = old + self.weight * (seconds - old)

    def forget(self, item: int) -> None:
        """Item ``item`` stopped without a run time (retried, lost, stopped)."""
        self.running.pop(item, None)

    def batch_done(self, items: int) -> None:
        """A batch of ``items`` items ended, every one of them."""
        self.measured = max(self.measured, items)

    def item_seconds(self) -> float | None:
        """An item's run time, the average of those that ended (None: none ended yet)."""
        return self.average

    def running_seconds(self) -> float:
        """How long the oldest item still running has run (0: none runs)."""
        if not self.running:
            return 0.0
        return self.clock() - next(iter(self.running.values()))
