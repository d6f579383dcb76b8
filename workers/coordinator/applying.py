"""The coordinator's applying stage: verified results -> request state, output, next round.

Each result is applied with the compare-and-set function (on the round number), so duplicates
and rival coordinators change nothing: ``advance`` (the speculative core's, the local engine's
too) makes the round's update; the window is retuned from what was accepted; the next round
goes to the experts' draft queues, or straight to verification with an empty draft (window 0:
the target alone) when no drafter of those experts is alive or the window is 0. A pending
cancellation wins. What the results tell the load control (verification cost, acceptance by
depth, overhead) is observed here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from redis.exceptions import RedisError

from cosine import bus, faults
from cosine.core.logprobs import LogprobsError
from cosine.core.rounds import ACTIVE, RequestState, RoundUpdate, advance, fail
from cosine.wire import Candidate, DraftJob, VerifiedBatch, VerifiedItem, WireError, decode, encode, rounds_in
from cosine.wire.context import by_reference
from cosine.wire.convert import empty_candidate, feedback_from_wire
from cosine.wire.keys import split_id
from cosine.wire.state import round_fields

from ..base import Entry
from .forming import draft_home
from .records import Drafting, RoundClock

COST_WARM = 16  # verification batches observed before the cost model's error is counted


def _current(item: VerifiedItem, state: RequestState | None) -> bool:
    """Whether a verified round is its active request's current one (not a duplicate, nor a
    result another coordinator applied)."""
    return state is not None and state.status == ACTIVE and state.round == item.round


class Applying:
    """Mixed into the ``Coordinator``: verified batches applied to their requests."""

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """A verified batch that cannot be applied (unreadable, or failing here each time): each
        round it carried that is still its request's current one is verified again once, without
        drafts; the second time the request ends with one ``internal`` final naming the cause.
        (A candidate needs nothing: its round stays in the rounds set until it is sent, and the
        drafter-deadline sweep verifies it without drafts.)"""
        if stream not in (self.keys.verified, self.keys.verified_at(self.instance)):
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
                    await self._apply_verified(entry[0], dataclasses.replace(batch, items=[item]), stream)
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

    async def _apply_verified(self, entry_id: bytes, batch: VerifiedBatch, stream: str) -> None:
        """Applies a verified batch read from ``stream`` (this coordinator's own, or the shared one)."""
        for item in batch.items:
            faults.check("coordinator.apply", item.request_id)
        cost_error = self._observe(batch)
        for item in batch.items:  # the verifier now holds these requests' caches
            self.records.of(item.request_id).home = batch.verifier
        rounds = [(item.request_id, item.round) for item in batch.items]
        states, load = self._known_states(rounds), None
        if any(state is None for state in states):  # else the load is read with the rounds' application
            states, load = await self._known_states_and_load(rounds)
        self._plan(batch, states)
        # Every request's round in one round trip (each its own compare-and-set).
        calls, applied, chunked, with_states = [], [], [], []  # applied: (item, state, update, its next round pooled here) of each call
        for item, state in zip(batch.items, states):
            if item.prefilled > 0 and not item.error:  # a prefill chunk: the same round again
                if _current(item, state):
                    record = self.records.of(item.request_id)
                    record.prefilled = item.prefilled if item.prefilled > record.prefilled else -1  # -1: no progress
                    if item.features:  # the chunk's states are stored with the round's next try
                        with_states.append((state, self._chunk_call(state, item)))
                    else:
                        chunked.append(state)
                continue
            self.records.of(item.request_id).prefilled = 0
            update = self._update(item, state, batch.fingerprint)
            if update is not None:
                call, local = self._round_call(state, update, item, in_place=True)
                calls.append(call)
                applied.append((item, state, update, local))
        rounds_applied = len(calls)  # then the prefill chunks' calls
        calls += [call for _, call in with_states]
        if load is None and calls:  # the load (what the batch decision needs) in the same round trip
            streams: list[str] = []
            outcomes, replies = await bus.apply_rounds_and(self.redis, calls, lambda pipe: streams.extend(self._queue_load(pipe)))
            load = self._parse_load(streams, replies)
        else:
            outcomes = await bus.apply_rounds(self.redis, calls)
        for (item, state, update, local), outcome in zip(applied, outcomes):
            self._remember(state, update, outcome)
            if outcome == "applied":
                self._count(state, update, item)
                if local is not None:  # the next round, without drafts: pooled here, no candidates entry
                    await self._pool_round(b"local:%s:%d" % (state.request_id.encode(), local.round), local, update.state, local=True)
            elif outcome == "cancelled":  # flagged while we computed: read again, the cancellation wins
                await self._apply_item(item, batch.fingerprint)
        # A chunk whose states were not stored (a cancellation pending) goes on without them:
        # its next round applies the cancellation.
        chunked += [state for (state, _), outcome in zip(with_states, outcomes[rounds_applied:]) if outcome == "cancelled"]
        if faults.enabled():
            await self.mark_phase("after_apply")
            await asyncio.sleep(faults.delay("coordinator.after_apply"))
        decoded = sum(len(item.decoded) for item in batch.items)
        round_times = dict(self.round_times)

        def acknowledge(pipe) -> None:  # the batch's figures and its acknowledgement, with the next batch if one goes
            pipe.hincrby(self.keys.stats, "verify_batches", 1)
            pipe.hincrby(self.keys.stats, "verify_items", batch.batch_size)
            pipe.hincrby(self.keys.stats, "verify_forward_us", round(batch.forward_ms * 1000))  # verifiers' busy time
            if decoded:  # tokens made after a multi-step round's first: the share multi-step makes
                pipe.hincrby(self.keys.stats, "multi_step_tokens", decoded)
                pipe.hincrby(self.keys.stats, "multi_step_rounds", sum(1 for item in batch.items if item.decoded))
            for name, value in round_times.items():
                pipe.hincrby(self.keys.stats, name, value)
            if cost_error is not None:  # the cost model's error on batches it had not seen
                pipe.hincrby(self.keys.stats, "cost_model_batches", 1)
                pipe.hincrby(self.keys.stats, "cost_model_error_ppm", round(cost_error * 1e6))
            for state in chunked:  # with the acknowledgement: a crash cannot lose the round
                pipe.xadd(self.keys.candidates, encode(empty_candidate(state)))
            if chunked or with_states:
                pipe.hincrby(self.keys.stats, "prefill_chunks", len(chunked) + len(with_states))
            pipe.xack(stream, self.group, entry_id)

        await self._flush(load=load, also=acknowledge)  # rounds pooled here go at once when the batch policy says so
        self.round_times.clear()
        await self.mark_phase("idle")

    def _observe(self, batch: VerifiedBatch) -> float | None:
        """What a verified batch tells the load control: the verification's cost (returns the
        model's relative error on it, once warm), each round's acceptance by tree depth, and
        the rounds' overhead: wall time less drafting and its own verification, whatever else
        it waited for (hops, batch forming, other batches ahead of it at the verifier) — what a
        round costs its request besides. (Counted only where a batch held every active request,
        it never moved once requests outnumbered the verifiers: at 16 requests on four, 1–3 ms
        learnt at one request against 18 measured, and load control priced window-0 rounds at
        half their time.)"""
        sent = self.sent_batches.pop(batch.batch_id, None)
        if sent is None or not batch.items:
            return None  # formed by another coordinator (or seen before: a redelivery)
        self.tally.observe("verification_batch_size", batch.batch_size)
        now = time.monotonic()
        for item in batch.items:
            if item.error or item.prefilled > 0:
                continue
            depth = sent.depths.get(item.request_id, 0)
            self.control.observe_round(depth, len(item.accepted_tokens))
            if not depth:
                self.control.observe_decoding(1 + len(item.decoded))
            record = self.records.get(item.request_id)
            clock = record.clock if record is not None else None
            if record is not None:
                record.clock = None
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
        windows = self.control.plan(rows, self.batch_policy.fair_share(self.active, self.verifiers.count))
        together = sum(1 for w in windows if w > 0)
        for (request_id, next_round), window in zip(ids, windows):
            self.records.of(request_id).planned = (next_round, window, together)

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
                             feedback_from_wire(item.drafters), self.routing_policy, self.expert_of, self.records.texts, item.logprobs, item.decoded)
        except LogprobsError as error:  # asked for, but the verifier's rows do not fit: the request ends, loudly
            self.log.warning("request %s round %d: %s", state.request_id, state.round, error)
            return fail(state, self.tokenizer, f"the verifier's log-probabilities did not fit the round: {error}")
        return update

    async def _apply(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None = None) -> str:
        outcome = (await bus.apply_rounds(self.redis, [self._apply_call(state, update, item)]))[0]
        self._remember(state, update, outcome)
        if outcome == "applied":
            self._count(state, update, item)
        return outcome

    def _remember(self, state: RequestState, update: RoundUpdate, outcome: str) -> None:
        """Keeps the state an applied round left (its next round is applied from it, without
        reading the request's hash), forgets it after any other outcome. Not for a request of a
        feature drafter: the apply function keeps its stored states' count (``feature_rows``)."""
        record = self.records.get(state.request_id)
        if record is None:
            return
        keep = outcome == "applied" and not update.finished and not self.feature_experts.intersection(update.state.experts)
        record.state = update.state if keep else None

    def _count(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None) -> None:
        """Metrics of an applied update: tokens, latencies, speculation, a request's end."""
        now_ms = self.clock.now_ms()
        new_tokens = len(update.state.output_ids) - len(state.output_ids)
        record = self.records.of(state.request_id)
        since_ms, record.last_output_ms = record.last_output_ms, None  # None: its previous round was applied elsewhere
        if not update.finished:
            record.last_output_ms = now_ms if new_tokens else since_ms if since_ms is not None else now_ms
        if item is not None and update.state.rounds > state.rounds:  # a verified round (not a failure or cancellation)
            drafters = {name: (f.drafted, f.accepted) for name, f in feedback_from_wire(item.drafters).items()}
            self.tally.round_applied(new_tokens=new_tokens, first=not state.output_ids, created_ms=state.created_ms, since_ms=since_ms,
                                     now_ms=now_ms, draft_tokens=item.draft_tokens, accepted=len(item.accepted_tokens), drafters=drafters,
                                     tenant=split_id(state.request_id)[0])
        if update.finished:
            self.tally.request_ended(update.final.finish_reason, update.final.error_code, state.created_ms, now_ms, tenant=split_id(state.request_id)[0])
            self.records.forget(state.request_id)

    def _apply_call(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None = None) -> tuple[list[str], list]:
        """The compare-and-set call that applies ``update`` (and asks for the next round)."""
        return self._round_call(state, update, item)[0]

    def _round_call(self, state: RequestState, update: RoundUpdate, item: VerifiedItem | None = None,
                    in_place: bool = False) -> tuple[tuple[list[str], list], Candidate | None]:
        """``_apply_call``'s call, and (``in_place``) the next round's candidate when that round
        goes without drafts: the caller pools it once applied. Its call writes no candidates
        entry, only the round's issue time in the ``rounds`` set: should this coordinator die
        with the round pooled, the drafter-deadline sweep of any coordinator sends it on."""
        if update.finished:
            return bus.apply_round_call(self.keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
                                        out_entries=update.out_entries, ttl_s=self.config.pipeline.output_ttl_s), None
        features, start = (item.features, item.features_start) if item is not None and item.features else (b"", 0)
        # The round's states cover positions start .. L'-2 (all but the new last token).
        rows = self._state_rows(state, features, len(update.state.context) - 1 - start)
        if not rows:
            features, start = b"", 0
        streams, payload = self._next_round(update.state, features, start)
        local = None
        if in_place and streams == [self.keys.candidates]:
            streams, local = [], empty_candidate(update.state)  # the payload alone: recorded in the rounds set
        return bus.apply_round_call(
            self.keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
            out_entries=update.out_entries, job_streams=streams, payload=payload, features=features, features_start=start, feature_rows=rows,
        ), local

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
        together = len(self.records.drafting) + 1  # requests drafting at once with this one
        record = self.records.of(state.request_id)
        planned, record.planned = record.planned, None
        if experts and window > 0:
            batch_size = self.batch_policy.fair_share(self.active, self.verifiers.count)  # requests per batch at this load
            experts = experts[: self.control.cooperating(len(experts), batch_size, window)]  # the best ranked first
            # Exploration only at low load (explore_max_batch): under load a drafted round costs its batch-mates too.
            if batch_size <= self.control.explore_max_batch and self.control.explore(state.request_id, state.round, state.drafted_rounds):
                pass  # drafts at its adaptive window
            elif planned is not None and planned[0] == state.round:
                window, together = min(window, planned[1]), max(1, planned[2])
            else:
                window = self.control.choose(window, batch_size, state.accepted_tokens, state.drafted_rounds)
        record.clock = RoundClock(state.round, time.monotonic())
        if not experts or window <= 0:
            return [self.keys.candidates], encode(empty_candidate(state))[b"m"]
        self.records.drafting[state.request_id] = Drafting(state.round, time.monotonic(), window, together)
        start, prefix_digest, tail = by_reference(state.context)
        job = DraftJob(state.request_id, state.round, tail, window, state.sampling, experts, self.clock.now_ms(), features, features_start, state.domain,
                       step_mode=self.config.speculation.mode == "step", context_start=start, context_digest=prefix_digest)
        return [self._draft_stream(state.request_id, e) for e in experts], encode(job)[b"m"]

    def _draft_stream(self, request_id: str, expert: str) -> str | tuple[str, str]:
        """Where a round's job for ``expert`` goes: the drafter that drafted the request's last
        round (``forming.draft_home``), else the expert's stream. A home's stream comes with the
        expert's: the job goes there if the home's stream is gone."""
        if not self.config.pipeline.affinity:
            return self.keys.draft(expert)
        record = self.records.get(request_id)
        home = draft_home(record.draft_homes.get(expert) if record is not None else None, expert, self.drafter_ids, self.drafter_expert,
                          self.drafter_queued)
        return (self.keys.draft_at(home), self.keys.draft(expert)) if home else self.keys.draft(expert)
