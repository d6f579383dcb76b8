"""Fusion: merges cooperating drafters' chains for a round into one token tree.

Reads ``drafts``. A round's drafts are kept in Redis (``fuse:{id}:{round}``), not in a worker:
each draft is stored and acknowledged in one Lua call, and the call that completes the set of
cooperating experts returns them all; a round whose set is still incomplete at the fusion
deadline is taken by whichever fusion worker sweeps first. So any number of fusion workers
share the work, two experts' drafts read by two workers still make one tree, and a worker that
dies (or drains) holds nothing: a round it took but did not emit is taken again after
``RETAKE_MS``. The fused ``Candidate`` is written once (a done marker drops late duplicates).
A round drafted by one expert (under load, each request's best) is its draft alone: fused at
once and written with the draft's acknowledgement in one call, with nothing stored.

Step mode (``speculation.mode = "step"``, the paper's fusion): drafters draft one token per job;
each step's drafts are collected the same way (``fuse:{id}:{round}:s{step}``); when a step is
complete its most confident token is appended to the prefix and the next step's jobs go to every
cooperating expert, together with the step's drafts kept in the round's levels hash, in one Lua
call; after the last step (the window, no proposal, or the tree's node cap) the levels become one
tree (``fuse_steps``). Each step costs a drafter hop and a fusion hop.
"""

from __future__ import annotations

import msgpack

from cosine import bus
from cosine.core.tree import fuse_steps, fused_token, merge_chains
from cosine.wire import PAYLOAD_FIELD, Candidate, Draft, DraftJob, decode, encode
from cosine.wire.convert import draft_to_chain, tree_to_candidate

from .base import Entry, StageWorker

RETAKE_MS = 2_000


class FusionWorker(StageWorker):
    role = "fusion"
    read_count = 64

    def input_streams(self) -> list[str]:
        return [self.keys.drafts]

    async def setup(self) -> None:
        self.max_nodes = self.config.speculation.max_tree_nodes
        pipeline = self.config.pipeline
        self.deadline_ms = pipeline.fusion_deadline_ms
        # An open round's drafts outlive its deadline and a few retakes; the done marker only
        # needs to outlive drafts still on their way (a later one makes a stale candidate that
        # the coordinator drops), so it does not keep one key per round for a minute.
        self.hash_ttl_ms = pipeline.fusion_deadline_ms + pipeline.drafter_deadline_ms + 60_000
        self.done_ttl_ms = pipeline.fusion_deadline_ms + pipeline.drafter_deadline_ms

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        """A read's drafts in one round trip: a round drafted by one expert fused at once, the
        others stored; then each round whose set one of them completed is fused."""
        calls, keys = [], []
        now_ms = self.clock.now_ms()
        for entry_id, fields in entries:
            draft = decode(fields, Draft)
            draft_to_chain(draft)  # validate now: a bad draft is dead-lettered alone
            key = self.keys.fuse(draft.request_id, draft.round, draft.step if draft.step_mode else None)
            if len(draft.experts) <= 1 and not draft.step_mode:  # nothing to wait for
                calls.append(bus.fuse_one_call(self.keys, group=self.group, entry_id=entry_id, hash_key=key,
                                               payload=encode(self._candidate([draft]))[PAYLOAD_FIELD], done_ttl_ms=self.done_ttl_ms))
                keys.append(None)
                continue
            calls.append(bus.fuse_add_call(
                self.keys, group=self.group, entry_id=entry_id, hash_key=key, expert=draft.expert,
                payload=fields[PAYLOAD_FIELD], expected=max(1, len(draft.experts)), deadline_ms=now_ms + self.deadline_ms,
                ttl_ms=self.hash_ttl_ms, retake_ms=now_ms + RETAKE_MS,
            ))
            keys.append(key)
        for key, reply in zip(keys, await bus.fcalls(self.redis, calls)):
            if key is not None and reply:
                await self._emit(key, list(reply))

    async def tick(self) -> None:
        now_ms = self.clock.now_ms()
        for raw_key in await self.redis.zrangebyscore(self.keys.fusing, 0, now_ms, start=0, num=64):
            key = raw_key.decode()
            payloads = await bus.fuse_take(self.redis, self.keys, key, now_ms + RETAKE_MS)
            if payloads:
                self.log.info("%s: fusing after the deadline with %d drafts", key, len(payloads))
                await self.guarded(self._emit, key, payloads)

    def block_ms(self) -> int:
        # Wake for the sweep soon enough that a deadline is not missed by a whole block.
        return min(self.config.pipeline.block_ms, max(50, self.deadline_ms // 4))

    async def _emit(self, key: str, payloads: list[bytes]) -> None:
        drafts = sorted((decode({PAYLOAD_FIELD: p}, Draft) for p in payloads), key=lambda d: d.rank)
        if drafts and drafts[0].step_mode:
            await self._step(key, drafts)
            return
        await bus.fuse_emit(self.redis, self.keys, key, encode(self._candidate(drafts))[PAYLOAD_FIELD], self.done_ttl_ms)

    def _candidate(self, drafts: list[Draft]) -> Candidate:
        """The fused tree of a round's drafts (by rank)."""
        chains = [draft_to_chain(d) for d in drafts]
        tree = merge_chains([c for c in chains if len(c)], self.max_nodes)
        homes = [[d.expert, d.instance] for d in drafts if d.instance]  # where the next round's jobs go first
        return tree_to_candidate(drafts[0].request_id, drafts[0].round, tree, homes)

    async def _step(self, key: str, drafts: list[Draft]) -> None:
        first = drafts[0]
        levels_key = self.keys.fuse_levels(first.request_id, first.round)
        levels = _levels(await self.redis.hgetall(levels_key), first.step) if first.step else []
        level = [draft_to_chain(d) for d in drafts]
        token = fused_token(level)
        cooperating = max(1, len(first.experts))
        last = token is None or first.step + 1 >= first.window or (first.step + 2) * cooperating > self.max_nodes
        if len(levels) < first.step:  # a level lost (expired): this step hangs from nothing known
            self.log.warning("request %s round %d: step %d without its earlier steps; fusing those found", first.request_id, first.round, first.step)
            level, last = [], True
        context = None if last else await self._committed(first.request_id, first.round)
        if context is None:  # the last step, or a round already over: the tree as it stands
            tree = fuse_steps([*levels, level])
            candidate = tree_to_candidate(first.request_id, first.round, tree)
            await bus.fuse_emit(self.redis, self.keys, key, encode(candidate)[PAYLOAD_FIELD], self.done_ttl_ms)
            return
        job = DraftJob(first.request_id, first.round, context, first.window, first.sampling, first.experts, self.clock.now_ms(),
                       domain=first.domain, step_mode=True, step=first.step + 1, prefix=[*first.prefix, token])
        stored = msgpack.packb([encode(d)[PAYLOAD_FIELD] for d in drafts])
        await bus.fuse_next(self.redis, self.keys, hash_key=key, levels_key=levels_key, step=first.step, level=stored,
                            job_streams=[self.keys.draft(e) for e in first.experts], job=encode(job)[PAYLOAD_FIELD],
                            done_ttl_ms=self.done_ttl_ms, levels_ttl_ms=self.hash_ttl_ms)

    async def _committed(self, request_id: str, round_index: int) -> list[int] | None:
        """The request's committed tokens, or None when the round is no longer the request's."""
        prompt, output, current, status = await self.redis.hmget(self.keys.request(request_id), "prompt_ids", "output_ids", "round", "status")
        if prompt is None or output is None or current is None or int(current) != round_index or status != b"active":
            return None
        return [*msgpack.unpackb(prompt), *msgpack.unpackb(output)]


def _levels(stored: dict[bytes, bytes], steps: int) -> list[list]:
    """The chains of steps 0 .. steps-1 from the round's levels hash (stops at a missing step)."""
    levels = []
    for step in range(steps):
        raw = stored.get(str(step).encode())
        if raw is None:
            break
        drafts = sorted((decode({PAYLOAD_FIELD: p}, Draft) for p in msgpack.unpackb(raw)), key=lambda d: d.rank)
        levels.append([draft_to_chain(d) for d in drafts])
    return levels
