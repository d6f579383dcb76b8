"""Coordinator: request pool, verification batches, applying verified rounds, next rounds.

- ``candidates`` -> pool -> ``verify``: fused trees wait in a pool until the batch policy
  releases a batch; the batch is written and its candidates acknowledged in one transaction.
  Requests pinned to a target fingerprint (every round after the first) go to that target's
  own verify stream, so a batch never mixes targets.
- ``verified`` -> request state + ``out:{id}`` + next round: each result is applied with the
  compare-and-set Lua function (round number), so duplicates and rival coordinators change
  nothing; the window is retuned from what was accepted; the next round goes to the experts'
  draft queues, or straight to verification with an empty draft (window 0: the target alone)
  when no drafter of those experts is alive or the window is 0. A pending cancellation wins.
- sweeps: a round with no candidate after ``drafter_deadline_ms`` goes on without drafts; a
  request past its deadline ends with ``error_code=deadline``.
- housekeeping: trims streams below what is still pending or unread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from dataclasses import dataclass

from redis.exceptions import RedisError, ResponseError

from cosine import bus, faults
from cosine.bus import roster_field, roster_int
from cosine.core.logprobs import LogprobsError
from cosine.core.rounds import ACTIVE, RequestState, RoundUpdate, advance, fail
from cosine.core.tree import tree_depth
from cosine.policy.batching import BatchPolicy, Pending
from cosine.policy.control import SpeculationControl
from cosine.policy.routing import routing_policy
from cosine.policy.window import WindowPolicy
from cosine.wire import (
    Candidate,
    DraftJob,
    VerifiedBatch,
    VerifiedItem,
    VerifyBatch,
    VerifyItem,
    WireError,
    decode,
    encode,
    rounds_in,
)
from cosine.wire.context import by_reference
from cosine.wire.convert import empty_candidate, feedback_from_wire
from cosine.wire.keys import split_id
from cosine.wire.state import round_fields, state_from_fields

from .base import Entry, StageWorker
from .models import load_tokenizer_and_limits
from .roster import LiveRoster

CONTROL_LOG_S = 30.0  # how often the cost model's state is logged (INFO)
EXPLORE_MAX_BATCH = 2  # load control explores drafting only while batches are this small
COST_WARM = 16  # verification batches observed before the cost model's error is counted
SWEEP_S = 1.0  # how often gone verifiers' own streams are looked for
TRACKED = 4096  # batches and rounds whose timing is remembered (oldest forgotten first)
# Positions of a feature request's prompt per verification when prefill_chunk is 0: its states
# travel with the result, and a whole long prompt's would pass the wire's size cap.
FEATURE_CHUNK = 512
DRAFTER_BACKLOG = 4  # jobs waiting unread in a drafter's own stream before its requests go to an idle drafter of the expert


@dataclass
class _Waiting:
    entry_id: bytes
    item: VerifyItem
    arrived: float
    fed_tokens: int = 1  # what the verifier feeds: the tree and the new token, the prompt in a first round
    expected: float = 1.0  # tokens the round is expected to commit
    depth: int = 0  # of the drafted tree
    room: int = 1  # tokens the request may still make (max_tokens)


@dataclass
class _RoundClock:
    """One round of a request as this coordinator saw it (monotonic seconds)."""

    round: int
    began: float  # next round asked for (drafting jobs or the direct candidate written)
    pooled: float = 0.0  # its candidate pooled
    sent: float = 0.0  # its batch written to a verify stream
    drafting_ms: float = 0.0  # began -> pooled, when it drafted


@dataclass
class _SentBatch:
    """What the cost model needs of a batch this coordinator formed, until its result is back."""

    size: int
    fed_tokens: int
    longest_context: int
    first_round: bool  # holds a request's first round (a prompt's prefill: not a round's cost)
    depths: dict[str, int]  # request -> its drafted tree's depth


def _with_steps(waiting: _Waiting, steps: int) -> VerifyItem:
    """The item as sent: a round without drafts (past a request's first, so that its first token
    comes at once) decodes up to ``steps`` tokens, never past the request's ``max_tokens``; one
    that asked for the target's states (feature drafters) or is a prefill chunk, one."""
    item = waiting.item
    if steps <= 1 or item.tree.tokens or item.round == 0 or item.features_from >= 0 or item.prefill_chunk > 0:
        return item
    return dataclasses.replace(item, steps=max(1, min(steps, waiting.room)))


def kv_rows_of(item: VerifyItem, block: int) -> int:
    """K/V pool rows a verification item holds: its context and tree, in whole blocks."""
    rows = item.context_len + len(item.tree.tokens)
    return -(-rows // max(1, block)) * max(1, block)


def _current(item: VerifiedItem, state: RequestState | None) -> bool:
    """Whether a verified round is its active request's current one (not a duplicate, nor a
    result another coordinator applied)."""
    return state is not None and state.status == ACTIVE and state.round == item.round


class Coordinator(StageWorker):
    role = "coordinator"
    read_count = 64

    def __init__(self, config, redis_url: str, instance: str | None = None) -> None:
        super().__init__(config, redis_url, instance)
        self.rosters = LiveRoster(self)
        spec = config.speculation
        self.control = SpeculationControl(enabled=spec.load_control and spec.max_window > 0, multi_step=spec.multi_step)
        self.drafting: dict[str, tuple[int, float, int, int]] = {}  # request -> (round, sent at, window, drafting at once)
        self.round_began: dict[str, _RoundClock] = {}  # request -> its round's timeline (overhead, where the time goes)
        self.sent_batches: dict[str, _SentBatch] = {}
        self.planned: dict[str, tuple[int, int, int]] = {}  # request -> (round, window, drafting at once) planned with its batch-mates
        # Rounds' wall times and tokens, drafted or not (what speculation earns at this load):
        # added to the stats hash with each verified batch.
        self.round_times: Counter[str] = Counter()
        self.texts: dict[str, tuple[int, tuple[int, ...], str]] = {}  # request -> its output's text (incremental detokenization)
        self.active = 1  # active requests, as of the last batch decision
        self.verifier_ids: set[str] = set()  # live verifier instances
        self.kv_rows: dict[str, int] = {}  # verifier instance -> rows of its K/V pool (from the roster)
        self.kv_block = 1  # rows per pool block (from the roster)
        self.home: dict[str, str] = {}  # request -> the verifier instance that verified its last round (holds its caches)
        self.busy_at: dict[str, int] = {}  # verifier instance -> batches of its own stream queued or in hand (last read)
        self.steal = False  # some verifier is free (last read): busy homes' requests go to the shared stream
        # request -> prompt positions the verifier holds after its last prefill chunk (-1: a chunk
        # made no progress, e.g. the cache was evicted meanwhile: the rest goes at once)
        self.prefilled: dict[str, int] = {}
        self.last_output: dict[str, int] = {}  # request -> epoch ms of its last output applied here (inter-token latency)
        # request -> {expert: the drafter instance that drafted its last round} (drafter affinity)
        self.draft_homes: dict[str, dict[str, str]] = {}
        self.drafter_ids: set[str] = set()  # live drafter instances
        self.drafter_expert: dict[str, str] = {}  # live drafter instance -> its expert (from the roster)
        self.drafter_queued: dict[str, tuple[int, int]] = {}  # live drafter instance -> jobs of its own stream (waiting unread, in hand), last refresh

    def input_streams(self) -> list[str]:
        return [self.keys.verified, self.keys.candidates]

    async def setup(self) -> None:
        self.tokenizer, _, _ = await self.off_loop(load_tokenizer_and_limits, self.config)
        spec = self.config.speculation
        self.window_policy = WindowPolicy(spec.window, spec.min_window, spec.max_window, spec.adaptive_window)
        self.routing_policy = routing_policy(self.config)
        self.expert_of = {d.name: d.expert for d in self.config.drafters}
        self.batch_policy = BatchPolicy(spec.max_batch, max_wait_s=self.config.pipeline.batch_wait_ms / 1000)
        self.pool: list[_Waiting] = []
        self.live_experts: set[str] = set()
        self.live_verifiers = 0
        self.fingerprints: set[str] = set()  # every target fingerprint seen live
        self.live_fingerprints: set[str] = set()  # those of live verifiers now
        self.target_gone_since: dict[str, float] = {}  # fingerprint -> when its last verifier was gone (monotonic)
        self.last_refresh = self.last_trim = self.last_control_log = self.last_sweep = 0.0

    @property
    def feature_experts(self) -> set[str]:
        """Experts served by feature drafters: their requests' rounds ship the target's states."""
        return {d.expert for d in self.config.drafters if d.kind == "feature"}

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        if stream == self.keys.candidates:
            candidates = [(entry_id, decode(fields, Candidate)) for entry_id, fields in entries]
            states = await self._states([c.request_id for _, c in candidates])  # one round trip for all
            for (entry_id, candidate), state in zip(candidates, states):
                await self._pool_candidate(entry_id, candidate, state)
            await self._flush()
        else:
            for entry_id, fields in entries:
                await self._apply_verified(entry_id, decode(fields, VerifiedBatch))

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """A verified batch that cannot be applied (unreadable, or failing here each time): each
        round it carried that is still its request's current one is verified again once, without
        drafts; the second time the request ends with one ``internal`` final naming the cause.
        (A candidate needs nothing: its round stays in the rounds set until it is sent, and the
        drafter-deadline sweep verifies it without drafts.)"""
        if stream != self.keys.verified:
            return
        rounds = [(request_id, round_, reason) for request_id, round_ in rounds_in(entry[1])]
        try:
            batch = decode(entry[1], VerifiedBatch)
        except WireError:
            batch = None
        if batch is not None and len(batch.items) > 1:  # one request's result may be the cause: the others apply alone
            rounds = []
            for item in batch.items:
                try:
                    await self._apply_verified(entry[0], dataclasses.replace(batch, items=[item]))
                except (RedisError, asyncio.CancelledError):
                    raise
                except Exception as error:
                    rounds.append((item.request_id, item.round, f"internal error: {type(error).__name__}: {error}"))
        for request_id, round_, reason in rounds:
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE or state.round != round_:
                continue  # applied elsewhere, or ended: nothing stranded
            key = self.keys.request(request_id)
            if await self.redis.hget(key, "redo") != str(round_).encode():
                self.log.warning("request %s round %d: its verified result could not be applied (%s); verifying it again", request_id, round_, reason)
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.hset(key, "redo", round_)
                    pipe.xadd(self.keys.candidates, encode(empty_candidate(state)))
                    await pipe.execute()
            else:
                update = fail(state, self.tokenizer, f"the verified round could not be applied, twice: {reason}", error_code="internal")
                self.log.warning("request %s round %d: ended (%s)", request_id, round_, await self._apply(state, update))

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_refresh > 0.25:
            self.last_refresh = now
            await self._refresh_liveness()
            limit = now - self.config.pipeline.drafter_deadline_ms / 1000
            self.drafting = {k: v for k, v in self.drafting.items() if v[1] >= limit}  # rounds that never came back here
            self.round_began = {k: v for k, v in self.round_began.items() if v.began >= now - 60}
            await self.guarded(self._fallback_overdue_rounds)
            if now - self.last_sweep > SWEEP_S:
                self.last_sweep = now
                await self.guarded(self._move_gone_verifier_streams)
                await self.guarded(self._move_gone_drafter_streams)
                await self.guarded(self._end_rounds_of_gone_targets)
            await self.guarded(self._expire_deadlines)
        if self.control.enabled and now - self.last_control_log > CONTROL_LOG_S:
            self.last_control_log = now
            self.log.info("load control: %s", self.control.describe())
        if now - self.last_trim > self.config.pipeline.trim_interval_s:
            self.last_trim = now
            await self.guarded(self._trim)
        await self._flush()

    async def drain(self) -> None:
        """Hand the pool on at once: every pooled candidate goes into a batch now."""
        if self.pool:
            self.log.info("draining: sending %d pooled candidates to verification", len(self.pool))
            await self.retrying(self._flush, True)

    def held(self) -> dict[str, list[bytes]]:
        return {self.keys.candidates: [w.entry_id for w in self.pool]}

    def let_go(self, stream: str, entry_ids: set[bytes]) -> None:
        self.pool = [w for w in self.pool if w.entry_id not in entry_ids]  # another coordinator batches them

    def block_ms(self) -> int:
        if not self.pool:
            return self.config.pipeline.block_ms
        waited = time.monotonic() - self.pool[0].arrived
        return max(1, min(self.config.pipeline.block_ms, int((self.batch_policy.max_wait_s - waited) * 1000) + 1))

    # ---- candidates -> verification batches -------------------------------------------------

    async def _pool_candidate(self, entry_id: bytes, candidate: Candidate, state: RequestState | None) -> None:
        if any(w.entry_id == entry_id for w in self.pool):
            return  # handled again after an error: already pooled
        now = time.monotonic()
        sent = self.drafting.get(candidate.request_id)
        if sent is not None and sent[0] <= candidate.round:
            del self.drafting[candidate.request_id]  # back from drafting (or gone past it)
            if sent[0] == candidate.round and candidate.tokens:
                self.control.observe_drafting(sent[2], (now - sent[1]) * 1000, sent[3])
        clock = self.round_began.get(candidate.request_id)
        if clock is not None and clock.round == candidate.round and not clock.pooled:
            clock.pooled = now
            clock.drafting_ms = (now - clock.began) * 1000 if candidate.tokens else 0.0
        if state is None or state.status != ACTIVE or state.round != candidate.round:
            await self.redis.xack(self.keys.candidates, self.group, entry_id)  # stale
            return
        # A pooled candidate of an earlier round of this request is stale (a duplicate of it was
        # verified elsewhere): drop it, so it cannot pass for this round's duplicate.
        stale = [w for w in self.pool if w.item.request_id == state.request_id and w.item.round != state.round]
        if stale:
            await self.redis.xack(self.keys.candidates, self.group, *(w.entry_id for w in stale))
            self.pool = [w for w in self.pool if w not in stale]
        if any(w.item.request_id == state.request_id for w in self.pool):
            await self.redis.xack(self.keys.candidates, self.group, entry_id)  # this round, already pooled
            return
        self._remember_draft_homes(candidate)
        features_from = state.feature_rows if self.feature_experts.intersection(state.experts) else -1
        chunk, fed = 0, len(candidate.tokens) + (len(state.context) if state.round == 0 else 1)
        if state.round == 0:  # a prompt's prefill, chunked unless it stalls (a feature request's always: its states)
            prefilled = self.prefilled.get(state.request_id, 0)
            chunk = 0 if prefilled < 0 else self.config.pipeline.prefill_chunk or (FEATURE_CHUNK if features_from >= 0 else 0)
            if chunk:
                fed = len(candidate.tokens) + min(chunk, max(1, len(state.context) - max(prefilled, features_from)))
        # Later rounds reference the context (the verifier keeps it); a first round carries the prompt.
        start, prefix_digest, tail = by_reference(state.context) if state.round else (0, b"", state.context)
        item = VerifyItem(state.request_id, state.round, tail, candidate, state.sampling, state.fingerprint, features_from, chunk, start, prefix_digest,
                          state.logprobs, stop_ids=list(state.eos_ids))
        depth = tree_depth(candidate.parents)
        expected = self.control.expected(depth, state.accepted_tokens, state.drafted_rounds)
        self.pool.append(_Waiting(entry_id, item, time.monotonic(), fed, expected, depth, state.max_tokens - len(state.output_ids)))

    def _remember_draft_homes(self, candidate: Candidate) -> None:
        homes = {e: i for pair in candidate.homes if isinstance(pair, list) and len(pair) == 2
                 for e, i in [pair] if isinstance(e, str) and isinstance(i, str)}
        if homes:  # a round without drafts (window 0) keeps the homes of the last drafted one
            self.draft_homes.pop(candidate.request_id, None)
            self.draft_homes[candidate.request_id] = homes
            while len(self.draft_homes) > TRACKED:  # requests that ended elsewhere
                del self.draft_homes[next(iter(self.draft_homes))]

    def _draft_stream(self, request_id: str, expert: str) -> str | tuple[str, str]:
        """Where a round's job for ``expert`` goes: the live drafter instance that drafted the
        request's last round (its caches, its draft made ahead), else the expert's stream; also
        when that one has a backlog (DRAFTER_BACKLOG jobs waiting unread) while another drafter of
        the expert has nothing queued or in hand: a slow or stuck home does not hold its requests
        while others idle (a home that misses the drafting deadline loses them at once). A
        home's stream comes with the expert's: the job goes there if the home's stream is gone."""
        home = self.draft_homes.get(request_id, {}).get(expert)
        if not home or home not in self.drafter_ids or not self.config.pipeline.affinity:
            return self.keys.draft(expert)
        waiting, _ = self.drafter_queued.get(home, (0, 0))
        if waiting >= DRAFTER_BACKLOG and any(
            self.drafter_queued.get(other, (0, 0)) == (0, 0) for other, served in self.drafter_expert.items() if served == expert and other != home
        ):
            return self.keys.draft(expert)
        return self.keys.draft_at(home), self.keys.draft(expert)

    async def _flush(self, force: bool = False) -> None:
        while self.pool:
            if not force:
                active, busy = await self._load()
                self.active = active
                # A home verifier with work queued or in hand while another one is free: its
                # requests' next batch goes to the shared stream, to the first verifier free
                # (which rebuilds their caches) instead of queueing behind the home's work.
                self.steal = busy < self.live_verifiers
                oldest = time.monotonic() - self.pool[0].arrived
                tokens = sum(len(w.item.tree.tokens) + 1 for w in self.pool)
                now = time.monotonic()
                due = max((sent + self.control.draft_ms(window, k) / 1000 - now for _, sent, window, k in self.drafting.values()), default=0.0)
                split = self.control.verify.coefficients[0] / 1000  # a verification's fixed cost
                if not self.batch_policy.should_flush(len(self.pool), tokens, oldest, active, self.live_verifiers, busy, len(self.drafting), due, split):
                    return
            # One batch serves one target: the oldest candidate's; which of its candidates, by
            # the cost model (value per verification ms, none passed over past batch_starve_ms).
            fingerprint = self.pool[0].item.fingerprint
            home = self._home(self.pool[0].item.request_id)
            # Cache affinity: a batch goes to one verifier; requests new to every verifier join any.
            same = [w for w in self.pool if w.item.fingerprint == fingerprint and self._home(w.item.request_id) in (home, "")]
            pipeline = self.config.pipeline
            now = time.monotonic()
            pending = [Pending(now - w.arrived, w.fed_tokens, w.expected, w.item.round == 0, kv_rows_of(w.item, self.kv_block)) for w in same]
            kv_rows = self.kv_rows.get(home) or min(self.kv_rows.values(), default=0)  # the home's pool, else the smallest
            if pipeline.batch_choice == "fifo":
                chosen = self.batch_policy.first_come(pending, kv_rows)
            else:
                chosen = self.batch_policy.select(pending, self.control.verify_ms, pipeline.batch_latency_weight, pipeline.batch_starve_ms / 1000, kv_rows)
            taken = [same[i] for i in chosen]
            steps = self._multi_steps(taken)
            batch = VerifyBatch(uuid.uuid4().hex[:12], [_with_steps(w, steps) for w in taken])
            shared = self.keys.verify_for(fingerprint) if fingerprint else self.keys.verify
            async with self.redis.pipeline(transaction=True) as pipe:
                if home:  # the shared stream if the home is gone and its stream moved
                    bus.send(pipe, self.keys.verify_at(home), shared, encode(batch))
                else:
                    pipe.xadd(shared, encode(batch))
                # Drafting is done: the drafter-deadline sweep lets go of these rounds.
                pipe.zrem(self.keys.rounds, *(w.item.request_id for w in taken))
                pipe.hincrby(self.keys.stats, "rounds_sent", len(taken))
                pipe.hincrby(self.keys.stats, "rounds_window0", sum(1 for w in taken if not w.item.tree.tokens))
                pipe.xack(self.keys.candidates, self.group, *(w.entry_id for w in taken))
                await pipe.execute()
            # Only once written: a failed write keeps the candidates pooled (and pending).
            taken_ids = {w.entry_id for w in taken}
            self.pool = [w for w in self.pool if w.entry_id not in taken_ids]
            sent_at = time.monotonic()
            for w in taken:
                clock = self.round_began.get(w.item.request_id)
                if clock is not None and clock.round == w.item.round:
                    clock.sent = sent_at
            self.sent_batches[batch.batch_id] = _SentBatch(
                len(taken), sum(w.fed_tokens for w in taken), max(w.item.context_len for w in taken),
                any(w.item.round == 0 for w in taken), {w.item.request_id: w.depth for w in taken},
            )
            while len(self.sent_batches) > TRACKED:  # results that never came back here
                del self.sent_batches[next(iter(self.sent_batches))]
            self.log.debug("batch %s: %d requests to %s", batch.batch_id, len(taken), home or shared)

    def _multi_steps(self, taken: list[_Waiting]) -> int:
        """How many tokens a batch's rounds without drafts may decode in this one job
        (multi-step; ``speculation.multi_step``): every one, when the batch holds every active
        request; else only as many as fit before the rounds drafting now are expected back (they
        would wait for this batch), at least one."""
        limit = self.config.speculation.multi_step
        if limit <= 1 or not any(not w.item.tree.tokens for w in taken):
            return 1
        left = len(self.pool) - len(taken)  # candidates that stay pooled
        if len(taken) >= self.active and not self.drafting and not left:
            return limit
        if left:
            return 1
        now = time.monotonic()
        due_ms = min((max(0.0, sent + self.control.draft_ms(window, k) / 1000 - now) * 1000 for _, sent, window, k in self.drafting.values()), default=0.0)
        longest = max(w.item.context_len for w in taken)
        step_ms = max(1e-3, self.control.verify_ms(len(taken), len(taken), longest))
        return max(1, min(limit, 1 + int(due_ms / step_ms)))

    def _home(self, request_id: str) -> str:
        """The live verifier instance that holds a request's caches, or "" (any verifier): also
        when that one has work while another is free."""
        home = self.home.get(request_id, "")
        if home not in self.verifier_ids or not self.config.pipeline.affinity:
            return ""
        return "" if self.steal and self.busy_at.get(home, 0) else home

    async def _load(self) -> tuple[int, int]:
        """(active requests, batches queued or in verification over the shared and the
        per-target verify streams), in one round trip: a batch decision sits on every round's
        path."""
        # Only live targets' streams: batches of a target no verifier serves wait for nobody's
        # time (they end target_gone), and counted as busy they held healthy batches for good.
        streams = [self.keys.verify, *(self.keys.verify_for(f) for f in sorted(self.live_fingerprints)),
                   *(self.keys.verify_at(i) for i in sorted(self.verifier_ids))]
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.deadlines)
            pipe.zcard(self.keys.waiting)
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies[:2]:
            if isinstance(reply, Exception):
                raise reply
        active, busy, own = replies[0] - replies[1], 0, {}  # started requests: waiting ones are in no batch
        instances = {self.keys.verify_at(i): i for i in self.verifier_ids}
        for stream, groups in zip(streams, replies[2:]):
            if isinstance(groups, ResponseError) and "no such key" in str(groups).lower():
                continue  # a verify stream not created yet: nothing queued on it
            if isinstance(groups, Exception):
                raise groups
            for group in groups:
                if group["name"].decode() == self.keys.group("verifier"):
                    queued = int(group.get("lag") or 0) + int(group.get("pending") or 0)
                    busy += queued
                    if stream in instances:
                        own[instances[stream]] = queued
        self.busy_at = own  # per verifier: batches of its own stream queued or in hand
        return int(active), busy

    # ---- verified results -> state, output, next round ----------------------------------------

    async def _apply_verified(self, entry_id: bytes, batch: VerifiedBatch) -> None:
        for item in batch.items:
            faults.check("coordinator.apply", item.request_id)
        cost_error = self._observe(batch)
        for item in batch.items:  # the verifier now holds these requests' caches
            self.home[item.request_id] = batch.verifier
        while len(self.home) > TRACKED:  # requests that ended elsewhere
            del self.home[next(iter(self.home))]
        states = await self._states([item.request_id for item in batch.items])
        self._plan(batch, states)
        # Every request's round in one round trip (each its own compare-and-set).
        calls, applied, chunked, with_states = [], [], [], []  # applied: (item, state, update) of each call
        for item, state in zip(batch.items, states):
            if item.prefilled > 0 and not item.error:  # a prefill chunk: the same round again
                if _current(item, state):
                    progress = item.prefilled > self.prefilled.get(item.request_id, 0)
                    self.prefilled[item.request_id] = item.prefilled if progress else -1
                    if item.features:  # the chunk's states are stored with the round's next try
                        with_states.append((state, self._chunk_call(state, item)))
                    else:
                        chunked.append(state)
                    while len(self.prefilled) > TRACKED:  # requests that ended elsewhere
                        del self.prefilled[next(iter(self.prefilled))]
                continue
            self.prefilled.pop(item.request_id, None)
            update = self._update(item, state, batch.fingerprint)
            if update is not None:
                calls.append(self._apply_call(state, update, item))
                applied.append((item, state, update))
        outcomes = await bus.apply_rounds(self.redis, calls + [call for _, call in with_states])
        for (item, state, update), outcome in zip(applied, outcomes):
            if outcome == "applied":
                self._count(state, update, item)
            elif outcome == "cancelled":  # flagged while we computed: read again, the cancellation wins
                await self._apply_item(item, batch.fingerprint)
        # A chunk whose states were not stored (a cancellation pending) goes on without them:
        # its next round applies the cancellation.
        chunked += [state for (state, _), outcome in zip(with_states, outcomes[len(calls):]) if outcome == "cancelled"]
        if faults.enabled():
            await self.mark_phase("after_apply")
            await asyncio.sleep(faults.delay("coordinator.after_apply"))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(self.keys.stats, "verify_batches", 1)
            pipe.hincrby(self.keys.stats, "verify_items", batch.batch_size)
            pipe.hincrby(self.keys.stats, "verify_forward_us", round(batch.forward_ms * 1000))  # verifiers' busy time
            decoded = sum(len(item.decoded) for item in batch.items)
            if decoded:  # tokens made after a multi-step round's first: the share multi-step makes
                pipe.hincrby(self.keys.stats, "multi_step_tokens", decoded)
                pipe.hincrby(self.keys.stats, "multi_step_rounds", sum(1 for item in batch.items if item.decoded))
            for name, value in self.round_times.items():
                pipe.hincrby(self.keys.stats, name, value)
            if cost_error is not None:  # the cost model's error on batches it had not seen
                pipe.hincrby(self.keys.stats, "cost_model_batches", 1)
                pipe.hincrby(self.keys.stats, "cost_model_error_ppm", round(cost_error * 1e6))
            for state in chunked:  # with the acknowledgement: a crash cannot lose the round
                pipe.xadd(self.keys.candidates, encode(empty_candidate(state)))
            if chunked or with_states:
                pipe.hincrby(self.keys.stats, "prefill_chunks", len(chunked) + len(with_states))
            pipe.xack(self.keys.verified, self.group, entry_id)
            await pipe.execute()
        self.round_times.clear()
        await self.mark_phase("idle")

    def _observe(self, batch: VerifiedBatch) -> float | None:
        """What a verified batch tells the load control: the verification's cost (returns the
        model's relative error on it, once warm), each round's acceptance by tree depth, and
        the rounds' overhead (wall time less drafting and verification; only where the batch
        held every active request, so that no other batch's verification is in it)."""
        sent = self.sent_batches.pop(batch.batch_id, None)
        if sent is None or not batch.items:
            return None  # formed by another coordinator (or seen before: a redelivery)
        self.tally.observe("verification_batch_size", batch.batch_size)
        now = time.monotonic()
        whole = len(batch.items) >= self.active
        for item in batch.items:
            if item.error or item.prefilled > 0:
                continue
            depth = sent.depths.get(item.request_id, 0)
            self.control.observe_round(depth, len(item.accepted_tokens))
            clock = self.round_began.pop(item.request_id, None)
            if clock is None or clock.round != item.round or batch.forward_ms <= 0 or not clock.pooled or not clock.sent:
                continue
            wall_ms = (now - clock.began) * 1000
            kind = "drafted" if depth else "window0"
            times = self.round_times
            times[f"rounds_timed_{kind}"] += 1
            times[f"round_wall_us_{kind}"] += round(wall_ms * 1000)
            times[f"round_tokens_{kind}"] += len(item.accepted_tokens) + 1 + len(item.decoded)
            # Where the round's time went: the hop to the pool (writing the round, drafting and
            # fusion when it drafted), the pool (batch forming, waiting for a free verifier), the
            # verify stream (queued behind other batches, the hops) and the forward itself.
            times["round_to_pool_us"] += round((clock.pooled - clock.began) * 1e6)
            times["round_in_pool_us"] += round((clock.sent - clock.pooled) * 1e6)
            times["round_verify_wait_us"] += round(max(0.0, (now - clock.sent) * 1000 - batch.forward_ms) * 1000)
            times["round_forward_us"] += round(batch.forward_ms * 1000)
            if whole:
                self.control.observe_overhead(wall_ms - clock.drafting_ms - batch.forward_ms)
        # First rounds feed whole prompts: their batches say nothing of a verification round's cost.
        # Multi-step batches ran several forwards: not one verification's cost either.
        if sent.first_round or batch.forward_ms <= 0 or any(item.error or item.decoded for item in batch.items) or sent.size != len(batch.items):
            return None
        warm = self.control.verify.observations >= COST_WARM
        error = self.control.observe_verification(sent.size, sent.fed_tokens, batch.forward_ms, sent.longest_context)
        return error if warm else None

    def _plan(self, batch: VerifiedBatch, states: list[RequestState | None]) -> None:
        """The next round's windows of a verified batch's requests, decided together: they
        will most likely be verified together again (load control; the plan caps each window)."""
        if not self.control.enabled:
            return
        ids, rows = [], []
        for item, state in zip(batch.items, states):
            if item.error or item.prefilled > 0 or not _current(item, state):
                continue
            drafted = item.draft_tokens > 0
            ids.append((item.request_id, item.round + 1))
            rows.append((state.window, state.accepted_tokens + (len(item.accepted_tokens) if drafted else 0), state.drafted_rounds + drafted))
        if not rows:
            return
        windows = self.control.plan(rows, self.batch_policy.fair_share(self.active, self.live_verifiers))
        together = sum(1 for w in windows if w > 0)
        for (request_id, next_round), window in zip(ids, windows):
            self.planned[request_id] = (next_round, window, together)
        while len(self.planned) > TRACKED:
            del self.planned[next(iter(self.planned))]

    async def _apply_item(self, item: VerifiedItem, fingerprint: str, state: RequestState | None = None) -> None:
        for attempt in range(3):  # a cancellation flagged while we computed: read again, apply it instead
            if attempt or state is None:
                state = await self._state(item.request_id)
            update = self._update(item, state, fingerprint)
            if update is None or await self._apply(state, update, item) != "cancelled":
                return

    def _update(self, item: VerifiedItem, state: RequestState | None, fingerprint: str) -> RoundUpdate | None:
        """What a verified round does to its request; None for a duplicate, or a result another
        coordinator applied."""
        if not _current(item, state):
            return None
        if state.cancel_requested:
            return fail(state, self.tokenizer, "cancelled by client", "cancelled", "cancelled")
        if item.error:
            return fail(state, self.tokenizer, item.error, error_code=item.error_code or "internal")
        try:
            update = advance(state, item.accepted_tokens, item.next_token, item.draft_tokens, self.tokenizer, self.window_policy, fingerprint,
                             feedback_from_wire(item.drafters), self.routing_policy, self.expert_of, self.texts, item.logprobs, item.decoded)
        except LogprobsError as error:  # asked for, but the verifier's rows do not fit: the request ends, loudly
            self.log.warning("request %s round %d: %s", state.request_id, state.round, error)
            return fail(state, self.tokenizer, f"the verifier's log-probabilities did not fit the round: {error}")
        while len(self.texts) > TRACKED:  # requests that ended elsewhere
            del self.texts[next(iter(self.texts))]
        return update

    async def _apply(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None = None) -> str:
        outcome = (await bus.apply_rounds(self.redis, [self._apply_call(state, update, item)]))[0]
        if outcome == "applied":
            self._count(state, update, item)
        return outcome

    def _count(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None) -> None:
        """Metrics of an applied update: tokens, latencies, speculation, a request's end."""
        now_ms = self.clock.now_ms()
        new_tokens = len(update.state.output_ids) - len(state.output_ids)
        since_ms = self.last_output.pop(state.request_id, None)  # None: its previous round was applied elsewhere
        if not update.finished:
            self.last_output[state.request_id] = now_ms if new_tokens else since_ms if since_ms is not None else now_ms
            while len(self.last_output) > TRACKED:  # requests that ended elsewhere
                del self.last_output[next(iter(self.last_output))]
        if item is not None and update.state.rounds > state.rounds:  # a verified round (not a failure or cancellation)
            drafters = {name: (f.drafted, f.accepted) for name, f in feedback_from_wire(item.drafters).items()}
            self.tally.round_applied(new_tokens=new_tokens, first=not state.output_ids, created_ms=state.created_ms, since_ms=since_ms,
                                     now_ms=now_ms, draft_tokens=item.draft_tokens, accepted=len(item.accepted_tokens), drafters=drafters,
                                     tenant=split_id(state.request_id)[0])
        if update.finished:
            final = next((e for e in reversed(update.out_entries) if e.get("type") == "final"), {})
            self.tally.request_ended(final.get("finish_reason", ""), final.get("error_code", ""), state.created_ms, now_ms, tenant=split_id(state.request_id)[0])

    def _apply_call(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None = None) -> tuple[list[str], list]:
        """The compare-and-set call that applies ``update`` (and asks for the next round)."""
        if update.finished:
            return bus.apply_round_call(self.keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
                                        out_entries=update.out_entries, ttl_s=self.config.pipeline.output_ttl_s)
        features, start = (item.features, item.features_start) if item is not None and item.features else (b"", 0)
        # The round's states cover positions start .. L'-2 (all but the new last token).
        rows = self._state_rows(state, features, len(update.state.context) - 1 - start)
        if not rows:
            features, start = b"", 0
        streams, payload = self._next_round(update.state, features, start)
        return bus.apply_round_call(
            self.keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
            out_entries=update.out_entries, job_streams=streams, payload=payload, features=features, features_start=start, feature_rows=rows,
        )

    def _chunk_call(self, state: RequestState, item: VerifiedItem) -> tuple[list[str], list]:
        """The call that stores a prefill chunk's states (positions features_start ..
        prefilled - 1) and queues the round's next try, with no other change to the request."""
        rows = self._state_rows(state, item.features, item.prefilled - item.features_start)
        return bus.apply_round_call(
            self.keys, request_id=state.request_id, expected_round=state.round, fields={}, out_entries=[],
            job_streams=[self.keys.candidates], payload=encode(empty_candidate(state))[b"m"],
            features=item.features if rows else b"", features_start=item.features_start, feature_rows=rows,
        )

    def _state_rows(self, state: RequestState, features: bytes, positions: int) -> int:
        """``positions`` when ``features`` are that many whole rows of states, else 0: states
        that do not fit are dropped (logged), and the next round ships them again."""
        if not features:
            return 0
        if positions <= 0 or len(features) % positions:
            self.log.warning("request %s round %d: %d bytes of states for %d positions; dropped", state.request_id, state.round, len(features), positions)
            return 0
        return positions

    def _next_round(self, state: RequestState, features: bytes = b"", features_start: int = 0) -> tuple[list[str | tuple[str, str]], bytes]:
        experts = [e for e in state.experts if e in self.live_experts]
        room = state.max_tokens - len(state.output_ids) - 1
        window = min(state.window, max(0, room), *([state.max_window] if state.max_window >= 0 else []))  # the request's own cap
        together = len(self.drafting) + 1  # requests drafting at once with this one
        planned = self.planned.pop(state.request_id, None)
        if experts and window > 0:
            batch_size = self.batch_policy.fair_share(self.active, self.live_verifiers)  # requests per batch at this load
            experts = experts[: self.control.cooperating(len(experts), batch_size)]  # the best ranked first
            # Exploration only at low load: under load a drafted round costs its batch-mates too
            # (even rare exploration cost a large share of the throughput at 16 requests).
            if batch_size <= EXPLORE_MAX_BATCH and self.control.explore(state.request_id, state.round, state.drafted_rounds):
                pass  # drafts at its adaptive window
            elif planned is not None and planned[0] == state.round:
                window, together = min(window, planned[1]), max(1, planned[2])
            else:
                window = self.control.choose(window, batch_size, state.accepted_tokens, state.drafted_rounds)
        self.round_began[state.request_id] = _RoundClock(state.round, time.monotonic())
        if not experts or window <= 0:
            return [self.keys.candidates], encode(empty_candidate(state))[b"m"]
        self.drafting[state.request_id] = (state.round, time.monotonic(), window, together)
        start, prefix_digest, tail = by_reference(state.context)
        job = DraftJob(state.request_id, state.round, tail, window, state.sampling, experts, self.clock.now_ms(), features, features_start, state.domain,
                       step_mode=self.config.speculation.mode == "step", context_start=start, context_digest=prefix_digest)
        return [self._draft_stream(state.request_id, e) for e in experts], encode(job)[b"m"]

    # ---- sweeps --------------------------------------------------------------------------

    async def _fallback_overdue_rounds(self) -> None:
        """A round still drafting after the deadline goes on without drafts (window 0).

        Covers drafters that died or never existed. Rounds already pooled or queued for
        verification are not in the ``rounds`` set. A late real draft for the same round is
        harmless: the first result applied wins the compare-and-set, the other is stale.
        """
        deadline_ms = self.config.pipeline.drafter_deadline_ms
        now_ms = self.clock.now_ms()
        overdue = await self.redis.zrangebyscore(self.keys.rounds, 0, now_ms - deadline_ms, start=0, num=64)
        for raw_id in overdue:
            request_id = raw_id.decode()
            await self.redis.zadd(self.keys.rounds, {request_id: now_ms}, xx=True)  # not again at once
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE:
                await self.redis.zrem(self.keys.rounds, request_id)
                continue
            self.log.warning("request %s round %d: no draft after %d ms, verifying without drafts", request_id, state.round, deadline_ms)
            self.draft_homes.pop(request_id, None)  # its next round goes to any drafter, not back to the late one
            await self.redis.xadd(self.keys.candidates, encode(empty_candidate(state)))

    async def _move_gone_verifier_streams(self) -> None:
        """A verifier that is gone leaves batches in its own stream (unread, or read and not
        acknowledged): they go to the shared stream, for any verifier (one of another target
        hands a batch on to its target's stream). One atomic call, so only one coordinator
        moves it; a verifier that was only slow registers again and makes its stream again (at
        most a batch verified twice: the compare-and-set applies it once)."""
        registered = {m.decode() for m in await self.redis.smembers(self.keys.verifier_streams)}
        if not registered - self.verifier_ids:
            return
        # A roster read after the registry's, not the cached one: a verifier joins the roster
        # before the registry, so one that just started is not taken for gone.
        live = set(await self.rosters.live("verifier", max_age_s=0.0))
        for instance in sorted(registered - live):
            moved = await bus.move_stream(self.redis, self.keys.verify_at(instance), self.keys.verify, self.keys.verifier_streams,
                                          group=self.keys.group("verifier"), instance=instance, registry_type="set")
            if moved is not None:
                self.log.warning("verifier %s is gone: %d batches of its stream moved to the shared stream", instance, moved)

    async def _move_gone_drafter_streams(self) -> None:
        """A drafter that is gone leaves jobs in its own stream (unread, or read and not
        acknowledged): they go to its expert's stream, for any drafter of it. As for verifiers."""
        registered = {i.decode(): e.decode() for i, e in (await self.redis.hgetall(self.keys.drafter_streams)).items()}
        if not set(registered) - self.drafter_ids:
            return
        live = set(await self.rosters.live("drafter", max_age_s=0.0))  # fresh: a drafter joins the roster before the registry
        for instance in sorted(set(registered) - live):
            shared = self.keys.draft(registered[instance])
            moved = await bus.move_stream(self.redis, self.keys.draft_at(instance), shared, self.keys.drafter_streams,
                                          group=self.keys.group("drafter"), instance=instance, registry_type="hash")
            if moved is not None:
                self.log.warning("drafter %s is gone: %d jobs of its stream moved to %s", instance, moved, shared)

    async def _end_rounds_of_gone_targets(self) -> None:
        """Requests pinned to a target fingerprint that no live verifier has served for
        ``pipeline.target_grace_s`` (a retired target after a rolling upgrade) end with
        ``error_code=target_gone`` instead of waiting for their deadline: their batches are taken
        off that target's stream. Within the grace, a verifier of the target that comes back
        serves them. Only while another target is served: with no verifier live at all (a
        restart, an outage) requests wait as before, up to their deadline."""
        now, grace = time.monotonic(), self.config.pipeline.target_grace_s
        if not self.live_fingerprints:
            self.target_gone_since.clear()
            return
        for fingerprint in self.live_fingerprints:
            self.target_gone_since.pop(fingerprint, None)
        for fingerprint in sorted(self.fingerprints - self.live_fingerprints):
            if now - self.target_gone_since.setdefault(fingerprint, now) < grace:
                continue
            stream = self.keys.verify_for(fingerprint)
            for entry_id, fields in await self.redis.xrange(stream, count=64):
                try:
                    items = decode(fields, VerifyBatch).items
                except WireError:
                    items = []
                for item in items:
                    state = await self._state(item.request_id)
                    if state is None or state.status != ACTIVE or state.round != item.round:
                        continue
                    reason = f"no live verifier has served the target this request is pinned to for {grace:g}s (retired?)"
                    outcome = await self._apply(state, fail(state, self.tokenizer, reason, error_code="target_gone"))
                    self.log.warning("request %s: its target %s is gone (%s)", item.request_id, fingerprint[:16], outcome)
                await self.redis.xdel(stream, entry_id)

    async def _expire_deadlines(self) -> None:
        """Requests past their deadline (an abandoned client, a stalled pipeline) end now."""
        now_ms = self.clock.now_ms()
        for raw_id in await self.redis.zrangebyscore(self.keys.deadlines, 0, now_ms, start=0, num=64):
            request_id = raw_id.decode()
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE:
                await self.redis.zrem(self.keys.deadlines, request_id)
                continue
            seconds = (state.deadline_ms - state.created_ms) / 1000
            update = fail(state, self.tokenizer, f"deadline of {seconds:g}s passed", error_code="deadline")
            outcome = await self._apply(state, update)  # stale: a round won the race; next tick
            self.log.info("request %s: deadline passed (%s)", request_id, outcome)

    async def _refresh_liveness(self) -> None:
        self.live_experts = await self.rosters.drafter_experts()
        drafters = await self.rosters.live("drafter")
        self.drafter_ids = set(drafters)
        self.drafter_expert = {instance: roster_field(value, "expert") or "" for instance, value in drafters.items()}
        self.drafter_queued = await self._drafter_queues() if self.config.pipeline.affinity else {}
        roster = await self.rosters.live("verifier")
        verifiers = list(roster.values())
        self.verifier_ids = set(roster)
        self.live_verifiers = len(verifiers)
        self.kv_rows = {instance: rows for instance, value in roster.items() if (rows := roster_int(value, "kv_rows"))}
        self.kv_block = max((roster_int(value, "kv_block") for value in verifiers), default=1) or 1
        found = {f for v in verifiers if (f := roster_field(v, "fingerprint"))}
        self.fingerprints |= found
        self.live_fingerprints = found
        if found and not self.control.verify.observations:
            profile = await self.redis.hgetall(self.keys.cost(sorted(found)[0]))
            if {b"a", b"b", b"c"} <= set(profile):
                self.control.verify.set_prior([float(profile.get(k, 0.0)) for k in (b"a", b"b", b"c", b"e")])

    async def _drafter_queues(self) -> dict[str, tuple[int, int]]:
        """Jobs waiting unread and in hand on each live drafter's own stream, in one round trip (only
        where an expert has more than one live drafter: with one, its requests have nowhere
        else to go)."""
        experts = list(self.drafter_expert.values())
        instances = sorted(i for i, e in self.drafter_expert.items() if experts.count(e) > 1)
        if not instances:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                pipe.xinfo_groups(self.keys.draft_at(instance))
            replies = await pipe.execute(raise_on_error=False)
        group, queued = self.keys.group("drafter"), {}
        for instance, groups in zip(instances, replies):
            if isinstance(groups, Exception):
                continue  # no stream yet: nothing queued
            for info in groups:
                if info["name"].decode() == group:
                    queued[instance] = (int(info.get("lag") or 0), int(info.get("pending") or 0))
        return queued

    async def _states(self, request_ids: list[str]) -> list[RequestState | None]:
        """Several requests' states in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hgetall(self.keys.request(request_id))
            replies = await pipe.execute()
        return [state_from_fields(fields) if fields else None for fields in replies]

    async def _state(self, request_id: str) -> RequestState | None:
        return (await self._states([request_id]))[0]

    # ---- housekeeping --------------------------------------------------------------------

    async def _trim(self) -> None:
        """Trim each stream below its oldest entry still pending or unread by any group."""
        async with self.redis.pipeline(transaction=False) as pipe:
            bus.read_stream_registries(pipe, self.keys)
            streams = self.keys.streams(*await pipe.execute())
        for stream in streams:
            await self.guarded(self._trim_stream, stream)

    async def _trim_stream(self, stream: str) -> None:
        if not await self.redis.exists(stream):
            return
        groups = []
        for group in await self.redis.xinfo_groups(stream):
            oldest_pending = None
            if int(group.get("pending") or 0):
                # May be acknowledged meanwhile: the summary then has no oldest entry (None).
                oldest_pending = (await self.redis.xpending(stream, group["name"]))["min"]
            groups.append((group["last-delivered-id"], oldest_pending))
        floor = bus.trim_floor(groups)
        if floor:
            await self.redis.xtrim(stream, minid=floor, approximate=False)
