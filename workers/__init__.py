"""What a deployment runs: the Celery app for ``celery -A workers.app worker``."""
