"""What a process needs of a model without its weights: where its files are, its tokenizer and
its configuration, loaded without importing torch.

The router and the coordinator tokenize, detokenize and read the context limit; importing torch
for that (transformers' ``AutoTokenizer`` and ``AutoConfig`` do) costs each of them ~200 MB
resident. A tokenizer saved as ``tokenizer.json`` with the generic fast-tokenizer class — every
GGUF conversion CoSine writes, and most checkpoints — loads through transformers' tokenizers
backend alone; any other class goes through ``AutoTokenizer`` as before.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

CONVERTED_DIR = "converted"
CONVERSION_MARK = "cosine_conversion.json"
# Tokenizer classes that are transformers' generic fast tokenizer over tokenizer.json.
_GENERIC_TOKENIZERS = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a local path nor a hub id already in the local cache."""


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def converted_location(gguf_path: Path, cache_dir: str | os.PathLike) -> tuple[Path, str]:
    """Where the safetensors copy of a GGUF file lives (converted or not yet), and the file's hash."""
    digest = file_hash(gguf_path)
    return Path(cache_dir).expanduser() / CONVERTED_DIR / f"{gguf_path.stem}-{digest[:16]}", digest


def cached_hub_snapshot(model_id: str) -> Path:
    """A hub model id already in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError) as error:
        raise ModelNotFoundError(
            f"model {model_id!r} is not a local path and is not in the local Hugging Face cache; "
            "CoSine never downloads from a hub at run time: put the model on disk and pass its path"
        ) from error


class NotConverted(ModelNotFoundError):
    """A GGUF file whose safetensors copy is not made yet: ``cosine.models.loading.resolve_model``
    makes it (with torch), ``cosine models pull`` does so ahead of time."""

    def __init__(self, path: Path, directory: Path, digest: str) -> None:
        super().__init__(f"GGUF file {path} is not converted to safetensors yet (`cosine models pull` converts it)")
        self.path, self.directory, self.digest = path, directory, digest


def model_directory(source: str | os.PathLike, cache_dir: str | os.PathLike) -> Path:
    """The directory transformers loads a model source from: a directory as it is, a GGUF file's
    safetensors copy (``NotConverted`` until it is made), or a hub id's snapshot already in the
    local cache."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} not found (run `cosine models pull` for the demo target)")
        directory, digest = converted_location(path, cache_dir)
        if is_converted(directory):
            return directory
        raise NotConverted(path, directory, digest)
    return path if path.is_dir() else cached_hub_snapshot(str(source))


def is_converted(directory: Path) -> bool:
    return (directory / CONVERSION_MARK).is_file()


def load_tokenizer(directory: Path):
    """The checkpoint's tokenizer; torch stays unloaded when it is the generic fast tokenizer."""
    try:
        settings = json.loads((directory / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        settings = {}
    if (directory / "tokenizer.json").is_file() and settings.get("tokenizer_class") in _GENERIC_TOKENIZERS:
        from transformers.tokenization_utils_tokenizers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(directory, local_files_only=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def read_model_config(directory: Path) -> SimpleNamespace:
    """The checkpoint's config.json as attributes (what the serving stages read of it:
    ``max_position_embeddings``, ``eos_token_id``, ``vocab_size``)."""
    try:
        values = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"no readable config.json in {directory}: {error}") from error
    if not isinstance(values, dict):
        raise ModelNotFoundError(f"{directory / 'config.json'} is not a JSON object")
    text = values.get("text_config")
    if isinstance(text, dict):  # multimodal checkpoints keep the language model's settings here
        values = {**values, **text}
    return SimpleNamespace(**values)
