"""Verifier: the target model; one forward pass per verification batch; lossless acceptance.

Reads ``verify`` one batch at a time, runs the batch through the ``ModelRunner`` (per-request KV
caches, trusted only for the prefix that matches the request's committed tokens), walks each
tree with greedy or multi-draft rejection sampling, and writes the results to ``verified`` with
the acknowledgement, atomically. A request whose recorded target fingerprint differs from this
verifier's is refused with an error rather than continued with another model.
"""

from __future__ import annotations

import time

from cosine.workers.base import Entry, StageWorker
from cosine.workers.convert import candidate_to_tree, sampling_from_wire

from cosine.bus import write_and_ack
from cosine.factory import load_target
from cosine.models.runner import ForwardItem, ModelRunner
from cosine.spec.acceptance import verify_greedy, verify_sampling
from cosine.spec.sampling import request_generator, warp_probs
from cosine.wire import VerifiedBatch, VerifiedItem, VerifyBatch, WireError, decode, encode


class VerifierWorker(StageWorker):
    role = "verifier"
    read_count = 1

    def input_streams(self) -> list[str]:
        return [self.keys.verify]

    async def setup(self) -> None:
        self.target = await self.off_loop(load_target, self.config)
        self.runner = ModelRunner(self.target.model, max_cached_tokens=self.config.model.max_cached_tokens)
        self.fingerprint = self.target.fingerprint
        await self.off_loop(self.runner.forward, [ForwardItem("warm-up", [1, 2, 3], (4,), (-1,))])
        self.runner.release("warm-up")

    def liveness_extra(self) -> str:
        return f"fingerprint={self.fingerprint}"

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            batch = decode(fields, VerifyBatch)
            async with self.renewing(stream, [entry_id]):
                began = time.perf_counter()
                results = await self.off_loop(self._verify, batch)
                forward_ms = (time.perf_counter() - began) * 1000
            out = VerifiedBatch(batch.batch_id, self.instance, results, len(batch.items), forward_ms, self.fingerprint)
            await write_and_ack(self.redis, [(self.keys.verified, encode(out))], stream, self.group, [entry_id])

    def _verify(self, batch: VerifyBatch) -> list[VerifiedItem]:
        accepted_items, trees, results = [], [], {}
        for item in batch.items:
            if item.fingerprint and item.fingerprint != self.fingerprint:
                results[item.request_id] = _error(item, f"target fingerprint mismatch: request uses {item.fingerprint}, this verifier {self.fingerprint}")
                continue
            try:
                tree = candidate_to_tree(item.tree, self.runner.vocab_size)
                if not item.context or any(not 0 <= t < self.runner.vocab_size for t in [*item.context, *tree.tokens]):
                    raise WireError("token id out of the vocabulary")
                sampling_from_wire(item.sampling)
            except WireError as error:
                results[item.request_id] = _error(item, f"invalid verification item: {error}")
                continue
            accepted_items.append(item)
            trees.append(tree)
        logits = self.runner.forward(
            [ForwardItem(i.request_id, i.context, t.tokens, t.parents) for i, t in zip(accepted_items, trees)]
        )
        for item, tree, rows in zip(accepted_items, trees, logits):
            sampling = sampling_from_wire(item.sampling)
            if sampling.greedy:
                verdict = verify_greedy(tree, rows.argmax(-1).tolist())
            else:
                generator = request_generator(sampling.seed, item.round, "verify")
                verdict = verify_sampling(tree, warp_probs(rows, sampling), generator)
            self.runner.commit(item.request_id, verdict.accepted_nodes, verdict.accepted_tokens)
            results[item.request_id] = VerifiedItem(
                item.request_id, item.round, list(verdict.accepted_tokens), verdict.next_token, len(tree)
            )
        return [results[item.request_id] for item in batch.items]


def _error(item, reason: str) -> VerifiedItem:
    return VerifiedItem(item.request_id, item.round, [], 0, 0, reason)


__all__ = ["VerifierWorker"]
