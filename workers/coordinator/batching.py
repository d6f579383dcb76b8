"""The coordinator's batching stage: candidates -> pool -> verification batches (the I/O around
``forming``). A candidate is checked against its request's state and pooled; the batch policy
releases a batch, written and its candidates acknowledged in one transaction. Requests pinned
to a target fingerprint (every round after the first) go to that target's own verify stream,
so a batch never mixes targets.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from redis.exceptions import ResponseError

from cosine import bus
from cosine.core.rounds import ACTIVE, RequestState
from cosine.core.tree import tree_depth
from cosine.wire import Candidate, VerifyBatch, VerifyItem, encode
from cosine.wire.context import by_reference

from .forming import Waiting, batch_home, drafting_due_s, multi_steps, next_batch, with_steps
from .records import TRACKED

# Positions of a feature request's prompt per verification when prefill_chunk is 0: its states
# travel with the result, and a whole long prompt's would pass the wire's size cap.
FEATURE_CHUNK = 512


@dataclass
class SentBatch:
    """What the cost model needs of a batch this coordinator formed, until its result is back."""

    size: int
    fed_tokens: int
    longest_context: int
    first_round: bool  # holds a request's first round (a prompt's prefill: not a round's cost)
    depths: dict[str, int]  # request -> its drafted tree's depth


class Batching:
    """Mixed into the ``Coordinator``: its pool and the batches it forms."""

    async def _pool_candidate(self, entry_id: bytes, candidate: Candidate, state: RequestState | None) -> None:
        """A candidate read from the candidates stream: pooled if it is its request's current
        round and not pooled already, else acknowledged (stale, or a duplicate)."""
        if any(w.entry_id == entry_id for w in self.pool):
            return  # handled again after an error: already pooled
        now = time.monotonic()
        sent = self.records.drafting.get(candidate.request_id)
        if sent is not None and sent.round <= candidate.round:
            del self.records.drafting[candidate.request_id]  # back from drafting (or gone past it)
            if sent.round == candidate.round and candidate.tokens and not self._cold(candidate):
                self.control.observe_drafting(sent.window, (now - sent.sent) * 1000, sent.together)
        if state is None or state.status != ACTIVE or state.round != candidate.round:
            await self.redis.xack(self.keys.candidates, self.group, entry_id)  # stale
            return
        if not await self._pool_round(entry_id, candidate, state):
            await self.redis.xack(self.keys.candidates, self.group, entry_id)  # this round, already pooled

    async def _pool_round(self, entry_id: bytes, candidate: Candidate, state: RequestState, local: bool = False) -> bool:
        """Pools the current round of ``state`` (False: it is pooled already). ``local``: a
        round without drafts pooled in place by the coordinator that applied the last one."""
        record = self.records.get(candidate.request_id)
        clock = record.clock if record is not None else None
        if clock is not None and clock.round == candidate.round and not clock.pooled:
            clock.pooled = time.monotonic()
            clock.drafting_ms = (clock.pooled - clock.began) * 1000 if candidate.tokens else 0.0
        # A pooled candidate of an earlier round of this request is stale (a duplicate of it was
        # verified elsewhere): drop it, so it cannot pass for this round's duplicate.
        stale = [w for w in self.pool if w.item.request_id == state.request_id and w.item.round != state.round]
        if stale:
            if acked := [w.entry_id for w in stale if not w.local]:
                await self.redis.xack(self.keys.candidates, self.group, *acked)
            self.pool = [w for w in self.pool if w not in stale]
        if any(w.item.request_id == state.request_id for w in self.pool):
            return False
        self._remember_draft_homes(candidate)
        features_from = state.feature_rows if self.feature_experts.intersection(state.experts) else -1
        chunk, fed = 0, len(candidate.tokens) + (len(state.context) if state.round == 0 else 1)
        if state.round == 0:  # a prompt's prefill, chunked unless it stalls (a feature request's always: its states)
            prefilled = record.prefilled if record is not None else 0
            chunk = 0 if prefilled < 0 else self.config.pipeline.prefill_chunk or (FEATURE_CHUNK if features_from >= 0 else 0)
            if chunk:
                fed = len(candidate.tokens) + min(chunk, max(1, len(state.context) - max(prefilled, features_from)))
        # Later rounds reference the context (the verifier keeps it); a first round carries the prompt.
        start, prefix_digest, tail = by_reference(state.context) if state.round else (0, b"", state.context)
        item = VerifyItem(state.request_id, state.round, tail, candidate, state.sampling, state.fingerprint, features_from, chunk, start, prefix_digest,
                          state.logprobs, stop_ids=list(state.eos_ids))
        depth = tree_depth(candidate.parents)
        expected = self.control.expected(depth, state.accepted_tokens, state.drafted_rounds)
        self.pool.append(Waiting(entry_id, item, time.monotonic(), fed, expected, depth, state.max_tokens - len(state.output_ids), local))
        return True

    def _cold(self, candidate: Candidate) -> bool:
        """Whether a drafter of this round drafted none before that this coordinator saw: its first
        job meets it cold (first call, first connection: 250 ms among 10 ms hops), no measure of
        the hop for the drafting fit."""
        new = set(_homes(candidate).values()) - self.warm_drafters
        self.warm_drafters |= new
        return bool(new)

    def _remember_draft_homes(self, candidate: Candidate) -> None:
        homes = _homes(candidate)
        if homes:  # a round without drafts (window 0) keeps the homes of the last drafted one
            self.records.of(candidate.request_id).draft_homes = homes

    def _home(self, request_id: str) -> str:
        record = self.records.get(request_id)
        return batch_home(record.home if record is not None else "", self.verifiers)

    async def _flush(self, force: bool = False, load: tuple[int, int] | None = None, also=None) -> None:
        """Writes the batches the batch policy releases. ``load``: (active requests, busy
        verifiers) as read just now with the states (else read here); ``also``: commands (a
        function of a pipeline) sent in the first batch's transaction, or alone when no batch
        goes (not at all when a write fails: the caller's handling is retried)."""
        busy = -1  # batches in verification (-1: not read, when forced)
        while self.pool:
            if not force:
                active, busy = load if load is not None else await self._load()
                load = (active, busy + 1)  # the next batch's decision: this one's batch queued too (if it goes)
                self.active = active
                now = time.monotonic()
                oldest = now - self.pool[0].arrived
                tokens = sum(len(w.item.tree.tokens) + 1 for w in self.pool)
                due = drafting_due_s(self.records.drafting.values(), now, self.control.draft_ms)
                split = self.control.verify.coefficients[0] / 1000  # a verification's fixed cost
                if not self.batch_policy.should_flush(len(self.pool), tokens, oldest, active, self.verifiers.count, busy, len(self.records.drafting), due, split):
                    break
            pipeline, now = self.config.pipeline, time.monotonic()
            taken, home, fingerprint = next_batch(
                self.pool, now, self._home, self.verifiers, self.batch_policy, pipeline.batch_choice, self.control.verify_ms,
                pipeline.batch_latency_weight, pipeline.batch_starve_ms / 1000,
            )
            own_verifier = 0 <= busy < self.verifiers.count  # with this batch, every batch in verification has a verifier of its own
            steps = multi_steps(self.config.speculation.multi_step, taken, len(self.pool) - len(taken), self.active,
                                list(self.records.drafting.values()), now, self.control.draft_ms, self.control.verify_ms, own_verifier)
            batch = VerifyBatch(uuid.uuid4().hex[:12], [with_steps(w, steps) for w in taken], self.instance)
            shared = self.keys.verify_for(fingerprint) if fingerprint else self.keys.verify
            async with self.redis.pipeline(transaction=True) as pipe:
                if home:  # the shared stream if the home is gone and its stream moved
                    bus.send(pipe, self.keys.verify_at(home), shared, encode(batch))
                else:
                    pipe.xadd(shared, encode(batch))
                # Drafting is done: the rounds' sweep waits verify_retry_ms for their results (a
                # batch or result lost to a fault is verified again then, not at the deadline).
                retry_at = self.clock.now_ms() + pipeline.verify_retry_ms - pipeline.drafter_deadline_ms
                pipe.zadd(self.keys.rounds, {w.item.request_id: retry_at for w in taken}, xx=True)
                pipe.hincrby(self.keys.stats, "rounds_sent", len(taken))
                pipe.hincrby(self.keys.stats, "rounds_window0", sum(1 for w in taken if not w.item.tree.tokens))
                if acked := [w.entry_id for w in taken if not w.local]:
                    pipe.xack(self.keys.candidates, self.group, *acked)
                if also is not None:
                    also(pipe)
                await pipe.execute()
            also = None
            # Only once written: a failed write keeps the candidates pooled (and pending).
            taken_ids = {id(w) for w in taken}
            self.pool = [w for w in self.pool if id(w) not in taken_ids]
            sent_at = time.monotonic()
            for w in taken:
                record = self.records.get(w.item.request_id)
                if record is not None and record.clock is not None and record.clock.round == w.item.round:
                    record.clock.sent = sent_at
            self.sent_batches[batch.batch_id] = SentBatch(
                len(taken), sum(w.fed_tokens for w in taken), max(w.item.context_len for w in taken),
                any(w.item.round == 0 for w in taken), {w.item.request_id: w.depth for w in taken},
            )
            while len(self.sent_batches) > TRACKED:  # results that never came back here
                del self.sent_batches[next(iter(self.sent_batches))]
            self.log.debug("batch %s: %d requests to %s", batch.batch_id, len(taken), home or shared)
        if also is not None:
            async with self.redis.pipeline(transaction=True) as pipe:
                also(pipe)
                await pipe.execute()

    async def _load(self) -> tuple[int, int]:
        """(active requests, batches queued or in verification over the shared and the
        per-target verify streams), in one round trip: a batch decision sits on every round's
        path (``_states_and_load`` reads it with the states too). Also which verifiers have work of their
        own (``Verifiers.busy_at``, ``steal``)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            streams = self._queue_load(pipe)
            replies = await pipe.execute(raise_on_error=False)
        return self._parse_load(streams, replies)

    def _queue_load(self, pipe) -> list[str]:
        """Queues the load's commands on ``pipe``; returns the verify streams they read."""
        # Only live targets' streams: batches of a target no verifier serves wait for nobody's
        # time (they end target_gone), and counted as busy they held healthy batches for good.
        live = sorted(self.verifiers.live)
        streams = [self.keys.verify, *(self.keys.verify_for(f) for f in sorted(self.live_fingerprints)), *(self.keys.verify_at(i) for i in live)]
        pipe.zcard(self.keys.deadlines)
        pipe.zcard(self.keys.waiting)
        for stream in streams:
            pipe.xinfo_groups(stream)
        return streams

    def _parse_load(self, streams: list[str], replies: list) -> tuple[int, int]:
        """The load from the replies of ``_queue_load``'s commands (read with errors returned)."""
        for reply in replies[:2]:
            if isinstance(reply, Exception):
                raise reply
        active, busy, own = replies[0] - replies[1], 0, {}  # started requests: waiting ones are in no batch
        live = sorted(self.verifiers.live)
        instances = {self.keys.verify_at(i): i for i in live}
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
        # A home verifier with work queued or in hand while another one is free: its requests'
        # next batch goes to the shared stream, to the first verifier free (which rebuilds
        # their caches) instead of queueing behind the home's work.
        self.verifiers = dataclasses.replace(self.verifiers, busy_at=own, steal=busy < self.verifiers.count)
        return int(active), busy


def _homes(candidate: Candidate) -> dict[str, str]:
    """The drafter instance of each expert that drafted the candidate's round (malformed pairs
    skipped: the candidate came over the wire)."""
    return {e: i for pair in candidate.homes if isinstance(pair, list) and len(pair) == 2
            for e, i in [pair] if isinstance(e, str) and isinstance(i, str)}
