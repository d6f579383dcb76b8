"""Verification batch forming (first version of the pluggable batch policy).

The coordinator keeps a pool of candidates waiting for verification. A batch goes out when it
is full, when its oldest member has waited ``max_wait_s``, or at once when a verifier is idle
and nothing else is queued for it. While every verifier is busy, candidates keep pooling (up to
``max_batch``), so batches grow with load instead of queueing as singletons: supply of drafts
then meets verification capacity.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch: int = 8
    max_tokens: int = 512  # drafted + context-suffix tokens in one batch (a forward's size)
    max_wait_s: float = 0.004

    def should_flush(self, pool_size: int, pool_tokens: int, oldest_wait_s: float, queued_batches: int, live_verifiers: int) -> bool:
        if pool_size == 0:
            return False
        if pool_size >= self.max_batch or pool_tokens >= self.max_tokens:
            return True
        if queued_batches < max(1, live_verifiers):
            return oldest_wait_s >= self.max_wait_s  # a verifier is (or soon is) idle
        # Every verifier has work queued: keep pooling, but never hold a candidate for long.
        return oldest_wait_s >= 50 * self.max_wait_s

    def take(self, pool_size: int) -> int:
        return min(pool_size, self.max_batch)
