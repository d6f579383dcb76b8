"""Building the target, drafters and the local engine from a ``Config``."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cosine.config import Config, DrafterConfig
from cosine.drafters.base import Drafter
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.drafters.model import ModelDrafter, early_exit_model, layer_skip_model
from cosine.drafters.suffix import SuffixDrafter
from cosine.models.fusing import fuse_projections
from cosine.models.loading import LoadedModel, cpu_key, load_model, prepack_cpu_linears, remembered_cpu_linears
from cosine.models.runner import ModelRunner
from cosine.policy.routing import PromptClassifier

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stack:
    target: LoadedModel
    runner: ModelRunner
    drafters: list[Drafter]


def load_target(config: Config, threads: int | None = None, cpu_linear: str | None = None, fuse: bool = True) -> LoadedModel:
    """The target as the verifier runs it, with ``threads`` torch threads (default
    model.threads) and on a CPU with oneDNN linears or plain ones as ``cpu_linear`` (default
    model.cpu_linear) says; "auto" measures both; with its projections fused (``fuse``:
    cosine.models.fusing; off where the target's own layers are read, as distillation copies
    them). Baselines that must be plain transformers load with ``load_model``."""
    torch.set_num_threads(threads or config.model.threads)
    loaded = load_model(
        config.model.target_path, cache_dir=config.model.cache_path, device=config.model.device, dtype=config.model.dtype
    )
    if fuse:
        fuse_projections(loaded.model)  # before the linears are swapped for oneDNN's (cosine.models.fusing)
    cpu_linear = cpu_linear or config.model.cpu_linear
    if cpu_linear == "onednn":
        prepack_cpu_linears(loaded.model)
    elif cpu_linear == "auto" and loaded.model.device.type == "cpu":
        record = config.model.cache_path / "cpu_linear.json"
        remembered_cpu_linears(loaded.model, record, cpu_key(loaded.model, loaded.fingerprint))
    return loaded


def build_drafter(spec: DrafterConfig, target: LoadedModel | None, config: Config) -> Drafter:
    if spec.kind == "emulated":  # benchmarks and tests: cosine.emulate
        from cosine.emulate.build import emulated_drafter

        return emulated_drafter(spec, config, target.tokenizer if target is not None else target_tokenizer(config))
    if spec.kind == "prompt-lookup":
        return PromptLookupDrafter(spec.name, max_ngram=spec.max_ngram)
    if spec.kind == "suffix":
        return SuffixDrafter(spec.name, max_depth=spec.max_depth, max_tokens=spec.max_tokens)
    if spec.kind in ("small", "feature"):
        from cosine.drafters.distilled import FeatureDrafter, SmallDrafter

        kind = SmallDrafter if spec.kind == "small" else FeatureDrafter
        return kind(spec.name, spec.resolved_path, target.model, target.tokenizer, int8=spec.int8)
    if spec.kind == "early-exit":
        model = early_exit_model(target.model, spec.layers)
    elif spec.kind == "layer-skip":
        model = layer_skip_model(target.model, list(spec.skip))
    else:
        loaded = load_model(spec.model, cache_dir=config.model.cache_path, device=config.model.device, dtype=config.model.dtype)
        check_same_tokenizer(loaded.tokenizer, target.tokenizer, spec.name)
        model = loaded.model
    return ModelDrafter(spec.name, ModelRunner(model, max_cache_bytes=config.model.kv_cache_bytes), vocab_size=output_width(target.model))


def target_tokenizer(config: Config):
    """The target's tokenizer, without its weights (a GGUF target converted first, once)."""
    from cosine.models import files

    try:
        directory = files.model_directory(config.model.target_path, config.model.cache_path)
    except files.NotConverted as missing:
        from cosine.models.loading import convert_missing

        directory = convert_missing(missing)
    return files.load_tokenizer(directory)


def output_width(model) -> int:
    """The width of a model's next-token distribution (its lm_head's rows; the config's
    vocab_size where the head is not a plain weight)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else int(model.config.vocab_size)


def check_same_tokenizer(drafter_tokenizer, target_tokenizer, name: str) -> None:
    if drafter_tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise ValueError(f"drafter {name!r} does not share the target's tokenizer")


def build_stack(config: Config, drafter_names: list[str] | None = None) -> Stack:
    target = load_target(config)
    specs = [d for d in config.drafters if not drafter_names or d.name in drafter_names]
    if drafter_names and len(specs) != len(drafter_names):
        known = [d.name for d in config.drafters]
        raise ValueError(f"unknown drafter in {drafter_names}; configured: {known}")
    drafters = [build_drafter(spec, target, config) for spec in specs]
    runner = ModelRunner(target.model, max_cache_bytes=config.model.kv_cache_bytes)
    return Stack(target, runner, drafters)


def routing_classifier(config: Config, vocab_size: int, names: list[str] | None = None) -> PromptClassifier | None:
    """The cold-start classifier over the loaded drafters (``names``) with a routing profile,
    keyed by drafter name (the local engine routes over drafters)."""
    from cosine.drafters.profile import profile_classifier

    return profile_classifier([d for d in config.drafters if names is None or d.name in names], vocab_size)
