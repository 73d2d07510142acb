"""Benchmarks of tea_dist: ratios against raw Celery and bare in-process pools (see README.md)."""
