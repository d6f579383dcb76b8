"""``cosine demo``: the whole system on a few chat prompts, against the target alone.

Starts the embedded valkey-server and every stage as its own process (as ``cosine serve``),
sends the prompts as a plain Redis client would, and compares with the target model decoding
alone (transformers ``generate``, greedy) in this process: speedup, acceptance, and whether the
outputs are identical (they must be).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import redis
import torch

from cosine.bus import redacted_url
from cosine.client import Client
from cosine.config import Config
from cosine.core.protocol import prompt_token_ids
from cosine.models.loading import load_model
from cosine.serve import Supervisor
from cosine.wire.keys import ROLES

DEMO_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences why the sky is blue.",
    "What is 15% of 240? Show the steps.",
    "Summarize: The city council met on Tuesday to discuss the new park. Residents asked for more "
    "trees and a playground. The council agreed to plant trees this spring and to build the "
    "playground next year.",
)
ANSWER_TIMEOUT_S = 120.0  # with no output entry for this long, the demo gives up


def run_demo(config: Config, config_path: Path | None, max_tokens: int, echo: Callable[[str], None]) -> None:
    # The baseline is plain transformers: no oneDNN reordering (the pipeline's verifier has it).
    torch.set_num_threads(config.model.threads)
    target = load_model(config.model.target_path, cache_dir=config.model.cache_path, device=config.model.device, dtype=config.model.dtype)
    tokenizer, model = target.tokenizer, target.model
    echo(f"target {config.model.target_path} ({config.model.dtype}, {config.model.device})")
    echo(f"drafters: {', '.join(f'{d.name} ({d.kind}, expert {d.expert})' for d in config.drafters)}")
    supervisor = Supervisor(config, config.redis.url or None, config_path, verifiers=1, drafters_per_expert=1, verbose=False)
    echo(supervisor.describe())
    url = supervisor.start()
    try:
        _wait_for_workers(redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5), config.redis.namespace)
        echo(f"pipeline up on {redacted_url(url)}\n")
        client = Client(url, config.redis.namespace, timeout=ANSWER_TIMEOUT_S)
        _ask(client, "warm-up", DEMO_PROMPTS[0], 4)
        # The baseline warmed up like the pipeline (its first call pays one-off set-up costs).
        warm = prompt_token_ids(tokenizer, messages=[{"role": "user", "content": DEMO_PROMPTS[0]}])
        with torch.inference_mode():
            model.generate(torch.tensor([warm]), attention_mask=torch.ones(1, len(warm), dtype=torch.long), max_new_tokens=4, do_sample=False)
        baseline_s = pipeline_s = 0.0
        identical = drafted = accepted = 0
        by_drafter: dict[str, list[int]] = {}
        for index, prompt in enumerate(DEMO_PROMPTS):
            ids = prompt_token_ids(tokenizer, messages=[{"role": "user", "content": prompt}])
            began = time.perf_counter()
            with torch.inference_mode():
                output = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens, do_sample=False)
            baseline_s += time.perf_counter() - began
            began = time.perf_counter()
            final = _ask(client, f"demo-{index}-{int(time.time())}", prompt, max_tokens)
            pipeline_s += time.perf_counter() - began
            tokens = final.token_ids
            identical += tokens == output[0, len(ids) :].tolist()[: len(tokens)]
            drafted += final.draft_tokens
            accepted += final.accepted_tokens
            for name, counts in final.drafters.items():
                mine = by_drafter.setdefault(name, [0, 0])
                mine[0] += counts["drafted"]
                mine[1] += counts["accepted"]
            echo(f"> {prompt[:72]}\n{final.text.strip()}")
            echo(f"  [{final.generated_tokens} tokens in {final.rounds} rounds, {final.accepted_tokens}/{final.draft_tokens} drafted tokens accepted]\n")
        echo(
            f"CoSine vs the target alone: {baseline_s / pipeline_s:.2f}x ({baseline_s:.1f}s -> {pipeline_s:.1f}s); "
            f"acceptance {accepted / max(1, drafted):.0%}; outputs identical to the target: {identical}/{len(DEMO_PROMPTS)}"
        )
        if by_drafter:
            echo("who drafted what (accepted / drafted tokens): " + ", ".join(f"{name} {a}/{d}" for name, (d, a) in sorted(by_drafter.items())))
    finally:
        supervisor.stop()


def _wait_for_workers(client: redis.Redis, namespace: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        roles = {k.decode().removeprefix(namespace).split(":")[1] for k in client.scan_iter(match=f"{namespace}live:*")}
        if set(ROLES) <= roles:
            return
        time.sleep(0.2)
    raise TimeoutError("the pipeline's workers did not come up")


def _ask(client: Client, request_id: str, prompt: str, max_tokens: int) -> dict:
    # The client reads in short blocks, so a quiet spell longer than the connection's socket
    # time-out (a long prefill, a restarting worker) is waited out, not raised.
    return client.generate(messages=[{"role": "user", "content": prompt}], request_id=request_id, max_tokens=max_tokens)
