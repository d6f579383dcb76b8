"""Fusion: merges cooperating drafters' chains for a round into one token tree.

Reads ``drafts``; holds the drafts of a (request, round) until every cooperating expert's draft
is in or the fusion deadline passes; then writes the fused ``Candidate`` to ``candidates`` and
acknowledges all its drafts in one transaction. Held drafts are soft state: if this worker dies,
the unacknowledged drafts are reclaimed by another fusion worker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cosine.workers.base import Entry, StageWorker
from cosine.workers.convert import draft_to_chain, tree_to_candidate

from cosine.bus import write_and_ack
from cosine.spec.tree import merge_chains
from cosine.wire import Draft, decode, encode


@dataclass
class _Pending:
    first_seen: float
    expected: int
    drafts: dict[str, tuple[bytes, Draft]] = field(default_factory=dict)  # expert -> (entry id, draft)


class FusionWorker(StageWorker):
    role = "fusion"
    read_count = 64

    def input_streams(self) -> list[str]:
        return [self.keys.drafts]

    async def setup(self) -> None:
        self.pending: dict[tuple[str, int], _Pending] = {}
        self.max_nodes = self.config.speculation.max_tree_nodes

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        ready = []
        for entry_id, fields in entries:
            draft = decode(fields, Draft)
            draft_to_chain(draft)  # validate now: a bad draft is dead-lettered alone
            key = (draft.request_id, draft.round)
            pending = self.pending.setdefault(key, _Pending(time.monotonic(), max(1, len(draft.experts))))
            if draft.expert in pending.drafts:  # a redelivery: keep one, ack the other with it
                await self.redis.xack(stream, self.group, entry_id)
                continue
            pending.drafts[draft.expert] = (entry_id, draft)
            if len(pending.drafts) >= pending.expected:
                ready.append(key)
        for key in ready:
            await self._emit(key)

    async def tick(self) -> None:
        deadline = self.config.pipeline.fusion_deadline_ms / 1000
        now = time.monotonic()
        for key in [k for k, p in self.pending.items() if now - p.first_seen > deadline]:
            self.log.info("request %s round %d: fusing after the deadline with %d drafts", key[0], key[1], len(self.pending[key].drafts))
            await self._emit(key)

    async def _emit(self, key: tuple[str, int]) -> None:
        pending = self.pending.pop(key)
        drafts = sorted((d for _, d in pending.drafts.values()), key=lambda d: d.rank)
        chains = [draft_to_chain(d) for d in drafts]
        tree = merge_chains([c for c in chains if len(c)], self.max_nodes)
        candidate = tree_to_candidate(key[0], key[1], tree)
        entry_ids = [entry_id for entry_id, _ in pending.drafts.values()]
        await write_and_ack(self.redis, [(self.keys.candidates, encode(candidate))], self.keys.drafts, self.group, entry_ids)
