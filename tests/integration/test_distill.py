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

    from cosine.core.protocol import eos_token_ids
    from cosine.core.sampling import SamplingParams
    from cosine.core.stopping import StopRules
    from cosine.drafters.distilled import SmallDrafter
    from cosine.engine import GenerationRequest, LocalEngine
    from cosine.models.runner import ModelRunner
    from cosine.policy.window import WindowPolicy

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


def test_a_feature_drafter_gets_the_target_states_through_the_pipeline(tmp_path, demo_target, greedy_references, pipelines, embedded_url):
    # A tiny feature drafter for the real target, served by two drafter workers of one expert:
    # each round's job carries the states the verifier computed for what it committed, a worker
    # that missed a round reads the rows before it from Redis, and outputs stay the target's.
    from tests.integration.harness import Pipeline, final_of, read_output, submit, write_config

    data = tmp_path / "data.jsonl"
    rows = [{"text": "The quick brown fox jumps over the lazy dog. " * 30}] + [{"prompt": p} for p in ("Name three colours.", "Count to five.")]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    config = tmp_path / "distill.toml"
    config.write_text(f'[model]\ntarget = "{demo_target.source}"\ncache_dir = "{cache_dir()}"\nthreads = 2\n')
    out = tmp_path / "feature"
    command = [
        sys.executable, "-m", "cosine.cli", "distill", "--config", str(config), "--kind", "feature", "--out", str(out),
        "--work", str(tmp_path / "work"), "--data", str(data), "--text-tokens", "600", "--chat-prompts", "2", "--answer-tokens", "12",
        "--seq-len", "64", "--vocab", "2048", "--vocab-corpus-tokens", "2000", "--epochs", "1", "--batch-size", "4", "--unroll", "2",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    drafter = {"name": "feat", "kind": "feature", "path": str(out), "expert": "general"}
    # Affinity off: with it a request's rounds stay with the drafter that drafted its last one,
    # and no worker would miss a round.
    # Prompts in chunks of 16 positions: the first round's states come chunk by chunk.
    settings = {"affinity": False, "prefill_chunk": 16}
    pipeline = Pipeline(embedded_url, write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=[drafter], pipeline=settings))
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general", env={"COSINE_DEBUG": "1"})
    pipeline.start("drafter", "--expert", "general", env={"COSINE_DEBUG": "1"})
    pipeline.wait_live("drafter", 2)
    pipeline.wait_live("verifier", 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    ids = [submit(client, id=f"feat-{i}", messages=json.dumps([{"role": "user", "content": texts[i]}]), max_tokens=24) for i in range(3)]
    for index, request_id in enumerate(ids):
        final = final_of(read_output(client, request_id))
        tokens = json.loads(final["token_ids"])
        assert tokens == greedy_references[index][: len(tokens)] and (len(tokens) == 24 or tokens[-1] == 2), final
        assert int(final["draft_tokens"]) > 0, final  # drafted: the states reached the drafters
        assert client.exists(f"cosine:feat:{request_id}") == 0  # the states go with the request
    assert int(client.hget("cosine:stats", "prefill_chunks")) >= 3
    logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("drafter-*.log"))
    assert "feature rows read from Redis" in logs
    # Regression: a first round (no states yet) on a worker holding nothing failed every job.
    assert "failed to handle" not in logs and "dead-lettering" not in logs, logs[-3000:]
