"""The ideal: the emulated cluster simulated in virtual time, with no control-plane cost.

A discrete-event simulation (deterministic; this machine's speed does not enter it) of the
same verifiers and drafter hosts as the emulated pipeline, on the same requests and arrivals,
deciding with the pipeline's own policies: routing (``choose_experts`` and ``RequestRouting``),
the adaptive window (``WindowPolicy``), load control (``SpeculationControl``: cooperation, the
window per round, the expected yield a batch is chosen by), batch forming (``BatchPolicy``:
when to flush, which candidates), fusion of the cooperating chains into a tree
(``merge_chains``) and drafts made ahead (the drafter's next round drafted while this one is
verified). Drafts are the emulated drafters' own (``EmulatedDrafter.chain``: the same seeded
function of request, position and drafter), verified against the oracle. Time passes only for
the profiled GPUs (verification, drafting) and the network on the minimum messages of a round
(the job to a drafter host, the draft back). A job goes, when it arrives, to its expert's
drafter free soonest (on a shared GPU: one no other drafter is about to take), and a drafter
drafts every job waiting for it in one call, as the drafter worker drafts what it read.

``greedy=True`` gives the upper bound where a free verifier never waits while a candidate is
ready (every batch goes at once).

Simplifications, each in the ideal's favour or neutral: a prompt is prefilled in its first
round at once (the pipeline chunks it), a round without drafts decodes one token (the pipeline's
multi-step jobs only save control-plane time, which is zero here), temperature 0 only.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from cosine.core.tree import ROOT, DraftChain, merge_chains
from cosine.policy.batching import BatchPolicy, Pending
from cosine.policy.control import DRAFT_PROFILE_CALLS, VERIFY_PROFILE_CALLS, SpeculationControl, draft_features, verify_features
from cosine.policy.routing import RequestRouting, by_expert, choose_experts, routing_policy, tree_feedback
from cosine.policy.window import Turnaround, WindowPolicy, ahead_budget, ahead_window

from .build import domain_markers
from .drafter import EmulatedDrafter
from .gpu import drafter_gpu_index
from .oracle import Oracle
from .profiles import load_profiles

JOB_BYTES = 400  # a draft job or a draft on the wire, about (tail of the context, window, ids)


@dataclass
class _Request:
    index: int
    key: str
    context: list[int]
    prompt_len: int
    max_tokens: int
    submitted: float
    routing: RequestRouting | None  # None: fixed experts (router.online off)
    window: int
    round: int = 0
    accepted: int = 0
    drafted_rounds: int = 0
    first_token: float = -1.0
    ended: float = -1.0
    experts: list[str] = field(default_factory=list)  # this round's


@dataclass
class _Host:
    name: str
    expert: str
    drafter: EmulatedDrafter
    gpu: int | None = None  # the verifier whose GPU it shares (emulate.shared_gpus); None: its own
    free_at: float = 0.0
    ahead: dict = field(default_factory=dict)  # request key -> (round, guessed context, chain, ready at)
    written: dict = field(default_factory=dict)  # request key -> (round, when its draft was done, ms), newest last
    queue: list = field(default_factory=list)  # jobs waiting for the host, drafted together when it is free
    starting: bool = False  # a start of the queued jobs is scheduled
    turnaround: Turnaround = field(default_factory=Turnaround)  # a draft done to its request's next job, as the drafter worker's


@dataclass
class _Candidate:
    request: _Request
    chains: list[DraftChain]
    window: int
    arrived: float


def simulate(config, tokenizer, request_ids: Sequence[str], prompt_texts: Sequence[str], max_tokens: int, verifiers: int,
             concurrency: int | None = None, arrivals: Sequence[float] | None = None, greedy: bool = False, with_outputs: bool = False) -> dict:
    """Run the requests (closed loop of ``concurrency`` clients, or ``arrivals`` in seconds)
    through the simulated cluster; returns throughput, latencies and the verifiers' busy share.
    The prompts are encoded as the router encodes a ``prompt`` (``tokenizer``, no template)."""
    prompt_ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    markers = domain_markers(tokenizer, config.emulate.domains)
    simulation = _Simulation(config, verifiers, greedy, markers)
    figures = simulation.run(request_ids, prompt_ids, prompt_texts, max_tokens, concurrency, arrivals)
    return {**figures, "outputs": simulation.outputs} if with_outputs else figures


class _Simulation:
    def __init__(self, config, verifiers: int, greedy: bool, markers: dict[int, str]) -> None:
        emulate, speculation, pipeline = config.emulate, config.speculation, config.pipeline
        profiles = load_profiles(emulate.profiles or None)
        self.target = profiles.target(emulate.target)
        # drafters on the verifiers' GPUs (emulate.shared_gpus) are on the verification server: no network
        self.network = profiles.network(emulate.network) if emulate.network and not emulate.shared_gpus else None
        acceptance = profiles.accuracy(emulate.acceptance).scaled(emulate.gap_scale)
        self.oracle = Oracle(emulate.seed)
        self.hosts = [
            _Host(spec.name, spec.expert, EmulatedDrafter(spec.name, spec.expert, profiles.drafter(spec.profile), acceptance, self.oracle, markers),
                  drafter_gpu_index(config, spec.name))
            for spec in config.drafters if spec.kind == "emulated"
        ]
        if emulate.shared_gpus > verifiers:
            raise ValueError(f"emulate.shared_gpus ({emulate.shared_gpus}) is more than the verifiers ({verifiers})")
        self.expert_of = {h.name: h.expert for h in self.hosts}
        self.experts = list(dict.fromkeys(h.expert for h in self.hosts))
        self.config = config
        self.routing = routing_policy(config)
        self.window_policy = WindowPolicy(speculation.window, speculation.min_window, speculation.max_window, speculation.adaptive_window)
        self.batch_policy = BatchPolicy(speculation.max_batch, max_wait_s=pipeline.batch_wait_ms / 1000)
        # as the coordinator's deployment plan: emulated drafters on GPUs of their own, unless shared
        self.control = SpeculationControl(enabled=speculation.load_control, overhead_prior=0.0, drafters_share_compute=bool(emulate.shared_gpus))
        self.control.verify.set_prior(_fit_verify(self.target))
        # As the coordinator: the slowest drafter's start-up profile is the drafting prior.
        self.control.draft.set_prior([max(c) for c in zip(*(_fit_draft(h.drafter.profile) for h in self.hosts))] if self.hosts else [0.0, 0.0, 0.0])
        self.pipelining = speculation.pipelining != "off"
        self.max_nodes = speculation.max_tree_nodes
        self.verifiers = verifiers
        self.greedy = greedy
        self.free = [0.0] * verifiers  # when each verifier is next free
        self.busy = 0.0
        self.events: list = []
        self.counter = itertools.count()
        self.pool: list[_Candidate] = []
        self.drafting: dict[str, tuple[float, int, int]] = {}  # request -> (sent, window, together)
        self.active = 0
        self.now = 0.0
        self.rounds = 0

    # ---- the event loop ------------------------------------------------------------------

    def at(self, time: float, action, *args) -> None:
        heapq.heappush(self.events, (time, next(self.counter), action, args))

    def run(self, request_ids, prompt_ids, prompt_texts, max_tokens, concurrency, arrivals) -> dict:
        waiting = list(range(len(request_ids)))
        self.done: list[_Request] = []

        def submit(index: int) -> None:
            self.start(request_ids[index], index, list(prompt_ids[index]), prompt_texts[index], max_tokens)

        if arrivals is not None:
            for index, arrival in zip(waiting, arrivals):
                self.at(arrival, submit, index)
        else:
            self.next_waiting = waiting[concurrency or 1 :]
            self.on_end = lambda: self.next_waiting and submit(self.next_waiting.pop(0))
            for index in waiting[: concurrency or 1]:
                self.at(0.0, submit, index)
        while self.events:
            self.now, _, action, args = heapq.heappop(self.events)
            action(*args)
        return self.report()

    def report(self) -> dict:
        done = self.done
        began = min(r.submitted for r in done)
        wall = max(r.ended for r in done) - began
        tokens = sum(len(r.context) - r.prompt_len for r in done)
        latencies = sorted(r.ended - r.submitted for r in done)
        self.outputs = {r.key: r.context[r.prompt_len :] for r in done}
        return {"tokens_per_s": tokens / wall, "mean_latency_s": sum(latencies) / len(latencies), "p50_latency_s": latencies[len(latencies) // 2],
                "verifier_busy_share": self.busy / (wall * self.verifiers), "tokens_per_round": tokens / max(1, self.rounds), "wall_s": wall}

    # ---- requests and rounds -------------------------------------------------------------

    def start(self, key: str, index: int, prompt: list[int], text: str, max_tokens: int) -> None:
        router = self.config.router
        if router.online:  # as the router: every expert a candidate, keyword matches and defaults first
            candidates = choose_experts(text, None, router.default_experts, router.keywords, self.experts, len(self.experts))
            candidates += [e for e in self.experts if e not in candidates]
            routing = RequestRouting.start(candidates, {}, self.routing)
            experts = routing.choose(self.routing)
        else:  # fixed experts
            routing, experts = None, choose_experts(text, None, router.default_experts, router.keywords, self.experts, router.max_experts)
        request = _Request(index, key, prompt, len(prompt), max_tokens, self.now, routing, self.window_policy.initial, experts=experts)
        self.active += 1
        self.next_round(request, experts)

    def next_round(self, request: _Request, experts: list[str]) -> None:
        room = request.max_tokens - (len(request.context) - request.prompt_len) - 1
        window = min(request.window, max(0, room))
        batch_size = self.batch_policy.fair_share(self.active, self.verifiers)
        together = len(self.drafting) + 1
        if experts and window > 0:
            experts = experts[: self.control.cooperating(len(experts), batch_size, window)]
            if not (batch_size <= self.control.explore_max_batch and self.control.explore(request.key, request.round, request.drafted_rounds)):
                window = self.control.choose(window, batch_size, request.accepted, request.drafted_rounds)
        if not experts or window <= 0:
            self.pool_candidate(_Candidate(request, [], 0, self.now))
            return
        self.drafting[request.key] = (self.now, window, together)
        drafts: dict[str, DraftChain] = {}
        for expert in experts:
            self.at(self.now + self.one_way(), self.draft_job, expert, request, request.round, window, drafts, experts)

    def host_for(self, request: _Request, expert: str) -> _Host:
        """The expert's host that drafted ahead for the request, else the one free soonest (as
        the job arrives: a job taken before it, of this round too, is in its ``ready_at``)."""
        hosts = [h for h in self.hosts if h.expert == expert]
        ahead = [h for h in hosts if request.key in h.ahead]
        return ahead[0] if ahead else min(hosts, key=lambda h: (max(self.now, self.ready_at(h)), self.gpu_wanted(h), len(h.queue)))

    def gpu_wanted(self, host: _Host) -> bool:
        """Whether another drafter on the host's shared GPU has jobs about to start there."""
        return host.gpu is not None and any(h.queue for h in self.hosts if h.gpu == host.gpu and h is not host)

    def ready_at(self, host: _Host) -> float:
        """When the host can start a job: it and, on a verifier's GPU, that GPU are free."""
        return host.free_at if host.gpu is None else max(host.free_at, self.free[host.gpu])

    def occupy(self, host: _Host, began: float, ms: float) -> float:
        """The host's job from ``began`` (its GPU's too, when shared); when it is done."""
        host.free_at = began + ms / 1000
        if host.gpu is not None:
            self.free[host.gpu] = host.free_at
            self.at(host.free_at, self.flush)  # the verifier's GPU is free again
        return host.free_at

    def draft_job(self, expert: str, request: _Request, round_: int, window: int, drafts: dict, experts: list[str]) -> None:
        host = self.host_for(request, expert)
        written = host.written.pop(request.key, None)
        if written is not None and written[0] == round_ - 1:
            host.turnaround.observe(self.now * 1000 - written[1])
        ahead = host.ahead.pop(request.key, None)
        if ahead is not None and ahead[0] == round_ and ahead[1] == request.context and len(ahead[2].tokens) >= window:
            chain = DraftChain(ahead[2].tokens[:window], ahead[2].confidences[:window], None, host.name)
            self.drafted(host, request, round_, window, chain, drafts, experts, max(self.now, ahead[3]))
            return
        host.queue.append((request, round_, window, drafts, experts))
        if not host.starting:
            host.starting = True
            self.at(max(self.now, self.ready_at(host)), self.start_jobs, host)

    def start_jobs(self, host: _Host) -> None:
        """The host drafts every job that waits for it in one call, as the drafter worker drafts
        every job it read (the profile's cost of a batch: the longest window, per request a little)."""
        if self.ready_at(host) > self.now:  # its GPU was taken meanwhile (a verification)
            self.at(self.ready_at(host), self.start_jobs, host)
            return
        jobs, host.queue, host.starting = host.queue, [], False
        done = self.occupy(host, self.now, host.drafter.profile.job_ms(len(jobs), max(job[2] for job in jobs)))
        for request, round_, window, drafts, experts in jobs:
            self.drafted(host, request, round_, window, host.drafter.chain(request.key, request.context, window), drafts, experts, done)

    def drafted(self, host: _Host, request: _Request, round_: int, window: int, chain: DraftChain, drafts: dict, experts: list[str], done: float) -> None:
        host.written.pop(request.key, None)  # newest last, as the worker's
        host.written[request.key] = (round_, done * 1000)
        self.at(done + self.one_way(), self.draft_back, host, request, round_, window, chain, drafts, experts)
        if self.pipelining and window > 0:
            self.at(done, self.draft_ahead, host, request, round_, window, chain)

    def draft_ahead(self, host: _Host, request: _Request, round_: int, window: int, chain: DraftChain) -> None:
        """The drafter's next round made ahead while it has nothing else to do (as the drafter
        worker: its guess of the target's next token, the window one longer as long as the
        work fits before the next job it expects, ``ahead_budget``)."""
        if self.ready_at(host) > self.now or host.queue or request.round != round_:
            return
        budget = ahead_budget(host.turnaround.ms, self.now * 1000, request.key, host.written)
        ahead = ahead_window(window, self.config.speculation.max_window, budget, lambda tokens: host.drafter.profile.job_ms(1, tokens))
        if ahead <= 0:
            return
        guessed = [*request.context, *chain.tokens]
        whole = host.drafter.chain(request.key, guessed, ahead + 1)
        if len(whole.tokens) < 2:
            return
        context = [*guessed, whole.tokens[0]]
        rest = DraftChain(whole.tokens[1:], whole.confidences[1:], None, host.name)
        host.ahead[request.key] = (round_ + 1, context, rest, self.occupy(host, self.now, host.drafter.profile.job_ms(1, ahead + 1)))

    def draft_back(self, host: _Host, request: _Request, round_: int, window: int, chain: DraftChain, drafts: dict, experts: list[str]) -> None:
        drafts[host.name] = chain
        if len(drafts) < len(experts):
            return
        sent = self.drafting.pop(request.key, None)
        if sent is not None:
            self.control.observe_drafting(sent[1], (self.now - sent[0]) * 1000, sent[2])
        ranked = sorted(drafts.values(), key=lambda c: experts.index(self.expert_of[c.drafter]))  # the chains in rank order, as fusion's
        self.pool_candidate(_Candidate(request, ranked, window, self.now))

    def pool_candidate(self, candidate: _Candidate) -> None:
        self.pool.append(candidate)
        self.flush()

    def flush(self) -> None:
        while self.pool:
            free = [i for i, t in enumerate(self.free) if t <= self.now]
            if not free:
                return
            oldest = self.now - min(c.arrived for c in self.pool)
            tokens = sum(sum(len(ch.tokens) for ch in c.chains) + 1 for c in self.pool)
            busy = self.verifiers - len(free)
            if not self.greedy:
                due = max((s + self.control.draft_ms(w, k) / 1000 - self.now for s, w, k in self.drafting.values()), default=0.0)
                split = self.control.verify.coefficients[0] / 1000
                if not self.batch_policy.should_flush(len(self.pool), tokens, oldest, self.active, self.verifiers, busy, len(self.drafting), due, split):
                    wait_until = min(c.arrived for c in self.pool) + self.batch_policy.max_wait_s
                    if wait_until > self.now:
                        self.at(wait_until, self.flush)
                    return
            pending = [Pending(self.now - c.arrived, self.fed(c), self.control.expected(c.window, c.request.accepted, c.request.drafted_rounds),
                               c.request.round == 0, 0) for c in self.pool]
            chosen = self.batch_policy.select(pending, self.control.verify_ms, 0.0, self.config.pipeline.batch_starve_ms / 1000)
            batch = [self.pool[i] for i in chosen]
            self.pool = [c for i, c in enumerate(self.pool) if i not in set(chosen)]
            verifier = free[0]
            fed = sum(self.fed(c) for c in batch)
            rows = sum(len(c.request.context) for c in batch)
            ms = self.target.step_ms(len(batch), fed, rows)
            self.free[verifier] = self.now + ms / 1000
            self.busy += ms / 1000
            self.control.observe_verification(len(batch), fed, ms, max(len(c.request.context) for c in batch))
            self.at(self.free[verifier], self.verified, batch)

    def fed(self, candidate: _Candidate) -> int:
        drafted = len(merge_chains(candidate.chains, self.max_nodes)) if candidate.chains else 0
        return drafted + (candidate.request.prompt_len if candidate.request.round == 0 else 1)

    def verified(self, batch: list[_Candidate]) -> None:
        for candidate in batch:
            self.apply(candidate)
        self.flush()

    def apply(self, candidate: _Candidate) -> None:
        request = candidate.request
        tree = merge_chains(candidate.chains, self.max_nodes) if candidate.chains else None
        accepted_nodes, accepted_tokens, node = [], [], ROOT
        context = request.context
        while True:
            truth = self._truth(context, accepted_tokens)
            child = tree.child_with_token(node, truth) if tree is not None else None
            if child is None:
                break
            accepted_nodes.append(child)
            accepted_tokens.append(truth)
            node = child
        new = [*accepted_tokens, truth]
        room = request.max_tokens - (len(context) - request.prompt_len)
        request.context = [*context, *new[:room]]
        drafted = len(tree) if tree is not None else 0
        self.rounds += 1
        self.control.observe_round(_depth(tree), len(accepted_tokens))
        if not drafted:
            self.control.observe_decoding(1)  # a round without drafts decodes one token here
        if request.first_token < 0:
            request.first_token = self.now
        request.window = self.window_policy.next_window(request.window, drafted, len(accepted_tokens))
        request.accepted += len(accepted_tokens)
        request.drafted_rounds += drafted > 0
        request.round += 1
        if tree is not None and request.routing is not None:
            request.routing.observe(by_expert(tree_feedback(tree.sources, tree.confidences, accepted_nodes), self.expert_of), len(accepted_tokens), self.routing)
            request.experts = request.routing.choose(self.routing)
        if len(request.context) - request.prompt_len >= request.max_tokens:
            request.ended = self.now
            self.active -= 1
            self.done.append(request)
            for host in self.hosts:
                host.ahead.pop(request.key, None)
                host.written.pop(request.key, None)
            if hasattr(self, "on_end"):
                self.on_end()
            return
        self.next_round(request, request.experts)

    def _truth(self, context: list[int], accepted: list[int]) -> int:
        tail = [*context[-2:], *accepted][-2:]
        return self.oracle.next_token(tail[0] if len(tail) > 1 else -1, tail[-1], len(context) + len(accepted))

    def one_way(self) -> float:
        return self.network.one_way_s(JOB_BYTES) if self.network else 0.0


def _depth(tree) -> int:
    if tree is None or len(tree) == 0:
        return 0
    return max(tree.depths())


def _fit_draft(profile) -> list[float]:
    """A drafter's start-up profile as ``profile_drafting`` fits it (same calls, exact times)."""
    calls = DRAFT_PROFILE_CALLS
    return _fitted([draft_features(window, together) for together, window in calls], [profile.job_ms(together, window) for together, window in calls])


def _fit_verify(profile) -> list[float]:
    """The verifier's start-up cost profile, as ``profile_cost`` fits it on the emulated runner
    (same batches, exact times): the load controller's prior."""
    calls = VERIFY_PROFILE_CALLS
    return _fitted([verify_features(batch, batch * k, context + 1) for batch, k, context in calls],
                   [profile.step_ms(batch, batch * k, batch * (context + 1)) for batch, k, context in calls])


def _fitted(rows: list, times: list[float]) -> list[float]:
    """Least-squares coefficients, none below 0 (as the workers' profiles clamp theirs)."""
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return [max(0.0, float(c)) for c in coef]
