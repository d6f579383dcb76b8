"""``cosine demo``: the target alone vs. speculative decoding on a few chat prompts."""

from __future__ import annotations

import time
from typing import Callable

import torch

from cosine.config import Config
from cosine.engine import GenerationRequest
from cosine.factory import build_engine, build_stack
from cosine.requests import eos_token_ids, prompt_token_ids
from cosine.spec.sampling import SamplingParams
from cosine.spec.stopping import StopRules

DEMO_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "What is 15% of 240? Show the steps.",
    "Summarize: The city council met on Tuesday to discuss the new park. Residents asked for more "
    "trees and a playground. The council agreed to plant trees this spring and to build the "
    "playground next year.",
)


def run_demo(config: Config, max_tokens: int, echo: Callable[[str], None]) -> None:
    stack = build_stack(config)
    tokenizer, model = stack.target.tokenizer, stack.target.model
    eos = eos_token_ids(tokenizer, model.config)
    prompts = [prompt_token_ids(tokenizer, messages=[{"role": "user", "content": p}]) for p in DEMO_PROMPTS]
    echo(f"target {config.model.target_path} ({config.model.dtype}, {config.model.device}, {config.model.threads} threads)")
    echo(f"drafters: {', '.join(d.name for d in stack.drafters)}; mode {config.speculation.mode}")
    engine = build_engine(config, stack)
    warm = GenerationRequest("warm", tuple(prompts[0]), SamplingParams(), StopRules(4, eos))
    engine.generate([warm])
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)
    baseline_s = spec_s = 0.0
    identical = 0
    for index, ids in enumerate(prompts):
        began = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        baseline_s += time.perf_counter() - began
        reference = output[0, len(ids) :].tolist()
        request = GenerationRequest(f"demo-{index}", tuple(ids), SamplingParams(), StopRules(max_tokens, eos))
        began = time.perf_counter()
        result = engine.generate([request])[0]
        spec_s += time.perf_counter() - began
        identical += result.token_ids == reference[: len(result.token_ids)]
        rate = result.accepted_tokens / max(result.draft_tokens, 1)
        echo(f"\n> {DEMO_PROMPTS[index][:70]}\n{result.text.strip()}")
        echo(f"  [{result.generated_tokens} tokens, {result.rounds} rounds, acceptance {rate:.0%}]")
    echo(
        f"\nspeculative vs target alone (transformers generate): {baseline_s / spec_s:.2f}x "
        f"({baseline_s:.1f}s -> {spec_s:.1f}s); outputs identical to the target: {identical}/{len(prompts)}"
    )
