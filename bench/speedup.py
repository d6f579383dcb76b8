"""Single-stream speedup over the target alone, on both evaluation sets (issue 7's workload).

Workload, fixed before any drafter was trained: every prompt of ``bench/prompts.jsonl`` and
``bench/prompts_holdout.jsonl`` (committed before the first training run), chat template,
``max_tokens`` 128, no ``expert`` field, the repository's ``config.toml`` (its drafters and
speculation settings), one request at a time, the median over ``--repeats`` per prompt.

Systems, all in one run on this machine:

- ``target``: transformers ``generate`` on the plain model (greedy, KV cache, batch 1);
- ``runner``: the project's runner alone (oneDNN linears, no drafter: window 0), to separate the
  runner's own speed from speculation's;
- ``engine``: the local engine with the configured drafters;
- ``pipeline``: ``cosine serve`` (embedded Valkey, one process per stage), a Redis client
  submits and times to the final entry;
- ``hf-assisted``: transformers assisted generation with the ``small`` drafter exported as a
  standard full-vocabulary Llama (its blocks and norm, the target's embedding and head);
- ``hf-lookup``: transformers' prompt lookup (``prompt_lookup_num_tokens``).

Reported: speedup per system (sum of target latencies / sum of the system's), per prompt set
and per prompt (the worst named), outputs identical to ``target`` (temperature 0), acceptance
per draft position (engine), accepted/drafted (pipeline), drafter cost c, and the expected
speedup S = (1 - a^(g+1)) / ((1 - a)(g c + v(g+1))) at the measured a, g, c, v.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from common import BENCH_DIR, OtherCpu, chat_ids, load_prompts, median, report_other_cpu, stamp, write_result
from hops import RoundRecorder, by_position

from cosine.config import load_config
from cosine.core.protocol import eos_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.drafters.artifact import load_drafter_net
from cosine.engine import GenerationRequest, LocalEngine
from cosine.factory import build_stack
from cosine.lossless import TIE_GAP, first_divergence, top2_gap
from cosine.models.loading import load_model
from cosine.models.runner import ForwardItem, ModelRunner
from cosine.policy.window import WindowPolicy
from cosine.wire import Keys

SETS = {"prompts": BENCH_DIR / "prompts.jsonl", "holdout": BENCH_DIR / "prompts_holdout.jsonl"}
SYSTEMS = ("target", "runner", "engine", "pipeline", "hf-assisted", "hf-lookup")


def hf_generate(model, ids, max_tokens, temperature, seed, **extra):
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0} if temperature > 0 else {"do_sample": False}
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens, **sampling, **extra)
    return time.perf_counter() - began, out[0, len(ids) :].tolist()


def full_vocab_model(target, net):
    """A small drafter's network (fp32, as its file holds it: not the served drafter's int8
    layers) as a standard transformers Llama: its blocks and norm, the target's embedding and
    (tied) full-vocabulary head."""
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = net.spec.layers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config).eval()
    state = {f"model.layers.{i}.{k}": v.to_dense() if v.is_mkldnn else v for i, block in enumerate(net.blocks) for k, v in block.state_dict().items()}
    state["model.norm.weight"] = net.norm.weight.detach()
    state["model.embed_tokens.weight"] = target.get_input_embeddings().weight.detach()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def step_ms(runner: ModelRunner, context: list[int], k: int) -> float:
    times = []
    base = list(context)
    runner.forward([ForwardItem("cost", base)])
    for i in range(7):
        extended = base + [198 + i]
        began = time.perf_counter()
        runner.forward([ForwardItem("cost", extended + [220] * (k - 1))])
        times.append(time.perf_counter() - began)
        base = extended
    runner.release("cost")
    return 1000 * median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(BENCH_DIR.parent / "config.toml"))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--limit", type=int, default=0, help="first N prompts of each set (0: all; a check of the harness, not a result)")
    parser.add_argument("--name", default="speedup")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    config = load_config(Path(args.config))
    torch.set_num_threads(config.model.threads)
    plain = load_model(config.model.target_path, cache_dir=config.model.cache_path, device="cpu", dtype=config.model.dtype)
    tokenizer = plain.tokenizer
    stack = build_stack(config)
    model = stack.target.model
    eos = eos_token_ids(tokenizer, model.config)
    spec = config.speculation
    prompts = {name: load_prompts(path, limit=args.limit or None) for name, path in SETS.items()}
    ids = {name: [chat_ids(tokenizer, item["messages"]) for item in items] for name, items in prompts.items()}
    latencies: dict[str, dict[str, list[list[float]]]] = {s: {n: [[] for _ in items] for n, items in ids.items()} for s in systems}
    outputs: dict[str, dict[str, list[list[int]]]] = {s: {n: [[] for _ in items] for n, items in ids.items()} for s in systems}
    counters = {"engine": {"drafted_at": [], "accepted_at": [], "rounds": 0}, "pipeline": {"drafted": 0, "accepted": 0, "rounds": 0}}

    def sampling(seed):
        return SamplingParams(temperature=args.temperature, seed=seed) if args.temperature > 0 else SamplingParams()

    engines = {}
    if "engine" in systems:
        engines["engine"] = LocalEngine(stack.runner, tokenizer, stack.drafters, mode=spec.mode, max_batch=1, max_tree_nodes=spec.max_tree_nodes,
                                        window=WindowPolicy(spec.window, spec.min_window, spec.max_window, spec.adaptive_window))
    if "runner" in systems:
        engines["runner"] = LocalEngine(ModelRunner(model), tokenizer, [], mode="chain", max_batch=1, window=WindowPolicy(0, 0, 0, False))
    assistant = None
    if "hf-assisted" in systems:
        small = next((d for d in config.drafters if d.kind == "small"), None)
        assistant = full_vocab_model(plain.model, load_drafter_net(Path(small.resolved_path), plain.model)[0]) if small else None
    supervisor = client = None
    if "pipeline" in systems:
        from cosine.client import Client
        from cosine.serve import Supervisor

        supervisor = Supervisor(config, None, Path(args.config), verifiers=1, drafters_per_expert=1, verbose=False)
        url = supervisor.start()
        client = Client(url, config.redis.namespace, timeout=300)
        import redis

        from cosine.demo import _wait_for_workers

        _wait_for_workers(redis.Redis.from_url(url), config.redis.namespace)
    # Warm-up, excluded.
    warm = ids["prompts"][0]
    for engine in engines.values():
        engine.generate([GenerationRequest("warm", tuple(warm), SamplingParams(), StopRules(8, eos))])
        engine.stats = type(engine.stats)()
    hf_generate(plain.model, warm, 8, 0.0, 0)
    recorder = None
    if client:
        client.generate(prompt="warm up", max_tokens=8)
        recorder = RoundRecorder(url, Keys(config.redis.namespace))
        recorder.start()
    other = OtherCpu()  # the pipeline's own worker processes count as other processes here
    began = time.perf_counter()
    for repeat in range(args.repeats):
        for set_name, items in ids.items():
            for index, prompt in enumerate(items):
                seed = 1000 * repeat + index
                for system in systems:
                    if system == "target":
                        seconds, out = hf_generate(plain.model, prompt, args.max_tokens, args.temperature, seed)
                    elif system == "hf-lookup":
                        seconds, out = hf_generate(plain.model, prompt, args.max_tokens, args.temperature, seed, prompt_lookup_num_tokens=spec.window)
                    elif system == "hf-assisted":
                        if assistant is None:
                            continue
                        seconds, out = hf_generate(plain.model, prompt, args.max_tokens, args.temperature, seed, assistant_model=assistant)
                    elif system in engines:
                        request = GenerationRequest(f"{system}-{set_name}-{index}-{repeat}", tuple(prompt), sampling(seed), StopRules(args.max_tokens, eos))
                        t0 = time.perf_counter()
                        result = engines[system].generate([request])[0]
                        seconds, out = time.perf_counter() - t0, list(result.token_ids)
                    else:  # pipeline
                        fields = {"max_tokens": args.max_tokens}
                        if args.temperature > 0:
                            fields |= {"temperature": args.temperature, "seed": seed}
                        t0 = time.perf_counter()
                        final = client.generate(messages=prompts[set_name][index]["messages"], **fields)
                        seconds, out = time.perf_counter() - t0, final.token_ids
                        counters["pipeline"]["drafted"] += final.draft_tokens
                        counters["pipeline"]["accepted"] += final.accepted_tokens
                        counters["pipeline"]["rounds"] += final.rounds
                    latencies[system][set_name][index].append(seconds)
                    if repeat == 0:
                        outputs[system][set_name][index] = out
            print(f"repeat {repeat + 1}/{args.repeats}, {set_name}: done at {time.perf_counter() - began:.0f} s", flush=True)
    other_share = other.share()
    if recorder:
        time.sleep(0.5)  # the last round's entries
        recorder.stop.set()
        recorder.join()
        counters["pipeline"]["by_position"] = by_position(recorder.rounds())
    if supervisor:
        client.close()
        supervisor.stop()
    if "engine" in engines:
        stats = engines["engine"].stats
        counters["engine"] = {"rounds": stats.rounds, "acceptance_by_position": [round(a, 4) for a in stats.acceptance_by_position()],
                              "drafted_at": stats.drafted_at, "accepted_at": stats.accepted_at}
    result = report(args, systems, ids, prompts, latencies, outputs, counters)
    if "target" in systems:
        result["target_outputs"] = outputs["target"]  # the reference outputs (bench/overlap.py reads them)
    result["divergences"] = divergences(plain.model, systems, ids, prompts, outputs) if args.temperature == 0 and "target" in systems else None
    result["costs"] = costs(stack, model, plain.model, ids["prompts"][0])
    result["bound"] = expected_bound(counters.get("engine", {}), result["costs"])
    result["stamp"], result["other_cpu_share"] = stamp(), other_share
    result["config"] = Path(args.config).read_text()
    path = write_result(args.name, result)
    report_other_cpu(other_share)
    print(json.dumps({k: result[k] for k in ("speedup", "identical", "divergences", "worst_prompt", "costs", "acceptance", "bound")}, indent=1))
    print(f"wrote {path}")


def costs(stack, model, plain_model, prompt) -> dict:
    """Drafter cost c (one drafted token / one target decode step of transformers) and the
    runner's v(k) (k new tokens / one decode step of transformers)."""
    hf = []
    with torch.inference_mode():
        out = plain_model(torch.tensor([prompt]), use_cache=True)
        cache = out.past_key_values
        for i in range(7):
            began = time.perf_counter()
            out = plain_model(torch.tensor([[198 + i]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            hf.append(time.perf_counter() - began)
    hf_ms = 1000 * median(hf)
    runner = ModelRunner(model)
    v = {k: round(step_ms(runner, prompt, k) / hf_ms, 3) for k in (1, 2, 3, 4, 5)}
    c = {}
    from cosine.drafters.base import DraftRequest

    for drafter in stack.drafters:
        times = []
        # A feature drafter drafts from the target's states: rows of the right shape cost the same as real ones.
        states = torch.zeros(len(prompt) + 8, model.config.hidden_size) if getattr(drafter, "needs_features", False) else None
        for i in range(8):
            began = time.perf_counter()
            drafter.propose([DraftRequest("cost", list(prompt) + [198] * i, 1, SamplingParams(), i, states)])
            times.append(time.perf_counter() - began)
        drafter.release("cost")
        c[drafter.name] = round(1000 * median(times[1:]) / hf_ms, 3)
    return {"hf_decode_ms": round(hf_ms, 2), "v": v, "c": c}


def expected_bound(engine: dict, costs: dict) -> dict | None:
    """The expected speedup of sequential speculative decoding (bench.md) at what the engine
    measured: a = acceptance at draft position 1, g = mean drafted depth per round, c = the
    costliest drafter's cost per drafted token, v = the runner's cost of g + 1 new tokens, all
    relative to one transformers decode step. S = (1 - a^(g+1)) / ((1 - a)(g c + v(g+1)))."""
    drafted, rounds = engine.get("drafted_at"), engine.get("rounds")
    if not drafted or not rounds:
        return None
    a = engine["acceptance_by_position"][0]
    g = sum(drafted) / rounds
    c = max(costs["c"].values())
    k = min(max(costs["v"]), round(g + 1))  # v was measured for k = 1..5
    v = costs["v"][k]
    s = (1 - a ** (g + 1)) / ((1 - a) * (g * c + v)) if a < 1 else None
    return {"a": round(a, 4), "g": round(g, 3), "c": c, "v": v, "v_k": int(k), "speedup": round(s, 3) if s else None}


def divergences(model, systems, ids, prompts, outputs) -> list[dict]:
    """Every output that differs from ``target``'s, with the target's top-2 logit gap where it
    first diverges (design.md: excused only at a numerical tie, gap < 1e-3)."""
    found = []
    for system in systems:
        for set_name, items in ids.items():
            for index, prompt in enumerate(items):
                reference, output = outputs["target"][set_name][index], outputs[system][set_name][index]
                at = first_divergence(output, reference)
                if system == "target" or at is None or not output:
                    continue
                gap = top2_gap(model, list(prompt) + reference[:at])
                found.append({"system": system, "set": set_name, "id": prompts[set_name][index]["id"], "at": at,
                              "ours": output[at : at + 1], "target": reference[at : at + 1], "top2_gap": gap, "tie": gap < TIE_GAP})
    return found


def report(args, systems, ids, prompts, latencies, outputs, counters) -> dict:
    speedup, per_prompt, identical = {}, {}, {}
    for system in systems:
        speedup[system], identical[system] = {}, {}
        for set_name in ids:
            base = [median(x) for x in latencies["target"][set_name]] if "target" in systems else None
            mine = [median(x) for x in latencies[system][set_name]]
            if base is None or any(m is None for m in mine):
                continue
            speedup[system][set_name] = round(sum(base) / sum(mine), 3)
            per_prompt.setdefault(system, {})[set_name] = {prompts[set_name][i]["id"]: round(b / m, 3) for i, (b, m) in enumerate(zip(base, mine))}
            if args.temperature == 0 and "target" in systems:
                ref = outputs["target"][set_name]
                identical[system][set_name] = f"{sum(o == r for o, r in zip(outputs[system][set_name], ref))}/{len(ref)}"
    worst = {s: min(((name, pid, v) for name, rows in sets.items() for pid, v in rows.items()), key=lambda x: x[2]) for s, sets in per_prompt.items()}
    engine = counters.get("engine", {})
    pipeline = counters["pipeline"]
    acceptance = {
        "engine_by_position": engine.get("acceptance_by_position"),
        "pipeline_accepted_per_drafted": round(pipeline["accepted"] / pipeline["drafted"], 4) if pipeline["drafted"] else None,
        "pipeline_accepted_per_round": round(pipeline["accepted"] / pipeline["rounds"], 4) if pipeline["rounds"] else None,
        "pipeline_by_position": pipeline.get("by_position", {}).get("acceptance_by_position"),
        "pipeline_rounds_read_back": f"{pipeline.get('by_position', {}).get('rounds', 0)}/{pipeline['rounds']}",
    }
    return {
        "args": vars(args), "systems": systems, "speedup": speedup, "per_prompt": per_prompt, "identical": identical,
        "worst_prompt": {s: {"set": w[0], "id": w[1], "speedup": w[2]} for s, w in worst.items()},
        "acceptance": acceptance, "counters": counters,
        "latency_s": {s: {n: [median(x) for x in rows] for n, rows in sets.items()} for s, sets in latencies.items()},
    }


if __name__ == "__main__":
    main()
