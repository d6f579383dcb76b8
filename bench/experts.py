"""Issue 8: what domain experts, the paper's routing and fusion are worth (local engine, one run).

Workload, fixed before the experts were trained: every prompt of ``bench/prompts.jsonl`` and
``bench/prompts_holdout.jsonl`` (code, chat, math, summarization; none of them, nor a paraphrase
or a template instance, in any expert's data: ``bench/distill_experts.sh`` excludes their words
and its math problems are of other kinds), chat template, ``max_tokens`` 128, temperature 0, no
``expert`` field, one request at a time, the target verifying with the project's runner.

Systems (fixed windows, so that drafted tokens per round are set by the system, not by luck):

- ``general``: the shipped general drafter alone, window 4;
- ``union``: the general drafter adapted on the union of the three experts' data for the same
  total steps (``union-small``), alone, window 4 — the baseline of the issue's goal;
- ``code`` / ``chat`` / ``math``: each expert alone, window 4;
- ``routed``: routing over the three experts, one drafter per round, window 4;
- ``routed+step`` / ``routed+tree``: routing, up to two cooperating experts fused step by step
  or as whole chains, window 2 (at most 4 drafted tokens per round, as the single drafters);
- ``union@2`` (any single drafter ``name@W``): that drafter alone at window W — ``union@2``
  drafts about as many tokens per round as the fused systems (not in the default list);
- ``all+step`` / ``all+tree``: the three experts, the suffix datastore and prompt lookup, routed
  and fused, window 2; the suffix datastore emptied before the pass; ``all+step-warm`` /
  ``all+tree-warm``: a second pass with the datastore as the first left it (every prompt seen).

Reported per system and per domain: accepted tokens per round, drafted tokens per round,
acceptance per draft position, speedup over ``target`` (transformers ``generate``, summed
latency); outputs identical to ``target``; routing quality (the share of requests whose
cold-start choice was the expert that did best alone for them, and the rounds routing took to
put that expert first when it was not); the goal ratio (routed + fused vs union, accepted tokens
per round).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import BENCH_DIR, OtherCpu, chat_ids, load_prompts, report_other_cpu, stamp, write_result
from speedup import hf_generate

from cosine.config import PACKAGE_DIR, load_config
from cosine.core.protocol import eos_token_ids
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import StopRules
from cosine.drafters.distilled import SmallDrafter
from cosine.drafters.lookup import PromptLookupDrafter
from cosine.drafters.profile import load_profile
from cosine.drafters.suffix import SuffixDrafter
from cosine.engine import GenerationRequest, LocalEngine
from cosine.factory import load_target
from cosine.lossless import TIE_GAP, first_divergence, top2_gap
from cosine.models.loading import load_model
from cosine.models.runner import ModelRunner
from cosine.policy.routing import PromptClassifier, RoutingPolicy
from cosine.policy.window import WindowPolicy

SETS = {"prompts": BENCH_DIR / "prompts.jsonl", "holdout": BENCH_DIR / "prompts_holdout.jsonl"}
EXPERTS = ("code", "chat", "math")
SYSTEMS = ("target", "general", "union", *EXPERTS, "routed", "routed+step", "routed+tree", "all+step", "all+tree")


def build_engines(systems, runner, tokenizer, weights: Path, target_model):
    def small(name):
        return SmallDrafter(name, weights / f"{name}-small", target_model, tokenizer)

    drafters = {name: small(name) for name in ("general", "union", *EXPERTS)}
    profiles = {name: load_profile(weights / f"{name}-small") for name in EXPERTS}
    classifier = PromptClassifier({n: p for n, p in profiles.items() if p}, len(tokenizer))
    suffix = SuffixDrafter("suffix")
    lookup = PromptLookupDrafter("prompt-lookup")

    def engine(members, mode="chain", window=4, experts=1):
        routing = RoutingPolicy(max_experts=experts) if len(members) > 1 else None
        return LocalEngine(runner, tokenizer, members, mode=mode, window=WindowPolicy(window, window, window, False), max_batch=1,
                           routing=routing, classifier=classifier if routing else None)

    team = [drafters[n] for n in EXPERTS]
    made = {}
    for system in systems:
        base, _, window = system.partition("@")  # "union@2": that system at window 2
        if window and base in drafters:
            made[system] = engine([drafters[base]], window=int(window))
        elif system in drafters:
            made[system] = engine([drafters[system]])
        elif system == "routed":
            made[system] = engine(team)
        elif system.startswith("routed+"):
            made[system] = engine(team, mode=system.split("+")[1], window=2, experts=2)
        elif system.startswith("all+"):
            made[system] = engine([*team, suffix, lookup], mode=system.split("+")[1], window=2, experts=2)
    return made, suffix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(BENCH_DIR.parent / "config.toml"))
    parser.add_argument("--weights", default=str(PACKAGE_DIR / "drafters" / "weights"), help="directory holding general-small, union-small, code-small, ...")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--limit", type=int, default=0, help="first N prompts of each set (a check of the harness, not a result)")
    parser.add_argument("--name", default="experts")
    args = parser.parse_args()
    systems = [s for s in args.systems.split(",") if s]
    config = load_config(Path(args.config))
    torch.set_num_threads(config.model.threads)
    plain = load_model(config.model.target_path, cache_dir=config.model.cache_path, device="cpu", dtype=config.model.dtype)
    tokenizer = plain.tokenizer
    target = load_target(config)
    runner = ModelRunner(target.model)
    eos = eos_token_ids(tokenizer, target.model.config)
    engines, suffix = build_engines(systems, runner, tokenizer, Path(args.weights), target.model)
    items = [(set_name, item) for set_name, path in SETS.items() for item in load_prompts(path, limit=args.limit or None)]
    ids = [chat_ids(tokenizer, item["messages"]) for _, item in items]
    passes = [s for s in systems if s != "target"] + [f"{s}-warm" for s in systems if s.startswith("all+")]
    warm = ids[0]
    for engine in engines.values():
        engine.generate([GenerationRequest("warm", tuple(warm), SamplingParams(), StopRules(8, eos))])
        engine.stats = type(engine.stats)()
    hf_generate(plain.model, warm, 8, 0.0, 0)
    rows: dict[str, list[dict]] = {s: [] for s in ["target", *passes]}
    other = OtherCpu()
    began = time.perf_counter()
    if "target" in systems:
        for prompt in ids:
            seconds, out = hf_generate(plain.model, prompt, args.max_tokens, 0.0, 0)
            rows["target"].append({"seconds": seconds, "ids": out})
        print(f"target done at {time.perf_counter() - began:.0f} s", flush=True)
    for system in passes:
        engine = engines[system.removesuffix("-warm")]
        if system.startswith("all+") and not system.endswith("-warm"):
            suffix.clear()  # every measured pass starts from an empty datastore
        for index, prompt in enumerate(ids):
            request = GenerationRequest(f"{system}-{index}", tuple(prompt), SamplingParams(), StopRules(args.max_tokens, eos))
            t0 = time.perf_counter()
            result = engine.generate([request])[0]
            rows[system].append({"seconds": time.perf_counter() - t0, "ids": list(result.token_ids), "rounds": result.rounds,
                                 "drafted": result.draft_tokens, "accepted": result.accepted_tokens, "drafters": result.drafters,
                                 "first_choice": result.first_choice, "chosen": [list(c) for c in result.chosen]})
        stats = engine.stats
        rows[system].append({"acceptance_by_position": [round(a, 4) for a in stats.acceptance_by_position()]})
        engine.stats = type(stats)()
        print(f"{system} done at {time.perf_counter() - began:.0f} s", flush=True)
    share = other.share()
    result = report(items, rows)
    result["divergences"] = divergences(plain.model, items, ids, rows)
    result["stamp"], result["other_cpu_share"], result["config"] = stamp(), share, {"max_tokens": args.max_tokens, "systems": passes}
    path = write_result(args.name, result)
    report_other_cpu(share)
    print(json.dumps({k: result[k] for k in ("table", "goal", "routing_quality", "identical", "divergences")}, indent=1))
    print(f"wrote {path}")


def report(items, rows) -> dict:
    domains = sorted({item["domain"] for _, item in items})
    target = rows.get("target", [])
    table, identical, per_prompt = {}, {}, {}
    for system, data in rows.items():
        if system == "target" or not data:
            continue
        positions = data[-1]["acceptance_by_position"]
        data = data[:-1]
        entry = {"acceptance_by_position": positions}
        for domain in ["all", *domains]:
            picked = [i for i, (_, item) in enumerate(items) if domain == "all" or item["domain"] == domain]
            rounds = sum(data[i]["rounds"] for i in picked)
            cell = {"accepted_per_round": round(sum(data[i]["accepted"] for i in picked) / max(1, rounds), 3),
                    "drafted_per_round": round(sum(data[i]["drafted"] for i in picked) / max(1, rounds), 3)}
            if target:
                cell["speedup"] = round(sum(target[i]["seconds"] for i in picked) / sum(data[i]["seconds"] for i in picked), 3)
            entry[domain] = cell
        drafters: dict[str, dict[str, int]] = {}
        for row in data:
            for name, counts in row["drafters"].items():
                mine = drafters.setdefault(name, {"drafted": 0, "accepted": 0})
                mine["drafted"] += counts["drafted"]
                mine["accepted"] += counts["accepted"]
        entry["drafters"] = drafters
        table[system] = entry
        if target:
            identical[system] = sum(data[i]["ids"] == target[i]["ids"] for i in range(len(data)))
        per_prompt[system] = [{k: v for k, v in row.items() if k != "ids"} for row in data]
    result = {"table": table, "identical": identical, "prompts": len(items), "per_prompt": per_prompt,
              "prompt_ids": [item["id"] for _, item in items], "domains": [item["domain"] for _, item in items]}
    result["goal"] = {s: round(table[s]["all"]["accepted_per_round"] / table["union"]["all"]["accepted_per_round"], 3)
                      for s in table if "union" in table and s != "union" and table["union"]["all"]["accepted_per_round"]}
    result["routing_quality"] = routing_quality(rows, items)
    return result


def divergences(model, items, ids, rows) -> list[dict]:
    """Every output that differs from ``target``'s, with the target's top-2 logit gap where it
    first diverges (design.md: excused only at a numerical tie, gap < 1e-3)."""
    found = []
    target = rows.get("target") or []
    for system, data in rows.items():
        if system == "target" or not target:
            continue
        for index, row in enumerate(data[:-1]):
            reference = target[index]["ids"]
            at = first_divergence(row["ids"], reference)
            if at is None or not row["ids"]:
                continue
            gap = top2_gap(model, list(ids[index]) + reference[:at])
            found.append({"system": system, "id": items[index][1]["id"], "at": at, "ours": row["ids"][at : at + 1],
                          "target": reference[at : at + 1], "top2_gap": gap, "tie": gap < TIE_GAP})
    return found


def routing_quality(rows, items) -> dict:
    """Best expert per request = the expert alone with the most accepted tokens per round on it."""
    if not all(rows.get(e) for e in EXPERTS) or not rows.get("routed"):
        return {}
    alone = {e: rows[e][:-1] for e in EXPERTS}
    routed = rows["routed"][:-1]
    right, found_after = 0, []
    for i in range(len(items)):
        best = max(EXPERTS, key=lambda e: alone[e][i]["accepted"] / max(1, alone[e][i]["rounds"]))
        if routed[i]["first_choice"] == best:
            right += 1
            continue
        first_round = next((r for r, chosen in enumerate(routed[i]["chosen"]) if chosen and chosen[0] == best), None)
        found_after.append(first_round)
    found = [r for r in found_after if r is not None]
    return {"first_choice_best": round(right / len(items), 3), "wrong_first_choices": len(found_after),
            "found_by_exploration": len(found), "rounds_to_find": sorted(found)}


if __name__ == "__main__":
    main()
