"""The router, coordinator and fusion stages never load torch: each such process held ~200 MB
more for it (a default `cosine serve` on two cores was 3.5 GB resident, the goal 2.5 GB)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cosine.core.tree import DraftChain, merge_chains
from cosine.wire import Draft
from cosine.wire.convert import candidate_to_tree, draft_to_chain, probs_to_bytes, tree_to_candidate


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_the_light_stage_modules_import_without_torch():
    """The gateway, router, coordinator and fusion never load torch (nor transformers' model
    code): import-linter's contract checks the package's own imports, this checks what the
    third-party packages they use import in turn."""
    code = ("import sys\nimport cosine.workers.router, cosine.workers.coordinator, cosine.workers.fusion, cosine.gateway\n"
            "print(sorted(m for m in ('torch', 'transformers.modeling_utils') if m in sys.modules))")
    assert run(code) == "[]"


@pytest.fixture
def generic_tokenizer_dir(tmp_path):
    """A checkpoint directory with a small generic fast tokenizer, a chat template and a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>", "hello", "world", "user", "assistant", ":", "\n"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 64, "eos_token_id": [0, 3], "vocab_size": 8}')
    return tmp_path


def test_a_generic_tokenizer_and_config_load_without_torch_and_as_transformers_loads_them(generic_tokenizer_dir):
    code = f"""
import sys, json
from pathlib import Path
from cosine.models.files import load_tokenizer, read_model_config
from cosine.core.protocol import eos_token_ids, prompt_token_ids
d = Path({str(generic_tokenizer_dir)!r})
t = load_tokenizer(d)
c = read_model_config(d)
out = [prompt_token_ids(t, "hello world hello"), prompt_token_ids(t, None, '[{{"role": "user", "content": "hello"}}]'),
       t.decode([2, 3, 0], skip_special_tokens=True), sorted(eos_token_ids(t, c)), c.max_position_embeddings, len(t)]
print(json.dumps([out, "torch" in sys.modules]))
"""
    import json

    from transformers import AutoTokenizer

    from cosine.core.protocol import prompt_token_ids

    light, loaded_torch = json.loads(run(code))
    assert not loaded_torch
    reference = AutoTokenizer.from_pretrained(generic_tokenizer_dir)
    assert light == [prompt_token_ids(reference, "hello world hello"),
                     prompt_token_ids(reference, None, '[{"role": "user", "content": "hello"}]'),
                     reference.decode([2, 3, 0], skip_special_tokens=True), [0, 3], 64, len(reference)]


def test_fusion_merges_sampled_drafts_as_numpy_rows_and_the_verifier_reads_the_same_tree():
    """Fusion now holds draft distributions as NumPy rows; the candidate it sends must be the one
    the torch path made."""
    rng = np.random.default_rng(0)
    probs = {name: rng.dirichlet(np.ones(12), size=3).astype(np.float32) for name in ("a", "b")}
    drafts = [Draft("r", 2, "general", name, rank, [1, 2, t], [0.9, 0.8, 0.7], probs_to_bytes(torch.from_numpy(probs[name])))
              for rank, (name, t) in enumerate((("a", 3), ("b", 4)))]
    light = [draft_to_chain(d) for d in drafts]
    assert all(isinstance(c.draft_probs, np.ndarray) for c in light)
    heavy = [DraftChain(c.tokens, c.confidences, torch.from_numpy(c.draft_probs), c.drafter) for c in light]
    sent = tree_to_candidate("r", 2, merge_chains(light))
    assert sent == tree_to_candidate("r", 2, merge_chains(heavy))
    tree = candidate_to_tree(sent, 12)  # the verifier makes a tensor of its array
    assert isinstance(tree.draft_probs, np.ndarray)
    assert torch.equal(torch.from_numpy(tree.draft_probs), merge_chains(heavy).draft_probs)
    assert tree.draft_probs.shape == (6, 12)  # every draw's row: two drafters, three tokens each


def test_one_resolver_finds_a_models_directory_for_workers_and_for_load_model(tmp_path, generic_tokenizer_dir):
    """A directory is used as it is; a GGUF file already converted resolves to its safetensors
    copy without torch; a missing GGUF file or an uncached hub id is a ModelNotFoundError."""
    from cosine.models.files import CONVERSION_MARK, ModelNotFoundError, converted_location, model_directory

    assert model_directory(generic_tokenizer_dir, tmp_path) == generic_tokenizer_dir
    with pytest.raises(ModelNotFoundError, match="cosine models pull"):
        model_directory(tmp_path / "absent.gguf", tmp_path)
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        model_directory("no-such-owner/no-such-model", tmp_path)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really a gguf file")
    converted, _ = converted_location(gguf, tmp_path / "cache")
    converted.mkdir(parents=True)
    (converted / CONVERSION_MARK).write_text("{}")
    code = f"""
import sys
from cosine.models.files import model_directory
print(model_directory({str(gguf)!r}, {str(tmp_path / 'cache')!r}), "torch" in sys.modules)
"""
    assert run(code) == f"{converted} False"
