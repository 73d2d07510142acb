"""The raw Celery app of ``bench/rawtasks.py`` plus a bootstep that refills the pool promptly.

A prefork worker replaces a killed child either at once (the child's sentinel fd wakes the
event loop) or only at the pool's periodic ``maintain_pool`` timer (every 5 s): measured here,
the next task starts 0.1-0.3 s or 1-5 s after a hard time limit or ``revoke(terminate=True)``.
``PromptRefill`` calls ``maintain_pool`` 0.15, 0.3 and 0.6 s after every task failure (a hard
time limit fires ``task_failure`` in the worker's main process) and every revoke, so the slot
is refilled within ~0.3 s every time. tea_dist's flow workers run it
(``tea_dist.distributed.celery_app.PromptRefill``); ``bench/refill_probe.py`` measures it on raw
Celery.
"""

from __future__ import annotations

from bench.rawtasks import app
from tea_dist.distributed.celery_app import PromptRefill

app.steps["worker"].add(PromptRefill)
