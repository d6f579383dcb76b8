"""Drafter: drafts for one expert's queue with one drafter (a model or model-free).

Reads ``draft:{expert}``, drafts every job it read in one batched ``propose`` call (off the event
loop), writes one ``Draft`` per job to ``drafts`` and acknowledges, atomically. Soft state: the
drafter's KV caches, trusted only for the prefix that matches the job's context, and for a
feature drafter the target's states per request: each job carries the rows its last round
committed; a worker without the rows before them reads them from the request's features key,
so any worker of the expert serves any round.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import torch
from cosine.workers.base import Entry, StageWorker

from cosine.bus import write_and_ack
from cosine.core.tree import DraftChain
from cosine.drafters.base import DraftRequest
from cosine.factory import build_drafter, load_target
from cosine.wire import Draft, DraftJob, decode, encode
from cosine.wire.convert import probs_to_bytes, states_from_bytes


class DrafterWorker(StageWorker):
    role = "drafter"

    def __init__(self, config, redis_url, expert: str, drafter_name: str | None = None, instance: str | None = None) -> None:
        super().__init__(config, redis_url, instance)
        specs = [d for d in config.drafters if d.expert == expert and (drafter_name is None or d.name == drafter_name)]
        if not specs:
            raise ValueError(f"no configured drafter for expert {expert!r}" + (f" named {drafter_name!r}" if drafter_name else ""))
        self.spec = specs[0]
        self.expert = expert

    def input_streams(self) -> list[str]:
        return [self.keys.draft(self.expert)]

    def liveness_extra(self) -> str:
        return f"expert={self.expert} drafter={self.spec.name}"

    async def setup(self) -> None:
        def load():
            # A drafter's process takes its own thread count (drafters.threads), not the verifier's;
            # only drafters made of the target's layers run them (the others borrow its embedding
            # or tokenizer): no start-up timing of its linears for those.
            layers = "auto" if self.spec.kind in ("early-exit", "layer-skip") else "plain"
            target = load_target(self.config, threads=self.spec.threads, cpu_linear=layers) if self.spec.kind != "prompt-lookup" else None
            return build_drafter(self.spec, target, self.config)

        self.drafter = await self.off_loop(load)
        self.rank = [d.name for d in self.config.drafters].index(self.spec.name)
        self.features: OrderedDict[str, torch.Tensor] = OrderedDict()  # request id -> states at positions 0..
        self.contexts: OrderedDict[str, list[int]] = OrderedDict()  # request id -> the context of its last job here

    async def on_connect(self) -> None:
        await self.redis.sadd(self.keys.experts, self.expert)

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        jobs = [decode(fields, DraftJob) for _, fields in entries]
        contexts = await self._contexts(jobs)
        features = [await self._features(j) for j in jobs] if self.drafter.needs_features else [None] * len(jobs)
        # A job whose request moved on since it was written (its context is no longer the
        # request's) drafts nothing: its round is over.
        live = [i for i, context in enumerate(contexts) if context is not None]
        requests = [_request(jobs[i], contexts[i], features[i]) for i in live]
        async with self.renewing(stream, [entry_id for entry_id, _ in entries]):
            began = time.perf_counter()
            drafted = await self.off_loop(self.drafter.propose, requests) if requests else []
            draft_ms = (time.perf_counter() - began) * 1000
        chains = [DraftChain((), (), None, self.spec.name)] * len(jobs)
        for i, chain in zip(live, drafted):
            chains[i] = chain
        outputs = []
        for job, chain in zip(jobs, chains):
            draft = Draft(
                request_id=job.request_id,
                round=job.round,
                expert=self.expert,
                drafter=self.spec.name,
                rank=self.rank,
                tokens=list(chain.tokens),
                confidences=[float(c) for c in chain.confidences],
                draft_probs=probs_to_bytes(chain.draft_probs),
                experts=job.experts,
                context_len=job.context_len,
                draft_ms=draft_ms,
                step_mode=job.step_mode,
                step=job.step,
                window=job.window,
                prefix=job.prefix,
                sampling=job.sampling,
                domain=job.domain,
            )
            outputs.append((self.keys.drafts, encode(draft)))
        await write_and_ack(self.redis, outputs, stream, self.group, [entry_id for entry_id, _ in entries])


    async def _contexts(self, jobs: list[DraftJob]) -> list[list[int] | None]:
        """Each job's whole context (``whole_contexts``), kept as the request's last one here."""
        contexts = await self.whole_contexts(self.contexts, jobs)
        for job, context in zip(jobs, contexts):
            if context is not None:
                self.contexts.pop(job.request_id, None)
                self.contexts[job.request_id] = context
        while len(self.contexts) > MAX_HELD_REQUESTS:
            self.contexts.popitem(last=False)
        return contexts

    async def _features(self, job: DraftJob) -> torch.Tensor | None:
        """The target's states at positions 0.. for the job's request: what this worker holds plus
        the job's new rows, or the request's features key when this worker holds too few."""
        width = self.drafter.net.spec.hidden
        held = self.features.pop(job.request_id, None)
        new = states_from_bytes(job.features, width)
        if new is None:
            self.log.warning("request %s round %d: states of %d bytes are not rows of %d; drafting without", job.request_id, job.round, len(job.features), width)
            return None
        have = 0 if held is None else min(len(held), job.features_start)
        parts = [held[:have]] if held is not None else []
        if have < job.features_start:  # the rows in between: another worker drafted those rounds
            row_bytes = width * 2
            stored = await self.redis.getrange(self.keys.features(job.request_id), have * row_bytes, job.features_start * row_bytes - 1)
            if len(stored) < (job.features_start - have) * row_bytes:
                return None  # not there (yet): this round drafts nothing
            self.log.debug("request %s: %d feature rows read from Redis", job.request_id, job.features_start - have)
            parts.append(states_from_bytes(stored, width))
        rows = torch.cat([*parts, new])
        self.features[job.request_id] = rows
        while len(self.features) > MAX_HELD_REQUESTS:
            self.features.popitem(last=False)
        return rows


MAX_HELD_REQUESTS = 256


def _request(job: DraftJob, context: list[int], features: torch.Tensor | None) -> DraftRequest:
    sampling = job.sampling
    if job.step_mode:  # one token after the fused prefix; its draws get the step's own random stream
        window = 1 if job.step < job.window else 0
        return DraftRequest(job.request_id, [*context, *job.prefix], window, sampling, job.round, features, job.domain, job.step)
    return DraftRequest(job.request_id, context, max(0, job.window), sampling, job.round, features, job.domain)
