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

from collections.abc import Callable, Sequence
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
        self, pool_size: int, pool_tokens: int, oldest_wait_s: float, active_requests: int, live_verifiers: int, busy_verifiers: int,
        drafting: int = 0, drafting_due_s: float = 0.0, split_cost_s: float = 0.0,
    ) -> bool:
        """busy_verifiers: batches queued or in verification (the verify group's lag + pending);
        drafting: active requests whose round is with the drafters, expected back within
        ``drafting_due_s``; split_cost_s: what verifying them in a batch of their own would
        cost over joining this one (the fixed part of a verification).

        An idle verifier waits (up to ``max_wait_s``) for candidates about to come back from
        verification. When every request missing from the pool is drafting, it waits for them
        only while they are due back sooner than a batch of their own would cost: going now
        splits the requests into two batches that go on alternating, each paying the fixed
        cost; waiting keeps them in one."""
        if pool_size == 0:
            return False
        if pool_size >= self.fair_share(active_requests, live_verifiers) or pool_tokens >= self.max_tokens:
            return True
        idle_verifier = busy_verifiers < max(1, live_verifiers)
        if not idle_verifier:
            return False
        if oldest_wait_s >= self.max_wait_s:
            return True
        return pool_size + drafting >= active_requests and drafting_due_s > split_cost_s

    def first_come(self, pool: Sequence[Pending], kv_rows: int = 0) -> list[int]:
        """The first-come batch: pool order, at most ``max_batch`` candidates, only those whose
        K/V rows still fit the verifier's pool (``kv_rows``; 0 = not bounded), the first
        always."""
        chosen: list[int] = []
        rows = 0
        for i, p in enumerate(pool):
            if len(chosen) >= self.max_batch:
                break
            if chosen and kv_rows and rows + p.kv_rows > kv_rows:
                continue
            chosen.append(i)
            rows += p.kv_rows
        return chosen

    def select(
        self, pool: Sequence[Pending], cost_ms: Callable[[int, int], float], latency_weight: float = 0.0, starve_s: float = 1.0, kv_rows: int = 0,
    ) -> list[int]:
        """Which pooled candidates (indices, in pool order) form the next batch.

        Maximises ``sum(expected + latency_weight * age) / cost_ms(batch size, fed tokens)``
        over the batch, greedily: candidates waiting ``starve_s`` or more go first (oldest
        first), then requests' first rounds (first-come: admitting a request is what keeps later
        batches full, which one batch's ratio does not see — held back, they cost throughput in
        bench/load.py's ablation), then the others by their value per fed token,
        each kept only if it raises the ratio; at most ``max_batch`` candidates and
        ``max_tokens`` fed tokens of rounds after the first (a starved candidate bigger than
        the budget still goes, alone), and only candidates whose K/V rows together fit the
        verifier's pool (``kv_rows``, 0 = not bounded: a batch that does not fit would be
        served one request at a time; the first candidate always goes). ``latency_weight`` is in tokens per second of waiting:
        0 is throughput-first; large values favour the oldest candidates in small, quick
        batches.
        """
        if not pool:
            return []
        value = [p.expected + latency_weight * p.age_s for p in pool]
        starved = sorted((i for i, p in enumerate(pool) if p.age_s >= starve_s), key=lambda i: -pool[i].age_s)
        firsts = sorted((i for i, p in enumerate(pool) if p.first and p.age_s < starve_s), key=lambda i: -pool[i].age_s)
        others = sorted((i for i, p in enumerate(pool) if not p.first and p.age_s < starve_s), key=lambda i: -value[i] / max(1, pool[i].tokens))
        chosen: list[int] = []
        tokens, budget, total, rows = 0, 0, 0.0, 0  # budget: fed tokens of rounds after the first
        for i in starved + firsts + others:
            if len(chosen) >= self.max_batch:
                break
            if chosen and not pool[i].first and budget + pool[i].tokens > self.max_tokens:
                continue
            if chosen and kv_rows and rows + pool[i].kv_rows > kv_rows:
                continue
            if chosen and i not in starved and not pool[i].first:
                before = total / max(cost_ms(len(chosen), tokens), 1e-9)
                after = (total + value[i]) / max(cost_ms(len(chosen) + 1, tokens + pool[i].tokens), 1e-9)
                if after < before:
                    continue
            chosen.append(i)
            rows += pool[i].kv_rows
            tokens += pool[i].tokens
            budget += 0 if pool[i].first else pool[i].tokens
            total += value[i]
        return sorted(chosen)


@dataclass(frozen=True, slots=True)
class Pending:
    """A pooled candidate as the batch policy sees it."""

    age_s: float  # time waited in the pool
    tokens: int  # tokens the verifier feeds for it: drafted nodes + 1, plus an uncached prompt
    expected: float  # tokens its round is expected to commit
    first: bool = False  # a request's first round (its prompt's prefill)
    kv_rows: int = 0  # K/V pool rows it holds during its verification (context + tree, in whole blocks)
