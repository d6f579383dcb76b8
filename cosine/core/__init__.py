"""The pure speculative-decoding core: sampling, acceptance, token trees, stop rules.

Nothing here does I/O, logging set-up, asyncio or Redis; every function is tested directly
in ``tests/unit``.
"""
