"""Scheduling policies: which experts draft (routing), which candidates form a verification
batch (batching), how long each round's draft is (window, load control).

Pure like the core: decisions from numbers they are given, no I/O; tested in ``tests/unit``.
"""
