"""Batched forward passes with per-request KV caches (the verifier's and model drafters' engine).

A batch is *packed*: the new tokens of every request are laid end to end in one sequence
(batch size 1, ``q_total`` tokens), with explicit position ids and, per request, cumulative
offsets into the packed sequence (vLLM's varlen layout). Linear layers see one [q_total, hidden]
matrix with no padding. Attention is done per request by a registered transformers attention
function, against that request's own KV buffer: the cached prefix plus its new tokens, under a
mask built from lengths and tree parents (never from token ids).

KV buffers are per request and per layer, grown geometrically. Cropping is bookkeeping: after a
round only the accepted tree nodes' rows are gathered into place; the next round compares the
cached tokens with the request's committed tokens and reuses the longest common prefix. A cache
that is missing (evicted, another worker) is rebuilt by feeding the tokens again.

Memory is bounded in bytes of what is allocated (capacity, not valid rows): when creating or
growing a buffer would pass ``max_cache_bytes``, least-recently-used caches outside the batch
being prepared are evicted first. A batch that needs more than the whole budget on its own still
runs, over budget, with one warning per request.
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

from cosine.spec.tree import ROOT, tree_attention_mask

ATTN_IMPLEMENTATION = "cosine_packed"
_BATCH_KWARG = "cosine_batch"
DEFAULT_MAX_CACHE_BYTES = 1024 * 2**20  # the default of config.toml's model.kv_cache_mb
_GROWTH_HEADROOM = 16  # rows beyond the first round of a new cache, so the next round fits
_MAX_WARNED_KEYS = 1024  # bounds the memory of which requests were warned about

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ForwardItem:
    """One request in a batch.

    context: [L] committed tokens (prompt + output so far), L >= 1; tree_tokens / tree_parents:
    [n] speculative nodes placed after the context (ROOT = child of the last context token).
    The runner returns logits [1 + n, vocab]: row 0 after the context, row i + 1 after node i.
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
    reused_tokens: int = 0
    cache_rebuilds: int = 0
    evictions: int = 0  # caches dropped to stay within the byte budget
    releases: int = 0  # caches freed by release / release_many (keys with no cache not counted)
    forward_seconds: float = 0.0
    bookkeeping_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__slots__}


@dataclass(slots=True)
class _RequestCache:
    keys: dict[int, torch.Tensor]  # layer_idx -> [kv_heads, capacity, head_dim]
    values: dict[int, torch.Tensor]
    tokens: list[int] = field(default_factory=list)  # tokens whose K/V rows are valid, in order

    @property
    def capacity(self) -> int:
        return next(iter(self.keys.values())).shape[1]


@dataclass(slots=True)
class _Segment:
    cache: _RequestCache
    start: int  # rows already cached (reused prefix)
    count: int  # new tokens fed for this request
    offset: int  # where they start in the packed sequence
    mask: torch.Tensor | None  # [count, start + count] bool, None = attend to everything


@dataclass(slots=True)
class _PackedBatch:
    segments: list[_Segment]


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for a packed batch; plain SDPA when called outside the runner (e.g. generate).

    query: [1, heads, q_total, head_dim]; key/value: [1, kv_heads, q_total, head_dim].
    Returns [1, q_total, heads, head_dim].
    """
    batch: _PackedBatch | None = kwargs.pop(_BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    layer = module.layer_idx
    outputs = []
    for seg in batch.segments:
        end = seg.start + seg.count
        new = slice(seg.offset, seg.offset + seg.count)
        layer_keys, layer_values = seg.cache.keys[layer], seg.cache.values[layer]
        layer_keys[:, seg.start : end] = key[0, :, new]
        layer_values[:, seg.start : end] = value[0, :, new]
        outputs.append(
            torch.nn.functional.scaled_dot_product_attention(
                query[:, :, new],
                layer_keys[None, :, :end],
                layer_values[None, :, :end],
                attn_mask=seg.mask,
                scale=scaling,
                enable_gqa=True,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_IMPLEMENTATION, _packed_attention)


def _no_mask(*args, **kwargs) -> None:
    return None  # the packed attention builds its own per-request masks


AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)


class ModelRunner:
    """Runs a causal LM over packed batches, keeping one KV cache per request key.

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
        # KV buffers are keyed by each attention module's layer_idx (a layer-skip drafter keeps
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
        self.max_cache_bytes = max_cache_bytes
        self.stats = RunnerStats()
        self._caches: OrderedDict[str, _RequestCache] = OrderedDict()  # least recently used first
        self._allocated_bytes = 0  # sum of the caches' capacity bytes, kept up to date on change
        self._warned_over_budget: set[str] = set()
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
            segments, input_ids, positions, wanted = self._prepare(items)
            prepared = time.perf_counter()
            with self._packed_attention():
                hidden = self.decoder(
                    input_ids=input_ids[None],
                    position_ids=positions[None],
                    use_cache=False,
                    **{_BATCH_KWARG: _PackedBatch(segments)},
                ).last_hidden_state[0]
            logits = self.lm_head(hidden[wanted]).float()
            done = time.perf_counter()
            self._after_forward(items, segments)
            finished = time.perf_counter()
        self.stats.forward_calls += 1
        self.stats.forward_seconds += done - prepared
        self.stats.bookkeeping_seconds += (prepared - began) + (finished - done)
        sizes = [1 + len(item.tree_tokens) for item in items]
        states = [FedStates(seg.start, hidden[seg.offset : seg.offset + seg.count]) for seg in segments]
        return list(torch.split(logits, sizes)), states

    @torch.inference_mode()
    def commit(self, key: str, accepted_nodes: Sequence[int], accepted_tokens: Sequence[int]) -> None:
        """Keep the K/V rows of the accepted tree path; drop the other speculative rows."""
        began = time.perf_counter()
        with self._lock:
            cache = self._caches.get(key)
            if cache is not None:
                base = len(cache.tokens)
                sources = [base + node for node in accepted_nodes]
                targets = list(range(base, base + len(sources)))
                if sources != targets:
                    src = torch.tensor(sources, device=self.device)
                    for layer in self.layer_ids:
                        cache.keys[layer][:, targets] = cache.keys[layer][:, src]
                        cache.values[layer][:, targets] = cache.values[layer][:, src]
                cache.tokens.extend(int(t) for t in accepted_tokens)
        self.stats.bookkeeping_seconds += time.perf_counter() - began

    def release(self, key: str) -> None:
        """Free a finished request's cache (no-op for a key with none)."""
        self.release_many([key])

    def release_many(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._warned_over_budget.discard(key)
                cache = self._caches.pop(key, None)
                if cache is not None:
                    self._allocated_bytes -= self._cache_bytes(cache.capacity)
                    self.stats.releases += 1

    def cached_keys(self) -> list[str]:
        """Keys that hold a cache, least recently used first."""
        with self._lock:
            return list(self._caches)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of K/V buffers held by all caches (capacity, not only valid rows)."""
        return self._allocated_bytes

    def cached_tokens(self, key: str) -> int:
        cache = self._caches.get(key)
        return len(cache.tokens) if cache is not None else 0

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
        segments: list[_Segment] = []
        ids: list[int] = []
        positions: list[int] = []
        wanted: list[int] = []
        for item in items:
            tree = list(item.tree_tokens)
            cache, reused = self._cache_for(item.key, item.context, len(item.context) + len(tree), in_batch, item.features_from)
            suffix = list(item.context[reused:])
            count = len(suffix) + len(tree)
            self._ensure_capacity(item.key, cache, reused + count, in_batch)
            offset = len(ids)
            ids.extend(suffix)
            ids.extend(tree)
            positions.extend(range(reused, len(item.context)))
            depths = _depths(item.tree_parents)
            positions.extend(len(item.context) + d for d in depths)
            wanted.append(offset + len(suffix) - 1)
            wanted.extend(offset + len(suffix) + i for i in range(len(tree)))
            mask = _segment_mask(reused, len(suffix), item.tree_parents, self.device)
            segments.append(_Segment(cache, reused, count, offset, mask))
            self.stats.fed_tokens += count
            self.stats.reused_tokens += reused
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return segments, as_tensor(ids), as_tensor(positions), as_tensor(wanted)

    def _cache_for(self, key: str, context: Sequence[int], rows: int, in_batch: set[str], features_from: int = -1) -> tuple[_RequestCache, int]:
        """The request's cache and how many of its rows are reused; a new one fits ``rows``."""
        cache = self._caches.get(key)
        if cache is None:
            capacity = _round_up(rows + _GROWTH_HEADROOM)
            self._make_room(key, self._cache_bytes(capacity), in_batch)
            cache = self._new_cache(capacity)
            self._caches[key] = cache
            self._allocated_bytes += self._cache_bytes(capacity)
            self.stats.cache_rebuilds += 1
            return cache, 0
        self._caches.move_to_end(key)
        limit = len(context) - 1 if features_from < 0 else max(0, min(len(context) - 1, features_from))
        reused = common_prefix(cache.tokens, context, limit=limit)
        del cache.tokens[reused:]
        return cache, reused

    def _after_forward(self, items: Sequence[ForwardItem], segments: list[_Segment]) -> None:
        for item, seg in zip(items, segments):
            seg.cache.tokens.extend(int(t) for t in item.context[seg.start :])

    def _new_cache(self, capacity: int) -> _RequestCache:
        shape = (self.kv_heads, capacity, self.head_dim)
        make = lambda: torch.empty(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return _RequestCache({i: make() for i in self.layer_ids}, {i: make() for i in self.layer_ids})

    def _ensure_capacity(self, key: str, cache: _RequestCache, needed: int, in_batch: set[str]) -> None:
        if needed <= cache.capacity:
            return
        valid = cache.capacity
        capacity = _round_up(needed)
        extra = self._cache_bytes(capacity) - self._cache_bytes(valid)
        self._make_room(key, extra, in_batch)
        grown = self._new_cache(capacity)
        for layer in self.layer_ids:
            grown.keys[layer][:, :valid] = cache.keys[layer]
            grown.values[layer][:, :valid] = cache.values[layer]
        cache.keys, cache.values = grown.keys, grown.values
        self._allocated_bytes += extra

    def _make_room(self, key: str, incoming: int, in_batch: set[str]) -> None:
        """Evict least-recently-used caches outside the batch until ``incoming`` more bytes fit."""
        while self._allocated_bytes + incoming > self.max_cache_bytes:
            victim = next((k for k in self._caches if k not in in_batch), None)
            if victim is None:
                self._warn_over_budget(key, incoming)
                return
            evicted = self._caches.pop(victim)
            self._allocated_bytes -= self._cache_bytes(evicted.capacity)
            self.stats.evictions += 1

    def _warn_over_budget(self, key: str, incoming: int) -> None:
        if key in self._warned_over_budget:
            return
        if len(self._warned_over_budget) >= _MAX_WARNED_KEYS:  # callers that never release
            self._warned_over_budget.clear()
        self._warned_over_budget.add(key)
        log.warning(
            "request %s: KV caches of its batch need %d bytes, over the budget of %d (model.kv_cache_mb); running over budget",
            key, self._allocated_bytes + incoming, self.max_cache_bytes,
        )

    def _cache_bytes(self, capacity: int) -> int:
        return capacity * self.bytes_per_token


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


def _segment_mask(cached: int, suffix: int, parents: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """mask: [suffix + n, cached + suffix + n] bool for one request's new tokens.

    Suffix tokens are causal; tree nodes see the whole context and their ancestors.
    """
    n = len(parents)
    count = suffix + n
    if count == 1:
        return None  # a single new token may attend to everything before it
    mask = torch.ones((count, cached + count), dtype=torch.bool)
    mask[:, cached:] = False
    mask[:suffix, cached : cached + suffix] = torch.ones((suffix, suffix), dtype=torch.bool).tril()
    if n:
        mask[suffix:, cached : cached + suffix] = True
        mask[suffix:, cached + suffix :] = tree_attention_mask(tuple(parents))
    return mask.to(device)


def _round_up(n: int) -> int:
    size = 64
    while size < n:
        size *= 2
    return size


