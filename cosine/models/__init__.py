"""Model loading (transformers checkpoints, GGUF with a safetensors cache) and the batched
model runner with per-request KV caches.

The package itself imports nothing heavy: ``cosine.models.files`` (paths of converted models,
tokenizers, model configs) is used by processes that never load torch — the router, the
coordinator — while ``loading`` and ``runner`` bring torch and transformers' modelling code."""
