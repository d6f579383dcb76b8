"""`cosine distill` end to end on a tiny budget with the real target, then the drafter it made
drafting through the local engine: outputs identical to the target's greedy decoding."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import cache_dir
from tests.integration.harness import ROOT

pytestmark = pytest.mark.model


def test_distill_makes_a_drafter_that_drafts_losslessly(tmp_path, demo_target, chat_prompts, greedy_references):
    data = tmp_path / "data.jsonl"
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 30}, {"text": "A list keeps its items in order; a set does not. " * 25}]
    rows += [{"prompt": p} for p in ("Name three colours.", "What is a noun?", "Say hello in French.", "Count to five.")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\ntarget = "{demo_target.source}"\ncache_dir = "{cache_dir()}"\nthreads = 2\n')
    out = tmp_path / "drafter"
    command = [
        sys.executable, "-m", "cosine.cli", "distill", "--config", str(config), "--kind", "small", "--layers", "1", "--out", str(out),
        "--work", str(tmp_path / "work"), "--data", str(data), "--text-tokens", "600", "--chat-prompts", "4", "--answer-tokens", "12",
        "--seq-len", "64", "--vocab", "2048", "--vocab-corpus-tokens", "2000", "--epochs", "1", "--batch-size", "4",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])
    assert summary["data"]["answers"] == 4 and summary["data"]["text_tokens"] > 0
    meta = json.loads((out / "drafter.json").read_text())
    assert meta["spec"]["kind"] == "small" and meta["spec"]["reduced_vocab"] == 2048 and meta["training"]["steps"] >= 1
    # A bad --data file is refused with the line at fault, before the model is loaded.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n')
    refused = subprocess.run(command[:-2] + ["--data", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "bad.jsonl:1" in refused.stderr

    from cosine.drafters.distilled import SmallDrafter
    from cosine.engine import GenerationRequest, LocalEngine
    from cosine.models.runner import ModelRunner
    from cosine.requests import eos_token_ids
    from cosine.spec.sampling import SamplingParams
    from cosine.spec.stopping import StopRules
    from cosine.spec.window import WindowPolicy

    # `cosine drafters convert` stores it in int8 (the repository's form): about half the bytes.
    packed = tmp_path / "drafter-int8"
    converted = subprocess.run([sys.executable, "-m", "cosine.cli", "drafters", "convert", str(out), str(packed), "--dtype", "int8"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert (packed / "drafter.safetensors").stat().st_size < 0.6 * (out / "drafter.safetensors").stat().st_size
    assert json.loads((packed / "drafter.json").read_text())["stored_dtype"] == "int8"

    model, tokenizer = demo_target.model, demo_target.tokenizer
    drafter = SmallDrafter("tiny", packed, model, tokenizer)
    engine = LocalEngine(ModelRunner(model), tokenizer, [drafter], mode="chain", window=WindowPolicy(3, 1, 4, True), max_batch=4)
    eos = eos_token_ids(tokenizer, model.config)
    requests = [GenerationRequest(f"r{i}", tuple(chat_prompts[i]), SamplingParams(), StopRules(40, eos)) for i in range(4)]
    results = engine.generate(requests)
    for i, result in enumerate(results):
        assert list(result.token_ids) == greedy_references[i][: len(result.token_ids)]
        assert len(result.token_ids) == 40 or result.token_ids[-1] in eos
    assert engine.stats.drafted_at and engine.stats.drafted_at[0] > 0
