"""Drafters backed by a causal LM: any small model sharing the target's tokenizer, or an
early-exit view of the target itself (its first layers, its norm and output head)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from cosine.core.sampling import restrict_top_k, sample, warp_probs
from cosine.core.tree import DraftChain
from cosine.drafters.base import DRAFT_SUPPORT, Drafter, DraftRequest
from cosine.models.runner import ForwardItem, ModelRunner


class ModelDrafter(Drafter):
    """Drafts token by token with its own per-request KV caches.

    All requests of a call advance together: each step is one packed forward over every request
    that still has window left. At temperature 0 drafts are the drafter's argmax (fixed
    proposals); otherwise they are sampled from the warped distribution cut to its
    ``DRAFT_SUPPORT`` most likely tokens, which is kept for lossless verification. Confidence is the drafter's probability for its token.
    """

    def __init__(self, name: str, runner: ModelRunner, vocab_size: int | None = None) -> None:
        self.name = name
        self.runner = runner
        # The target's output width: a drafter of another size of the family may pad its
        # vocabulary differently (an lm_head wider or narrower). Its logits are cut or padded to
        # the target's width, so its draws are target tokens and its distributions the
        # verifier's shape (padding rows are no tokens: nothing is lost).
        self.vocab_size = vocab_size

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftChain]:
        contexts = [list(r.context) for r in requests]
        tokens: list[list[int]] = [[] for _ in requests]
        confidences: list[list[float]] = [[] for _ in requests]
        probs_rows: list[list[torch.Tensor]] = [[] for _ in requests]
        generators = [None if r.sampling.greedy else self.generator(r) for r in requests]
        for step in range(max((r.window for r in requests), default=0)):
            active = [i for i, r in enumerate(requests) if step < r.window]
            logits = self.runner.forward([ForwardItem(requests[i].key, contexts[i]) for i in active])
            for i, row in zip(active, logits):
                token, confidence, probs = self._pick(fit_width(row[0], self.vocab_size), requests[i], generators[i])
                tokens[i].append(token)
                confidences[i].append(confidence)
                if probs is not None:
                    probs_rows[i].append(probs)
                contexts[i].append(token)
        return [
            DraftChain(tuple(t), tuple(c), torch.stack(p) if p else None, self.name)
            for t, c, p in zip(tokens, confidences, probs_rows)
        ]

    @staticmethod
    def _pick(logits: torch.Tensor, request: DraftRequest, generator) -> tuple[int, float, torch.Tensor | None]:
        if request.sampling.greedy:
            token = int(logits.argmax())
            return token, float(torch.softmax(logits.float(), -1)[token]), None
        probs = restrict_top_k(warp_probs(logits[None], request.sampling)[0], DRAFT_SUPPORT)
        token = sample(probs, generator)
        return token, float(probs[token]), probs

    def release(self, key: str) -> None:
        self.runner.release(key)


def fit_width(logits: torch.Tensor, width: int | None) -> torch.Tensor:
    """Logits over the last dimension cut to ``width``, or padded with -inf up to it."""
    have = logits.shape[-1]
    if width is None or have == width:
        return logits
    if have > width:
        return logits[..., :width]
    return torch.nn.functional.pad(logits, (0, width - have), value=float("-inf"))


def early_exit_model(target: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A model made of the target's first ``num_layers`` layers, its final norm and head."""
    total = target.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise ValueError(f"early-exit layers must be in [1, {total - 1}], got {num_layers}")
    return layer_subset_model(target, list(range(num_layers)))


def layer_skip_model(target: PreTrainedModel, skip: list[int]) -> PreTrainedModel:
    """Self-speculation by layer skipping: the target without the layers in ``skip``."""
    total = target.config.num_hidden_layers
    if not skip or any(not 0 <= layer < total for layer in skip) or len(set(skip)) >= total:
        raise ValueError(f"skip must name between 1 and {total - 1} distinct layers in [0, {total - 1}], got {skip}")
    return layer_subset_model(target, [layer for layer in range(total) if layer not in set(skip)])


def layer_subset_model(target: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A drafter made of some of the target's layers (in order), its embeddings, norm and head.

    The modules are shared with the target, not copied: the drafter costs no extra weights.
    Each kept layer keeps its ``layer_idx``; the runner keys KV buffers by it.
    """
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = len(layers)
    with torch.device("meta"):
        draft = AutoModelForCausalLM.from_config(config)
    decoder, target_decoder = draft.get_decoder(), target.get_decoder()
    decoder.embed_tokens = target_decoder.embed_tokens
    decoder.layers = torch.nn.ModuleList([target_decoder.layers[i] for i in layers])
    decoder.norm = target_decoder.norm
    decoder.rotary_emb = target_decoder.rotary_emb
    draft.lm_head = target.get_output_embeddings()
    return draft.eval()
