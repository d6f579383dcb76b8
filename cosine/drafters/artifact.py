"""A drafter's files as ``cosine distill`` writes them and serving reads them: ``drafter.json``
(format, shape, target, data, training, measured agreement) and ``drafter.safetensors`` (its own
tensors in a compact dtype, and its vocabulary map). The routing profile beside them is
``cosine.drafters.profile``'s. Serving imports this module, never the training code."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cosine.drafters.net import DraftNet, DraftSpec

FORMAT = 1


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.blake2b(json.dumps(vocab).encode(), digest_size=8).hexdigest()


EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int8": torch.int8}
SCALE = ".scale"


def pack_tensors(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """A drafter's tensors as stored: in ``dtype``; for ``int8``, every matrix as int8 with one
    fp16 scale per output row (symmetric, absmax / 127: half the bytes of fp16) and vectors
    (norms) in fp16."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"drafter dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    packed = {}
    for name, value in state.items():
        value = value.detach().float().cpu()
        if dtype != "int8":
            packed[name] = value.to(EXPORT_DTYPES[dtype]).contiguous()
        elif value.dim() == 2:
            scale = (value.abs().amax(dim=1) / 127).clamp(min=1e-6).to(torch.float16)  # the scale as stored
            packed[name] = torch.round(value / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
            packed[name + SCALE] = scale
        else:
            packed[name] = value.to(torch.float16).contiguous()
    return packed


def unpack_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``pack_tensors`` (float32; ``vocab`` left out)."""
    out = {}
    for name, value in tensors.items():
        if name == "vocab" or name.endswith(SCALE):
            continue
        if value.dtype == torch.int8:
            value = value.float() * tensors[name + SCALE].float()[:, None]
        out[name] = value.float()
    return out


def export(net: DraftNet, dtype: str, path: Path, meta: dict) -> Path:
    """``path``/drafter.safetensors (trainable tensors in ``dtype`` + ``vocab``) and
    ``path``/drafter.json."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = pack_tensors(net.state_dict(), dtype)
    tensors["vocab"] = net.vocab.to(torch.int32).cpu()
    save_file(tensors, str(path / "drafter.safetensors"))
    (path / "drafter.json").write_text(json.dumps({"format": FORMAT, "spec": net.spec.to_dict(), **meta}, indent=2))
    return path


def convert_drafter(source: Path, out: Path, dtype: str) -> dict:
    """Store a drafter's tensors in another dtype (e.g. ``int8`` for the repository); its
    drafter.json is kept, with the conversion recorded. Returns the new drafter.json."""
    meta = json.loads((Path(source) / "drafter.json").read_text())
    tensors = load_file(str(Path(source) / "drafter.safetensors"))
    packed = pack_tensors(unpack_tensors(tensors), dtype)
    packed["vocab"] = tensors["vocab"]
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(packed, str(Path(out) / "drafter.safetensors"))
    meta.setdefault("conversions", []).append({"from": meta.get("stored_dtype", meta.get("training", {}).get("dtype")), "to": dtype})
    meta["stored_dtype"] = dtype
    (Path(out) / "drafter.json").write_text(json.dumps(meta, indent=2))
    return meta


def load_drafter_net(path: Path, target) -> tuple[DraftNet, dict]:
    """A drafter made by ``export``, bound to ``target`` (its embedding and head rows)."""
    meta_path, weights = Path(path) / "drafter.json", Path(path) / "drafter.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path}: no drafter.json / drafter.safetensors (made by `cosine distill`)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: drafter format {meta.get('format')} (this version reads {FORMAT})")
    spec = DraftSpec.from_dict(meta["spec"])
    config = target.config
    if (spec.hidden, spec.vocab_size) != (config.hidden_size, config.vocab_size):
        raise ValueError(f"{path}: made for a target of width {spec.hidden} and vocabulary {spec.vocab_size}, not {config.hidden_size} / {config.vocab_size}")
    stored = load_file(str(weights))
    vocab = stored["vocab"]
    tensors = unpack_tensors(stored)
    embedding = target.get_input_embeddings().weight
    net = DraftNet(spec, embedding, vocab).to(embedding.device)
    net.load_state_dict({k: v.to(embedding.dtype) for k, v in tensors.items()}, strict=False)
    missing = set(net.state_dict()) - set(tensors)
    if missing:
        raise ValueError(f"{path}: tensors missing: {sorted(missing)[:5]}")
    return net.eval(), meta
