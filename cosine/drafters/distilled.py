"""Drafters made by ``cosine distill``: the ``small`` kind (tokens only) and the ``feature`` kind
(EAGLE-style: the target's final hidden states and the tokens).

A request's drafter state is a KV cache over its committed tokens (soft state: a drafter
instance that has none rebuilds it from the context in the job, so any instance serves any
round). Drafting feeds the uncached suffix of the context in one forward, then one token per
step; the drafted tokens' cache rows are dropped afterwards (the verifier decides what stays).
The head covers the reduced vocabulary; proposals and their distributions are mapped back to
target ids (a sampled draft's distribution is zero outside the reduced vocabulary, which the
verifier's rejection sampling handles like any other draft distribution).

A ``feature`` drafter's input at position j is the pair (token j, the target's hidden state at
j - 1); its output at j is its guess of the target's state at j and, through the head, of token
j + 1. Committed positions use the target's own states (``DraftRequest.features``: the verifier
computes them for every token it commits); each further draft step feeds the drafter's own
predicted state, as training unrolled it. Its KV cache holds the pairs of committed positions
only, keyed by the tokens (a committed position's target state depends on the tokens alone).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from cosine.core.sampling import restrict_top_k, sample, warp_probs
from cosine.core.tree import DraftChain
from cosine.drafters.artifact import load_drafter_net
from cosine.drafters.base import DRAFT_SUPPORT, Drafter, DraftRequest
from cosine.models.loading import prepack_cpu_linears
from cosine.models.runner import common_prefix

MAX_CACHED_REQUESTS = 256


def cpu_bf16(device: torch.device) -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels natively (AVX512-BF16 or AMX)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_int8(device: torch.device) -> bool:
    """Whether dynamically quantized int8 linears run here (a CPU with a quantized engine)."""
    return device.type == "cpu" and any(e != "none" for e in torch.backends.quantized.supported_engines)


class _State:
    __slots__ = ("tokens", "past")

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.past = None  # one (k, v) per block, [1, kv, T, hd]


class SmallDrafter(Drafter):
    kind = "small"

    def __init__(self, name: str, path: str | Path, target, tokenizer=None, int8: bool = True) -> None:
        self.name = name
        self.net, self.meta = load_drafter_net(Path(path), target)
        if self.net.spec.kind != self.kind:
            what = "drafts from tokens alone ('small')" if self.kind == "small" else "reads the target's hidden states ('feature')"
            raise ValueError(f"drafter {name!r}: {path} holds a {self.net.spec.kind!r} drafter; this kind {what}")
        if tokenizer is not None:
            from cosine.drafters.artifact import tokenizer_digest

            made_for = self.meta.get("target", {}).get("tokenizer")
            if made_for and made_for != tokenizer_digest(tokenizer):
                raise ValueError(f"drafter {name!r}: {path} was made for another tokenizer than the target's")
        # Drafting is memory-bound on a CPU (a few rows through ~50 MB of fp32 weights per step):
        # int8 weights read a quarter of the bytes (DraftNet.quantize_int8: faster per drafted
        # token at the same agreement with the target); without int8 kernels, bf16 where the
        # CPU has it natively; else fp32 through oneDNN.
        device = self.net.head.device
        self.int8 = int8 and cpu_int8(device) and self.net.head.dtype == torch.float32
        if self.int8:
            self.net.quantize_int8()
        else:
            if cpu_bf16(device) and self.net.head.dtype == torch.float32:
                self.net.to_compute_dtype(torch.bfloat16)
            prepack_cpu_linears(self.net)
        self.vocab_size = self.net.spec.vocab_size
        self.states: OrderedDict[str, _State] = OrderedDict()

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        return [self._draft(r) for r in requests]

    def _draft(self, request: DraftRequest) -> DraftChain:
        context = list(request.context)
        if request.window <= 0 or not context:
            return DraftChain((), (), None, self.name)
        state = self._state(request.key)
        common = common_prefix(state.tokens, context, limit=len(context) - 1)  # feed at least the last token
        self._crop(state, common)
        logits = self._feed(state, context[common:], common)
        generator = None if request.sampling.greedy else self.generator(request)
        tokens, confidences, rows = [], [], []
        for step in range(request.window):
            token, confidence, probs = self._pick(logits, request, generator)
            tokens.append(token)
            confidences.append(confidence)
            if probs is not None:
                rows.append(probs)
            if step + 1 < request.window:
                logits = self._feed(state, [token], len(context) + step)
        self._crop(state, len(context))
        return DraftChain(tuple(tokens), tuple(confidences), torch.stack(rows) if rows else None, self.name)

    def _feed(self, state: _State, tokens: list[int], start: int) -> torch.Tensor:
        device = self.net.head.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        hidden, state.past = self.net(ids, positions, past=state.past)
        state.tokens.extend(tokens)
        return self.net.logits(hidden[0, -1])

    def _pick(self, logits: torch.Tensor, request: DraftRequest, generator):
        if request.sampling.greedy:
            index = int(logits.argmax())
            return int(self.net.vocab[index]), float(torch.softmax(logits.float(), -1)[index]), None
        reduced = restrict_top_k(warp_probs(logits[None], request.sampling)[0], DRAFT_SUPPORT)
        index = sample(reduced, generator)
        full = torch.zeros(self.vocab_size, dtype=torch.float32, device=reduced.device)
        full[self.net.vocab] = reduced
        return int(self.net.vocab[index]), float(reduced[index]), full

    def _state(self, key: str) -> _State:
        state = self.states.pop(key, None) or _State()
        self.states[key] = state
        while len(self.states) > MAX_CACHED_REQUESTS:
            self.states.popitem(last=False)
        return state

    @staticmethod
    def _crop(state: _State, length: int) -> None:
        if len(state.tokens) > length:
            del state.tokens[length:]
            if state.past is not None:
                state.past = [(k[:, :, :length], v[:, :, :length]) for k, v in state.past] if length else None

    def release(self, key: str) -> None:
        self.states.pop(key, None)



class FeatureDrafter(SmallDrafter):
    """The ``feature`` kind: drafts from the target's hidden states (see the module's notes)."""

    kind = "feature"
    needs_features = True

    def _draft(self, request: DraftRequest) -> DraftChain:
        context = list(request.context)
        features = request.features
        if request.window <= 0 or len(context) < 2 or features is None or len(features) < len(context) - 1:
            return DraftChain((), (), None, self.name)  # no states for this context: nothing to draft from
        state = self._state(request.key)
        # state.tokens: tokens 0..c, whose pairs 1..c are cached; the last context token is always fed.
        common = common_prefix(state.tokens, context, limit=len(context) - 1)
        if common == 0:
            state.tokens, state.past, common = [context[0]], None, 1
        else:
            self._crop(state, common)
        hidden = self._feed_pairs(state, context[common:], features[common - 1 : len(context) - 1], common)
        generator = None if request.sampling.greedy else self.generator(request)
        tokens, confidences, rows = [], [], []
        for step in range(request.window):
            token, confidence, probs = self._pick(self.net.logits(hidden), request, generator)
            tokens.append(token)
            confidences.append(confidence)
            if probs is not None:
                rows.append(probs)
            if step + 1 < request.window:
                hidden = self._feed_pairs(state, [token], hidden[None], len(context) + step)
        self._crop(state, len(context))
        return DraftChain(tuple(tokens), tuple(confidences), torch.stack(rows) if rows else None, self.name)

    def _feed_pairs(self, state: _State, tokens: list[int], features: torch.Tensor, start: int) -> torch.Tensor:
        """Pairs (tokens[i], features[i]) at positions start + i; the last position's output."""
        device = self.net.head.device
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, start + len(tokens), device=device)[None]
        hidden, state.past = self.net(ids, positions, features.to(device)[None], past=state.past)
        state.tokens.extend(tokens)
        return hidden[0, -1]

    @staticmethod
    def _crop(state: _State, length: int) -> None:
        """Keep tokens 0..length-1 and the pairs of positions 1..length-1."""
        if len(state.tokens) > length:
            del state.tokens[length:]
            pairs = max(0, length - 1)
            if state.past is not None:
                state.past = [(k[:, :, :pairs], v[:, :, :pairs]) for k, v in state.past] if pairs else None
