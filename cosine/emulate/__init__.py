"""Emulated GPUs: model kinds for benchmarks and tests that stand in for GPU compute on a
machine without one (never a default).

The pipeline runs for real — Redis, the worker processes and their code — while the target and
the drafters are an oracle that computes its result and then sleeps, on the worker's model
thread, until the time a profiled GPU would have taken (``profiles.toml``, each figure cited in
docs/emulation.md). Drafters know the oracle with a per-position acceptance that depends on the
request's domain, and their Redis round trips can carry a network delay. Every sleep records
how far it overshot its profiled time (``timing.Recorder``): a run whose sleeps overshoot by
more than 2% on average measured this machine, not the emulated one.

``ideal`` simulates the same cluster in virtual time with the pipeline's own policies and no
control-plane cost: what the real pipeline is measured against (``bench/emulate.py``).
"""
