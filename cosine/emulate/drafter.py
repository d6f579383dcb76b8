"""The emulated drafter: knows the oracle, and gets each token right with the acceptance of
its expertise against the request's domain.

Draft position ``i`` of a round is right when ``unit(seed, request, absolute position,
drafter, i)`` falls under the acceptance at ``i`` (given the positions before it were right;
after a wrong token the rest of the chain follows the oracle from the wrong context, and is
rejected with it). The ideal simulation (``cosine.emulate.ideal``) uses the same draw. A
request's domain is the marker its prompt starts with (the first prompt token of one of
``markers``); none: every expert is outside its domain, the generalist is itself. A call
sleeps once for its profiled time (every request and token of it), on the drafter's model
thread.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence

from cosine.core.tree import DraftChain
from cosine.drafters.base import Drafter, DraftRequest

from .oracle import Oracle, key_hash, unit
from .profiles import Acceptance, DrafterProfile
from .timing import Recorder, sleep_until

MARKER_SPAN = 4  # the first prompt tokens searched for a domain marker


def domain_of(context: Sequence[int], markers: Mapping[int, str]) -> str:
    """The request's domain: the first of its first tokens that is a domain marker."""
    for token in context[:MARKER_SPAN]:
        domain = markers.get(int(token))
        if domain is not None:
            return domain
    return ""


def right_at(seed: int, request: int, position: int, drafter: int, index: int, acceptance: float) -> bool:
    """Whether a drafter's ``index``-th token of a round, at ``position`` of the request's
    sequence, is the oracle's (each argument an integer: ``key_hash`` of names)."""
    return unit(seed, request, position, drafter, index) < acceptance


class EmulatedDrafter(Drafter):
    drafts_ahead = True

    def __init__(self, name: str, expert: str, profile: DrafterProfile, acceptance: Acceptance, oracle: Oracle,
                 markers: Mapping[int, str], slowdown: float = 1.0, recorder: Recorder | None = None, gpu=None) -> None:
        self.name = name
        self.expert = expert
        self.profile = profile
        self.acceptance = acceptance
        self.oracle = oracle
        self.markers = dict(markers)
        self.slowdown = slowdown
        self.recorder = recorder or Recorder()
        self.gpu = gpu if gpu is not None else contextlib.nullcontext()  # a verifier's GPU (emulate.shared_gpus)
        self._name_hash = key_hash(name)

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        with self.gpu:  # on a shared GPU, the call's time starts once the GPU is its own
            began = time.perf_counter()
            chains = [self.chain(r.key, r.context, r.window) for r in requests]
            drafting = [r for r in requests if r.window > 0]
            profiled = self.slowdown * self.profile.job_ms(len(drafting), max((r.window for r in drafting), default=0)) / 1000
            if profiled > 0:
                sleep_until(began + profiled)
                self.recorder.add("drafter", profiled, time.perf_counter() - began)
        return chains

    def chain(self, key: str, context: Sequence[int], window: int) -> DraftChain:
        """The chain this drafter proposes (no sleep): each token the oracle's when its draw
        says so, another token otherwise; its confidence the acceptance it expected, higher
        for a token it got right."""
        if window <= 0:
            return DraftChain((), (), None, self.name)
        domain = domain_of(context, self.markers)
        request = key_hash(key)
        seed = self.oracle.seed
        prev2, prev1, position = (context[-2] if len(context) > 1 else -1), context[-1], len(context)
        tokens, confidences = [], []
        for index in range(window):
            alpha = self.acceptance.at(self.expert, domain, index)
            token = self.oracle.next_token(prev2, prev1, position)
            if right_at(seed, request, position, self._name_hash, index, alpha):
                confidences.append(alpha + (1 - alpha) / 2)
            else:
                token = self.oracle.other_than(token, seed, request, position, self._name_hash)
                confidences.append(alpha / 2)
            tokens.append(token)
            prev2, prev1, position = prev1, token, position + 1
        return DraftChain(tuple(tokens), tuple(confidences), None, self.name)
