"""Coordinator: request pool, verification batches, applying verified rounds, next rounds.

- ``candidates`` -> pool -> ``verify``: fused trees wait in a pool until the batch policy
  releases a batch; the batch is written and its candidates acknowledged in one transaction.
- ``verified`` -> request state + ``out:{id}`` + next round: each result is applied with the
  compare-and-set Lua function (round number), so duplicates and rival coordinators change
  nothing; the window is retuned from what was accepted; the next round goes to the experts'
  draft queues, or straight to verification with an empty draft (window 0: the target alone)
  when no drafter of those experts is alive or the window is 0.
- housekeeping: trims streams below what is still pending or unread.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from cosine.workers.base import Entry, StageWorker, apply_update
from cosine.workers.convert import empty_candidate
from cosine.workers.models import load_tokenizer_and_limits

from cosine.bus import write_and_ack
from cosine.spec.batching import BatchPolicy
from cosine.spec.window import WindowPolicy
from cosine.state import ACTIVE, RequestState, advance, fail
from cosine.wire import Candidate, DraftJob, Sampling, VerifiedBatch, VerifyBatch, VerifyItem, decode, encode


@dataclass
class _Waiting:
    entry_id: bytes
    item: VerifyItem
    arrived: float


class Coordinator(StageWorker):
    role = "coordinator"
    read_count = 64

    def input_streams(self) -> list[str]:
        return [self.keys.verified, self.keys.candidates]

    async def setup(self) -> None:
        self.tokenizer, _, _ = await self.off_loop(load_tokenizer_and_limits, self.config)
        spec = self.config.speculation
        self.window_policy = WindowPolicy(spec.window, spec.min_window, spec.max_window, spec.adaptive_window)
        self.batch_policy = BatchPolicy(spec.max_batch, max_wait_s=self.config.pipeline.batch_wait_ms / 1000)
        self.live_verifiers = 1
        self.pool: list[_Waiting] = []
        self.live_experts: set[str] = set()
        self.live_verifiers = 0
        self.last_refresh = self.last_trim = 0.0

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        if stream == self.keys.candidates:
            for entry_id, fields in entries:
                await self._pool_candidate(entry_id, decode(fields, Candidate))
            await self._flush()
        else:
            for entry_id, fields in entries:
                await self._apply_verified(entry_id, decode(fields, VerifiedBatch))

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_refresh > 0.25:
            await self._refresh_liveness()
            await self._fallback_overdue_rounds()
            self.last_refresh = now
        if now - self.last_trim > self.config.pipeline.trim_interval_s:
            await self._trim()
            self.last_trim = now
        await self._flush()

    def block_ms(self) -> int:
        if not self.pool:
            return self.config.pipeline.block_ms
        waited = time.monotonic() - self.pool[0].arrived
        return max(1, min(self.config.pipeline.block_ms, int((self.batch_policy.max_wait_s - waited) * 1000) + 1))

    # ---- candidates -> verification batches -------------------------------------------------

    async def _pool_candidate(self, entry_id: bytes, candidate: Candidate) -> None:
        state = await self._state(candidate.request_id)
        duplicate = any(w.item.request_id == candidate.request_id for w in self.pool)
        if duplicate or state is None or state.status != ACTIVE or state.round != candidate.round:
            await self.redis.xack(self.keys.candidates, self.group, entry_id)  # stale or duplicate
            return
        sampling = Sampling(state.sampling.temperature, state.sampling.top_p, state.sampling.seed)
        item = VerifyItem(state.request_id, state.round, state.context, candidate, sampling, state.fingerprint)
        self.pool.append(_Waiting(entry_id, item, time.monotonic()))

    async def _flush(self) -> None:
        while self.pool:
            active = await self.redis.zcard(self.keys.rounds)
            oldest = time.monotonic() - self.pool[0].arrived
            tokens = sum(len(w.item.tree.tokens) + 1 for w in self.pool)
            busy = await self._busy_verifiers()
            if not self.batch_policy.should_flush(len(self.pool), tokens, oldest, active, self.live_verifiers, busy):
                return
            size = self.batch_policy.take(len(self.pool))
            taken, self.pool = self.pool[:size], self.pool[size:]
            batch = VerifyBatch(uuid.uuid4().hex[:12], [w.item for w in taken])
            self.log.debug("batch %s: %d requests (pool waited %.0f ms, %d active, %d/%d verifiers busy)", batch.batch_id, len(taken), oldest * 1000, active, busy, self.live_verifiers)
            await write_and_ack(self.redis, [(self.keys.verify, encode(batch))], self.keys.candidates, self.group, [w.entry_id for w in taken])

    async def _busy_verifiers(self) -> int:
        for group in await self.redis.xinfo_groups(self.keys.verify):
            if group["name"].decode() == self.keys.group("verifier"):
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0

    # ---- verified results -> state, output, next round ----------------------------------------

    async def _apply_verified(self, entry_id: bytes, batch: VerifiedBatch) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.stats, "verify_batches", 1)
            pipe.hincrby(self.keys.stats, "verify_items", batch.batch_size)
            await pipe.execute()
        for item in batch.items:
            state = await self._state(item.request_id)
            if state is None or state.status != ACTIVE or state.round != item.round:
                continue  # a duplicate or a result another coordinator applied
            if item.error:
                update = fail(state, self.tokenizer, item.error)
                await apply_update(self.redis, self.keys, state, update, None, self.config.pipeline.output_ttl_s)
                continue
            update = advance(state, item.accepted_tokens, item.next_token, item.draft_tokens, self.tokenizer, self.window_policy, batch.fingerprint)
            next_job = None if update.finished else self._next_round(update.state)
            await apply_update(self.redis, self.keys, state, update, next_job, self.config.pipeline.output_ttl_s)
        await self.redis.xack(self.keys.verified, self.group, entry_id)

    def _next_round(self, state: RequestState) -> tuple[list[str], bytes]:
        experts = [e for e in state.experts if e in self.live_experts]
        room = state.max_tokens - len(state.output_ids) - 1
        window = min(state.window, max(0, room))
        if not experts or window <= 0:
            return [self.keys.candidates], encode(empty_candidate(state))[b"m"]
        sampling = Sampling(state.sampling.temperature, state.sampling.top_p, state.sampling.seed)
        job = DraftJob(state.request_id, state.round, state.context, window, sampling, experts, int(time.time() * 1000))
        return [self.keys.draft(e) for e in experts], encode(job)[b"m"]

    async def _fallback_overdue_rounds(self) -> None:
        """A round with no result after the deadline goes on without drafts (window 0).

        Covers drafters that died or never existed. A late real draft for the same round is
        harmless: the first result applied wins the compare-and-set, the other is stale.
        """
        deadline_ms = self.config.pipeline.drafter_deadline_ms
        now_ms = int(time.time() * 1000)
        overdue = await self.redis.zrangebyscore(self.keys.rounds, 0, now_ms - deadline_ms, start=0, num=64)
        for raw_id in overdue:
            request_id = raw_id.decode()
            await self.redis.zadd(self.keys.rounds, {request_id: now_ms}, xx=True)  # not again at once
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE:
                await self.redis.zrem(self.keys.rounds, request_id)
                continue
            self.log.warning("request %s round %d: no result after %d ms, verifying without drafts", request_id, state.round, deadline_ms)
            await self.redis.xadd(self.keys.candidates, encode(empty_candidate(state)))

    async def _refresh_liveness(self) -> None:
        self.live_experts = await self.live_drafter_experts()
        self.live_verifiers = 0
        async for _ in self.redis.scan_iter(match=self.keys.live_pattern("verifier"), count=500):
            self.live_verifiers += 1

    async def _state(self, request_id: str) -> RequestState | None:
        fields = await self.redis.hgetall(self.keys.request(request_id))
        return RequestState.from_fields(fields) if fields else None

    # ---- housekeeping --------------------------------------------------------------------

    async def _trim(self) -> None:
        """Trim each stream below its oldest entry still pending or unread by any group."""
        streams = [self.keys.requests, self.keys.cancel, self.keys.drafts, self.keys.candidates, self.keys.verify, self.keys.verified]
        streams += [self.keys.draft(e.decode()) for e in await self.redis.smembers(self.keys.experts)]
        for stream in streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except Exception:
                continue
            if not groups:
                continue
            floor = None
            for group in groups:
                # Below last-delivered-id everything is acknowledged except what is pending;
                # above it is unread. So the oldest pending entry, or last-delivered + 1, is safe.
                group_floor = _next_id(group["last-delivered-id"])
                if int(group.get("pending") or 0):
                    group_floor = min_id(group_floor, (await self.redis.xpending(stream, group["name"]))["min"])
                floor = group_floor if floor is None else min_id(floor, group_floor)
            if floor:
                await self.redis.xtrim(stream, minid=floor, approximate=False)


def _parse(entry_id) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id) -> bytes:
    ms, seq = _parse(entry_id)
    return f"{ms}-{seq + 1}".encode()


def min_id(a, b) -> bytes:
    return a if _parse(a) <= _parse(b) else b
