"""Fused projections: the same logits as transformers' separate layers, in the runner and in
``generate``; layers of another shape are left alone."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.models.fusing import FusedAttention, FusedGatedMLP, fuse_projections
from cosine.models.runner import ForwardItem, ModelRunner


def tiny(seed: int = 0, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(config).eval()


def test_fused_layers_give_the_separate_layers_results():
    for bias in (False, True):
        plain = tiny(bias=bias)
        fused = copy.deepcopy(plain)
        assert fuse_projections(fused) == 2 * 2  # attention and MLP of each layer
        assert all(isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedGatedMLP) for layer in fused.model.layers)
        context, tree = list(range(5, 40)), (30, 31, 32, 33)
        a = ModelRunner(plain).forward([ForwardItem("r", context, tree, (-1, 0, 0, 2))])[0]
        b = ModelRunner(fused).forward([ForwardItem("r", context, tree, (-1, 0, 0, 2))])[0]
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ids = torch.tensor([context])
        with torch.inference_mode():  # outside the runner too (transformers' own attention and cache)
            assert plain.generate(ids, max_new_tokens=12, do_sample=False).tolist() == fused.generate(ids, max_new_tokens=12, do_sample=False).tolist()


def test_fusing_twice_or_other_shapes_changes_nothing():
    model = tiny()
    fuse_projections(model)
    assert fuse_projections(model) == 0  # already fused
    assert fuse_projections(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
