"""Single-process speculative decoding (the local engine) against the target alone.

Measured in one run, same model, dtype, threads and prompts (bench/prompts.jsonl, chat template):

- ``target``: transformers ``generate`` (greedy, KV cache, batch 1), one request at a time;
- ``target-batched``: the same requests in one left-padded ``generate`` batch;
- for each drafter configuration, the local engine one request at a time (``max_batch=1``) and,
  with ``--concurrency N``, N requests sharing each verification pass.

Reported per configuration: speedup over ``target`` (single stream: total latency ratio),
throughput ratio over ``target-batched`` (concurrent runs), mean accepted tokens per round,
acceptance per draft position, where a round's time goes (drafting / verification /
acceptance), the lossless check (outputs identical to ``target``), and the expected speedup of
the independence model in bench.md, S = (1 - a^(g+1)) / ((1 - a)(g c + v)), from the measured
acceptance a, mean window g, drafter cost c and verification cost v.

Warm-up (one short request per system) is excluded. Repeats take the median per request.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import (
    OtherCpu,
    add_model_options,
    chat_ids,
    load_prompts,
    load_target,
    median,
    report_other_cpu,
    setup_torch,
    stamp,
    write_result,
)

from cosine.core.protocol import eos_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.drafters.model import ModelDrafter, early_exit_model, layer_skip_model
from cosine.engine import GenerationRequest, LocalEngine
from cosine.models.runner import ModelRunner
from cosine.policy.window import WindowPolicy


def drafter_sets(model):
    early_exit = ModelDrafter("early-exit-2", ModelRunner(early_exit_model(model, 2)))
    skip = ModelDrafter("skip-15", ModelRunner(layer_skip_model(model, [15])))
    lookup = PromptLookupDrafter()
    return {
        "early-exit-2": ("chain", [early_exit]),
        "prompt-lookup": ("chain", [lookup]),
        "skip-15": ("chain", [skip]),
        "tree(early-exit-2+prompt-lookup)": ("tree", [early_exit, lookup]),
    }


def run_target(model, prompts, max_tokens):
    latencies, outputs = [], []
    for ids in prompts:
        began = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens, do_sample=False)
        latencies.append(time.perf_counter() - began)
        outputs.append(out[0, len(ids) :].tolist())
    return latencies, outputs


def run_target_batched(model, prompts, max_tokens, pad_id):
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])  # from lengths
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    seconds = time.perf_counter() - began
    generated = 0
    for row in out[:, longest:].tolist():
        generated += next((i + 1 for i, t in enumerate(row) if t == pad_id), len(row))
    return seconds, generated


def run_engine(target_model, tokenizer, mode, drafters, prompts, max_tokens, max_batch, window):
    engine = LocalEngine(ModelRunner(target_model), tokenizer, drafters, mode=mode, max_batch=max_batch, window=window)
    eos = eos_token_ids(tokenizer, target_model.config)
    engine.generate([GenerationRequest("warm", tuple(prompts[0]), SamplingParams(), StopRules(4, eos))])
    engine.stats = type(engine.stats)()
    requests = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(), StopRules(max_tokens, eos)) for i, p in enumerate(prompts)]
    began = time.perf_counter()
    if max_batch == 1:
        results = [engine.generate([r])[0] for r in requests]
    else:
        results = engine.generate(requests)
    return time.perf_counter() - began, results, engine.stats, engine.target.stats


def drafter_cost(drafters, target_model, prompt) -> float:
    """Cost of one drafting step relative to one target decode step (c in bench.md)."""
    from cosine.models.runner import ForwardItem

    def step_time(runner):
        runner.forward([ForwardItem("c", prompt)])
        times = []
        for i in range(7):
            began = time.perf_counter()
            runner.forward([ForwardItem("c", list(prompt) + [198] * (i + 1))])
            times.append(time.perf_counter() - began)
        return median(times)

    target_step = step_time(ModelRunner(target_model))
    model_drafters = [d for d in drafters if isinstance(d, ModelDrafter)]
    return sum(step_time(ModelRunner(d.runner.model)) for d in model_drafters) / target_step


def expected_speedup(alpha: float, window: float, cost: float, verify: float) -> float | None:
    if alpha >= 1.0 or window <= 0:
        return None
    return (1 - alpha ** (window + 1)) / ((1 - alpha) * (window * cost + verify))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--limit", type=int, default=8, help="number of prompts (default %(default)s)")
    parser.add_argument("--concurrency", type=int, default=0, help="also run N requests per verification batch")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--configs", default="", help="comma-separated subset of drafter configurations")
    parser.add_argument("--name", default="local-engine", help="result file name in bench/results")
    parser.add_argument("--verify-cost", type=float, default=1.6, help="v of bench.md (bench/verify_cost.py measures it)")
    args = parser.parse_args()
    setup_torch(args.threads)
    loaded = load_target(args)
    model, tokenizer = loaded.model, loaded.tokenizer
    items = load_prompts(limit=args.limit)
    prompts = [chat_ids(tokenizer, item["messages"]) for item in items]
    other = OtherCpu()
    run_target(model, prompts[:1], 4)  # warm-up
    target_latencies, references = run_target(model, prompts, args.max_tokens)
    target_total = sum(target_latencies)
    target_tokens = sum(len(r) for r in references)
    print(f"target: {target_total:.1f}s for {target_tokens} tokens ({target_tokens / target_total:.1f} tok/s)")
    result = {"stamp": stamp(), "args": vars(args), "target": {"seconds": target_total, "tokens": target_tokens}, "systems": {}}
    if args.concurrency:
        batched_s, batched_tokens = run_target_batched(model, prompts[: args.concurrency], args.max_tokens, tokenizer.pad_token_id)
        result["target_batched"] = {"seconds": batched_s, "tokens": batched_tokens, "tokens_per_s": batched_tokens / batched_s}
        print(f"target-batched (N={args.concurrency}): {batched_tokens / batched_s:.1f} tok/s")
    wanted = [c for c in args.configs.split(",") if c]
    window = WindowPolicy(args.window, 1, max(8, args.window))
    for name, (mode, drafters) in drafter_sets(model).items():
        if wanted and name not in wanted:
            continue
        seconds, results, stats, runner_stats = run_engine(model, tokenizer, mode, drafters, prompts, args.max_tokens, 1, window)
        generated = sum(r.generated_tokens for r in results)
        identical = sum(r.token_ids == ref[: len(r.token_ids)] for r, ref in zip(results, references))
        alpha = sum(r.accepted_tokens for r in results) / max(1, sum(r.draft_tokens for r in results))
        mean_window = sum(r.draft_tokens for r in results) / max(1, sum(r.rounds for r in results))
        cost = drafter_cost(drafters, model, prompts[0])
        round_time = stats.draft_seconds + stats.verify_seconds + stats.accept_seconds
        entry = {
            "mode": mode,
            "speedup_vs_target": target_total / seconds,
            "tokens_per_s": generated / seconds,
            "identical_to_target": f"{identical}/{len(results)}",
            "acceptance_rate": alpha,
            "mean_accepted_per_round": sum(r.accepted_tokens for r in results) / max(1, sum(r.rounds for r in results)),
            "acceptance_by_position": stats.acceptance_by_position(),
            "mean_draft_tokens_per_round": mean_window,
            "drafter_cost_c": cost,
            "expected_speedup_bound": expected_speedup(alpha, mean_window, cost, args.verify_cost),
            "round_time_share": {
                "drafting": stats.draft_seconds / round_time,
                "verification": stats.verify_seconds / round_time,
                "acceptance_and_bookkeeping": stats.accept_seconds / round_time,
            },
            "kv_cache_bookkeeping_share_of_round": runner_stats.bookkeeping_seconds / round_time,
            "median_latency_s": median(r.seconds for r in results),
            "median_ttft_s": median(r.first_token_seconds for r in results),
        }
        if args.concurrency:
            conc_s, conc_results, _, _ = run_engine(model, tokenizer, mode, drafters, prompts[: args.concurrency], args.max_tokens, args.concurrency, window)
            conc_tokens = sum(r.generated_tokens for r in conc_results)
            entry["concurrent_tokens_per_s"] = conc_tokens / conc_s
            entry["throughput_vs_target_batched"] = (conc_tokens / conc_s) / result["target_batched"]["tokens_per_s"]
        result["systems"][name] = entry
        print(
            f"{name:34s} speedup {entry['speedup_vs_target']:.2f}x  accept {alpha:.2f}  "
            f"per-round {entry['mean_accepted_per_round']:.2f}  c={cost:.2f}  identical {entry['identical_to_target']}"
            + (f"  conc {entry['throughput_vs_target_batched']:.2f}x batched" if args.concurrency else "")
        )
    result["other_cpu_share"] = other.share()
    report_other_cpu(result["other_cpu_share"])
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
