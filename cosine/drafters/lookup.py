"""Prompt lookup: a model-free drafter that copies what followed the last n-gram elsewhere in
the context. Strong where output repeats input (summaries, code edits), weak elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

from cosine.core.tree import DraftChain
from cosine.drafters.base import Drafter, DraftRequest


class PromptLookupDrafter(Drafter):
    """Proposes the continuation of the most recent earlier occurrence of the context's last
    n tokens (n from ``max_ngram`` down to ``min_ngram``). Confidence of each proposed token is
    the share of all earlier occurrences whose continuation agrees with the proposal so far.
    Proposals are fixed (no distribution), which verification treats as one-hot drafts."""

    drafts_ahead = False  # drafting costs nothing here: nothing to gain ahead

    def __init__(self, name: str = "prompt-lookup", *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        return [self._propose_one(list(r.context), r.window) for r in requests]

    def _propose_one(self, context: list[int], window: int) -> DraftChain:
        if window <= 0:
            return DraftChain((), (), None, self.name)
        for size in range(self.max_ngram, self.min_ngram - 1, -1):
            if len(context) <= size:
                continue
            pattern = context[-size:]
            starts = [i for i in range(len(context) - size) if context[i : i + size] == pattern]
            if starts:
                return self._chain_from(context, [s + size for s in starts], window)
        return DraftChain((), (), None, self.name)

    def _chain_from(self, context: list[int], follows: list[int], window: int) -> DraftChain:
        latest = follows[-1]
        proposal = context[latest : latest + window]
        confidences = []
        for depth in range(len(proposal)):
            agreeing = sum(1 for f in follows if context[f : f + depth + 1] == proposal[: depth + 1])
            confidences.append(agreeing / len(follows))
        return DraftChain(tuple(proposal), tuple(confidences), None, self.name)
