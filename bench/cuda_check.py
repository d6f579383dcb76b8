"""CUDA path check: the verifier's runner and the local engine on a GPU, against transformers.

    python bench/cuda_check.py [CACHE_DIR]

Loads the demo target on ``cuda`` (fp32 and bf16), runs the local engine (prompt lookup and an
early-exit drafter fused into a tree; batched and single) on chat prompts, and checks greedy
outputs against transformers ``generate`` on the same device and dtype; runs a seeded sampled
batch; prints times. Exits 1 if an output differs (fp32) or CUDA is missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from cosine.config import Config, ModelConfig
from cosine.core.protocol import eos_token_ids, prompt_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.drafters.model import ModelDrafter, early_exit_model
from cosine.engine import GenerationRequest, LocalEngine
from cosine.factory import load_target
from cosine.models.runner import ModelRunner
from cosine.policy.window import WindowPolicy

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    cache = Path(sys.argv[1] if len(sys.argv) > 1 else "~/.cache/cosine").expanduser()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())[:8]
    failures = 0
    for dtype in ("float32", "bfloat16"):
        config = Config(model=ModelConfig(device="cuda", dtype=dtype, cache_dir=str(cache)))
        target = load_target(config)
        model, tokenizer = target.model, target.tokenizer
        prompts = [prompt_token_ids(tokenizer, messages=[{"role": "user", "content": t}]) for t in texts]
        eos = eos_token_ids(tokenizer, model.config)
        references, began = [], time.perf_counter()
        for ids in prompts:
            with torch.inference_mode():
                out = model.generate(torch.tensor([ids], device="cuda"), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device="cuda"), max_new_tokens=64, do_sample=False)
            references.append(out[0, len(ids) :].tolist())
        target_s = time.perf_counter() - began
        drafters = [ModelDrafter("early-exit-4", ModelRunner(early_exit_model(model, 4))), PromptLookupDrafter()]
        engine = LocalEngine(ModelRunner(model), tokenizer, drafters, mode="tree", window=WindowPolicy(4, 1, 8, True), max_batch=8)
        for batch in (1, 8):
            began = time.perf_counter()
            requests = [GenerationRequest(f"g{batch}-{i}", tuple(p), SamplingParams(), StopRules(64, eos)) for i, p in enumerate(prompts)]
            results = engine.generate(requests) if batch > 1 else [engine.generate([r])[0] for r in requests]
            seconds = time.perf_counter() - began
            same = sum(list(r.token_ids) == ref[: len(r.token_ids)] for r, ref in zip(results, references))
            print(f"{dtype} engine batch {batch}: {same}/{len(prompts)} identical to generate; {seconds:.2f}s vs generate {target_s:.2f}s (one at a time)")
            if dtype == "float32" and same != len(prompts):
                failures += 1
        sampled = [GenerationRequest(f"s{i}", tuple(p), SamplingParams(temperature=0.8, top_p=0.95, seed=i), StopRules(32, eos)) for i, p in enumerate(prompts)]
        results = engine.generate(sampled)
        print(f"{dtype} sampled batch: {sum(len(r.token_ids) for r in results)} tokens, acceptance by position {[round(a, 2) for a in engine.stats.acceptance_by_position()][:4]}")
        del engine, drafters, model, target
        torch.cuda.empty_cache()
    print("CUDA path:", "ok" if not failures else f"{failures} mismatching runs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
