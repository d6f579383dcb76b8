"""The drafter interface every drafter kind implements.

Two methods, as transformers' candidate generators: ``propose`` drafts for a batch of requests,
``observe`` hears how many of its tokens the target accepted (the feedback hook beside the
drafter; learned drafters and routing scores use it). ``release`` drops soft state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from cosine.core.sampling import SamplingParams, request_generator
from cosine.core.tree import DraftChain

# A sampled draft is drawn from the drafter's distribution cut to its most likely tokens (then
# renormalized), and that cut distribution is what travels for verification: 32 (index, p)
# pairs, 260 bytes, instead of the whole vocabulary (196 KB for 49,152 tokens). Measured with
# general-small against the demo target (96 chat positions), the cut does not cost acceptance
# (sum of min(p, q): 0.398 whole, 0.401 cut to 32 at temperature 0.7; 0.398 and 0.413 at 1.0):
# the drafter's tail is mass the target rarely agrees with.
DRAFT_SUPPORT = 32


@dataclass(frozen=True, slots=True)
class DraftRequest:
    """What a drafter needs for one request's round: the committed tokens and a window."""

    key: str
    context: Sequence[int]
    window: int
    sampling: SamplingParams
    round_index: int
    # The target's final hidden states at context positions 0, 1, ... (at least L - 1 rows for
    # a context of L tokens), for drafters that read them (``needs_features``); else None.
    features: torch.Tensor | None = None
    domain: str = ""  # the request's first-choice expert (per-domain datastores key on it)
    step: int = 0  # step mode: the draft step this call makes (its draws get their own random stream)


class Drafter(ABC):
    name: str
    needs_features = False  # True: propose() wants DraftRequest.features
    # Pipelining may call propose() on a guessed context (this round's plus its draft): only
    # drafters whose drafting costs a forward and learns nothing from the contexts it sees.
    drafts_ahead = True

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        """One chain per request (possibly empty), at most ``window`` tokens long."""

    def observe(self, key: str, proposed: int, accepted: int) -> None:
        """Feedback after verification: ``accepted`` of ``proposed`` tokens were kept."""

    def release(self, key: str) -> None:
        """The request is finished: drop soft state kept for it."""

    def generator(self, request: DraftRequest) -> torch.Generator:
        purpose = f"draft:{self.name}" if request.step == 0 else f"draft:{self.name}:{request.step}"
        return request_generator(request.sampling.seed, request.round_index, purpose)


def propose_ahead(drafter: Drafter, request: DraftRequest, draft: Sequence[int]) -> tuple[list[int], DraftChain] | None:
    """The request's next round drafted ahead (pipelining): ``(context, chain)`` for the context
    that round has when every token of ``draft`` is accepted and the target's next token is the
    drafter's guess, or None when the drafter has no guess.

    ``request`` is the next round's: this round's context, the window to draft, the sampling,
    the next round's index. The guess is the drafter's most likely token after the draft (the
    likeliest to be the target's too, and no draw from a random stream); the chain is then
    drafted from the guessed context with the next round's own random stream, exactly as a
    fresh draft of that round would be.
    """
    guessed = [*request.context, *draft]
    if request.sampling.greedy:  # no draws: the guess and the chain in one call
        [chain] = drafter.propose([replace(request, context=guessed, window=request.window + 1)])
        if len(chain.tokens) < 2:
            return None
        probs = chain.draft_probs[1:] if chain.draft_probs is not None else None
        return [*guessed, chain.tokens[0]], DraftChain(chain.tokens[1:], chain.confidences[1:], probs, chain.drafter)
    [first] = drafter.propose([replace(request, context=guessed, window=1, sampling=SamplingParams())])
    if not first.tokens:
        return None
    context = [*guessed, first.tokens[0]]
    [chain] = drafter.propose([replace(request, context=context)])
    return (context, chain) if chain.tokens else None
