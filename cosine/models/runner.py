"""Batched forward passes over a paged KV pool (the verifier's and model drafters' engine).

A batch is *packed*: the new tokens of every request are laid end to end in one sequence
(batch size 1, ``q_total`` tokens), with explicit position ids (vLLM's varlen layout). Linear
layers see one [q_total, hidden] matrix with no padding.

K/V rows live in one preallocated pool per model, ``[layers, kv_heads, blocks * BLOCK_SIZE,
head_dim]`` for keys and the same for values, sized by the byte budget (``model.kv_cache_mb``).
A request holds a list of blocks (its block table); row ``p`` of a request is row ``p %
BLOCK_SIZE`` of its block ``p // BLOCK_SIZE``. Per layer, attention is one scatter of the new
K/V rows into the pool, one gather of the batch's rows into a padded ``[batch, kv_heads, longest,
head_dim]`` view, and one SDPA call under a mask built on the device from lengths and tree
parents (never from token ids) — no per-request Python inside the layer loop. Requests that
feed many tokens (a prefill chunk) get a call of their own, so that the decoding requests'
queries are not padded to a prefill's length.

Prefix caching: a block whose rows all hold committed tokens is registered under a hash of the
whole prefix up to its end; a new request (or one whose cache was evicted) starts from the
longest run of registered blocks that matches its context and feeds only the rest. Shared
blocks are counted once and never written (a request that must rewrite one takes a fresh block);
a registered block nobody holds stays cached until its room is needed (least recently freed
first).

Cropping is bookkeeping: after a round only the accepted tree nodes' rows are gathered into
place (one indexed copy for all layers); the next round compares the cached tokens with the
request's committed tokens and reuses the longest common prefix. A cache that is missing
(evicted, another worker) is rebuilt by feeding the tokens again.

Memory: when the pool has no free block, least-recently-used requests outside the batch being
prepared give theirs back; a batch whose requests together need more blocks than the pool
raises ``KVBudgetError`` (callers retry its requests one by one; one request bigger than the
whole pool fails alone).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from cosine.core.tree import ROOT

ATTN_IMPLEMENTATION = "cosine_packed"
_BATCH_KWARG = "cosine_batch"
DEFAULT_MAX_CACHE_BYTES = 1024 * 2**20  # the default of config.toml's model.kv_cache_mb
BLOCK_SIZE = 16  # K/V rows per pool block
SMALL_QUERIES = 64  # requests feeding at most this many tokens share one padded attention call

log = logging.getLogger(__name__)


class KVBudgetError(RuntimeError):
    """The batch's requests need more K/V blocks than the pool holds (``model.kv_cache_mb``)."""


@dataclass(frozen=True, slots=True)
class ForwardItem:
    """One request in a batch.

    context: [L] committed tokens (prompt + output so far), L >= 1; tree_tokens / tree_parents:
    [n] speculative nodes placed after the context (ROOT = child of the last context token).
    The runner returns logits [1 + n, vocab]: row 0 after the context, row i + 1 after node i.
    A caller may send a prefix of a long context first (chunked prefill): it is cached, and the
    next forward feeds only the rest.
    """

    key: str
    context: Sequence[int]
    tree_tokens: tuple[int, ...] = ()
    tree_parents: tuple[int, ...] = ()
    # >= 0: positions from here on are fed again even when cached, so that their final hidden
    # states are computed (feature drafters); -1: reuse whatever the cache holds.
    features_from: int = -1


@dataclass(frozen=True, slots=True)
class FedStates:
    """The final (post-norm) hidden states of what a forward fed for one request: context
    positions ``start`` .. L-1, then one row per tree node."""

    start: int
    rows: torch.Tensor  # [L - start + n, d]

    def committed(self, context_len: int, accepted_nodes: Sequence[int]) -> torch.Tensor:
        """Rows for positions ``start`` .. L-1 + len(accepted_nodes): the context's and the
        accepted path's (in position order)."""
        fed = context_len - self.start
        index = list(range(fed)) + [fed + node for node in accepted_nodes]
        return self.rows[index]


@dataclass(slots=True)
class RunnerStats:
    forward_calls: int = 0
    fed_tokens: int = 0
    reused_tokens: int = 0  # rows not fed again: the request's own cache or shared prefix blocks
    prefix_hit_tokens: int = 0  # of those, rows found in another request's registered blocks
    cache_rebuilds: int = 0  # requests that came with no cache of their own
    evictions: int = 0  # requests' caches dropped to make room
    releases: int = 0  # caches freed by release / release_many (keys with no cache not counted)
    forward_seconds: float = 0.0
    bookkeeping_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _Sequence:
    blocks: list[int] = field(default_factory=list)  # block table
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V rows are valid, in order
    digests: list[int] = field(default_factory=list)  # prefix hash at the end of each full block registered so far


class _BlockTable:
    """Reference-counted pool blocks, with the prefix-cache registry.

    A block is free (nobody holds it, not registered), held (refs > 0), or cached (refs == 0
    but registered: its rows are a known prefix; taken back when no free block is left, least
    recently freed first).
    """

    def __init__(self, count: int) -> None:
        self.refs = [0] * count
        self.free = list(range(count - 1, -1, -1))  # a stack: low block ids first
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.by_digest: dict[int, int] = {}
        self.digest_of: dict[int, int] = {}

    @property
    def held(self) -> int:
        return len(self.refs) - len(self.free) - len(self.cached)

    def available(self) -> int:
        return len(self.free) + len(self.cached)

    def take(self) -> int | None:
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)
            self.unregister(block)
        else:
            return None
        self.refs[block] = 1
        return block

    def hold(self, block: int) -> None:
        if self.refs[block] == 0:
            self.cached.pop(block, None)
        self.refs[block] += 1

    def drop(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self.cached[block] = None
            else:
                self.free.append(block)

    def forget_cached(self) -> None:
        """Every cached block back to the free stack, the lowest ids on top: the next requests
        reuse pages already touched instead of touching new ones."""
        for block in self.cached:
            self.unregister(block)
        self.free = sorted(set(self.free) | set(self.cached), reverse=True)
        self.cached.clear()

    def register(self, block: int, digest: int) -> None:
        if digest not in self.by_digest and block not in self.digest_of:
            self.by_digest[digest] = block
            self.digest_of[block] = digest

    def unregister(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None and self.by_digest.get(digest) == block:
            del self.by_digest[digest]


@dataclass(slots=True)
class _Group:
    """Requests that share one attention call per layer."""

    gather: torch.Tensor  # [B, longest] pool rows of each request's positions (padding: masked)
    queries: torch.Tensor  # [B, q_max] packed indices of each request's new tokens (padding: 0)
    mask: torch.Tensor  # [B, 1, q_max, longest] bool
    out_rows: torch.Tensor  # [q_real] packed indices the group's outputs go to
    out_valid: torch.Tensor  # [q_real] which of the B * q_max padded query rows are real (indices)
    # A lone request whose rows are one run of the pool, fed as the whole packed batch: its keys
    # and values are a view of the pool (first row), its queries and outputs the batch's own, no
    # gather, and a plain decoding step (one new token, every row seen) needs no mask.
    contiguous_from: int = -1


@dataclass(slots=True)
class _PackedBatch:
    write_rows: torch.Tensor  # [q_total] pool row of every new token, in packed order
    groups: list[_Group]
    layer_index: dict[int, int]
    keys: torch.Tensor  # the pool: [layers, kv_heads, rows, head_dim]
    values: torch.Tensor


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a packed batch; plain SDPA when called outside the runner (e.g. generate).

    query: [1, heads, q_total, head_dim]; key/value: [1, kv_heads, q_total, head_dim].
    Returns [1, q_total, heads, head_dim].
    """
    batch: _PackedBatch | None = kwargs.pop(_BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = batch.layer_index[module.layer_idx]
    pool_keys, pool_values = batch.keys[layer], batch.values[layer]  # [kv_heads, rows, head_dim]
    pool_keys.index_copy_(1, batch.write_rows, key[0])
    pool_values.index_copy_(1, batch.write_rows, value[0])
    heads, q_total, head_dim = query.shape[1], query.shape[2], query.shape[3]
    output = query.new_empty((q_total, heads, head_dim))
    kv_heads = pool_keys.shape[0]
    for group in batch.groups:
        b, longest = group.gather.shape
        if group.contiguous_from >= 0:
            keys = pool_keys.narrow(1, group.contiguous_from, longest)[None]  # [1, kv_heads, longest, head_dim]
            values = pool_values.narrow(1, group.contiguous_from, longest)[None]
            attended = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=group.mask, scale=scaling, enable_gqa=True)
            return attended.transpose(1, 2), None  # [1, q_total, heads, head_dim]
        # index_select on flat indices: a third of advanced indexing's cost on the small
        # tensors of a decoding step (advanced indexing showed up in profiles of a 1-token forward).
        queries = query[0].index_select(1, group.queries.reshape(-1)).view(heads, b, -1, head_dim).transpose(0, 1)  # [B, heads, q_max, head_dim]
        keys = pool_keys.index_select(1, group.gather.reshape(-1)).view(kv_heads, b, longest, head_dim).transpose(0, 1)  # [B, kv_heads, longest, head_dim]
        values = pool_values.index_select(1, group.gather.reshape(-1)).view(kv_heads, b, longest, head_dim).transpose(0, 1)
        attended = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=group.mask, scale=scaling, enable_gqa=True)
        flat = attended.transpose(1, 2).reshape(-1, heads, head_dim)  # [B * q_max, heads, head_dim]
        output.index_copy_(0, group.out_rows, flat.index_select(0, group.out_valid))
    return output[None], None


AttentionInterface.register(ATTN_IMPLEMENTATION, _packed_attention)


def _no_mask(*args, **kwargs) -> None:
    return None  # the packed attention builds its own masks


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


@dataclass(slots=True)
class _Plan:
    """One request's part of a forward, before tensors are made."""

    sequence: _Sequence
    start: int  # rows reused (cached or shared)
    suffix: int  # context tokens fed
    parents: tuple[int, ...]  # tree parents
    offset: int  # where its new tokens start in the packed sequence

    @property
    def count(self) -> int:
        return self.suffix + len(self.parents)


class ModelRunner:
    """Runs a causal LM over packed batches, keeping each request's K/V rows in a paged pool.

    Not thread-safe by itself: a lock serialises forwards so a worker may call it from a
    thread pool.
    """

    def __init__(self, model: PreTrainedModel, *, max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES) -> None:
        if max_cache_bytes < 1:
            raise ValueError(f"max_cache_bytes must be >= 1, got {max_cache_bytes}")
        self.model = model.eval()
        # Layers may share a config object with another model (early-exit drafters share the
        # target's layers), so the packed attention is switched on per forward, on every config
        # the layers read, and switched back after: `generate` on the same model stays plain SDPA.
        configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")}
        self._configs = list(configs.values())
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        config = model.config
        # The pool is indexed by each attention module's layer_idx (a layer-skip drafter keeps
        # the target's indices, so they need not be 0..n-1).
        self.layer_ids = sorted({m.layer_idx for m in model.modules() if type(m).__name__.endswith("Attention")})
        if not self.layer_ids:
            raise ValueError(f"{type(model).__name__}: no attention modules with a layer_idx found")
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.vocab_size = self.lm_head.weight.shape[0]
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        # One row of every layer's key and value buffers.
        self.bytes_per_token = len(self.layer_ids) * 2 * self.kv_heads * self.head_dim * self.dtype.itemsize
        self.bytes_per_block = self.bytes_per_token * BLOCK_SIZE
        self.max_cache_bytes = max_cache_bytes
        self.num_blocks = max(1, max_cache_bytes // self.bytes_per_block)
        shape = (len(self.layer_ids), self.kv_heads, self.num_blocks * BLOCK_SIZE, self.head_dim)
        # Preallocated once (on the CPU, pages are only touched as blocks are used).
        self._keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._values = torch.empty(shape, dtype=self.dtype, device=self.device)
        self._layer_index = {layer: i for i, layer in enumerate(self.layer_ids)}
        self._blocks = _BlockTable(self.num_blocks)
        self.stats = RunnerStats()
        self._sequences: OrderedDict[str, _Sequence] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    # ---- public API ----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, items: Sequence[ForwardItem]) -> list[torch.Tensor]:
        """One model forward call for the whole batch; logits [1 + n_i, vocab] per item."""
        return self.forward_with_states(items)[0]

    @torch.inference_mode()
    def forward_with_states(self, items: Sequence[ForwardItem]) -> tuple[list[torch.Tensor], list[FedStates]]:
        """``forward``, and the final hidden states of every position fed per item."""
        if not items:
            return [], []
        with self._lock:
            began = time.perf_counter()
            plans, batch, input_ids, positions, wanted = self._prepare(items)
            prepared = time.perf_counter()
            with self._packed_attention():
                hidden = self.decoder(
                    input_ids=input_ids[None],
                    position_ids=positions[None],
                    use_cache=False,
                    **{_BATCH_KWARG: batch},
                ).last_hidden_state[0]
            logits = self.lm_head(hidden[wanted]).float()
            done = time.perf_counter()
            self._after_forward(items, plans)
            finished = time.perf_counter()
        self.stats.forward_calls += 1
        self.stats.forward_seconds += done - prepared
        self.stats.bookkeeping_seconds += (prepared - began) + (finished - done)
        sizes = [1 + len(item.tree_tokens) for item in items]
        states = [FedStates(plan.start, hidden[plan.offset : plan.offset + plan.count]) for plan in plans]
        return list(torch.split(logits, sizes)), states

    @torch.inference_mode()
    def commit(self, key: str, accepted_nodes: Sequence[int], accepted_tokens: Sequence[int]) -> None:
        """Keep the K/V rows of the accepted tree path; drop the other speculative rows."""
        began = time.perf_counter()
        with self._lock:
            sequence = self._sequences.get(key)
            if sequence is not None:
                base = len(sequence.tokens)
                sources = [base + node for node in accepted_nodes]
                targets = list(range(base, base + len(sources)))
                if sources != targets:
                    src = torch.tensor(self._rows(sequence, sources), device=self.device)
                    dst = torch.tensor(self._rows(sequence, targets), device=self.device)
                    self._keys[:, :, dst] = self._keys[:, :, src]  # every layer at once
                    self._values[:, :, dst] = self._values[:, :, src]
                sequence.tokens.extend(int(t) for t in accepted_tokens)
                self._register_full_blocks(sequence)
        self.stats.bookkeeping_seconds += time.perf_counter() - began

    def release(self, key: str) -> None:
        """Free a finished request's cache (no-op for a key with none)."""
        self.release_many([key])

    def release_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                sequence = self._sequences.pop(key, None)
                if sequence is not None:
                    self._free(sequence)
                    self.stats.releases += 1

    def forget_prefixes(self) -> None:
        """Drop the prefix cache of released requests (blocks held by live requests stay). For
        start-up work whose synthetic prompts no request will share: the pool's pages it
        touched are reused first, so they are not kept resident beside the real requests'."""
        with self._lock:
            self._blocks.forget_cached()

    def cached_keys(self) -> list[str]:
        """Keys that hold a cache, least recently used first."""
        with self._lock:
            return list(self._sequences)

    @property
    def cache_count(self) -> int:
        return len(self._sequences)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of pool blocks held by requests (a shared prefix block counted once)."""
        return self._blocks.held * self.bytes_per_block

    @property
    def pool_bytes(self) -> int:
        """Bytes of the whole preallocated pool."""
        return self.num_blocks * self.bytes_per_block

    def reusable_tokens(self, key: str, context: Sequence[int]) -> int:
        """Context rows a forward for ``key`` would take from cache (its own, or registered
        prefix blocks for a request with none), not counting the last token (always fed)."""
        limit = len(context) - 1
        with self._lock:
            sequence = self._sequences.get(key)
            if sequence is not None:
                return common_prefix(sequence.tokens, context, limit=limit)
            digest, count = 0, 0
            for index in range(limit // BLOCK_SIZE):
                digest = hash((digest, tuple(context[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])))
                if digest not in self._blocks.by_digest:
                    break
                count += BLOCK_SIZE
            return count

    def cached_tokens(self, key: str) -> int:
        sequence = self._sequences.get(key)
        return len(sequence.tokens) if sequence is not None else 0

    # ---- internals -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _packed_attention(self):
        previous = [config._attn_implementation for config in self._configs]
        for config in self._configs:
            config._attn_implementation = ATTN_IMPLEMENTATION
        try:
            yield
        finally:
            for config, implementation in zip(self._configs, previous):
                config._attn_implementation = implementation

    def _prepare(self, items: Sequence[ForwardItem]):
        for item in items:  # before any allocation, so a bad item leaves the caches untouched
            if len(item.context) < 1:
                raise ValueError(f"request {item.key}: empty context")
            if len(item.tree_tokens) != len(item.tree_parents):
                raise ValueError(f"request {item.key}: tree tokens and parents differ in length")
        in_batch = {item.key for item in items}
        if len(in_batch) != len(items):
            raise ValueError("a request appears twice in one batch")
        plans: list[_Plan] = []
        ids: list[int] = []
        positions: list[int] = []
        wanted: list[int] = []
        write_rows: list[int] = []
        for item in items:
            sequence, start = self._sequence_for(item)
            suffix = len(item.context) - start
            plan = _Plan(sequence, start, suffix, tuple(item.tree_parents), len(ids))
            self._ensure_rows(item.key, sequence, start + plan.count, in_batch)
            ids.extend(item.context[start:])
            ids.extend(item.tree_tokens)
            positions.extend(range(start, len(item.context)))
            positions.extend(len(item.context) + d for d in _depths(item.tree_parents))
            wanted.append(plan.offset + suffix - 1)
            wanted.extend(plan.offset + suffix + i for i in range(len(plan.parents)))
            write_rows.extend(self._rows(sequence, range(start, start + plan.count)))
            plans.append(plan)
            self.stats.fed_tokens += plan.count
            self.stats.reused_tokens += start
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        batch = _PackedBatch(as_tensor(write_rows), self._groups(plans), self._layer_index, self._keys, self._values)
        return plans, batch, as_tensor(ids), as_tensor(positions), as_tensor(wanted)

    def _sequence_for(self, item: ForwardItem) -> tuple[_Sequence, int]:
        """The request's sequence and how many of its rows are reused (its own cache, or
        registered prefix blocks for a request with none)."""
        context = item.context
        limit = len(context) - 1 if item.features_from < 0 else max(0, min(len(context) - 1, item.features_from))
        sequence = self._sequences.get(item.key)
        if sequence is None:
            sequence = _Sequence()
            self._sequences[item.key] = sequence
            self.stats.cache_rebuilds += 1
            self._adopt_prefix(sequence, context, limit)
            return sequence, len(sequence.tokens)
        self._sequences.move_to_end(item.key)
        reused = common_prefix(sequence.tokens, context, limit=limit)
        return sequence, self._truncate(sequence, reused)

    def _adopt_prefix(self, sequence: _Sequence, context: Sequence[int], limit: int) -> None:
        """Hold the registered blocks that match the context's leading full blocks."""
        digest = 0
        for index in range(limit // BLOCK_SIZE):
            tokens = tuple(context[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
            digest = hash((digest, tokens))
            block = self._blocks.by_digest.get(digest)
            if block is None:
                break
            self._blocks.hold(block)
            sequence.blocks.append(block)
            sequence.tokens.extend(tokens)
            sequence.digests.append(digest)
            self.stats.prefix_hit_tokens += BLOCK_SIZE

    def _truncate(self, sequence: _Sequence, keep: int) -> int:
        """Keep the first ``keep`` rows; a kept partial block that others share (or that is
        registered as a full prefix) is not written again: the rows from its start are fed
        again into a block of this request's own. Returns the rows kept."""
        blocks_needed = -(-keep // BLOCK_SIZE)
        if keep % BLOCK_SIZE and blocks_needed <= len(sequence.blocks):
            last = sequence.blocks[blocks_needed - 1]
            if self._blocks.refs[last] > 1 or last in self._blocks.digest_of:
                keep -= keep % BLOCK_SIZE
                blocks_needed -= 1
        for block in sequence.blocks[blocks_needed:]:
            self._blocks.drop(block)
        del sequence.blocks[blocks_needed:]
        del sequence.tokens[keep:]
        del sequence.digests[keep // BLOCK_SIZE :]
        return keep

    def _ensure_rows(self, key: str, sequence: _Sequence, rows: int, in_batch: set[str]) -> None:
        while len(sequence.blocks) * BLOCK_SIZE < rows:
            block = self._blocks.take()
            while block is None and self._evict_one(in_batch):
                block = self._blocks.take()
            if block is None:
                raise KVBudgetError(
                    f"request {key}: the batch needs more K/V rows than the pool's {self.num_blocks * BLOCK_SIZE} "
                    f"({self.max_cache_bytes // 2**20} MiB, model.kv_cache_mb)"
                )
            sequence.blocks.append(block)

    def _evict_one(self, in_batch: set[str]) -> bool:
        victim = next((k for k in self._sequences if k not in in_batch), None)
        if victim is None:
            return False
        self._free(self._sequences.pop(victim))
        self.stats.evictions += 1
        return True

    def _free(self, sequence: _Sequence) -> None:
        for block in sequence.blocks:
            self._blocks.drop(block)
        sequence.blocks.clear()

    def _after_forward(self, items: Sequence[ForwardItem], plans: list[_Plan]) -> None:
        for item, plan in zip(items, plans):
            plan.sequence.tokens.extend(int(t) for t in item.context[plan.start :])
            self._register_full_blocks(plan.sequence)

    def _register_full_blocks(self, sequence: _Sequence) -> None:
        full = len(sequence.tokens) // BLOCK_SIZE
        digest = sequence.digests[-1] if sequence.digests else 0
        for index in range(len(sequence.digests), full):
            digest = hash((digest, tuple(sequence.tokens[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])))
            sequence.digests.append(digest)
            self._blocks.register(sequence.blocks[index], digest)

    def _rows(self, sequence: _Sequence, positions) -> list[int]:
        blocks = sequence.blocks
        return [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in positions]

    def _groups(self, plans: list[_Plan]) -> list[_Group]:
        """Small requests (decoding, verification) in one group; each large one alone."""
        small = [p for p in plans if p.count <= SMALL_QUERIES]
        groups = [small] if small else []
        groups += [[p] for p in plans if p.count > SMALL_QUERIES]
        total = sum(p.count for p in plans)
        return [self._group(g, total) for g in groups]

    def _group(self, plans: list[_Plan], total_queries: int = -1) -> _Group:
        device = self.device
        longest = max(p.start + p.count for p in plans)
        q_max = max(p.count for p in plans)
        tables = torch.zeros((len(plans), -(-longest // BLOCK_SIZE)), dtype=torch.long)
        queries = torch.zeros((len(plans), q_max), dtype=torch.long)
        parents = torch.full((len(plans), q_max), -1, dtype=torch.long)  # tree parents as query indices
        starts, suffixes, counts = [], [], []
        for b, plan in enumerate(plans):
            used = -(-(plan.start + plan.count) // BLOCK_SIZE)
            tables[b, :used] = torch.tensor(plan.sequence.blocks[:used])
            queries[b, : plan.count] = torch.arange(plan.offset, plan.offset + plan.count)
            if plan.parents:
                tree = torch.tensor(plan.parents)
                parents[b, plan.suffix : plan.count] = torch.where(tree == ROOT, plan.suffix - 1, tree + plan.suffix)
            starts.append(plan.start)
            suffixes.append(plan.suffix)
            counts.append(plan.count)
        mask = _group_mask(parents.to(device), torch.tensor(starts, device=device), torch.tensor(suffixes, device=device),
                           torch.tensor(counts, device=device), longest, max((len(p.parents) for p in plans), default=0))
        # Pool row of every position: its block's first row + its offset in the block (rows past
        # a request's end point into block 0 of the padding and are masked out).
        position = torch.arange(longest)
        gather = tables[:, position // BLOCK_SIZE] * BLOCK_SIZE + position % BLOCK_SIZE
        valid = torch.arange(q_max)[None, :] < torch.tensor(counts)[:, None]
        contiguous_from = -1
        if len(plans) == 1 and plans[0].offset == 0 and plans[0].count == total_queries:
            blocks = plans[0].sequence.blocks[: -(-longest // BLOCK_SIZE)]
            if all(block == blocks[0] + i for i, block in enumerate(blocks)):
                contiguous_from = blocks[0] * BLOCK_SIZE
                if plans[0].count == 1:
                    mask = None  # one new token after its own rows: it sees all of them
        return _Group(gather.to(device), queries.to(device), mask, queries[valid].to(device), valid.reshape(-1).nonzero()[:, 0].to(device), contiguous_from)


def _group_mask(parents: torch.Tensor, starts: torch.Tensor, suffixes: torch.Tensor, counts: torch.Tensor, longest: int, tree_depth: int) -> torch.Tensor:
    """mask: [B, 1, q_max, longest] bool, on the tensors' device.

    Query i of request b (its i-th new token) sees every cached row (< start), the context
    tokens fed before it (causal), and, for a tree node, every fed context token and its own
    ancestors. Padded query rows see row 0 only (their output is dropped; no row is all False).
    """
    batch, q_max = parents.shape
    device = parents.device
    i = torch.arange(q_max, device=device)
    real = i[None, :] < counts[:, None]  # [B, q]
    is_node = i[None, :] >= suffixes[:, None]
    # local[b, i, j]: new token i sees new token j
    causal = (i[None, None, :] <= i[None, :, None]) & (i[None, None, :] < suffixes[:, None, None])  # context tokens before or at i
    local = torch.where(is_node[:, :, None], i[None, None, :] < suffixes[:, None, None], causal)
    # a node sees itself and its ancestors: follow parent links (at most the tree's depth)
    current = torch.where(is_node & real, i[None, :].expand(batch, q_max), torch.full_like(parents, -1))
    for _ in range(tree_depth + 1):
        hit = current >= 0
        local |= torch.nn.functional.one_hot(current.clamp(min=0), q_max).bool() & hit[:, :, None]
        current = torch.where(hit, parents.gather(1, current.clamp(min=0)), current)
        current = torch.where(current >= suffixes[:, None], current, torch.full_like(current, -1))  # stop at the context
    j = torch.arange(longest, device=device)
    cached = j[None, None, :] < starts[:, None, None]  # [B, 1, longest]
    offset = (j[None, :] - starts[:, None]).clamp(0, q_max - 1)  # [B, longest]
    in_new = (j[None, :] >= starts[:, None]) & (j[None, :] < (starts + counts)[:, None])
    seen_new = local.gather(2, offset[:, None, :].expand(batch, q_max, longest)) & in_new[:, None, :]
    mask = (cached | seen_new) & real[:, :, None]
    mask[:, :, 0] |= ~real  # padded rows: row 0, never all False
    return mask[:, None]


def common_prefix(cached: list[int], context: Sequence[int], limit: int) -> int:
    """Length of the longest common prefix of ``cached`` and ``context``, at most ``limit``."""
    n = min(len(cached), limit)
    if cached[:n] == list(context[:n]):
        return n
    low, high = 0, n  # the first mismatch is usually near the end: bisect on prefix equality
    while low < high:
        mid = (low + high + 1) // 2
        if cached[:mid] == list(context[:mid]):
            low = mid
        else:
            high = mid - 1
    return low


def _depths(parents: Sequence[int]) -> list[int]:
    depths: list[int] = []
    for parent in parents:
        depths.append(0 if parent == ROOT else depths[parent] + 1)
    return depths
