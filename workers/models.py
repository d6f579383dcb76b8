"""Model and tokenizer loading for the stages (thin wrappers over cosine.models)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer

from cosine.config import Config
from cosine.models.loading import ModelNotFoundError, converted_gguf_dir


def model_directory(config: Config) -> Path:
    path = Path(config.model.target_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found (run `cosine models pull` for the demo target)")
        return converted_gguf_dir(path, config.model.cache_path)
    return path


def load_tokenizer_and_limits(config: Config):
    """The target's tokenizer, context limit and config, without loading its weights."""
    directory = model_directory(config)
    model_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return tokenizer, int(model_config.max_position_embeddings), model_config


def expert_classifier(config: Config, vocab_size: int):
    """The router's cold-start classifier: per expert, the routing profiles of its drafters
    (profile.safetensors, summed); None when no drafter has one."""
    from cosine.distill.train import profile_classifier

    return profile_classifier(config.drafters, vocab_size, key=lambda spec: spec.expert)
