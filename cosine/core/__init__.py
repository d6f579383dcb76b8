"""The pure speculative-decoding core: sampling, acceptance, token trees, stop rules, and how a
verified round advances a request (``rounds``).

Nothing here does I/O, logging set-up, asyncio or Redis; every function is tested directly
in ``tests/unit``.
"""
