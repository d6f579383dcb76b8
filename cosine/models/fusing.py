"""Fused projections for the runner's model: one matrix product where transformers makes several.

A Llama-style decoder layer makes seven linear calls per token: q, k and v projections, the
output projection, gate, up and down. At the few rows a decoding or verification step feeds,
each call is mostly fixed cost, so one product of the concatenated weights costs much less than
three (or two) separate ones. Serving engines fuse them for the same reason (vLLM's QKV and
merged gate-up layers). The fused layers compute the same products on the same weights, concatenated; results
match the separate calls to float rounding.

Only layers of the known shape are fused (attention with q/k/v/o projections and rotary
embeddings, no per-head norms; a gated MLP); anything else is left as it is.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class FusedAttention(nn.Module):
    """A Llama-style attention whose q, k and v projections are one linear layer."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        q, k, v = attention.q_proj, attention.k_proj, attention.v_proj
        self.config = attention.config
        self.layer_idx = attention.layer_idx
        self.head_dim = attention.head_dim
        self.num_key_value_groups = attention.num_key_value_groups
        self.scaling = attention.scaling
        self.attention_dropout = getattr(attention, "attention_dropout", 0.0)
        self.is_causal = True
        self.sizes = (q.out_features, k.out_features, v.out_features)
        self.qkv_proj = _concatenated(q, k, v)
        self.o_proj = attention.o_proj
        self._rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = self.qkv_proj(hidden_states).split(self.sizes, dim=-1)
        query, key, value = (t.reshape(shape).transpose(1, 2) for t in (query, key, value))
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None)
        output, weights = attend(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class FusedGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up as one linear layer."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.intermediate = mlp.gate_proj.out_features
        self.gate_up_proj = _concatenated(mlp.gate_proj, mlp.up_proj)
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


def fuse_projections(model: nn.Module) -> int:
    """Fuse the projections of every decoder layer of a known shape, in place; returns how many
    modules were replaced. Call before any other layer swap (oneDNN prepacking)."""
    replaced = 0
    for layer in _decoder_layers(model):
        if _fusable_attention(getattr(layer, "self_attn", None)):
            layer.self_attn = FusedAttention(layer.self_attn)
            replaced += 1
        if _fusable_mlp(getattr(layer, "mlp", None)):
            layer.mlp = FusedGatedMLP(layer.mlp)
            replaced += 1
    return replaced


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def _plain_linears(*layers) -> bool:
    return all(type(layer) is nn.Linear for layer in layers)


def _fusable_attention(attention: nn.Module | None) -> bool:
    if attention is None or not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx", "head_dim", "scaling", "config")):
        return False
    if hasattr(attention, "q_norm") or hasattr(attention, "k_norm") or getattr(attention, "sliding_window", None):
        return False  # per-head norms or local attention: a forward of its own
    module = sys.modules.get(type(attention).__module__)
    return module is not None and hasattr(module, "apply_rotary_pos_emb") and _plain_linears(attention.q_proj, attention.k_proj, attention.v_proj)


def _fusable_mlp(mlp: nn.Module | None) -> bool:
    return (mlp is not None and all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))
            and _plain_linears(mlp.gate_proj, mlp.up_proj) and mlp.gate_proj.in_features == mlp.up_proj.in_features)


def _concatenated(*layers: nn.Linear) -> nn.Linear:
    first = layers[0]
    bias = first.bias is not None
    fused = nn.Linear(first.in_features, sum(layer.out_features for layer in layers), bias=bias, device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        if bias:
            fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused.requires_grad_(False)
