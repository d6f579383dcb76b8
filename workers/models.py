"""Model files for the stages that need a tokenizer but no weights (router, coordinator): loaded
without importing torch (see ``cosine.models.files``)."""

from __future__ import annotations

from pathlib import Path

from cosine.config import Config
from cosine.models.files import ModelNotFoundError, cached_hub_snapshot, converted_location, is_converted, load_tokenizer, read_model_config


def model_directory(config: Config) -> Path:
    path = Path(config.model.target_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found (run `cosine models pull` for the demo target)")
        directory, _ = converted_location(path, config.model.cache_path)
        if is_converted(directory):
            return directory
        from cosine.models.loading import converted_gguf_dir  # first start: convert (loads torch once)

        return converted_gguf_dir(path, config.model.cache_path)
    return path if path.is_dir() else cached_hub_snapshot(config.model.target_path)


def load_tokenizer_and_limits(config: Config):
    """The target's tokenizer, context limit and config, without loading its weights."""
    directory = model_directory(config)
    model_config = read_model_config(directory)
    tokenizer = load_tokenizer(directory)
    return tokenizer, int(model_config.max_position_embeddings), model_config


def expert_classifier(config: Config, vocab_size: int):
    """The router's cold-start classifier: per expert, the routing profiles of its drafters
    (profile.safetensors, summed); None when no drafter has one."""
    from cosine.distill.profile import profile_classifier

    return profile_classifier(config.drafters, vocab_size, key=lambda spec: spec.expert)
