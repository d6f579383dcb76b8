"""Model files for the stages that need a tokenizer but no weights (router, coordinator): loaded
without importing torch (see ``cosine.models.files``)."""

from __future__ import annotations

from pathlib import Path

from cosine.config import Config
from cosine.models import files
from cosine.models.files import load_tokenizer, read_model_config


def model_directory(config: Config) -> Path:
    try:
        return files.model_directory(config.model.target_path, config.model.cache_path)
    except files.NotConverted as missing:  # the first start on this host: converting the GGUF file takes torch, once
        from cosine.models.loading import convert_missing

        return convert_missing(missing)


def load_tokenizer_and_limits(config: Config):
    """The target's tokenizer, context limit and config, without loading its weights."""
    directory = model_directory(config)
    model_config = read_model_config(directory)
    tokenizer = load_tokenizer(directory)
    return tokenizer, int(model_config.max_position_embeddings), model_config


def expert_classifier(config: Config, vocab_size: int):
    """The router's cold-start classifier: per expert, the routing profiles of its drafters
    (profile.safetensors, summed); None when no drafter has one."""
    from cosine.drafters.profile import profile_classifier

    return profile_classifier(config.drafters, vocab_size, key=lambda spec: spec.expert)
