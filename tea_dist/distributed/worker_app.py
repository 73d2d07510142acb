"""What ``celery -A tea_dist.distributed.worker_app worker`` loads: a cluster from the
``TEA_DIST_*`` environment and its Celery app (``tea-dist worker`` runs exactly that).

Only worker and Flower processes import this module; the library never does.
"""

from __future__ import annotations

from tea_dist.distributed.cluster import Cluster

cluster = Cluster.from_env()
app = cluster.app
