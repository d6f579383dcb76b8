"""Sampling parameters, logit warping and per-request seeded generators.

The same warp (temperature, then top-p) is applied to the target's and the drafters' logits,
so that a draft's distribution and the target's are compared on the same footing.
"""

from __future__ import annotations

import hashlib

import torch

from cosine.core.params import MAX_TEMPERATURE, SamplingParams  # noqa: F401 - re-exported: the parameters' home is torch-free


def warp_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Turn logits into the sampling distribution: softmax(logits / T), restricted to top-p.

    logits: [n, vocab] -> probs: [n, vocab] (float32, rows sum to 1).
    Greedy params give the one-hot of the argmax, so callers can treat both cases alike.
    """
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        probs = _restrict_top_p(probs, params.top_p)
    return probs


def _restrict_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    # Keep the smallest set of most likely tokens whose mass reaches top_p; the first token
    # is always kept. Ties in probability are broken by token id (stable sort), so the target
    # and a drafter that agree on the logits keep the same set.
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True)


def restrict_top_k(probs: torch.Tensor, k: int) -> torch.Tensor:
    """A distribution ([vocab]) cut to its ``k`` most likely tokens and renormalized.

    Drafters sample from the cut distribution and send exactly it (sparse, a few hundred bytes
    instead of the whole vocabulary): rejection sampling is lossless for any proposal
    distribution the draft was drawn from, so the cut changes acceptance, never the output.
    ``k`` <= 0 or >= the vocabulary leaves the row as it is.
    """
    if k <= 0 or k >= probs.shape[-1]:
        return probs
    values, indices = torch.topk(probs, k)
    cut = torch.zeros_like(probs)
    cut[indices] = values / values.sum()
    return cut


def request_generator(seed: int, round_index: int, purpose: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator determined by (request seed, round, purpose).

    Deriving it from the request state, rather than carrying one generator along, keeps workers
    stateless: any worker that replays a round draws the same random numbers.
    """
    digest = hashlib.blake2b(f"{seed}:{round_index}:{purpose}".encode(), digest_size=8).digest()
    generator = torch.Generator(device=device)
    generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from a probability row ([vocab])."""
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator).item())
