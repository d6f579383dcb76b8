"""Fusion: merges cooperating drafters' chains for a round into one token tree.

Reads ``drafts``. A round's drafts are kept in Redis (``fuse:{id}:{round}``), not in a worker:
each draft is stored and acknowledged in one Lua call, and the call that completes the set of
cooperating experts returns them all; a round whose set is still incomplete at the fusion
deadline is taken by whichever fusion worker sweeps first. So any number of fusion workers
share the work, two experts' drafts read by two workers still make one tree, and a worker that
dies (or drains) holds nothing: a round it took but did not emit is taken again after
``RETAKE_MS``. The fused ``Candidate`` is written once (a done marker drops late duplicates).
"""

from __future__ import annotations

import time

from cosine.workers.base import Entry, StageWorker
from cosine.workers.convert import draft_to_chain, tree_to_candidate

from cosine import bus
from cosine.spec.tree import merge_chains
from cosine.wire import PAYLOAD_FIELD, Draft, decode, encode

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
        for entry_id, fields in entries:
            draft = decode(fields, Draft)
            draft_to_chain(draft)  # validate now: a bad draft is dead-lettered alone
            key = self.keys.fuse(draft.request_id, draft.round)
            now_ms = _now_ms()
            payloads = await bus.fuse_add(
                self.redis, self.keys, group=self.group, entry_id=entry_id, hash_key=key, expert=draft.expert,
                payload=fields[PAYLOAD_FIELD], expected=max(1, len(draft.experts)), deadline_ms=now_ms + self.deadline_ms,
                ttl_ms=self.hash_ttl_ms, retake_ms=now_ms + RETAKE_MS,
            )
            if payloads:
                await self._emit(key, payloads)

    async def tick(self) -> None:
        now_ms = _now_ms()
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
        chains = [draft_to_chain(d) for d in drafts]
        tree = merge_chains([c for c in chains if len(c)], self.max_nodes)
        candidate = tree_to_candidate(drafts[0].request_id, drafts[0].round, tree)
        await bus.fuse_emit(self.redis, self.keys, key, encode(candidate)[PAYLOAD_FIELD], self.done_ttl_ms)


def _now_ms() -> int:
    return int(time.time() * 1000)
