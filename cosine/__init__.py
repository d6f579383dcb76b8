"""CoSine: collaborative speculative inference serving.

Library layout: ``cosine.spec`` is the pure speculative core (no I/O), ``cosine.models``
loads models and runs batched forward passes with per-request KV caches, ``cosine.drafters``
holds the drafter kinds, ``cosine.engine`` is the single-process reference engine.
"""

__version__ = "0.1.0"
