"""CoSine: collaborative speculative inference serving.

Library layout: ``cosine.core`` is the pure speculative core (trees, acceptance, sampling,
stop rules, round application; no I/O), ``cosine.policy`` the scheduling policies (routing,
batching, windows, load control), ``cosine.wire`` every message format, ``cosine.models`` loads
models and runs batched forward passes over a paged KV pool, ``cosine.drafters`` holds the
drafter kinds, ``cosine.engine`` is the single-process reference engine; the stage workers
(``cosine.workers``) import neither the engine nor each other.
"""

__version__ = "0.1.0"
