"""The emulated target's language: a seeded function of the last two tokens and the position
(pure, no torch).

``Oracle.next_token`` is the target's greedy token after any context, defined everywhere, so
that every output can be checked exactly; ``support`` adds three more tokens for sampled
requests (the next-token distribution is ``Acceptance.sampling`` over them). Tokens come from
``[low, high)``: above the tokenizer's special tokens (no end of sequence: outputs run to
``max_tokens``, so every system does the same work) and below ``high``, the width of the rows
the emulated target returns. ``unit`` is the seeded uniform draw the emulated drafters' and the
ideal simulation's correctness both use.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

MASK = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
LOW, HIGH = 64, 2048  # default token range: past SmolLM2's special tokens


def mix(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 rounds)."""
    h = GOLDEN
    for part in parts:
        h = (h ^ (part & MASK)) * 0xBF58476D1CE4E5B9 & MASK
        h ^= h >> 27
        h = h * 0x94D049BB133111EB & MASK
        h ^= h >> 31
    return h


def unit(*parts: int) -> float:
    """A uniform draw in [0, 1) fixed by ``parts``."""
    return (mix(*parts) >> 11) / float(1 << 53)


def key_hash(key: str) -> int:
    """A request id (or a drafter name) as an integer for ``mix``."""
    return zlib.crc32(key.encode())


@dataclass(frozen=True, slots=True)
class Oracle:
    seed: int = 0
    low: int = LOW
    high: int = HIGH

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high - 4:
            raise ValueError("the oracle needs 0 <= low < high - 4")

    def next_token(self, prev2: int, prev1: int, position: int) -> int:
        """The greedy token at ``position`` (the context's length) after ``prev2, prev1``."""
        return self.low + mix(self.seed, position, prev2, prev1) % (self.high - self.low)

    def after(self, context: Sequence[int]) -> int:
        return self.next_token(context[-2] if len(context) > 1 else -1, context[-1], len(context))

    def support(self, prev2: int, prev1: int, position: int, count: int = 4) -> list[int]:
        """The greedy token and ``count - 1`` distinct others after it (the support of the
        sampled distribution, most likely first)."""
        span = self.high - self.low
        h = mix(self.seed, position, prev2, prev1)
        greedy = self.low + h % span
        offset = 1 + (h >> 24) % (span - count)
        return [greedy, *(self.low + (greedy - self.low + offset + j) % span for j in range(count - 1))]

    def other_than(self, token: int, *parts: int) -> int:
        """A token in range that is not ``token``, fixed by ``parts``."""
        span = self.high - self.low
        return self.low + (token - self.low + 1 + mix(*parts) % (span - 1)) % span

    def continuation(self, context: Sequence[int], count: int) -> list[int]:
        """The greedy output of ``count`` tokens after ``context`` (what every system must return)."""
        tokens = list(context[-2:])
        start = len(context)
        out = []
        for i in range(count):
            prev2 = tokens[-2] if len(tokens) > 1 else -1
            token = self.next_token(prev2, tokens[-1], start + i)
            out.append(token)
            tokens.append(token)
        return out
