"""Verifier: the target model; one forward pass per verification batch; lossless acceptance.

Reads ``verify`` (batches of requests on their first round) and its own target's stream
``verify:{fingerprint}`` (every later round), one batch at a time; runs the batch through the
``ModelRunner`` (per-request KV caches, trusted only for the prefix that matches the request's
committed tokens), walks each tree with greedy or multi-draft rejection sampling, and writes the
results to ``verified`` with the acknowledgement, atomically.

Faults stay with the request that causes them: a batch whose forward raises is verified again
one request at a time, and the request that still fails alone gets an error result (an
``error`` final naming the reason); a batch that keeps killing verifiers is dead-lettered after
``max_deliveries`` and split into single requests, and a single request that does so ends with
an error. Rounds already applied are dropped before the forward. Caches of finished requests
are released.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import OrderedDict

import torch

from cosine import bus, faults
from cosine.core.acceptance import Verdict, decode_token, emitted_logprobs, verify_and_credit
from cosine.core.tree import ROOT
from cosine.factory import load_target
from cosine.models.loading import release_freed_memory
from cosine.models.runner import BLOCK_SIZE, ForwardItem, ModelRunner
from cosine.policy.control import VERIFY_PROFILE_CALLS, verify_features
from cosine.wire import VerifiedBatch, VerifiedItem, VerifyBatch, VerifyItem, WireError, decode, encode, rounds_in
from cosine.wire.convert import candidate_to_tree, states_to_bytes

from .base import Entry, StageWorker
from .models import model_directory, read_model_config

RELEASE_INTERVAL_S = 2.0
MAX_HELD_CONTEXTS = 4096  # requests whose committed tokens a verifier keeps (oldest forgotten first)


class VerifierWorker(StageWorker):
    role = "verifier"
    read_count = 1

    def input_streams(self) -> list[str]:
        fingerprint = getattr(self, "fingerprint", None)
        # Its own stream first: rounds of requests whose caches it holds (cache affinity).
        own = [self.keys.verify_at(self.instance), self.keys.verify_for(fingerprint)] if fingerprint else []
        return own + [self.keys.verify]

    async def setup(self) -> None:
        if self.config.emulate.target:  # benchmarks and tests: an emulated GPU (cosine.emulate)
            from cosine.emulate.build import emulated_target

            vocab_size = int(read_model_config(model_directory(self.config)).vocab_size)  # the tokenizer's ids are the prompts'
            self.runner, self.fingerprint = emulated_target(self.config, vocab_size)
        else:
            target = await self.off_loop(load_target, self.config)
            self.runner = ModelRunner(target.model, max_cache_bytes=self.config.model.kv_cache_bytes)
            self.fingerprint = target.fingerprint
        self.last_release = 0.0
        self.contexts: OrderedDict[str, list[int]] = OrderedDict()  # request -> its committed tokens after the round it last verified
        await self.off_loop(self.runner.forward, [ForwardItem("warm-up", [1, 2, 3], (4,), (-1,))])
        self.runner.release("warm-up")
        self.cost_profile = await self.off_loop(profile_cost, self.runner)
        self.runner.forget_prefixes()  # the warm-up's and profile's prompts: reuse their pages first
        release_freed_memory()  # the layers replaced by fused and reordered copies
        self.log.info("verification cost profile: %.1f ms + %.2f ms per request + %.2f ms per fed token + %.2f ms per request per 1000 context rows",
                      *self.cost_profile)

    def own_streams(self) -> list[str]:
        return [self.keys.verify_at(self.instance)] if getattr(self, "fingerprint", None) else []

    def hand_back_to(self, stream: str) -> str:
        return self.keys.verify_for(self.fingerprint) if stream == self.keys.verify_at(self.instance) else stream

    async def on_connect(self) -> None:
        await bus.ensure_group(self.redis, self.keys.verify_for(self.fingerprint), self.group)
        await self.redis.sadd(self.keys.fingerprints, self.fingerprint)
        await self.redis.hset(self.keys.cost(self.fingerprint), mapping=dict(zip(("a", "b", "c", "e"), map(str, self.cost_profile))))

    def registrations(self, pipe) -> None:
        pipe.sadd(self.keys.verifier_streams, self.instance)

    def liveness_fields(self) -> dict[str, str]:
        # Read without the runner's lock (a forward may hold it): a count off by one is fine here.
        return {"fingerprint": self.fingerprint, "caches": str(self.runner.cache_count), "cache_bytes": str(self.runner.allocated_bytes),
                "kv_rows": str(self.runner.num_blocks * BLOCK_SIZE), "kv_block": str(BLOCK_SIZE)}

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        for entry_id, fields in entries:
            batch = decode(fields, VerifyBatch)
            outputs = self._hand_on_foreign(batch)
            ours = [i for i in batch.items if i.fingerprint in ("", self.fingerprint)]
            # Which rounds are still open is read while the batch is verified, not before: the
            # forward waits for no round trip, and a round applied already (a duplicate batch,
            # rare) costs its share of one forward and is not written back.
            check = asyncio.ensure_future(self._still_open(ours))
            check.add_done_callback(lambda task: task.cancelled() or task.exception())  # an error is raised where awaited
            try:
                items = await self._whole_contexts(ours)
                results: list[VerifiedItem] = []
                forward_ms = 0.0
                if items:
                    async with self.renewing(stream, [entry_id]):
                        await self.mark_phase("forward")
                        began = time.perf_counter()
                        results = await self.off_loop(self._verify_isolating, items)
                        forward_ms = (time.perf_counter() - began) * 1000
                        await self.mark_phase("idle")
                open_rounds = {(i.request_id, i.round) for i in await check}
            finally:
                check.cancel()  # done by now unless something raised
            kept = [(i, r) for i, r in zip(items, results) if (i.request_id, i.round) in open_rounds]
            items, results = [i for i, _ in kept], [r for _, r in kept]
            if items:
                self._remember(items, results)
                out = VerifiedBatch(batch.batch_id, self.instance, results, len(items), forward_ms, self.fingerprint)
                outputs.append((self._reply_stream(batch), encode(out)))
            await self.retrying(bus.write_and_ack, self.redis, outputs, stream, self.group, [entry_id])

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """A batch dead-lettered (it kept killing verifiers): split it, or end its one request."""
        try:
            batch = decode(entry[1], VerifyBatch)
        except WireError:  # unreadable (another schema version, over the size cap): its rounds end
            failed = [VerifiedItem(request_id, round_, [], -1, 0, f"verification batch could not be read: {reason}", "internal")
                      for request_id, round_ in rounds_in(entry[1])]
            if failed:
                batch_id = f"unreadable-{entry[0].decode()}"
                await self.retrying(bus.write_and_ack, self.redis, [(self.keys.verified, encode(VerifiedBatch(batch_id, self.instance, failed, len(failed), 0.0, self.fingerprint)))],
                                    stream, self.group, [])
            return
        if len(batch.items) > 1:
            outputs = [(stream, encode(VerifyBatch(f"{batch.batch_id}-{i}", [item], batch.reply_to))) for i, item in enumerate(batch.items)]
            self.log.warning("batch %s failed %s: verifying its %d requests one by one", batch.batch_id, reason, len(outputs))
        else:
            item = batch.items[0]
            failed = _error(item, f"verification failed repeatedly ({reason})", "internal")
            outputs = [(self._reply_stream(batch), encode(VerifiedBatch(batch.batch_id, self.instance, [failed], 1, 0.0, self.fingerprint)))]
        await self.retrying(bus.write_and_ack, self.redis, outputs, stream, self.group, [])

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_release > RELEASE_INTERVAL_S:
            self.last_release = now
            await self._release_finished()

    # ---- helpers -------------------------------------------------------------------------

    def _reply_stream(self, batch: VerifyBatch) -> str | tuple[str, str]:
        """Where a batch's result goes: the own stream of the coordinator that formed it (the
        shared one once that coordinator is gone and its stream moved), else the shared one."""
        return (self.keys.verified_at(batch.reply_to), self.keys.verified) if batch.reply_to else self.keys.verified

    def _hand_on_foreign(self, batch: VerifyBatch) -> list[tuple[str, dict]]:
        """Items pinned to another target go to that target's stream, one batch per item."""
        return [
            (self.keys.verify_for(item.fingerprint), encode(VerifyBatch(f"{batch.batch_id}-{i}", [item], batch.reply_to)))
            for i, item in enumerate(batch.items)
            if item.fingerprint not in ("", self.fingerprint)
        ]

    async def _still_open(self, items: list[VerifyItem]) -> list[VerifyItem]:
        """Drop rounds already applied (a duplicate batch): no forward is spent on them."""
        if not items:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for item in items:
                pipe.hmget(self.keys.request(item.request_id), "round", "status")
            replies = await pipe.execute()
        return [item for item, (round_, status) in zip(items, replies) if round_ == str(item.round).encode() and status == b"active"]

    async def _whole_contexts(self, items: list[VerifyItem]) -> list[VerifyItem]:
        """Items with their whole contexts (``whole_contexts``); an item whose request has moved
        on since is dropped (stale)."""
        contexts = await bus.whole_contexts(self.redis, self.keys, self.contexts, items)
        return [dataclasses.replace(i, context=c, context_start=0, context_digest=b"") for i, c in zip(items, contexts) if c is not None]

    def _remember(self, items: list[VerifyItem], results: list[VerifiedItem]) -> None:
        """Each request's committed tokens after this round: what its next round references."""
        for item, result in zip(items, results):
            self.contexts.pop(item.request_id, None)
            if result.error:
                continue
            if result.prefilled:
                self.contexts[item.request_id] = list(item.context)
            else:
                self.contexts[item.request_id] = [*item.context, *result.accepted_tokens, result.next_token, *result.decoded]
        while len(self.contexts) > MAX_HELD_CONTEXTS:
            self.contexts.popitem(last=False)

    async def _release_finished(self) -> None:
        keys = await self.off_loop(self.runner.cached_keys)
        if not keys:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(self.keys.request(key), "status")
            statuses = await pipe.execute()
        done = [key for key, status in zip(keys, statuses) if status != b"active"]
        if done:
            await self.off_loop(self.runner.release_many, done)
            for key in done:
                self.contexts.pop(key, None)

    def _verify_isolating(self, items: list[VerifyItem]) -> list[VerifiedItem]:
        """The batch in one forward; if that raises, each request alone, so one bad request
        fails alone and the others still get their results."""
        try:
            return self._verify(items)
        except Exception as error:
            if len(items) == 1:
                self.log.warning("request %s failed verification: %s: %s", items[0].request_id, type(error).__name__, error)
                return [_error(items[0], f"verification failed: {type(error).__name__}: {error}", "internal")]
            self.log.warning("batch of %d failed (%s: %s): verifying one by one", len(items), type(error).__name__, error)
            return [result for item in items for result in self._verify_isolating([item])]

    def _verify(self, items: list[VerifyItem]) -> list[VerifiedItem]:
        accepted_items, trees, results = [], [], {}
        for item in items:
            try:
                tree = candidate_to_tree(item.tree, self.runner.vocab_size)
                if tree.draft_probs is not None:
                    tree = dataclasses.replace(tree, draft_probs=torch.from_numpy(tree.draft_probs))
                if not item.context or any(not 0 <= t < self.runner.vocab_size for t in [*item.context, *tree.tokens]):
                    raise WireError("token id out of the vocabulary")
            except WireError as error:
                results[item.request_id] = _error(item, f"invalid verification item: {error}", "internal")
                continue
            faults.check("verifier.forward", item.request_id)
            accepted_items.append(item)
            trees.append(tree)
        # Chunked prefill: an item with more uncached context than its chunk feeds one chunk of
        # it (cached for the next time) and comes back as a partial result, no round verified;
        # a feature request's chunk carries the chunk's states (a prompt's states in one entry
        # could pass the wire's size cap on a wide target).
        forward_items, chunked = [], {}
        for item, tree in zip(accepted_items, trees):
            if item.prefill_chunk > 0:
                fed_from = item.features_from if item.features_from >= 0 else self.runner.reusable_tokens(item.request_id, item.context)
                end = fed_from + item.prefill_chunk
                if end < len(item.context):
                    chunked[item.request_id] = end
                    forward_items.append(ForwardItem(item.request_id, item.context[:end], features_from=item.features_from))
                    continue
            forward_items.append(ForwardItem(item.request_id, item.context, tree.tokens, tree.parents, item.features_from))
        logits, fed = self.runner.forward_with_states(forward_items)
        for item, tree, rows, states in zip(accepted_items, trees, logits, fed):
            end = chunked.get(item.request_id)
            verdict, feedback = (None, {}) if end is not None else verify_and_credit(tree, rows, item.sampling, item.round, len(item.context))
            features, start = b"", 0
            if item.features_from >= 0:  # the states of every position this round (or chunk) commits, from features_from on
                start = max(states.start, item.features_from)
                committed = states.committed(end or len(item.context), verdict.accepted_nodes if verdict else [])[start - states.start :]
                features = states_to_bytes(committed)
            if verdict is None:
                results[item.request_id] = VerifiedItem(item.request_id, item.round, [], -1, 0, features=features, features_start=start, prefilled=end)
                continue
            self.runner.commit(item.request_id, verdict.accepted_nodes, verdict.accepted_tokens)
            results[item.request_id] = VerifiedItem(
                item.request_id, item.round, list(verdict.accepted_tokens), verdict.next_token, len(tree),
                features=features, features_start=start,
                drafters=[[name, f.drafted, f.accepted, round(f.confidence_sum, 5)] for name, f in feedback.items()],
                logprobs=emitted_logprobs(rows, verdict, item.logprobs) if item.logprobs >= 0 else [],
            )
        multi_step = [item for item, tree in zip(accepted_items, trees) if item.request_id not in chunked and _decodes_on(item, tree, results[item.request_id])]
        if multi_step:
            self._decode_on(multi_step, results)
        return [results[item.request_id] for item in items]

    def _decode_on(self, items: list[VerifyItem], results: dict[str, VerifiedItem]) -> None:
        """Multi-step rounds: requests whose round had no drafts go on decoding, one batched
        forward per token, up to their ``steps`` or one of their ``stop_ids``, and their results
        carry the tokens after the first (``decoded``). One round's trip through the pipeline
        then yields several tokens, as a drafted round does."""
        made = {item.request_id: [results[item.request_id].next_token] for item in items}
        logprobs = {item.request_id: list(results[item.request_id].logprobs) for item in items}
        while True:
            going = [i for i in items if len(made[i.request_id]) < i.steps and made[i.request_id][-1] not in i.stop_ids]
            if not going:
                break
            rows = self.runner.forward([ForwardItem(i.request_id, [*i.context, *made[i.request_id]]) for i in going])
            for item, row in zip(going, rows):
                tokens = made[item.request_id]
                token = decode_token(row[0], item.sampling, len(item.context) + len(tokens))
                tokens.append(token)
                if item.logprobs >= 0:
                    logprobs[item.request_id] += emitted_logprobs(row, Verdict((), (), token), item.logprobs)
        for item in items:
            result = results[item.request_id]
            results[item.request_id] = dataclasses.replace(result, decoded=made[item.request_id][1:], logprobs=logprobs[item.request_id])


def profile_cost(runner: ModelRunner, repeats: int = 2) -> tuple[float, float, float, float]:
    """Fit ms = a + b B + c T + e B L / 1000 to a few timed verification forwards (B requests
    with a cached L-token prefix, feeding T tokens in all): the prior of the coordinator's cost
    model."""
    rows, times = [], []
    for batch, k, context in VERIFY_PROFILE_CALLS:
        keys = [f"cost-profile-{i}" for i in range(batch)]
        runner.forward([ForwardItem(key, list(range(1, context + 1))) for key in keys])
        parents = tuple([ROOT] + list(range(k - 2))) if k > 1 else ()
        items = [ForwardItem(key, list(range(1, context + 2)), tuple(range(2, k + 1)), parents) for key in keys]
        for _ in range(repeats):
            began = time.perf_counter()
            runner.forward(items)
            rows.append(list(verify_features(batch, batch * k, context + 1)))
            times.append((time.perf_counter() - began) * 1000)
        runner.release_many(keys)
    x, y = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(x, y).solution[:, 0].clamp(min=0.0)
    return tuple(float(c) for c in coef)  # type: ignore[return-value]


def _decodes_on(item: VerifyItem, tree, result: VerifiedItem) -> bool:
    """Whether a verified item goes on decoding (multi-step): a round without drafts that asked
    for more steps, ships no target states, and has not ended on a stop token."""
    return item.steps > 1 and len(tree) == 0 and item.features_from < 0 and not result.error and result.next_token not in item.stop_ids


def _error(item: VerifyItem, reason: str, code: str) -> VerifiedItem:
    return VerifiedItem(item.request_id, item.round, [], 0, 0, reason, code)


__all__ = ["VerifierWorker"]
