"""A request's committed tokens by reference: a round's job carries the last ``TAIL`` tokens, the
length of what comes before them and a digest of it, not the whole context.

A receiver (drafter or verifier worker) keeps the context it last saw for each request; when
that context starts with the referenced prefix (same digest) it appends the tail, so a job's
bytes grow with the round's new tokens, not with the context. Otherwise (another worker served
the request's last rounds, a restart, an eviction) it reads the committed tokens from the
request's hash, one round trip.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

# Tokens a job carries: more than a round commits (max_window + 1), so that a worker that
# missed a few rounds (window 0 under load control sends drafters no job) still finds the rest.
TAIL = 64


def digest(tokens: Sequence[int]) -> bytes:
    """8 bytes of blake2b over the tokens as little-endian int32."""
    return hashlib.blake2b(np.asarray(tokens, dtype="<i4").tobytes(), digest_size=8).digest()


def by_reference(context: Sequence[int]) -> tuple[int, bytes, list[int]]:
    """(start, digest of context[:start], context[start:]); start 0 (the whole context) when it
    is no longer than ``TAIL``."""
    start = max(0, len(context) - TAIL)
    return start, (digest(context[:start]) if start else b""), list(context[start:])


def resolve(held: Sequence[int] | None, start: int, prefix_digest: bytes, tail: Sequence[int]) -> list[int] | None:
    """The whole context from what a worker holds for the request and a job's reference; None
    when what it holds does not start with the referenced prefix."""
    if start == 0:
        return list(tail)
    if held is None or len(held) < start or digest(held[:start]) != prefix_digest:
        return None
    return [*held[:start], *tail]


def check_stored(stored: Sequence[int], start: int, tail: Sequence[int]) -> list[int] | None:
    """The committed tokens read from the request's hash, if they are the referenced context
    (None when the request has moved on since the job was written: a stale round)."""
    if len(stored) != start + len(tail) or list(stored[start:]) != list(tail):
        return None
    return list(stored)
