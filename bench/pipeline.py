"""The Redis Streams pipeline against the single-process local engine, and its control plane.

All in one run, same prompts (bench/prompts.jsonl), same drafters (config: early-exit-2 for the
"general" expert), greedy, on this machine:

1. ``local``: the in-process reference engine (one process, --threads torch threads), one
   request at a time: time to first token (TTFT) and per-request latency.
2. ``pipeline``: ``cosine serve``'s processes (embedded valkey-server, router, coordinator,
   fusion, verifier, drafter; one torch thread per model process) fed by a plain Redis client:
   the same figures one request at a time, then N concurrent requests (throughput, p50/p99).
3. ``pipeline-instant``: the same pipeline with an instant test-only target (a 2-layer,
   32-wide random-weight Llama with the demo tokenizer; drafter: its first layer), so model
   compute is ~0, drafting with prompt lookup (no model): rounds per second measure the control
   plane (Redis hops, msgpack, Lua, detokenization, plus one ~1 ms forward of the tiny model).
   Control-plane share of a real round = time per instant round / time per real round.

Warm-up requests are excluded. Results: bench/results/pipeline-latest.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import redis
import torch
from common import OtherCpu, add_model_options, chat_ids, load_prompts, load_target, median, setup_torch, stamp, write_result

from cosine.config import load_config
from cosine.core.protocol import eos_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.engine import GenerationRequest, build_engine
from cosine.factory import build_stack
from cosine.serve import Supervisor

CONFIG = """
[model]
target = "{target}"
cache_dir = "{cache_dir}"
threads = {threads}
[speculation]
window = 4
max_batch = 16
[pipeline]
batch_wait_ms = {batch_wait_ms}
[router]
default_experts = ["general"]
max_experts = 1
{drafter}
"""
MODEL_DRAFTER = """[[drafters]]
name = "early-exit"
kind = "early-exit"
layers = 2
expert = "general"
"""
# The instant run drafts with prompt lookup, so no model forward is spent on drafting either.
MODEL_FREE_DRAFTER = """[[drafters]]
name = "prompt-lookup"
kind = "prompt-lookup"
expert = "general"
"""


def make_instant_model(directory: Path, tokenizer) -> Path:
    """A random-weight 2-layer Llama with the demo tokenizer: forward passes take ~1 ms."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def start_pipeline(config_path: Path, verbose: bool = False) -> tuple[Supervisor, str]:
    config = load_config(config_path, environ={})
    supervisor = Supervisor(config, None, config_path, verifiers=1, drafters_per_expert=1, verbose=verbose)
    url = supervisor.start()
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        roles = {k.decode().split(":")[2] for k in client.scan_iter(match="cosine:live:*")}
        if {"router", "coordinator", "fusion", "verifier", "drafter"} <= roles:
            return supervisor, url
        time.sleep(0.2)
    supervisor.stop()
    raise TimeoutError("pipeline did not come up")


def run_requests(client: redis.Redis, messages_list, max_tokens: int, tag: str) -> list[dict]:
    """Submit all at once; return per request: ttft, latency, final entry."""
    started = {}
    for index, messages in enumerate(messages_list):
        request_id = f"{tag}-{index}"
        started[request_id] = time.perf_counter()
        client.xadd("cosine:requests", {"id": request_id, "messages": json.dumps(messages), "max_tokens": str(max_tokens)})
    results, cursors, first = {}, {f"cosine:out:{r}": "0-0" for r in started}, {}
    while cursors:
        reply = client.xread(cursors, block=1000)
        now = time.perf_counter()
        for stream, entries in reply or []:
            stream = stream.decode()
            request_id = stream.split("out:", 1)[1]
            for entry_id, fields in entries:
                cursors[stream] = entry_id
                first.setdefault(request_id, now)
                if fields[b"type"] == b"final":
                    final = {k.decode(): v.decode() for k, v in fields.items()}
                    results[request_id] = {"ttft_s": first[request_id] - started[request_id], "latency_s": now - started[request_id], "final": final}
                    del cursors[stream]
    return [results[r] for r in started]


def summarise(results: list[dict], wall_s: float) -> dict:
    latencies = sorted(r["latency_s"] for r in results)
    tokens = sum(int(r["final"]["generated_tokens"]) for r in results)
    rounds = sum(int(r["final"]["rounds"]) for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "rounds": rounds,
        "wall_s": wall_s,
        "tokens_per_s": tokens / wall_s,
        "rounds_per_s": rounds / wall_s,
        "median_ttft_s": median(r["ttft_s"] for r in results),
        "median_latency_s": median(latencies),
        "p99_latency_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "acceptance_rate": sum(int(r["final"]["accepted_tokens"]) for r in results) / max(1, sum(int(r["final"]["draft_tokens"]) for r in results)),
    }


def pipeline_runs(config_path: Path, prompts, max_tokens: int, concurrency: int) -> dict:
    supervisor, url = start_pipeline(config_path)
    try:
        client = redis.Redis.from_url(url)
        run_requests(client, prompts[:1], 8, "warm")
        single, began = [], time.perf_counter()
        for index, messages in enumerate(prompts):
            single += run_requests(client, [messages], max_tokens, f"single{index}")
        single_summary = summarise(single, time.perf_counter() - began)
        batch = (prompts * (concurrency // len(prompts) + 1))[:concurrency]
        before = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
        began = time.perf_counter()
        concurrent = run_requests(client, batch, max_tokens, "concurrent")
        concurrent_summary = summarise(concurrent, time.perf_counter() - began)
        after = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
        stats = {k: v - before.get(k, 0) for k, v in after.items()}  # the concurrent run only
        return {"single": single_summary, "concurrent": concurrent_summary, "stats": stats, "outputs": [json.loads(r["final"]["token_ids"]) for r in single]}
    finally:
        supervisor.stop()


def local_run(config_path: Path, prompts_ids, max_tokens: int) -> dict:
    config = load_config(config_path, environ={})
    stack = build_stack(config)
    engine = build_engine(config, stack)
    eos = eos_token_ids(stack.target.tokenizer, stack.target.model.config)
    engine.generate([GenerationRequest("warm", tuple(prompts_ids[0]), SamplingParams(), StopRules(8, eos))])
    results, began = [], time.perf_counter()
    for index, ids in enumerate(prompts_ids):
        results += engine.generate([GenerationRequest(f"l{index}", tuple(ids), SamplingParams(), StopRules(max_tokens, eos))])
    wall = time.perf_counter() - began
    return {
        "wall_s": wall,
        "median_ttft_s": median(r.first_token_seconds for r in results),
        "median_latency_s": median(r.seconds for r in results),
        "tokens_per_s": sum(r.generated_tokens for r in results) / wall,
        "rounds": sum(r.rounds for r in results),
        "outputs": [r.token_ids for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=int, default=100)
    parser.add_argument("--instant-only", action="store_true", help="the control plane alone (pipeline-instant), with --max-tokens per request")
    parser.add_argument("--name", default="pipeline")
    args = parser.parse_args()
    setup_torch(args.threads)
    loaded = load_target(args)
    items = load_prompts(limit=args.limit)
    prompts = [item["messages"] for item in items]
    prompt_ids = [chat_ids(loaded.tokenizer, m) for m in prompts]
    scratch = Path(tempfile.mkdtemp(prefix="cosine-bench-"))
    cache_dir = str(Path(args.cache_dir).expanduser())
    real = scratch / "real.toml"
    real.write_text(CONFIG.format(target=str(Path(args.target).expanduser()), cache_dir=cache_dir, threads=args.threads, batch_wait_ms=args.batch_wait_ms, drafter=MODEL_DRAFTER))
    instant_dir = make_instant_model(scratch / "instant-model", loaded.tokenizer)
    instant = scratch / "instant.toml"
    instant.write_text(CONFIG.format(target=str(instant_dir), cache_dir=cache_dir, threads=1, batch_wait_ms=args.batch_wait_ms, drafter=MODEL_FREE_DRAFTER))
    del loaded
    other = OtherCpu()
    result = {"stamp": stamp(), "args": vars(args)}
    if args.instant_only:
        result["pipeline-instant"] = runs = pipeline_runs(instant, prompts, args.max_tokens, args.concurrency)
        runs.pop("outputs")
        result["other_cpu_share"] = other.share()
        for mode in ("single", "concurrent"):
            row = runs[mode]
            print(f"instant {mode}: {row['rounds_per_s']:.0f} rounds/s, {1000 / row['rounds_per_s']:.2f} ms per round ({row['rounds']} rounds)")
        print(f"wrote {write_result(args.name, result)}")
        return
    result["local"] = local_run(real, prompt_ids, args.max_tokens)
    print(f"local engine: median TTFT {result['local']['median_ttft_s'] * 1000:.0f} ms, median latency {result['local']['median_latency_s']:.2f} s")
    result["pipeline"] = pipeline_runs(real, prompts, args.max_tokens, args.concurrency)
    result["pipeline-instant"] = pipeline_runs(instant, prompts, args.max_tokens, args.concurrency)
    identical = sum(a == b for a, b in zip(result["local"].pop("outputs"), result["pipeline"].pop("outputs")))
    result["pipeline-instant"].pop("outputs")
    single, instant_single = result["pipeline"]["single"], result["pipeline-instant"]["single"]
    real_round = single["wall_s"] / single["rounds"]
    instant_round = instant_single["wall_s"] / instant_single["rounds"]
    result["summary"] = {
        "pipeline_vs_local_ttft": single["median_ttft_s"] / result["local"]["median_ttft_s"],
        "pipeline_vs_local_latency": single["median_latency_s"] / result["local"]["median_latency_s"],
        "pipeline_outputs_identical_to_local": f"{identical}/{len(prompts)}",
        "instant_rounds_per_s_single": instant_single["rounds_per_s"],
        "instant_rounds_per_s_concurrent": result["pipeline-instant"]["concurrent"]["rounds_per_s"],
        "control_plane_ms_per_round": instant_round * 1000,
        "real_round_ms": real_round * 1000,
        "control_plane_share_of_round": instant_round / real_round,
        "concurrent_vs_single_throughput": result["pipeline"]["concurrent"]["tokens_per_s"] / single["tokens_per_s"],
        "mean_verify_batch": result["pipeline"]["stats"].get("verify_items", 0) / max(1, result["pipeline"]["stats"].get("verify_batches", 1)),
    }
    result["other_cpu_share"] = other.share()  # includes the pipeline's own worker processes
    for key, value in result["summary"].items():
        print(f"{key:40s} {value if isinstance(value, str) else round(value, 3)}")
    print(f"CPU used by other processes, this run's own pipeline workers included: {result['other_cpu_share']:.0%}")
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
