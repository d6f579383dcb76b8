"""The lossless check of design.md, shared by the tests and the benchmarks: compare an output
with the reference (transformers ``generate``, greedy) up to the first divergence; a divergence
is excused only at a numerical tie (the target's top-2 logit gap below ``TIE_GAP`` there)."""

from __future__ import annotations

import torch

TIE_GAP = 1e-3


def first_divergence(output: list[int], reference: list[int], eos: int = 2) -> int | None:
    """The first position where ``output`` and ``reference`` differ, None when they agree
    (an output clipped at EOS where the reference goes on counts as agreeing)."""
    for index, (mine, theirs) in enumerate(zip(output, reference)):
        if mine != theirs:
            return index
    if len(output) != len(reference) and not (output and output[-1] == eos):
        return min(len(output), len(reference))
    return None


def top2_gap(model, context: list[int]) -> float:
    """The gap between the target's two largest next-token logits after ``context``."""
    with torch.inference_mode():
        logits = model(torch.tensor([context])).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])
