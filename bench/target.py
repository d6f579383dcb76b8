"""The `target` baseline: the target model alone, greedy autoregressive decoding, batch 1.

What is measured: for each prompt of bench/prompts.jsonl (chat template applied, generation
prompt appended), one ``model.generate(input_ids, do_sample=False, max_new_tokens=N)`` call with
transformers' KV cache, one request at a time. Per request:

- latency: wall time of the whole generate call (prefill + decode), ``time.perf_counter``;
- generated tokens: new ids returned (an end-of-sequence token, when emitted, is counted);
- tokens/s: generated tokens / latency;
- TTFT (time to first token): measured *inside the same generate call* with a streamer that
  timestamps every ``put``; generate puts the prompt first, then each new token as soon as it is
  chosen, so TTFT = time of the first put after the prompt - start of the call (prefill plus
  the first token's selection). No extra generate call is needed;
- TPOT (time per output token after the first): (latency - TTFT) / (tokens - 1).

With --repeats R each prompt is generated R times and the per-request figures are the medians
over the repeats; the greedy ids must be identical every time (recorded as ``deterministic``).

Warm-up: one full generate (the first prompt, N tokens) runs before any timing and is
discarded, so one-off costs (allocator growth, kernel selection, lazy imports) are excluded.

The greedy token ids per prompt are saved as the lossless reference that speculative runs with
the same target, prompts, template and --max-tokens must reproduce exactly.

Example:
    python bench/target.py --limit 6 --max-tokens 64
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
    loadavg,
    median,
    report_other_cpu,
    setup_torch,
    stamp,
    write_result,
)
from transformers.generation.streamers import BaseStreamer


class _Timestamps(BaseStreamer):
    """Records perf_counter at every put; the first put is the prompt."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def generate_once(model, ids: list[int], max_new_tokens: int) -> dict:
    input_ids = torch.tensor([ids], dtype=torch.long)
    streamer = _Timestamps()
    began = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            streamer=streamer,
        )
    latency = time.perf_counter() - began
    new_ids = output[0, len(ids) :].tolist()
    ttft = streamer.times[1] - began if len(streamer.times) > 1 else latency
    return {"latency_s": latency, "ttft_s": ttft, "output_ids": new_ids}


def run_request(model, tokenizer, prompt: dict, max_new_tokens: int, repeats: int) -> dict:
    ids = chat_ids(tokenizer, prompt["messages"])
    runs = [generate_once(model, ids, max_new_tokens) for _ in range(repeats)]
    output_ids = runs[0]["output_ids"]
    n = len(output_ids)
    latency = median(r["latency_s"] for r in runs)
    ttft = median(r["ttft_s"] for r in runs)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    return {
        "id": prompt["id"],
        "domain": prompt["domain"],
        "prompt_tokens": len(ids),
        "generated_tokens": n,
        "stopped_on_eos": bool(output_ids) and output_ids[-1] in eos_ids,
        "latency_s": latency,
        "ttft_s": ttft,
        "tokens_per_s": n / latency,
        "tpot_s": (latency - ttft) / (n - 1) if n > 1 else None,
        "deterministic": all(r["output_ids"] == output_ids for r in runs),
        "runs": [{"latency_s": r["latency_s"], "ttft_s": r["ttft_s"]} for r in runs],
        "output_ids": output_ids,
        "output_text": tokenizer.decode(output_ids, skip_special_tokens=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--max-tokens", type=int, default=128, help="max_new_tokens per request (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--repeats", type=int, default=1, help="generate each prompt this many times (default: %(default)s)")
    parser.add_argument("--prompts", default=None, help="prompts JSONL (default: bench/prompts.jsonl)")
    parser.add_argument("--name", default="target", help="result file name prefix (default: %(default)s)")
    args = parser.parse_args()

    setup_torch(args.threads)
    machine = stamp()  # before loading: the load average then shows other work on the machine
    other_cpu = OtherCpu()
    lm = load_target(args)
    model, tokenizer = lm.model.eval(), lm.tokenizer
    prompts = load_prompts(args.prompts, args.limit) if args.prompts else load_prompts(limit=args.limit)

    warm = time.perf_counter()
    generate_once(model, chat_ids(tokenizer, prompts[0]["messages"]), args.max_tokens)
    warmup_s = time.perf_counter() - warm

    requests = []
    print(f"{'id':<18}{'prompt':>7}{'gen':>5}{'latency s':>11}{'TTFT ms':>9}{'tok/s':>8}{'TPOT ms':>9}")
    for prompt in prompts:
        r = run_request(model, tokenizer, prompt, args.max_tokens, args.repeats)
        requests.append(r)
        tpot = f"{r['tpot_s'] * 1e3:9.1f}" if r["tpot_s"] is not None else f"{'-':>9}"
        print(
            f"{r['id']:<18}{r['prompt_tokens']:>7}{r['generated_tokens']:>5}{r['latency_s']:>11.3f}"
            f"{r['ttft_s'] * 1e3:>9.1f}{r['tokens_per_s']:>8.2f}{tpot}"
        )

    total_tokens = sum(r["generated_tokens"] for r in requests)
    total_time = sum(r["latency_s"] for r in requests)
    summary = {
        "requests": len(requests),
        "median_latency_s": median(r["latency_s"] for r in requests),
        "median_ttft_s": median(r["ttft_s"] for r in requests),
        "median_tokens_per_s": median(r["tokens_per_s"] for r in requests),
        "median_tpot_s": median(r["tpot_s"] for r in requests if r["tpot_s"] is not None),
        "median_generated_tokens": median(r["generated_tokens"] for r in requests),
        "total_generated_tokens": total_tokens,
        "aggregate_tokens_per_s": total_tokens / total_time if total_time else None,
        "all_deterministic": all(r["deterministic"] for r in requests),
    }
    print(
        f"median: latency {summary['median_latency_s']:.3f} s, TTFT {summary['median_ttft_s'] * 1e3:.1f} ms, "
        f"{summary['median_tokens_per_s']:.2f} tok/s, TPOT {(summary['median_tpot_s'] or 0) * 1e3:.1f} ms; "
        f"aggregate {summary['aggregate_tokens_per_s']:.2f} tok/s over {total_tokens} tokens"
    )
    other_share = other_cpu.share()
    report_other_cpu(other_share)
    result = {
        "benchmark": "target",
        "config": {
            "target": args.target,
            "fingerprint": lm.fingerprint,
            "decoding": "greedy (do_sample=False), transformers generate with KV cache, batch 1, sequential",
            "max_new_tokens": args.max_tokens,
            "limit": args.limit,
            "repeats": args.repeats,
            "threads": args.threads,
            "prompts": str(args.prompts or "bench/prompts.jsonl"),
            "eos_token_id": model.generation_config.eos_token_id,
            "ttft_method": "streamer timestamp of the first generated token within the timed generate call",
            "warmup": "one full generate on the first prompt, discarded",
            "warmup_s": warmup_s,
        },
        "stamp": {**machine, "loadavg_end": loadavg(), "other_cpu_share": other_share},
        "summary": summary,
        "requests": requests,
    }
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
