"""Distilled drafter networks: ``small`` (tokens only) and ``feature`` (EAGLE-style).

Both are built from Llama-style decoder blocks (RMSNorm, grouped-query attention with RoPE,
SwiGLU) shaped like the target's, initialised from target layers, and both predict over a
*reduced vocabulary*: the most frequent target token ids, whose output rows are the target's own
(tied) embedding rows, frozen. So a drafter file holds only its blocks, norms and fusion layer;
token embeddings and the head come from the target at load time.

- ``small``: token embedding -> blocks -> norm -> reduced head. Runs without the target's
  features (another machine, no feature shipping).
- ``feature``: at position i it reads the target's final hidden state f_i (which predicted
  token i+1) and the embedding of token i+1, fuses them (``fc``), runs one block and a norm, and
  predicts f_{i+1} and, through the reduced head, token i+2. Later draft steps feed its own
  predicted feature back in place of f; training unrolls those steps.

Each block keeps a KV cache (``[kv_heads, T, head_dim]`` per batch row) so drafting continues a
request's context in O(new tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("small", "feature")


@dataclass(frozen=True, slots=True)
class DraftSpec:
    kind: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    rope_theta: float
    layers: int
    init_layers: tuple[int, ...]  # target layers the blocks start from
    vocab_size: int  # the target's
    reduced_vocab: int

    def to_dict(self) -> dict:
        data = asdict(self)
        data["init_layers"] = list(self.init_layers)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DraftSpec:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        fields["init_layers"] = tuple(fields["init_layers"])
        return cls(**fields)


def spec_for_target(config, kind: str, layers: int, reduced_vocab: int) -> DraftSpec:
    if kind not in KINDS:
        raise ValueError(f"drafter kind must be one of {KINDS}, got {kind!r}")
    total = config.num_hidden_layers
    if kind == "feature":
        layers, init = 1, (total - 1,)
    else:
        if not 1 <= layers <= total:
            raise ValueError(f"layers must be in [1, {total}], got {layers}")
        # The first layer reads embeddings, the last one writes for the head: start from those.
        init = tuple(range(layers - 1)) + (total - 1,) if layers > 1 else (0,)
    rope = getattr(config, "rope_parameters", None) or {}
    theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope type {rope.get('rope_type')!r} is not supported by distilled drafters")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return DraftSpec(
        kind, config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
        config.intermediate_size, float(config.rms_norm_eps), theta, layers, init, config.vocab_size, reduced_vocab,
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        return (self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))).to(dtype)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """One Llama decoder layer; parameter names follow transformers' so target layers load as is."""

    def __init__(self, spec: DraftSpec) -> None:
        super().__init__()
        d, h, kv, hd = spec.hidden, spec.heads, spec.kv_heads, spec.head_dim
        self.heads, self.kv_heads, self.head_dim = h, kv, hd
        self.input_layernorm = RMSNorm(d, spec.eps)
        self.post_attention_layernorm = RMSNorm(d, spec.eps)
        self.self_attn = nn.ModuleDict({
            "q_proj": nn.Linear(d, h * hd, bias=False), "k_proj": nn.Linear(d, kv * hd, bias=False),
            "v_proj": nn.Linear(d, kv * hd, bias=False), "o_proj": nn.Linear(h * hd, d, bias=False),
        })
        self.mlp = nn.ModuleDict({
            "gate_proj": nn.Linear(d, spec.intermediate, bias=False), "up_proj": nn.Linear(d, spec.intermediate, bias=False),
            "down_proj": nn.Linear(spec.intermediate, d, bias=False),
        })

    def forward(self, x, cos, sin, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x [B, T, d]; past (k, v) [B, kv, P, hd] or None. Causal within the new tokens, all
        of ``past`` visible. Returns (y, (k, v)) with the new keys appended."""
        b, t, _ = x.shape
        attn = self.self_attn
        hidden = self.input_layernorm(x)
        q = attn["q_proj"](hidden).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = attn["k_proj"](hidden).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn["v_proj"](hidden).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        groups = self.heads // self.kv_heads
        kx, vx = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        p = k.shape[2] - t
        if p == 0:
            out = F.scaled_dot_product_attention(q, kx, vx, is_causal=t > 1)
        elif t == 1:
            out = F.scaled_dot_product_attention(q, kx, vx)
        else:
            mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(p)
            out = F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask)
        x = x + attn["o_proj"](out.transpose(1, 2).reshape(b, t, -1))
        hidden = self.post_attention_layernorm(x)
        mlp = self.mlp
        x = x + mlp["down_proj"](F.silu(mlp["gate_proj"](hidden)) * mlp["up_proj"](hidden))
        return x, (k, v)


class DraftNet(nn.Module):
    """The trainable part of a drafter (what its file holds) plus frozen references to the
    target's embedding and the reduced head rows."""

    def __init__(self, spec: DraftSpec, embedding: torch.Tensor, vocab: torch.Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.eps)
        self.fc = nn.Linear(2 * spec.hidden, spec.hidden, bias=False) if spec.kind == "feature" else None
        self.rotary = Rotary(spec.head_dim, spec.rope_theta)
        # Frozen, not saved: the target's embedding, and the ids of the reduced vocabulary.
        self.register_buffer("embedding", embedding.detach(), persistent=False)
        self.register_buffer("vocab", vocab.long(), persistent=False)
        self.register_buffer("head", embedding.detach()[vocab.long()], persistent=False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def init_from_target(self, target) -> None:
        """Blocks from the target layers named in the spec, norm from the target's final norm;
        ``fc`` passes the feature through at first (so step one starts near the target)."""
        layers = target.get_decoder().layers
        for block, index in zip(self.blocks, self.spec.init_layers):
            # A served target's layers may hold oneDNN-reordered weights (made dense here) and
            # the zero biases oneDNN's linear adds; a real bias is a shape these blocks lack.
            source = {k: v.to_dense() if v.is_mkldnn else v for k, v in layers[index].state_dict().items() if not k.endswith("rotary_emb.inv_freq")}
            wanted = set(block.state_dict())
            extra = {k for k in source if k not in wanted}
            if any(not k.endswith(".bias") or bool(source[k].any()) for k in extra):
                raise ValueError(f"target layer {index} has parameters a drafter block cannot take: {sorted(extra)[:4]}")
            block.load_state_dict({k: v for k, v in source.items() if k in wanted}, strict=True)
        self.norm.weight.data.copy_(target.get_decoder().norm.weight.data)
        if self.fc is not None:
            d = self.spec.hidden
            with torch.no_grad():
                self.fc.weight.zero_()
                self.fc.weight[:, d:] = torch.eye(d)
                self.fc.weight[:, :d] = torch.eye(d) * 0.1

    def to_compute_dtype(self, dtype: torch.dtype) -> DraftNet:
        """Blocks, norm, fusion layer and head in ``dtype``; the (shared, frozen) embedding stays
        as it is and its rows are cast as they are read."""
        for module in [*self.blocks, self.norm, self.fc]:
            if module is not None:
                module.to(dtype)
        self.head = self.head.to(dtype)
        return self

    def quantize_int8(self) -> DraftNet:
        """Inference on a CPU with int8 weights: every linear layer and the head become dynamically
        quantized linears (int8 weights per output channel, activations quantized per call;
        fbgemm/oneDNN int8 kernels). Drafting is memory-bound, and a token then reads a quarter
        of the weight bytes, at the same agreement with the target (figures in
        docs/drafters.md). The verifier alone decides what is accepted, so a drafter may be
        approximate; the target is never quantized."""
        import warnings

        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        head = nn.Linear(self.spec.hidden, self.head.shape[0], bias=False)
        head.weight = nn.Parameter(self.head.detach().float().clone(), requires_grad=False)
        self.head_int8 = head
        with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao
            warnings.simplefilter("ignore")
            quantize_dynamic(self, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
        # The float head rows are no longer read (``logits`` takes the int8 head); an empty
        # tensor keeps their dtype and device, which the rest reads (18 MB per drafter freed).
        self.head = self.head.new_empty((0, self.spec.hidden))
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Reduced-vocabulary logits [..., reduced_vocab] of post-norm states."""
        head = getattr(self, "head_int8", None)
        if head is not None:  # quantized linears take 2-D input and up
            return head(hidden.reshape(-1, hidden.shape[-1]).float()).reshape(*hidden.shape[:-1], -1)
        return hidden @ self.head.T

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, features: torch.Tensor | None = None, past=None):
        """tokens [B, T] (target ids); positions [B, T]; features [B, T, d] for ``feature``.
        Returns (post-norm hidden [B, T, d], new past: one (k, v) per block)."""
        x = F.embedding(tokens, self.embedding).to(self.head.dtype)
        if self.fc is not None:
            x = self.fc(torch.cat((x, features.to(x.dtype)), dim=-1))
        cos, sin = self.rotary(positions, x.dtype)
        new_past = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, cos, sin, None if past is None else past[i])
            new_past.append(kv)
        return self.norm(x), new_past
