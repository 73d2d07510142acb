"""Where a branch attempt runs and how it is stopped: ``thread``, ``process``, ``asyncio``,
``inline``. Each is registered by name in ``tea_dist.core.strategies`` and imported lazily.
"""
