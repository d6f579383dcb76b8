"""Choosing the experts whose drafters draft for a request.

Two parts. ``choose_experts``: the candidate experts (a pinned expert alone; otherwise keyword
matches and the configured defaults, restricted to experts that have a drafter). Then the
paper's routing over those candidates: a cold-start choice from the prompt (``PromptClassifier``)
and, per request, online scores that combine each expert's drafting confidence with its verified
consistency harmonically, with exploration when acceptance is low (``RequestRouting``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


def choose_experts(
    text: str,
    pinned: str | None,
    default_experts: Sequence[str],
    keywords: Mapping[str, Sequence[str]],
    available: Sequence[str],
    max_experts: int,
) -> list[str]:
    if pinned is not None:
        return [pinned]
    lowered = text.lower()
    matched = [expert for expert, words in keywords.items() if any(w.lower() in lowered for w in words)]
    chosen: list[str] = []
    for expert in [*matched, *default_experts]:
        if expert in available and expert not in chosen:
            chosen.append(expert)
    if not chosen and available:
        chosen = [available[0]]
    return chosen[:max_experts]


# ---- the paper's routing: a cold-start classifier, then online scores per request -------------


class PromptClassifier:
    """Cold start: which expert's data a prompt looks like (multinomial naive Bayes over token ids).

    ``profiles`` maps each expert to the token counts of its training conversations (written by
    ``cosine distill`` beside the drafter). ``probabilities`` is the posterior under a uniform
    prior, tempered by the prompt's length (the mean log-likelihood per token, times
    ``sharpness``), so that a long prompt does not make the first choice look certain.
    """

    def __init__(self, profiles: Mapping[str, Mapping[int, int]], vocab_size: int, *, smoothing: float = 0.5, sharpness: float = 8.0) -> None:
        if vocab_size < 1:
            raise ValueError("vocab_size must be >= 1")
        self.experts = list(profiles)
        self.vocab_size = vocab_size
        self.sharpness = sharpness
        self.smoothing = smoothing
        self._log_probs: dict[str, dict[int, float]] = {}
        self._log_unseen: dict[str, float] = {}
        for expert, counts in profiles.items():
            total = sum(counts.values()) + smoothing * vocab_size
            self._log_probs[expert] = {int(t): math.log((c + smoothing) / total) for t, c in counts.items()}
            self._log_unseen[expert] = math.log(smoothing / total)

    def probabilities(self, token_ids: Sequence[int]) -> dict[str, float]:
        if not self.experts:
            return {}
        if not token_ids:
            return {e: 1.0 / len(self.experts) for e in self.experts}
        scores = {}
        for expert in self.experts:
            table, unseen = self._log_probs[expert], self._log_unseen[expert]
            scores[expert] = sum(table.get(t, unseen) for t in token_ids) / len(token_ids) * self.sharpness
        top = max(scores.values())
        weights = {e: math.exp(s - top) for e, s in scores.items()}
        total = sum(weights.values())
        return {e: w / total for e, w in weights.items()}


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """How a request's drafters are chosen round by round (see ``RequestRouting``).

    decay: weight of the newest round in the running confidence and consistency; explore_below:
    accepted tokens per round (running) under which an expert not yet tried is tried;
    cooperate_ratio: an expert cooperates while its score is at least this share of the best;
    max_experts: most experts drafting for one request in one round.
    """

    max_experts: int = 2
    decay: float = 0.3
    explore_below: float = 1.0
    cooperate_ratio: float = 0.6
    prior_weight: float = 0.5  # the classifier's share in a new request's starting scores

    def __post_init__(self) -> None:
        if self.max_experts < 1:
            raise ValueError("max_experts must be >= 1")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError("decay must be in (0, 1]")
        if not 0.0 <= self.cooperate_ratio <= 1.0 or not 0.0 <= self.prior_weight <= 1.0:
            raise ValueError("cooperate_ratio and prior_weight must be in [0, 1]")


@dataclass(slots=True)
class ExpertScore:
    confidence: float  # running mean of the drafter's own probability for its drafted tokens
    consistency: float  # running share of its drafted tokens the target accepted
    rounds: int = 0  # rounds it drafted in

    @property
    def score(self) -> float:
        """The paper's combination: the harmonic mean of confidence and consistency."""
        total = self.confidence + self.consistency
        return 2 * self.confidence * self.consistency / total if total > 0 else 0.0


@dataclass(slots=True)
class RoundFeedback:
    """What one expert did in one verified round: tokens drafted and accepted (tree nodes it
    proposed) and the sum of its confidences over them."""

    drafted: int
    accepted: int
    confidence_sum: float


@dataclass(slots=True)
class RequestRouting:
    """One request's routing state (it travels with the request's state: plain fields only).

    Starts from the classifier's probabilities (the cold-start choice); every verified round
    moves each drafting expert's confidence and consistency towards what that round showed.
    Each round the experts scoring within ``cooperate_ratio`` of the best cooperate (at most
    ``max_experts``); while the request's running acceptance is below ``explore_below``, the
    last place goes to an expert not tried yet (then to the least tried), so a wrong first choice
    is found out.
    """

    scores: dict[str, ExpertScore]
    first_choice: str
    accepted_per_round: float = -1.0  # running; < 0: no round yet
    rounds: int = 0
    explored: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, experts: Sequence[str], prior: Mapping[str, float], policy: RoutingPolicy, pinned: str | None = None) -> RequestRouting:
        if not experts:
            raise ValueError("no experts to route to")
        if pinned is not None:
            experts = [pinned]
        uniform = 1.0 / len(experts)
        start = {e: (1 - policy.prior_weight) * 0.5 + policy.prior_weight * prior.get(e, uniform) for e in experts}
        # Rank by prior, then by the configured order (a stable sort keeps it for ties).
        ranked = sorted(experts, key=lambda e: -prior.get(e, uniform))
        return cls({e: ExpertScore(start[e], start[e]) for e in ranked}, ranked[0])

    def choose(self, policy: RoutingPolicy) -> list[str]:
        ranked = sorted(self.scores, key=lambda e: -self.scores[e].score)
        best = self.scores[ranked[0]].score
        chosen = [e for e in ranked if self.scores[e].score >= policy.cooperate_ratio * best][: policy.max_experts]
        exploring = 0 <= self.accepted_per_round < policy.explore_below
        if exploring and len(self.scores) > len(chosen):
            untried = [e for e in ranked if e not in chosen and self.scores[e].rounds == 0]
            candidate = untried[0] if untried else min((e for e in ranked if e not in chosen), key=lambda e: self.scores[e].rounds)
            if len(chosen) >= policy.max_experts:
                chosen[-1] = candidate
            else:
                chosen.append(candidate)
            self.explored.append(candidate)
        return chosen

    def observe(self, feedback: Mapping[str, RoundFeedback], accepted_len: int, policy: RoutingPolicy) -> None:
        """A verified round: ``feedback`` per expert that drafted; ``accepted_len`` drafted tokens
        the round kept."""
        for expert, fed in feedback.items():
            score = self.scores.get(expert)
            if score is None or fed.drafted == 0:
                continue
            score.confidence += policy.decay * (fed.confidence_sum / fed.drafted - score.confidence)
            score.consistency += policy.decay * (fed.accepted / fed.drafted - score.consistency)
            score.rounds += 1
        if self.accepted_per_round < 0:
            self.accepted_per_round = float(accepted_len)
        else:
            self.accepted_per_round += policy.decay * (accepted_len - self.accepted_per_round)
        self.rounds += 1

    def best(self) -> str:
        return max(self.scores, key=lambda e: self.scores[e].score)

    def to_dict(self) -> dict:
        """Plain values for the request state (JSON)."""
        return {"scores": {e: [round(s.confidence, 5), round(s.consistency, 5), s.rounds] for e, s in self.scores.items()},
                "first": self.first_choice, "apr": round(self.accepted_per_round, 5), "rounds": self.rounds, "explored": self.explored[-16:]}

    @classmethod
    def from_dict(cls, data: Mapping) -> RequestRouting:
        try:
            scores = {str(e): ExpertScore(float(c), float(s), int(n)) for e, (c, s, n) in data["scores"].items()}
            return cls(scores, str(data["first"]), float(data["apr"]), int(data["rounds"]), [str(e) for e in data.get("explored", [])])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"bad routing state: {error}") from None


def tree_feedback(sources: Sequence[Sequence[str]], confidences: Sequence[float], accepted_nodes: Sequence[int]) -> dict[str, RoundFeedback]:
    """Per drafter, from a verified tree: the nodes it proposed, those on the accepted path, and
    their confidences summed (a node two drafters proposed credits its highest confidence to
    both: the tree keeps no more)."""
    accepted = set(accepted_nodes)
    feedback: dict[str, RoundFeedback] = {}
    for node, (names, confidence) in enumerate(zip(sources, confidences)):
        for name in names:
            fed = feedback.setdefault(name, RoundFeedback(0, 0, 0.0))
            fed.drafted += 1
            fed.accepted += node in accepted
            fed.confidence_sum += confidence
    return feedback


def by_expert(feedback: Mapping[str, RoundFeedback], expert_of: Mapping[str, str]) -> dict[str, RoundFeedback]:
    """Drafter feedback summed per expert (``expert_of``: drafter name -> expert; unknown names
    are their own expert)."""
    out: dict[str, RoundFeedback] = {}
    for name, fed in feedback.items():
        total = out.setdefault(expert_of.get(name, name), RoundFeedback(0, 0, 0.0))
        total.drafted += fed.drafted
        total.accepted += fed.accepted
        total.confidence_sum += fed.confidence_sum
    return out


def routing_policy(config) -> RoutingPolicy:
    """The policy of a ``Config``'s router section."""
    router = config.router
    return RoutingPolicy(max_experts=router.max_experts, decay=router.decay, explore_below=router.explore_below, cooperate_ratio=router.cooperate_ratio)
