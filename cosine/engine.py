"""The single-process reference engine: draft -> verify rounds in one process.

It is the oracle the distributed pipeline is tested against, and the smallest complete picture
of the algorithm: each round, the request's drafters (all of them, or those its routing state
chooses) propose; proposals are used as is (chain mode: the first drafter), fused into a token
tree from whole chains (tree mode) or fused step by step, every drafter continuing from the most
confident token of each step (step mode); one target forward verifies the whole batch; each
request keeps its accepted tokens plus one recovered/bonus token; windows and routing scores are
retuned from what was accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from cosine.core.acceptance import Verdict, verify_round
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import FINISH_ERROR, Emission, OutputAssembler, StopRules
from cosine.core.tree import DraftChain, DraftTree, fuse_steps, fused_token, merge_chains, truncate_to_budget
from cosine.drafters.base import Drafter, DraftRequest
from cosine.models.runner import ForwardItem, ModelRunner
from cosine.policy.routing import PromptClassifier, RequestRouting, RoundFeedback, RoutingPolicy
from cosine.policy.window import WindowPolicy

log = logging.getLogger(__name__)

MODES = ("chain", "tree", "step")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    stop: StopRules
    expert: str | None = None  # pin the request to this drafter (routing on)


@dataclass(slots=True)
class GenerationResult:
    """The final entry of the client protocol."""

    request_id: str
    finish_reason: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    error: str = ""
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    drafters: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> drafted, accepted
    first_choice: str = ""  # routing: the cold-start choice
    chosen: list[tuple[str, ...]] = field(default_factory=list)  # routing: the drafters of each round

    def final_entry(self) -> dict:
        entry = {
            "type": "final",
            "id": self.request_id,
            "finish_reason": self.finish_reason,
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "rounds": self.rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "drafters": self.drafters,
        }
        if self.error:
            entry["error"] = self.error
        return entry


@dataclass(slots=True)
class _Active:
    request: GenerationRequest
    assembler: OutputAssembler
    context: list[int]
    window: int
    started: float
    result: GenerationResult
    round_index: int = 0
    features: torch.Tensor | None = None  # the target's hidden states at positions 0.. (feature drafters)
    routing: RequestRouting | None = None
    drafting: list[str] = field(default_factory=list)  # this round's drafters
    draws: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)  # this round: drafter -> (depth, token, confidence)
    chained: bool = True  # this round's draws are whole chains (tree/chain) rather than steps


EmissionCallback = Callable[[str, Emission], None]


@dataclass(slots=True)
class EngineStats:
    """Where a round's time goes, and acceptance per draft position (depth in the tree).

    drafted_at[d]: rounds whose draft reached depth d; accepted_at[d]: rounds that accepted a
    token at depth d.
    """

    rounds: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accept_seconds: float = 0.0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def record(self, tree: DraftTree, accepted_len: int) -> None:
        depth = max(tree.depths(), default=-1) + 1
        while len(self.drafted_at) < depth:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for d in range(depth):
            self.drafted_at[d] += 1
            self.accepted_at[d] += d < accepted_len

    def acceptance_by_position(self) -> list[float]:
        return [a / n if n else 0.0 for a, n in zip(self.accepted_at, self.drafted_at)]


class LocalEngine:
    def __init__(
        self,
        target: ModelRunner,
        tokenizer,
        drafters: Sequence[Drafter],
        *,
        mode: str = "chain",
        window: WindowPolicy = WindowPolicy(),
        max_batch: int = 8,
        max_tree_nodes: int = 32,
        context_limit: int | None = None,
        routing: RoutingPolicy | None = None,
        classifier: PromptClassifier | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "tree" and len(drafters) < 1:
            raise ValueError("tree mode needs at least one drafter")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.target = target
        self.tokenizer = tokenizer
        self.drafters = list(drafters)
        self.mode = mode
        self.window = window
        self.max_batch = max_batch
        self.max_tree_nodes = max_tree_nodes
        self.context_limit = context_limit or target.model.config.max_position_embeddings
        self.routing = routing  # None: every drafter drafts for every request
        self.classifier = classifier
        self.stats = EngineStats()
        drafting = self.drafters if mode != "chain" else self.drafters[:1]
        self.needs_features = any(getattr(d, "needs_features", False) for d in drafting)

    def generate(self, requests: Sequence[GenerationRequest], on_emission: EmissionCallback | None = None) -> list[GenerationResult]:
        """Run all requests to completion; up to ``max_batch`` share each verification pass."""
        results: dict[str, GenerationResult] = {}
        waiting = list(requests)
        active: list[_Active] = []
        while waiting or active:
            while waiting and len(active) < self.max_batch:
                state = self._admit(waiting.pop(0))
                if isinstance(state, GenerationResult):
                    results[state.request_id] = state
                else:
                    active.append(state)
            if not active:
                continue
            for state in self._round(active, on_emission):
                active.remove(state)
                results[state.request.request_id] = state.result
        return [results[r.request_id] for r in requests]

    # ---- one round -------------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> _Active | GenerationResult:
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0 or prompt_len + request.stop.max_tokens > self.context_limit:
            reason = (
                "empty prompt"
                if prompt_len == 0
                else f"prompt ({prompt_len} tokens) plus max_tokens ({request.stop.max_tokens}) exceeds the context limit ({self.context_limit})"
            )
            return GenerationResult(request.request_id, FINISH_ERROR, error=reason, prompt_tokens=prompt_len)
        result = GenerationResult(request.request_id, "", prompt_tokens=prompt_len)
        assembler = OutputAssembler(self.tokenizer, request.stop)
        state = _Active(request, assembler, list(request.prompt_ids), self.window.initial, time.perf_counter(), result)
        if self.routing is not None:
            names = [d.name for d in self.drafters]
            if request.expert is not None and request.expert not in names:
                return GenerationResult(request.request_id, FINISH_ERROR, error=f"unknown expert {request.expert!r} (valid: {', '.join(names)})", prompt_tokens=prompt_len)
            prior = self.classifier.probabilities(request.prompt_ids) if self.classifier else {}
            state.routing = RequestRouting.start(names, prior, self.routing, request.expert)
            result.first_choice = state.routing.first_choice
        return state

    def _round(self, active: list[_Active], on_emission: EmissionCallback | None) -> list[_Active]:
        began = time.perf_counter()
        trees = self._draft(active)
        drafted = time.perf_counter()
        items = [
            ForwardItem(s.request.request_id, s.context, t.tokens, t.parents, _stored(s.features) if self.needs_features else -1)
            for s, t in zip(active, trees)
        ]
        logits, fed = self.target.forward_with_states(items)
        verified = time.perf_counter()
        finished = []
        for state, tree, rows, states in zip(active, trees, logits, fed):
            verdict = self._verify(state, tree, rows)
            if self.needs_features:  # the hidden states of every position now committed but the last
                new = states.committed(len(state.context), verdict.accepted_nodes)
                kept = state.features[: states.start] if state.features is not None else new[:0]
                state.features = torch.cat((kept, new))
            self.target.commit(state.request.request_id, verdict.accepted_nodes, verdict.accepted_tokens)
            self.stats.record(tree, verdict.accepted_len)
            if self._apply(state, tree, verdict, on_emission):
                finished.append(state)
        self.stats.rounds += 1
        self.stats.draft_seconds += drafted - began
        self.stats.verify_seconds += verified - drafted
        self.stats.accept_seconds += time.perf_counter() - verified
        return finished

    def _draft(self, active: list[_Active]) -> list[DraftTree]:
        for state in active:
            if state.routing is not None:
                state.drafting = state.routing.choose(self.routing)
            else:
                state.drafting = [d.name for d in (self.drafters if self.mode != "chain" else self.drafters[:1])]
            if self.mode == "chain":
                state.drafting = state.drafting[:1]
            state.draws = {name: [] for name in state.drafting}
            state.result.chosen.append(tuple(state.drafting))
        room = [max(0, min(s.window, s.request.stop.max_tokens - len(s.assembler.token_ids) - 1)) for s in active]
        if self.mode == "step":
            return self._draft_steps(active, room)
        chains: list[list[DraftChain]] = [[] for _ in active]
        for drafter in self.drafters:
            mine = [i for i, s in enumerate(active) if drafter.name in s.drafting]
            if not mine:
                continue
            requests = [self._draft_request(active[i], room[i]) for i in mine]
            for i, chain in zip(mine, drafter.propose(requests)):
                chains[i].append(chain)
        for state, per in zip(active, chains):
            per[:] = truncate_to_budget([c for c in per if len(c)], self.max_tree_nodes)  # what the tree will hold
            for chain in per:
                state.draws[chain.drafter] = [(d, t, c) for d, (t, c) in enumerate(zip(chain.tokens, chain.confidences))]
            state.chained = True
        return [merge_chains(per, self.max_tree_nodes) for per in chains]

    def _draft_steps(self, active: list[_Active], room: list[int]) -> list[DraftTree]:
        """Step mode: each step, every drafting drafter proposes one token after the fused
        prefix; the most confident one is appended and the next step starts from it."""
        levels: list[list[list[DraftChain]]] = [[] for _ in active]
        fused: list[list[int]] = [[] for _ in active]
        live = [i for i, w in enumerate(room) if w > 0]
        step = 0
        budget = [max(1, self.max_tree_nodes // max(1, len(s.drafting))) for s in active]
        while live:
            proposals: dict[int, list[DraftChain]] = {i: [] for i in live}
            for drafter in self.drafters:
                mine = [i for i in live if drafter.name in active[i].drafting]
                if not mine:
                    continue
                requests = [self._draft_request(active[i], 1, extra=fused[i], step=step) for i in mine]
                for i, chain in zip(mine, drafter.propose(requests)):
                    proposals[i].append(chain)
                    if len(chain):
                        active[i].draws[drafter.name].append((step, chain.tokens[0], chain.confidences[0]))
            step += 1
            still = []
            for i in live:
                token = fused_token(proposals[i])
                levels[i].append(proposals[i])
                if token is None:
                    continue
                fused[i].append(token)
                if step < room[i] and step < budget[i]:
                    still.append(i)
            live = still
        for state in active:
            state.chained = False
        return [fuse_steps(per) for per in levels]

    def _draft_request(self, state: _Active, window: int, extra: list[int] = (), step: int = 0) -> DraftRequest:
        context = state.context + list(extra) if extra else state.context
        domain = state.routing.first_choice if state.routing is not None else ""
        return DraftRequest(state.request.request_id, context, window, state.request.sampling, state.round_index, state.features, domain, step)

    def _account(self, state: _Active, tree: DraftTree, verdict: Verdict) -> None:
        feedback = drafter_feedback(state.draws, verdict.accepted_tokens, state.chained)
        for name, fed in feedback.items():
            counts = state.result.drafters.setdefault(name, {"drafted": 0, "accepted": 0})
            counts["drafted"] += fed.drafted
            counts["accepted"] += fed.accepted
        if state.routing is not None:
            state.routing.observe(feedback, verdict.accepted_len, self.routing)

    def _verify(self, state: _Active, tree: DraftTree, logits: torch.Tensor) -> Verdict:
        return verify_round(tree, logits, state.request.sampling, state.round_index, len(state.context))

    def _apply(self, state: _Active, tree: DraftTree, verdict: Verdict, on_emission: EmissionCallback | None) -> bool:
        emission = state.assembler.extend(verdict.new_tokens)
        result = state.result
        if not result.rounds:
            result.first_token_seconds = time.perf_counter() - state.started
        result.rounds += 1
        result.draft_tokens += len(tree)
        result.accepted_tokens += min(verdict.accepted_len, len(emission.token_ids))
        self._account(state, tree, verdict)
        state.context.extend(verdict.new_tokens)
        state.round_index += 1
        for drafter in self.drafters:
            if drafter.name in state.drafting:
                drafter.observe(state.request.request_id, len(tree), verdict.accepted_len)
        state.window = self.window.next_window(state.window, len(tree), verdict.accepted_len)
        if on_emission is not None and (emission.token_ids or emission.finish_reason):
            on_emission(state.request.request_id, emission)
        if emission.finish_reason is None:
            return False
        result.finish_reason = emission.finish_reason
        result.token_ids = list(state.assembler.token_ids)
        result.text = state.assembler.text
        result.generated_tokens = len(result.token_ids)
        result.seconds = time.perf_counter() - state.started
        self.target.release(state.request.request_id)
        for drafter in self.drafters:
            drafter.release(state.request.request_id)
        return True


def drafter_feedback(draws: dict[str, list[tuple[int, int, float]]], accepted_tokens: Sequence[int], chained: bool) -> dict[str, RoundFeedback]:
    """Per drafter: its drafted tokens this round, how many the target accepted, and the sum of
    its confidences. A chain's token counts as accepted while the chain follows the accepted path
    (its tokens after a divergence were drafted after another prefix); a step's token counts when
    it is the accepted token of its step (every step drafts after the accepted prefix)."""
    feedback = {}
    for name, made in draws.items():
        accepted = 0
        for depth, token, _ in made:
            hit = depth < len(accepted_tokens) and accepted_tokens[depth] == token
            if hit:
                accepted += 1
            elif chained:
                break
        feedback[name] = RoundFeedback(len(made), accepted, sum(c for _, _, c in made))
    return feedback


def _stored(features: torch.Tensor | None) -> int:
    return 0 if features is None else len(features)


def build_engine(config, stack) -> LocalEngine:
    """The local engine over a loaded stack (``cosine.factory.build_stack``), as configured."""
    from cosine.factory import routing_classifier
    from cosine.policy.routing import routing_policy

    spec = config.speculation
    names = [d.name for d in stack.drafters]
    online = config.router.online and len(names) > 1
    return LocalEngine(
        stack.runner,
        stack.target.tokenizer,
        stack.drafters,
        mode=spec.mode,
        window=WindowPolicy(spec.window, spec.min_window, spec.max_window, spec.adaptive_window),
        max_batch=spec.max_batch,
        max_tree_nodes=spec.max_tree_nodes,
        routing=routing_policy(config) if online else None,
        classifier=routing_classifier(config, len(stack.target.tokenizer), names) if online else None,
    )

