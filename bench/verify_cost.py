"""Verification cost curve: one target forward through ModelRunner feeding k new tokens per request.

What is measured: the wall time of one ``ModelRunner.forward`` call (packing, masks, the decoder,
the LM head on the fed rows) for k = 1, 2, 4, 8, 16 new tokens per request at batch sizes 1, 4
and 8, each request having a ~300-token prefix already in its KV cache. This is what one
speculative verification round costs as a function of the draft length, relative to one plain
decoding step (k = 1, batch 1).

How exactly k tokens are fed: request i has a token sequence ``seq_i`` (real chat-templated
prompts from bench/prompts.jsonl, concatenated, different for every request). The cache is built
by one forward over ``seq_i[:P]`` (P = --prefix-tokens). A timed call sends
``ForwardItem(key, context=seq_i[:P + 1], tree_tokens=seq_i[P + 1 : P + k],
tree_parents=(ROOT, 0, 1, ..., k - 3))``: the context has one uncached token and the k - 1 tree
nodes form a chain, so k tokens are fed. After the call the runner's cache holds ``seq_i[:P + 1]``;
on the next call it reuses the longest common prefix of the cache with the context, capped at
``len(context) - 1 = P`` tokens, so the same item again feeds exactly k tokens: the cache is
back at the P-token prefix before every repeat. Every timed call checks that
``runner.stats.fed_tokens`` grew by exactly k * batch (and ``reused_tokens`` by P * batch).

For comparison (batch 1 only, unless --no-hf), the plain transformers forward
``model(input_ids=seq[P : P + k], cache=cache)`` (transformers 5's name for past_key_values)
on a DynamicCache holding the same
P-token prefix, cropped back to P tokens before every call. It is timed before the runner is
built (the runner switches the model's attention implementation). The runner's logits for the
k fed tokens are checked against the HF ones (batch 1, largest k).

Warm-up: every (batch, k) configuration runs --warmup untimed calls first; then --repeats timed
rounds, each round timing every k once (round-robin, so slow drift of the machine spreads over
all k alike). Reported: median (and min) of the repeats, in ms and as a ratio to the median of
k = 1, batch 1.

Example:
    python bench/verify_cost.py
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
from transformers import DynamicCache

from cosine.core.tree import ROOT
from cosine.models.loading import choose_cpu_linears, prepack_cpu_linears
from cosine.models.runner import ForwardItem, ModelRunner


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def token_sequences(tokenizer, prompts: list[dict], count: int, length: int) -> list[list[int]]:
    """``count`` different sequences of ``length`` real tokens (prompts concatenated, rotated)."""
    encoded = [chat_ids(tokenizer, p["messages"]) for p in prompts]
    sequences = []
    for i in range(count):
        seq: list[int] = []
        j = i
        while len(seq) < length:
            seq.extend(encoded[j % len(encoded)])
            j += 1
        sequences.append(seq[:length])
    return sequences


def chain_item(key: str, seq: list[int], prefix: int, k: int) -> ForwardItem:
    """Feeds exactly k tokens on top of a cached ``prefix``: 1 context token + k - 1 chain nodes."""
    nodes = tuple(seq[prefix + 1 : prefix + k])
    parents = tuple([ROOT] + list(range(k - 2))) if k > 1 else ()
    return ForwardItem(key, context=tuple(seq[: prefix + 1]), tree_tokens=nodes, tree_parents=parents)


@torch.inference_mode()
def time_hf(model, seq: list[int], prefix: int, ks: list[int], warmup: int, repeats: int):
    """Plain HF forward with a DynamicCache of ``prefix`` tokens, k new tokens, batch 1."""
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([seq[:prefix]]), cache=cache, use_cache=True)
    assert cache.get_seq_length() == prefix

    def call(k: int):
        extra = cache.get_seq_length() - prefix
        if extra:
            cache.crop(-extra)  # transformers 5: crop takes minus the number of tokens to drop
        began = time.perf_counter()
        logits = model(input_ids=torch.tensor([seq[prefix : prefix + k]]), cache=cache, use_cache=True).logits
        elapsed = time.perf_counter() - began
        assert cache.get_seq_length() == prefix + k
        return elapsed, logits[0].float()

    times: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks:
        for _ in range(warmup):
            call(k)
    for _ in range(repeats):
        for k in ks:
            times[k].append(call(k)[0])
    reference = call(max(ks))[1]
    return times, reference


def time_runner(runner: ModelRunner, sequences, prefix: int, batches: list[int], ks: list[int], warmup: int, repeats: int):
    """Runner forwards; returns {(batch, k): (wall seconds list, model-only seconds list)} and the b=1 logits."""
    results: dict[tuple[int, int], tuple[list[float], list[float]]] = {}
    largest = {}
    for batch in batches:
        items = {k: [chain_item(f"r{i}", sequences[i], prefix, k) for i in range(batch)] for k in ks}

        def call(k: int, items=items, batch=batch):
            stats = runner.stats
            fed, reused, model_s = stats.fed_tokens, stats.reused_tokens, stats.forward_seconds
            began = time.perf_counter()
            logits = runner.forward(items[k])
            elapsed = time.perf_counter() - began
            if stats.fed_tokens - fed != k * batch or stats.reused_tokens - reused != prefix * batch:
                raise AssertionError(
                    f"batch {batch}, k {k}: fed {stats.fed_tokens - fed} tokens (want {k * batch}), "
                    f"reused {stats.reused_tokens - reused} (want {prefix * batch})"
                )
            return elapsed, stats.forward_seconds - model_s, logits

        for k in ks:
            for _ in range(warmup):
                call(k)
        for k in ks:
            results[(batch, k)] = ([], [])
        for _ in range(repeats):
            for k in ks:
                wall, model_only, _ = call(k)
                results[(batch, k)][0].append(wall)
                results[(batch, k)][1].append(model_only)
        if batch == 1:
            largest = call(max(ks))[2][0]
    return results, largest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--prefix-tokens", type=int, default=300, help="cached tokens per request (default: %(default)s)")
    parser.add_argument("--ks", type=int_list, default=[1, 2, 4, 8, 16], help="new tokens per request (default: 1,2,4,8,16)")
    parser.add_argument("--batches", type=int_list, default=[1, 4, 8], help="batch sizes (default: 1,4,8)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per configuration (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per configuration (default: %(default)s)")
    parser.add_argument("--no-hf", action="store_true", help="skip the plain transformers forward comparison")
    parser.add_argument("--name", default="verify_cost", help="result file name prefix (default: %(default)s)")
    parser.add_argument("--cpu-linear", choices=("auto", "onednn", "plain"), default="auto", help="the runner's linear layers, as model.cpu_linear (default: %(default)s, as served; the transformers comparison always runs plain, before)")
    args = parser.parse_args()
    if args.repeats < 7:
        parser.error("--repeats must be at least 7")
    if min(args.ks) < 1:
        parser.error("k must be >= 1")

    setup_torch(args.threads)
    machine = stamp()
    other_cpu = OtherCpu()
    lm = load_target(args)
    model = lm.model.eval()
    prefix, ks, batches = args.prefix_tokens, sorted(args.ks), sorted(args.batches)
    sequences = token_sequences(lm.tokenizer, load_prompts(), max(batches), prefix + max(ks))

    hf_times, hf_logits = (None, None) if args.no_hf else time_hf(model, sequences[0], prefix, ks, args.warmup, args.repeats)

    if args.cpu_linear == "onednn":
        prepack_cpu_linears(model)
    elif args.cpu_linear == "auto":
        args.cpu_linear = f"auto: {choose_cpu_linears(model)}"
    runner = ModelRunner(model)
    runner.forward([ForwardItem(f"r{i}", tuple(seq[:prefix])) for i, seq in enumerate(sequences)])  # build caches
    assert all(runner.cached_tokens(f"r{i}") == prefix for i in range(len(sequences)))
    times, runner_logits = time_runner(runner, sequences, prefix, batches, ks, args.warmup, args.repeats)

    base = median(times[(batches[0], ks[0])][0])
    rows = []
    for batch in batches:
        for k in ks:
            wall, model_only = times[(batch, k)]
            m = median(wall)
            rows.append({
                "batch": batch,
                "k": k,
                "fed_tokens": batch * k,
                "median_ms": m * 1e3,
                "min_ms": min(wall) * 1e3,
                "model_only_median_ms": median(model_only) * 1e3,
                "ms_per_fed_token": m * 1e3 / (batch * k),
                "ratio": m / base,
                "all_ms": [t * 1e3 for t in wall],
            })
    hf_rows = []
    if hf_times is not None:
        hf_base = median(hf_times[ks[0]])
        for k in ks:
            m = median(hf_times[k])
            hf_rows.append({
                "batch": 1,
                "k": k,
                "median_ms": m * 1e3,
                "min_ms": min(hf_times[k]) * 1e3,
                "ratio": m / hf_base,
                "ratio_to_runner_k1_b1": m / base,
                "all_ms": [t * 1e3 for t in hf_times[k]],
            })
    check = None
    if hf_logits is not None:
        diff = (runner_logits - hf_logits).abs().max().item()
        same_argmax = bool((runner_logits.argmax(-1) == hf_logits.argmax(-1)).all())
        check = {"k": max(ks), "max_abs_logit_diff": diff, "same_argmax": same_argmax}

    # ---- table ----
    print(f"\nverification cost: one ModelRunner.forward, {prefix} cached tokens per request, "
          f"{args.threads} threads, median of {args.repeats} (ratio to k={ks[0]}, batch={batches[0]} = {base * 1e3:.1f} ms)")
    header = f"{'k':>4}" + "".join(f"{f'batch {b}':>22}" for b in batches) + (f"{'HF batch 1':>22}" if hf_rows else "")
    print(header)
    by_key = {(r["batch"], r["k"]): r for r in rows}
    hf_by_k = {r["k"]: r for r in hf_rows}
    for k in ks:
        line = f"{k:>4}"
        for b in batches:
            r = by_key[(b, k)]
            line += f"{r['ratio']:>10.2f}x {r['median_ms']:>8.1f} ms"
        if hf_rows:
            r = hf_by_k[k]
            line += f"{r['ratio_to_runner_k1_b1']:>10.2f}x {r['median_ms']:>8.1f} ms"
        print(line)
    if check:
        print(f"runner vs HF logits (batch 1, k={check['k']}): max |diff| {check['max_abs_logit_diff']:.2e}, "
              f"same argmax: {check['same_argmax']}")

    other_share = other_cpu.share()
    report_other_cpu(other_share)
    result = {
        "benchmark": "verify_cost",
        "config": {
            "target": args.target,
            "fingerprint": lm.fingerprint,
            "prefix_tokens": prefix,
            "cpu_linear": args.cpu_linear,
            "ks": ks,
            "batches": batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "timed": "wall time of ModelRunner.forward (packing + masks + decoder + LM head on fed rows); "
                     "model_only = RunnerStats.forward_seconds delta (decoder + LM head)",
            "feeding": "context = prefix + 1 uncached token, k - 1 chain tree nodes; fed tokens checked per call",
            "hf": None if args.no_hf else "model(k ids, cache=DynamicCache cropped to prefix), batch 1, "
                                          "timed before the runner was built",
        },
        "stamp": {**machine, "loadavg_end": loadavg(), "other_cpu_share": other_share},
        "base_ms": base * 1e3,
        "runner": rows,
        "hf": hf_rows,
        "logits_check": check,
    }
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
