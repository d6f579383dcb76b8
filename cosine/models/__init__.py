"""Model loading (transformers checkpoints, GGUF with a safetensors cache) and the batched
model runner with per-request KV caches."""

from cosine.models.loading import LoadedModel, ModelNotFoundError, load_model
from cosine.models.runner import ForwardItem, ModelRunner

__all__ = ["ForwardItem", "LoadedModel", "ModelNotFoundError", "ModelRunner", "load_model"]
