"""The drafter interface every drafter kind implements.

Two methods, as transformers' candidate generators: ``propose`` drafts for a batch of requests,
``observe`` hears how many of its tokens the target accepted (the feedback hook beside the
drafter; learned drafters and routing scores use it). ``release`` drops soft state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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
