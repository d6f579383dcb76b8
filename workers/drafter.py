"""Drafter: drafts for one expert's queue with one drafter (a model or model-free).

Reads ``draft:{expert}``, drafts every job it read in one batched ``propose`` call (off the event
loop), writes one ``Draft`` per job to ``drafts`` and acknowledges, atomically. Soft state: the
drafter's KV caches, trusted only for the prefix that matches the job's context, and for a
feature drafter the target's states per request: each job carries the rows its last round
committed; a worker without the rows before them reads them from the request's features key,
so any worker of the expert serves any round.

Pipelining (``speculation.pipelining``): after sending a round's drafts, a lightly loaded
drafter goes on drafting each request's next round while this one is verified: from the context
it just drafted on plus its draft and its guess of the target's next token (its own most
likely one), the window one longer (a fully accepted round lengthens the adaptive window). When
the next round's job comes with exactly that context (every drafted token accepted and the
guess right), its draft is sent at once, without a forward; any other context drops the work.
The tokens sent are drafted from the round's context and random stream, as a fresh draft would
be (``propose_ahead``), so verification stays lossless and seeded outputs do not depend on
whether a draft was made ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from cosine.bus import whole_contexts, write_and_ack
from cosine.core.tree import DraftChain
from cosine.deploy import UNPROFILED_KINDS, machine_cores, plan_deployment
from cosine.drafters.base import DraftRequest, propose_ahead
from cosine.factory import build_drafter, load_target
from cosine.models.loading import release_freed_memory
from cosine.policy.control import DRAFT_PROFILE_CALLS, draft_features
from cosine.policy.window import Turnaround, ahead_budget, ahead_window
from cosine.wire import Draft, DraftJob, decode, encode
from cosine.wire.convert import probs_to_bytes, states_from_bytes

from .base import Entry, StageWorker, install_drain_handlers


class DrafterWorker(StageWorker):
    role = "drafter"

    def __init__(self, config, redis_url, expert: str, drafter_name: str | None = None, instance: str | None = None,
                 host: DrafterHost | None = None) -> None:
        super().__init__(config, redis_url, instance)
        specs = [d for d in config.drafters if d.expert == expert and (drafter_name is None or d.name == drafter_name)]
        if not specs:
            raise ValueError(f"no configured drafter for expert {expert!r}" + (f" named {drafter_name!r}" if drafter_name else ""))
        self.spec = specs[0]
        self.expert = expert
        self.host = host
        self.last_job = self.profiled_at = time.monotonic()
        self.profiles_left = 0  # drafting profiles still to take when idle (``tick``)
        # request id -> (round, when its draft was written, server clock ms); from then to the
        # request's next job (its entry ID) is what drafting ahead must fit in
        self.written: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self.turnaround = Turnaround()
        # One torch thread for every drafter of the process (see StageWorker); an emulated
        # drafter stands for a GPU of its own: its own thread, sleeping beside the others'.
        if host is not None and self.spec.kind != "emulated":
            self.executor.shutdown(wait=False)
            self.executor = host.executor
        self.pipelining = plan_deployment(config, machine_cores()).pipelining  # "on" / "off" as set; "auto" by the cores

    def input_streams(self) -> list[str]:
        # Its own stream first: rounds of requests it drafted the round before (cache affinity).
        return [self.keys.draft_at(self.instance), self.keys.draft(self.expert)]

    def liveness_fields(self) -> dict[str, str]:
        fields = {"expert": self.expert, "drafter": self.spec.name}
        if getattr(self, "cost_profile", None):  # its start-up drafting profile: the coordinators' prior
            fields["draft_ms"] = ",".join(f"{c:.3f}" for c in self.cost_profile)
        return fields

    async def setup(self) -> None:
        # A drafter's process takes its own thread count (drafters.threads), not the verifier's;
        # only drafters made of the target's layers run them (the others borrow its embedding
        # or tokenizer): no start-up timing of its linears for those.
        layers = "auto" if self.spec.kind in ("early-exit", "layer-skip") else "plain"
        threads = self.host.threads if self.host is not None else self.spec.threads
        target = None
        if self.spec.kind not in ("prompt-lookup", "emulated"):
            if self.host is not None:  # one copy of the target for every drafter the process hosts
                target = await self.host.target(layers, lambda: self.off_loop(load_target, self.config, threads, layers, layers == "auto"))
            else:  # fused projections only where the target's layers run (cosine.models.fusing)
                target = await self.off_loop(load_target, self.config, threads, layers, layers == "auto")
        self.drafter = await self.off_loop(build_drafter, self.spec, target, self.config)
        del target
        if self.host is not None:
            self.host.built(self.spec.name)
        else:  # what the drafter does not borrow of the target is freed now: give it back
            release_freed_memory()
        # Model-free drafters cost next to nothing (and a datastore would learn the profile's
        # synthetic contexts): only drafters that run a model are timed.
        self.cost_profile = None
        if self.spec.kind not in UNPROFILED_KINDS and not self.drafter.needs_features:
            await self._profile()
            self.profiles_left = profiles_when_idle(self.spec.kind, self.config.model.device) if self.cost_profile is not None else 0
        self.rank = [d.name for d in self.config.drafters].index(self.spec.name)
        self.features: OrderedDict[str, torch.Tensor] = OrderedDict()  # request id -> states at positions 0..
        self.contexts: OrderedDict[str, list[int]] = OrderedDict()  # request id -> the context of its last job here
        self.predrafts: OrderedDict[str, Predraft] = OrderedDict()  # request id -> its next round, drafted ahead

    def own_streams(self) -> list[str]:
        return [self.keys.draft_at(self.instance)]

    async def _profile(self) -> None:
        """Times the drafter (``profile_drafting``) and keeps the faster of this profile and the
        last: other work on the machine (the rest of a cluster starting up) only slows a profile,
        so the fastest taken is the closest to the drafter alone."""
        try:  # one drafter of a process at a time: the timings are of the drafter, not of the start-up
            async with self.host.profiling if self.host is not None else contextlib.nullcontext():
                profile = await self.off_loop(profile_drafting, self.drafter)
        except Exception as error:  # a prior lost, not a reason to stop: the coordinator measures drafting anyway
            self.log.warning("drafting cost profile failed: %s: %s", type(error).__name__, error)
            return
        self.cost_profile = faster_profile(self.cost_profile, profile)
        self.profiled_at = time.monotonic()

    async def tick(self) -> None:
        """A drafter profiled at start-up on a device of its own, idle for ``REPROFILE_IDLE_S``
        (no job in hand or read, nor any other drafter of its process), times itself again, up to ``REPROFILES`` times ``REPROFILE_EVERY_S`` apart: a
        start-up profile is often taken while the rest of the cluster starts (on one machine, 16
        drafters and the verifiers loading at once: 118 ms fixed, or 14 ms a token, against 0.08 +
        1.47 alone), and it is the coordinators' drafting prior."""
        if self.profiles_left <= 0:
            return
        now = time.monotonic()
        if now - self.profiled_at < REPROFILE_EVERY_S:
            return
        # Idle, and so is every drafter of the process (they share its model thread).
        if any(any(w._in_hand.values()) or now - w.last_job < REPROFILE_IDLE_S for w in (self.host.workers if self.host is not None else [self])):
            return
        self.profiles_left -= 1
        await self._profile()

    def connection_class(self):
        from cosine.emulate.build import network_connection  # emulate.network: a drafter host's link to Redis

        return network_connection(self.config)

    def hand_back_to(self, stream: str) -> str:
        return self.keys.draft(self.expert) if stream == self.keys.draft_at(self.instance) else stream

    async def on_connect(self) -> None:
        await self.redis.sadd(self.keys.experts, self.expert)

    def registrations(self, pipe) -> None:
        pipe.hset(self.keys.drafter_streams, self.instance, self.expert)

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        self.last_job = time.monotonic()
        jobs = [decode(fields, DraftJob) for _, fields in entries]
        if self.drafting_ahead:
            self._observe_turnaround(entries, jobs)
        contexts = await self._contexts(jobs)
        features = [await self._features(j) for j in jobs] if self.drafter.needs_features else [None] * len(jobs)
        # A job whose request moved on since it was written (its context is no longer the
        # request's) drafts nothing: its round is over.
        live = [i for i, context in enumerate(contexts) if context is not None]
        chains = [DraftChain((), (), None, self.spec.name)] * len(jobs)
        ahead = {i: self._drafted_ahead(jobs[i], contexts[i]) for i in live}
        fresh = [i for i in live if ahead[i] is None]
        requests = [_request(jobs[i], contexts[i], features[i]) for i in fresh]
        async with self.renewing(stream, [entry_id for entry_id, _ in entries]):
            began = time.perf_counter()
            drafted = await self.off_loop(self.drafter.propose, requests) if requests else []
            draft_ms = (time.perf_counter() - began) * 1000
        for i, chain in zip(fresh, drafted):
            chains[i] = chain
        for i in live:
            if ahead[i] is not None:
                chains[i] = ahead[i]
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
                instance=self.instance,
            )
            outputs.append((self.keys.drafts, encode(draft)))
        now_ms = self.clock.now() * 1000
        await write_and_ack(self.redis, outputs, stream, self.group, [entry_id for entry_id, _ in entries])
        if self.drafting_ahead:
            self._written([jobs[i] for i in live], now_ms)
            await self.guarded(self._draft_ahead, stream, [(jobs[i], contexts[i], chains[i]) for i in live])

    # ---- pipelining ----------------------------------------------------------------------

    def _drafted_ahead(self, job: DraftJob, context: list[int]) -> DraftChain | None:
        """The job's draft if it was drafted ahead for exactly this round, context and window."""
        ahead = self.predrafts.pop(job.request_id, None)
        if ahead is None or job.step_mode or ahead.round != job.round or ahead.sampling != job.sampling:
            return None
        if len(ahead.chain.tokens) < job.window or ahead.context != context:
            return None
        self.tally.count("drafts_ahead_used", drafter=self.spec.name)
        chain = ahead.chain
        probs = chain.draft_probs[: job.window] if chain.draft_probs is not None else None
        return DraftChain(chain.tokens[: job.window], chain.confidences[: job.window], probs, chain.drafter)

    async def _draft_ahead(self, stream: str, done: list[tuple[DraftJob, list[int], DraftChain]]) -> None:
        """Draft each request's next round from this one's draft, one request at a time, while
        no job waits (a waiting job goes first: this work only pays when the drafter is idle)."""
        work = [(job, context, chain) for job, context, chain in done if not job.step_mode and job.window > 0 and chain.tokens]
        if not work or len(done) > self.config.speculation.pipelining_max_batch:
            return
        for job, context, chain in work:
            # Jobs of another stream read with these (the expert's, after the drafter's own)
            # wait in hand; others may wait unread.
            if any(ids for name, ids in self._in_hand.items() if name != stream) or await self._jobs_waiting():
                return
            # The window the next round will likely ask: one longer (a fully accepted round
            # lengthens the adaptive window; a prefix of it serves a shorter one), as long as
            # the work fits before the request's next job comes.
            window = self.ahead_window(job)
            if window <= 0:
                continue
            request = DraftRequest(job.request_id, context, window, job.sampling, job.round + 1, None, job.domain)
            try:
                ahead = await self.off_loop(propose_ahead, self.drafter, request, chain.tokens)
            except Exception as error:  # a lost chance, not a failure: the round drafts as usual
                self.log.warning("request %s: drafting ahead failed: %s: %s", job.request_id, type(error).__name__, error)
                return
            if ahead is None:
                continue
            self.predrafts.pop(job.request_id, None)
            self.predrafts[job.request_id] = Predraft(job.round + 1, ahead[0], job.sampling, ahead[1])
            self.tally.count("drafts_ahead", drafter=self.spec.name)
            while len(self.predrafts) > MAX_HELD_REQUESTS:
                self.predrafts.popitem(last=False)

    @property
    def drafting_ahead(self) -> bool:
        """Whether this drafter drafts next rounds ahead (pipelining; not feature drafters)."""
        return self.pipelining and self.drafter.drafts_ahead and not self.drafter.needs_features

    def _written(self, jobs: list[DraftJob], now_ms: float) -> None:
        """The jobs' drafts were written at ``now_ms`` (the server's clock)."""
        for job in jobs:
            self.written.pop(job.request_id, None)
            self.written[job.request_id] = (job.round, now_ms)
        while len(self.written) > MAX_HELD_REQUESTS:
            self.written.popitem(last=False)

    def _observe_turnaround(self, entries: list[Entry], jobs: list[DraftJob]) -> None:
        """Each job of a request whose last round's draft this drafter wrote: the time between
        (the job's entry ID is when the server took it, by its clock, in ms)."""
        for (entry_id, _), job in zip(entries, jobs):
            written = self.written.pop(job.request_id, None)
            if written is not None and written[0] == job.round - 1:
                ms = _entry_key(entry_id)[0] - written[1]
                if ms >= 0 and self.clock.synced:  # before the clock's first sync its offset is unknown
                    self.turnaround.observe(ms)

    def ahead_window(self, job: DraftJob) -> int:
        """The window to draft the job's next round at ahead (``ahead_window``), by this
        drafter's profile, its measured turnaround and the jobs it expects (``ahead_budget``:
        the request's own and those of the others whose drafts it wrote lately)."""
        budget = ahead_budget(self.turnaround.ms, self.clock.now() * 1000, job.request_id, self.written)
        return ahead_window(job.window, self.config.speculation.max_window, budget, self._job_ms)

    def _job_ms(self, tokens: int) -> float:
        """A one-request job of ``tokens`` by this drafter's profile (0: not profiled)."""
        return profile_ms(self.cost_profile, tokens) if self.cost_profile else 0.0

    async def _jobs_waiting(self) -> bool:
        """Whether an input stream holds entries not yet delivered to this group: its newest
        entry is past the group's last delivered one."""
        streams = self.input_streams()
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream in streams:
                    pipe.xrevrange(stream, count=1)
                    pipe.xinfo_groups(stream)
                replies = await pipe.execute(raise_on_error=False)
        except Exception:
            return True
        for newest, groups in zip(replies[::2], replies[1::2]):
            if isinstance(newest, Exception) or isinstance(groups, Exception):
                return True
            if not newest:
                continue
            delivered = next((g.get("last-delivered-id") for g in groups if g.get("name") in (self.group, self.group.encode())), None)
            if delivered is None or _entry_key(newest[0][0]) > _entry_key(delivered):
                return True
        return False

    async def _contexts(self, jobs: list[DraftJob]) -> list[list[int] | None]:
        """Each job's whole context (``whole_contexts``), kept as the request's last one here."""
        contexts = await whole_contexts(self.redis, self.keys, self.contexts, jobs)
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
            parts.append(torch.from_numpy(states_from_bytes(stored, width)))
        rows = torch.cat([*parts, torch.from_numpy(new)])
        self.features[job.request_id] = rows
        while len(self.features) > MAX_HELD_REQUESTS:
            self.features.popitem(last=False)
        return rows


class DrafterHost:
    """Several drafters in one process (``cosine worker drafter --drafter A --drafter B``).

    Each hosted drafter is a ``DrafterWorker`` of its own (its instance, liveness, own stream and
    expert queue, exactly as in a process of its own: coordinators and ``cosine status`` see no
    difference), all on one event loop. What they would each hold is shared: one torch thread
    (every model call of the process runs on it, in turn: a second thread would get its own
    OpenMP team and slow both), one copy of the target they borrow from (its embedding), with
    the threads of the most demanding drafter.
    """

    def __init__(self, config, redis_url: str, names: list[str]) -> None:
        specs = {d.name: d for d in config.drafters}
        unknown = [name for name in names if name not in specs]
        if unknown:
            raise ValueError(f"no configured drafter named {unknown[0]!r}; configured: {list(specs)}")
        self.threads = max(specs[name].threads for name in names)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafters-model")
        self.workers = [DrafterWorker(config, redis_url, specs[name].expert, name, host=self) for name in dict.fromkeys(names)]
        self._targets: dict[str, asyncio.Future] = {}
        self.profiling = asyncio.Lock()  # the hosted drafters time their start-up profiles one at a time
        self._unbuilt = {name for name in names if specs[name].kind not in ("prompt-lookup", "emulated")}

    async def target(self, layers: str, load):
        """The target loaded once per linear layout, whichever hosted drafter asks first."""
        if layers not in self._targets:
            self._targets[layers] = asyncio.ensure_future(load())
        return await asyncio.shield(self._targets[layers])

    def built(self, name: str) -> None:
        """Once every hosted drafter is built, the host lets go of the target: what the drafters
        borrow (the embedding; an early-exit drafter's layers) stays, the rest is freed."""
        self._unbuilt.discard(name)
        if not self._unbuilt:
            self._targets.clear()
            release_freed_memory()

    async def run(self, *, burst: bool = False) -> None:
        install_drain_handlers([worker.stopping for worker in self.workers], self.workers[0].log)
        try:
            await asyncio.gather(*(worker.run(burst=burst, signals=False) for worker in self.workers))
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)


def profiles_when_idle(kind: str, device: str) -> int:
    """How many more drafting profiles a drafter takes when idle: ``REPROFILES`` on a device of
    its own (an emulated GPU, or CUDA), none on the CPU, where a profile takes the cores that the
    verifier, the other drafters — and a benchmark's own baseline, timed beside an idle
    pipeline — are using."""
    return REPROFILES if kind == "emulated" or device.startswith("cuda") else 0


def profile_ms(profile: tuple[float, ...], window: int, together: int = 1) -> float:
    """A drafting call's time by a drafting profile (d0, d1, d2): ``window`` tokens for
    ``together`` requests."""
    return float(np.dot(profile, draft_features(window, together)))


def faster_profile(last: tuple[float, ...] | None, profile: tuple[float, ...]) -> tuple[float, ...]:
    """Of two drafting profiles (d0, d1, d2), the one that predicts less time over the calls
    ``profile_drafting`` times (``last`` None: ``profile``)."""
    if last is None:
        return profile

    def total(coefficients) -> float:
        return sum(profile_ms(coefficients, window, together) for together, window in DRAFT_PROFILE_CALLS)

    return profile if total(profile) < total(last) else last


def profile_drafting(drafter, repeats: int = 3) -> tuple[float, float, float]:
    """Fit ms = d0 + d1 w + d2 k w to a few timed drafting calls (``k`` requests drafting ``w``
    tokens each, 64-token contexts; the fastest of ``repeats`` per call): the prior of the
    coordinator's drafting cost model, as the verifier's start-up profile is of its
    verification cost."""
    from cosine.core.sampling import SamplingParams

    rows, times = [], []
    for together, window in DRAFT_PROFILE_CALLS:
        requests = [DraftRequest(f"cost-profile-{i}", list(range(1, 65)), window, SamplingParams(), 0) for i in range(together)]
        fastest = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            drafter.propose(requests)
            fastest = min(fastest, (time.perf_counter() - began) * 1000)
        times.append(fastest)
        rows.append(draft_features(window, together))
        for request in requests:
            drafter.release(request.key)
    x, y = np.asarray(rows, dtype=np.float64), np.asarray(times, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return tuple(max(0.0, float(c)) for c in coef)  # type: ignore[return-value]


def _entry_key(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(ms), int(seq or 0)


MAX_HELD_REQUESTS = 256
# A drafter idle this long after start-up profiles itself again (``DrafterWorker.tick``), at
# most REPROFILES times, REPROFILE_EVERY_S apart.
REPROFILE_IDLE_S = 2.0
REPROFILE_EVERY_S = 10.0
REPROFILES = 2


@dataclass(frozen=True, slots=True)
class Predraft:
    """A request's next round drafted ahead: valid for that round, that exact context (this
    round's context, draft and the guessed next token) and the same sampling."""

    round: int
    context: list[int]
    sampling: object
    chain: DraftChain


def _request(job: DraftJob, context: list[int], features: torch.Tensor | None) -> DraftRequest:
    sampling = job.sampling
    if job.step_mode:  # one token after the fused prefix; its draws get the step's own random stream
        window = 1 if job.step < job.window else 0
        return DraftRequest(job.request_id, [*context, *job.prefix], window, sampling, job.round, features, job.domain, job.step)
    return DraftRequest(job.request_id, context, max(0, job.window), sampling, job.round, features, job.domain)
