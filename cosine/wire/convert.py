"""Conversions between wire messages and the core's objects (trees, chains, probabilities).

Everything here is NumPy: the router, fusion and coordinator use this module and never load torch
(a process that imports torch holds ~200 MB more); the verifier and drafters make tensors of the
arrays themselves (``torch.from_numpy``, no copy)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cosine.core.rounds import RequestState
from cosine.core.tree import DraftChain, DraftTree, Draw
from cosine.policy.routing import RoundFeedback
from cosine.wire.messages import Candidate, Draft, WireError

if TYPE_CHECKING:
    import torch


def probs_to_bytes(probs: torch.Tensor | np.ndarray | None) -> list[bytes]:
    """Draft distributions [k, vocab] as sparse rows: the vocabulary size (uint32), then the
    indices of the tokens with nonzero probability (int32, increasing), then their
    probabilities (float32), all little-endian. A drafter's cut distribution
    (``DRAFT_SUPPORT`` tokens) takes a few hundred bytes instead of 4 bytes per vocabulary entry."""
    if probs is None:
        return []
    rows = []
    array = np.asarray(probs, dtype=np.float32) if isinstance(probs, np.ndarray) else probs.float().cpu().numpy()
    for row in array:
        (indices,) = np.nonzero(row)
        rows.append(np.uint32(row.shape[0]).astype("<u4").tobytes() + indices.astype("<i4").tobytes() + row[indices].astype("<f4").tobytes())
    return rows


def probs_from_bytes(rows: list[bytes], vocab_size: int | None = None) -> np.ndarray | None:
    """Sparse rows (``probs_to_bytes``) as a dense float32 [k, vocab] array."""
    if not rows:
        return None
    if any(not isinstance(r, bytes) or len(r) < 4 or (len(r) - 4) % 8 for r in rows):
        raise WireError("draft_probs rows must be a uint32 vocabulary size and (int32 index, float32 probability) pairs")
    widths = {int(np.frombuffer(r[:4], dtype="<u4")[0]) for r in rows}
    if len(widths) != 1:
        raise WireError("draft_probs rows differ in vocabulary size")
    width = widths.pop()
    if vocab_size is not None and width != vocab_size:
        raise WireError(f"draft_probs rows have {width} entries, the vocabulary has {vocab_size}")
    dense = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        n = (len(row) - 4) // 8
        indices = np.frombuffer(row, dtype="<i4", count=n, offset=4)
        values = np.frombuffer(row, dtype="<f4", count=n, offset=4 + 4 * n)
        if n and (indices[0] < 0 or indices[-1] >= width or np.any(np.diff(indices) <= 0)):
            raise WireError(f"draft_probs indices must be increasing and in [0, {width})")
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise WireError("draft_probs probabilities must be finite and >= 0")
        dense[i, indices] = values
    return dense


def states_to_bytes(states: torch.Tensor) -> bytes:
    """The target's hidden states [n, d] as fp16 rows (little-endian) for the wire."""
    return states.half().cpu().numpy().astype("<f2").tobytes()


def states_from_bytes(data: bytes, width: int) -> np.ndarray | None:
    """fp16 rows of ``width`` as a float32 [n, width] array; None when the bytes are not whole rows."""
    if len(data) % (2 * width):
        return None
    return np.frombuffer(data, dtype="<f2").astype(np.float32).reshape(-1, width)


def draft_to_chain(draft: Draft) -> DraftChain:
    """A drafter's draft as a chain for fusion; its distributions as NumPy rows."""
    if len(draft.tokens) != len(draft.confidences):
        raise WireError("draft tokens and confidences differ in length")
    probs = probs_from_bytes(draft.draft_probs)
    if probs is not None and probs.shape[0] != len(draft.tokens):
        raise WireError("draft_probs needs one row per token")
    return DraftChain(tuple(draft.tokens), tuple(draft.confidences), probs, draft.drafter)


def tree_to_candidate(request_id: str, round_index: int, tree: DraftTree, homes: list | None = None) -> Candidate:
    return Candidate(
        request_id=request_id,
        round=round_index,
        tokens=list(tree.tokens),
        parents=list(tree.parents),
        confidences=[float(c) for c in tree.confidences],
        sources=[list(s) for s in tree.sources],
        draws=[[d.node, -1 if d.probs_row is None else d.probs_row] for d in tree.draws],
        draft_probs=probs_to_bytes(tree.draft_probs),
        homes=homes or [],
    )


def candidate_to_tree(candidate: Candidate, vocab_size: int | None = None) -> DraftTree:
    """The fused tree of a candidate, its draft distributions as a NumPy array."""
    probs = probs_from_bytes(candidate.draft_probs, vocab_size)
    rows = 0 if probs is None else probs.shape[0]
    draws = []
    for pair in candidate.draws:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
            raise WireError("each draw must be [node, probs_row]")
        node, row = pair
        if not 0 <= node < len(candidate.tokens) or not -1 <= row < rows:
            raise WireError(f"draw {pair} out of range")
        draws.append(Draw(node, None if row < 0 else row))
    try:
        return DraftTree(
            tokens=tuple(candidate.tokens),
            parents=tuple(candidate.parents),
            confidences=tuple(float(c) for c in candidate.confidences),
            sources=tuple(tuple(s) for s in candidate.sources),
            draws=tuple(draws),
            draft_probs=probs,
        )
    except (ValueError, TypeError) as error:
        raise WireError(f"bad tree: {error}") from None


def empty_candidate(state: RequestState) -> Candidate:
    """A round with no drafts: the target alone produces one token."""
    return Candidate(state.request_id, state.round, [], [], [], [], [], [])


def feedback_from_wire(rows: list) -> dict[str, RoundFeedback]:
    """A verified item's per-drafter rows ([name, drafted, accepted, confidence sum]); rows that
    are not of that shape are left out (accounting is never worth failing a round for)."""
    feedback = {}
    for row in rows if isinstance(rows, list) else []:
        if (isinstance(row, list) and len(row) == 4 and isinstance(row[0], str) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in row[1:3])
                and isinstance(row[3], (int, float))):
            feedback[row[0]] = RoundFeedback(row[1], min(row[1], row[2]), float(row[3]))
    return feedback
