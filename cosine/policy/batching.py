"""Verification batch forming (first version of the pluggable batch policy).

The coordinator keeps a pool of candidates waiting for verification. The policy splits the
active requests fairly over the live verifiers: a batch goes out once the pool holds a fair
share (ceil(active / verifiers), capped by ``max_batch`` and a token budget), or, when a
verifier is idle, once the oldest candidate has waited ``max_wait_s``. While every verifier is
busy a smaller batch would only queue, so the pool keeps growing instead. With R requests and V
verifiers, batches of about R / V alternate between verifiers: while one verifies, the drafters
prepare the next batch (the paper's pipelining), and batches grow with load.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_batch: int = 8
    max_tokens: int = 512  # drafted tokens in one batch (bounds one forward's size)
    max_wait_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_tokens < 1 or self.max_wait_s < 0:
            raise ValueError("max_batch and max_tokens must be >= 1, max_wait_s >= 0")

    def fair_share(self, active_requests: int, live_verifiers: int) -> int:
        verifiers = max(1, live_verifiers)
        share = -(-max(1, active_requests) // verifiers)  # ceiling division
        return max(1, min(self.max_batch, share))

    def should_flush(
        self, pool_size: int, pool_tokens: int, oldest_wait_s: float, active_requests: int, live_verifiers: int, busy_verifiers: int
    ) -> bool:
        """busy_verifiers: batches queued or in verification (the verify group's lag + pending)."""
        if pool_size == 0:
            return False
        if pool_size >= self.fair_share(active_requests, live_verifiers) or pool_tokens >= self.max_tokens:
            return True
        idle_verifier = busy_verifiers < max(1, live_verifiers)
        return idle_verifier and oldest_wait_s >= self.max_wait_s

    def take(self, pool_size: int) -> int:
        return min(pool_size, self.max_batch)
