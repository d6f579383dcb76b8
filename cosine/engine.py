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

from cosine.core.acceptance import verify_and_credit
from cosine.core.params import SamplingParams
from cosine.core.protocol import Final, Tokens
from cosine.core.rounds import RequestState, advance
from cosine.core.stopping import FINISH_ERROR, StopRules
from cosine.core.tree import DraftChain, DraftTree, fuse_steps, fused_token, merge_chains, truncate_to_budget
from cosine.drafters.base import Drafter, DraftRequest
from cosine.models.runner import ForwardItem, ModelRunner
from cosine.policy.routing import PromptClassifier, RequestRouting, RoutingPolicy
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
class GenerationResult(Final):
    """A request's final entry (the client protocol's ``Final``) and what the engine saw of it."""

    request_id: str = ""
    seconds: float = 0.0
    first_token_seconds: float = 0.0
    first_choice: str = ""  # routing: the cold-start choice
    chosen: list[tuple[str, ...]] = field(default_factory=list)  # routing: the drafters of each round


@dataclass(slots=True)
class _Active:
    """A request in the engine: the pipeline's own ``RequestState`` (advanced by the same
    ``advance``), plus what lives in Redis or in worker caches there (the target's states for
    feature drafters) and what the engine reports (timings, the drafters of each round)."""

    state: RequestState
    started: float
    first_token_seconds: float = 0.0
    features: torch.Tensor | None = None  # the target's hidden states at positions 0.. (feature drafters)
    chosen: list[tuple[str, ...]] = field(default_factory=list)

EmissionCallback = Callable[[str, Tokens], None]


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
        self._texts: dict = {}  # advance's text cache (request -> its output's text)
        drafting = self.drafters if mode != "chain" else self.drafters[:1]
        self.needs_features = any(getattr(d, "needs_features", False) for d in drafting)

    def generate(self, requests: Sequence[GenerationRequest], on_emission: EmissionCallback | None = None) -> list[GenerationResult]:
        """Run all requests to completion; up to ``max_batch`` share each verification pass."""
        results: dict[str, GenerationResult] = {}
        waiting = list(requests)
        active: list[_Active] = []
        while waiting or active:
            while waiting and len(active) < self.max_batch:
                admitted = self._admit(waiting.pop(0))
                if isinstance(admitted, GenerationResult):
                    results[admitted.request_id] = admitted
                else:
                    active.append(admitted)
            if not active:
                continue
            for done, result in self._round(active, on_emission):
                active.remove(done)
                results[result.request_id] = result
        return [results[r.request_id] for r in requests]

    # ---- one round -------------------------------------------------------------------------

    def _admit(self, request: GenerationRequest) -> _Active | GenerationResult:
        prompt_len = len(request.prompt_ids)
        names = [d.name for d in self.drafters]
        refused = ""
        if prompt_len == 0:
            refused = "empty prompt"
        elif prompt_len + request.stop.max_tokens > self.context_limit:
            refused = f"prompt ({prompt_len} tokens) plus max_tokens ({request.stop.max_tokens}) exceeds the context limit ({self.context_limit})"
        elif self.routing is not None and request.expert is not None and request.expert not in names:
            refused = f"unknown expert {request.expert!r} (valid: {', '.join(names)})"
        if refused:
            return GenerationResult(FINISH_ERROR, error=refused, error_code="invalid", prompt_tokens=prompt_len, request_id=request.request_id)
        routing = None
        if self.routing is not None:  # the router's start: cold-start scores, then the first choice
            prior = self.classifier.probabilities(request.prompt_ids) if self.classifier else {}
            online = RequestRouting.start(names, prior, self.routing, request.expert)
            experts, routing = online.choose(self.routing), online.to_dict()
        else:
            experts = names if self.mode != "chain" else names[:1]
        stop = request.stop
        state = RequestState(
            request.request_id, list(request.prompt_ids), request.sampling, stop.max_tokens, tuple(stop.stop_strings),
            tuple(sorted(stop.eos_token_ids)), experts, window=self.window.initial, routing=routing,
        )
        return _Active(state, time.perf_counter())

    def _round(self, active: list[_Active], on_emission: EmissionCallback | None) -> list[tuple[_Active, GenerationResult]]:
        began = time.perf_counter()
        trees = self._draft(active)
        drafted = time.perf_counter()
        items = [
            ForwardItem(a.state.request_id, a.state.context, t.tokens, t.parents, _stored(a.features) if self.needs_features else -1)
            for a, t in zip(active, trees)
        ]
        logits, fed = self.target.forward_with_states(items)
        verified = time.perf_counter()
        finished = []
        for one, tree, rows, states in zip(active, trees, logits, fed):
            state = one.state
            verdict, feedback = verify_and_credit(tree, rows, state.sampling, state.round, len(state.context))
            if self.needs_features:  # the hidden states of every position now committed but the last
                new = states.committed(len(state.context), verdict.accepted_nodes)
                kept = one.features[: states.start] if one.features is not None else new[:0]
                one.features = torch.cat((kept, new))
            self.target.commit(state.request_id, verdict.accepted_nodes, verdict.accepted_tokens)
            self.stats.record(tree, verdict.accepted_len)
            for drafter in self.drafters:
                if drafter.name in self._drafting(state):
                    drafter.observe(state.request_id, len(tree), verdict.accepted_len)
            update = advance(state, list(verdict.accepted_tokens), verdict.next_token, len(tree), self.tokenizer, self.window,
                             feedback=feedback, routing_policy=self.routing, text_cache=self._texts)
            one.state = update.state
            if not state.rounds:
                one.first_token_seconds = time.perf_counter() - one.started
            if on_emission is not None:
                for entry in update.out_entries:
                    if entry["type"] == "tokens":
                        on_emission(state.request_id, Tokens.from_fields(entry))
            if update.final is not None:
                finished.append((one, self._finish(one, update.final)))
        self.stats.rounds += 1
        self.stats.draft_seconds += drafted - began
        self.stats.verify_seconds += verified - drafted
        self.stats.accept_seconds += time.perf_counter() - verified
        return finished

    def _finish(self, one: _Active, final: Final) -> GenerationResult:
        request_id = one.state.request_id
        self.target.release(request_id)
        for drafter in self.drafters:
            drafter.release(request_id)
        routing = one.state.routing
        return GenerationResult(
            **{name: getattr(final, name) for name in Final.__dataclass_fields__}, request_id=request_id,
            seconds=time.perf_counter() - one.started, first_token_seconds=one.first_token_seconds,
            first_choice=routing["first"] if routing else "", chosen=one.chosen,
        )

    def _drafting(self, state: RequestState) -> list[str]:
        """This round's drafters: the request's experts (chain mode: the first)."""
        return state.experts[:1] if self.mode == "chain" else state.experts

    def _draft(self, active: list[_Active]) -> list[DraftTree]:
        for one in active:
            one.chosen.append(tuple(self._drafting(one.state)))
        room = [max(0, min(a.state.window, a.state.max_tokens - len(a.state.output_ids) - 1)) for a in active]
        if self.mode == "step":
            return self._draft_steps(active, room)
        chains: list[list[DraftChain]] = [[] for _ in active]
        for drafter in self.drafters:
            mine = [i for i, a in enumerate(active) if drafter.name in self._drafting(a.state)]
            if not mine:
                continue
            requests = [self._draft_request(active[i], room[i]) for i in mine]
            for i, chain in zip(mine, drafter.propose(requests)):
                chains[i].append(chain)
        for per in chains:
            per[:] = truncate_to_budget([c for c in per if len(c)], self.max_tree_nodes)  # what the tree will hold
        return [merge_chains(per, self.max_tree_nodes) for per in chains]

    def _draft_steps(self, active: list[_Active], room: list[int]) -> list[DraftTree]:
        """Step mode: each step, every drafting drafter proposes one token after the fused
        prefix; the most confident one is appended and the next step starts from it."""
        levels: list[list[list[DraftChain]]] = [[] for _ in active]
        fused: list[list[int]] = [[] for _ in active]
        live = [i for i, w in enumerate(room) if w > 0]
        step = 0
        budget = [max(1, self.max_tree_nodes // max(1, len(self._drafting(a.state)))) for a in active]
        while live:
            proposals: dict[int, list[DraftChain]] = {i: [] for i in live}
            for drafter in self.drafters:
                mine = [i for i in live if drafter.name in self._drafting(active[i].state)]
                if not mine:
                    continue
                requests = [self._draft_request(active[i], 1, extra=fused[i], step=step) for i in mine]
                for i, chain in zip(mine, drafter.propose(requests)):
                    proposals[i].append(chain)
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
        return [fuse_steps(per) for per in levels]

    def _draft_request(self, one: _Active, window: int, extra: list[int] = (), step: int = 0) -> DraftRequest:
        state = one.state
        context = state.context + list(extra) if extra else state.context
        domain = state.routing["first"] if state.routing is not None else ""
        return DraftRequest(state.request_id, context, window, state.sampling, state.round, one.features, domain, step)


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

