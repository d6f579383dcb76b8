"""Lossless acceptance of drafted tokens against the target.

Vocabulary (as in vLLM's rejection sampler):
- *accepted* tokens: drafted tokens the target keeps;
- *recovered* token: when a drafted token is rejected, the token the target puts in its place
  (greedy: the target's argmax; sampling: a draw from the residual distribution);
- *bonus* token: when every drafted token on the walked path is accepted, the target's own next
  token after it.
Each round therefore yields ``accepted + 1`` new tokens.

Both rules walk a ``DraftTree`` (a chain is a branchless tree). ``target_probs`` rows follow the
verifier's layout: row 0 is the target's distribution after the committed context (the root),
row ``i + 1`` the distribution after tree node ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cosine.core.params import SamplingParams
from cosine.core.sampling import request_generator, warp_probs
from cosine.core.tree import ROOT, DraftTree
from cosine.policy.routing import RoundFeedback, tree_feedback


@dataclass(frozen=True, slots=True)
class Verdict:
    """accepted_nodes: tree nodes on the accepted path, root first; next_token: the recovered
    or bonus token that follows them."""

    accepted_nodes: tuple[int, ...]
    accepted_tokens: tuple[int, ...]
    next_token: int

    @property
    def accepted_len(self) -> int:
        return len(self.accepted_nodes)

    @property
    def new_tokens(self) -> tuple[int, ...]:
        return (*self.accepted_tokens, self.next_token)


def verify_greedy(tree: DraftTree, target_argmax: list[int] | torch.Tensor) -> Verdict:
    """Temperature 0: follow the child that equals the target's argmax, as far as it goes.

    target_argmax: [n + 1] the target's greedy token at the root and after each node.
    """
    argmax = [int(t) for t in target_argmax]
    path: list[int] = []
    node = ROOT
    while True:
        wanted = argmax[node + 1]
        child = tree.child_with_token(node, wanted)
        if child is None:
            return _verdict(tree, path, wanted)
        path.append(child)
        node = child


def verify_sampling(tree: DraftTree, target_probs: torch.Tensor, generator: torch.Generator) -> Verdict:
    """Temperature > 0: multi-draft speculative (rejection) sampling over the tree.

    target_probs: [n + 1, vocab], already warped (temperature, top-p) exactly as the drafts were.
    At each node the draws proposing its children are tried in rank order: a draw of token x
    from distribution q is accepted with probability min(1, p(x) / q(x)); on rejection p becomes
    the residual norm(max(p - q, 0)). A fixed proposal counts as q = one-hot(x). When every draw
    is rejected the recovered token is drawn from the residual; when the walk reaches a leaf the
    bonus token is drawn from the target's distribution there. The output is distributed as the
    target's own sampling, whatever the drafts.
    """
    path: list[int] = []
    node = ROOT
    while True:
        # Draws happen where the generator lives (CPU): the same seed gives the same tokens
        # whatever device verified, and a CUDA row meets a CPU generator only here.
        residual = target_probs[node + 1].float().to(generator.device)
        chosen = None
        for draw in tree.draws_below(node):
            token = tree.tokens[draw.node]
            draft_probs = _draft_row(tree, draw.probs_row, token, residual)
            ratio = residual[token] / draft_probs[token]
            if torch.rand((), generator=generator) < ratio:  # rand in [0, 1): ratio >= 1 always accepts
                chosen = draw.node
                break
            residual = _residual(residual, draft_probs)
        if chosen is None:
            token = int(torch.multinomial(residual, 1, generator=generator).item())
            return _verdict(tree, path, token)
        path.append(chosen)
        node = chosen


def verify_round(tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, round_index: int, context_len: int) -> Verdict:
    """One round's verdict under the request's sampling.

    logits: [n + 1, vocab] in the verifier's layout. A drafted round's draws come from the
    round's random stream; a round without drafts (window 0) is plain decoding, and its token
    is drawn from a stream keyed by the token's position (``decode_token``), so a sampled output
    is the same however its window-0 stretches are cut into rounds (one token a round, or several
    in one multi-step job).
    """
    if sampling.greedy:
        return verify_greedy(tree, logits.argmax(-1).tolist())
    if len(tree) == 0:
        return Verdict((), (), decode_token(logits[0], sampling, context_len))
    return verify_sampling(tree, warp_probs(logits, sampling), request_generator(sampling.seed, round_index, "verify"))


def verify_and_credit(
    tree: DraftTree, logits: torch.Tensor, sampling: SamplingParams, round_index: int, context_len: int
) -> tuple[Verdict, dict[str, RoundFeedback]]:
    """A drafted round verified: its verdict, and each drafter's share of it (the tree nodes it
    proposed, those on the accepted path). The verifier and the local engine verify every round
    with this one function; the coordinator and the engine then apply it with ``advance``."""
    verdict = verify_round(tree, logits, sampling, round_index, context_len)
    return verdict, tree_feedback(tree.sources, tree.confidences, verdict.accepted_nodes)


def decode_token(logits: torch.Tensor, sampling: SamplingParams, position: int) -> int:
    """The target's own next token at ``position`` (the context's length), without drafts.

    logits: [vocab]. Greedy: the argmax. Sampled: a draw from the warped distribution with a
    generator keyed by (seed, position): any worker, any cut of rounds, draws the same token.
    """
    if sampling.greedy:
        return int(logits.argmax())
    probs = warp_probs(logits[None], sampling)[0]
    generator = request_generator(sampling.seed, position, "decode")
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator).item())


def _draft_row(tree: DraftTree, probs_row: int | None, token: int, like: torch.Tensor) -> torch.Tensor:
    if probs_row is None:
        one_hot = torch.zeros_like(like)
        one_hot[token] = 1.0
        return one_hot
    assert tree.draft_probs is not None  # guaranteed by merge_chains
    return tree.draft_probs[probs_row].float().to(like.device)


def _residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    residual = torch.clamp(target_probs - draft_probs, min=0.0)
    total = residual.sum()
    if total <= 0:
        # p <= q everywhere means p == q: a rejection then had probability 0 (up to rounding).
        return target_probs
    return residual / total


def _verdict(tree: DraftTree, path: list[int], next_token: int) -> Verdict:
    return Verdict(
        accepted_nodes=tuple(path),
        accepted_tokens=tuple(tree.tokens[n] for n in path),
        next_token=int(next_token),
    )


def emitted_logprobs(logits: torch.Tensor, verdict: Verdict, top: int) -> list[list]:
    """Per emitted token (``verdict.new_tokens``): ``[logprob, [top ids], [top logprobs]]`` under
    the target's raw distribution (before temperature and top-p, as vLLM reports by default).

    logits: [n + 1, vocab] in the verifier's layout (row 0 after the committed context, row
    ``i + 1`` after tree node ``i``); the token emitted after node ``j`` was drawn at row ``j + 1``.
    """
    rows = torch.tensor([node + 1 for node in (ROOT, *verdict.accepted_nodes)], device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    tokens = torch.tensor(verdict.new_tokens, device=logits.device)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        top_ids, top_values = indices.tolist(), values.tolist()
    else:
        top_ids = top_values = [[] for _ in chosen]
    return [[_finite(c), ids, [_finite(v) for v in values]] for c, ids, values in zip(chosen, top_ids, top_values)]


def _finite(value: float) -> float:
    # A token the target gives probability 0 (a masked logit) has log-probability -inf, which
    # JSON cannot carry: -9999 stands for it, as in OpenAI's responses.
    return value if math.isfinite(value) else -9999.0
