"""Where a branch attempt runs and how it is stopped: ``thread``, ``process``, ``asyncio``,
``inline``. ``tea_dist`` registers each by name (``tea_dist.core.strategies``), imported lazily.
"""
