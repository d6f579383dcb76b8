"""Throughput and latency under load: the pipeline against plain batching and plain speculation.

One command, one run, every system on the same requests and the same commit:

- ``target``: transformers ``generate``, batch 1, one request after another (a server that
  serves one request at a time): throughput is its own, latency grows with the queue.
- ``target-batched``: transformers ``generate`` on ``c`` requests in one left-padded batch,
  closed loop (the next ``c`` when the batch ends); greedy for every row (generate has one
  temperature per call; sampling costs the same).
- ``plain``: ``cosine serve`` with speculation off (window 0), first-come batches: the
  project's runner batching.
- ``vanilla``: ``cosine serve`` with the best single trained drafter (``general-small``), chain
  mode, no routing, at the best fixed window of a sweep run first (``--vanilla-windows``, at
  ``--sweep-concurrency`` clients), first-come batches, no load control.
- ``cosine``: ``cosine serve`` with the repository's ``config.toml`` (everything on).
- the ablation, closed loop at ``--ablation-concurrency``: ``cosine`` with its batch choice
  flipped (``cosine-fifo``: first-come batches, or ``cosine-cost``: batches chosen by the cost
  model, whichever ``cosine``'s config does not use), ``cosine-fixed`` (adaptive speculation
  control off: every round drafts at the request's adaptive window), ``cosine-no-pipelining``
  (drafters do not draft the next round ahead) and, with ``--verifiers`` >= 2,
  ``cosine-no-affinity`` (every round to the shared stream, whichever verifier is free).

Pipeline systems differ only in config (``[model]`` points at the same target and cache).

Loads: closed loop at each ``--concurrency`` (``c`` clients, each submits its next request when
its last one ends; ``max(--min-requests, 2c)`` requests), then Poisson arrivals at each
``--poisson`` fraction of ``plain``'s capacity measured in the same run (its best closed-loop
requests per second). The request mix: chat prompts of bench/prompts.jsonl, a ``--sampled``
share at temperature 0.7 (fixed seed per request), a ``--long`` share of ~1,000-token prompts.
Every submitted request counts: refused and errored ones are reported and their time to the
error enters the latency percentiles.

Per system and load: throughput (generated tokens / wall time from first submission to last
final), requests per second, p50 / p99 latency, p50 time to first token, errors, and for the
pipeline the share of verified rounds at window 0 (``cosine:stats``). Greedy outputs of every
pipeline system are compared with ``target``'s for the same prompt (lossless at temperature 0).

Results: bench/results/load-latest.json and load-latest.png (throughput and p50 latency
against load).

    python bench/load.py                           # the full run
    python bench/load.py --quick                   # a short check of the harness
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
import torch
from common import RESULTS_DIR, OtherCpu, add_model_options, chat_ids, load_prompts, load_target, setup_torch, stamp, write_result
from soak import Serve, long_messages

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "cosine:"
PIPELINE_SYSTEMS = ("plain", "vanilla", "cosine")
# The ablation: cosine with one part turned off (config only), at --ablation-concurrency.
# An ablation whose config equals cosine's (the part is already off there) is skipped.
ABLATIONS = {
    "cosine-fifo": "first-come batches (pipeline.batch_choice = fifo)",
    "cosine-cost": "batches chosen by the cost model (pipeline.batch_choice = cost)",
    "cosine-fixed": "adaptive control off: the adaptive window alone (speculation.load_control = false)",
    "cosine-no-affinity": "cache affinity off: every round to the shared stream, any verifier (pipeline.affinity = false; with --verifiers >= 2)",
    "cosine-no-pipelining": "pipelining off: drafters do not draft the next round ahead (speculation.pipelining = false)",
}
ALL_SYSTEMS = ("target", "target-batched", *PIPELINE_SYSTEMS, *ABLATIONS)
LONG_TOKENS = 1_000
VERIFIERS = 1  # verifier processes of every pipeline system (--verifiers)
STALL_S = 300.0


# ---- the requests ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    key: str  # identifies the request's content across systems (prompt index, sampling)
    messages: list[dict[str, str]]
    temperature: float
    seed: int
    max_tokens: int


@dataclass
class Outcome:
    key: str
    submitted: float
    ended: float = 0.0
    first_token: float | None = None
    last_token: float | None = None  # the last entry with tokens
    tokens: list[int] = field(default_factory=list)
    error: str = ""


def plan_requests(count: int, rng: random.Random, chats: list, long_chat: list, args) -> list[Plan]:
    plans = []
    for _ in range(count):
        long = rng.random() < args.long
        index = -1 if long else rng.randrange(len(chats))
        sampled = rng.random() < args.sampled
        seed = rng.randrange(2**31) if sampled else 0
        plans.append(Plan(f"{index}:{seed}" if sampled else f"{index}:greedy", long_chat if long else chats[index],
                          0.7 if sampled else 0.0, seed, args.max_tokens))
    return plans


def levels(args) -> list[tuple[str, float, int]]:
    """(kind, load, requests): closed-loop concurrency levels, then Poisson fractions."""
    closed = [("closed", float(c), max(args.min_requests, 2 * c)) for c in args.concurrency]
    return closed + [("poisson", f, args.poisson_requests) for f in args.poisson]


def summarise(outcomes: list[Outcome]) -> dict:
    began = min(o.submitted for o in outcomes)
    ended = max(o.ended for o in outcomes)
    wall = max(1e-9, ended - began)
    tokens = sum(len(o.tokens) for o in outcomes)
    latencies = sorted(o.ended - o.submitted for o in outcomes)
    ttfts = sorted(o.first_token - o.submitted for o in outcomes if o.first_token is not None)
    # Inter-token latency of a request: its first to its last token, per token after the first.
    itls = sorted((o.last_token - o.first_token) / (len(o.tokens) - 1) for o in outcomes if o.first_token is not None and o.last_token and len(o.tokens) > 1)
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "requests": len(outcomes), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "requests_per_s": len(outcomes) / wall,
        "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
        "p50_ttft_s": percentile(ttfts, 50) if ttfts else None, "p99_ttft_s": percentile(ttfts, 99) if ttfts else None,
        "p50_itl_s": percentile(itls, 50) if itls else None, "p99_itl_s": percentile(itls, 99) if itls else None, "errors": errors,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def arrival_times(kind: str, load: float, count: int, rate_per_s: float | None, rng: random.Random) -> list[float] | None:
    if kind == "closed":
        return None
    times, now = [], 0.0
    for _ in range(count):
        now += rng.expovariate(rate_per_s)
        times.append(now)
    return times


# ---- target baselines (in this process) ------------------------------------------------------


class FirstStep:
    """A logits processor that notes when the first new token is chosen (after prefill)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self, input_ids, scores):
        if self.at is None:
            self.at = time.perf_counter()
        return scores


def generate(model, tokenizer, plans: list[Plan], pad_id: int, greedy: bool) -> tuple[list[list[int]], float | None]:
    ids = [chat_ids(tokenizer, p.messages) for p in plans]
    longest = max(len(i) for i in ids)
    input_ids = torch.tensor([[pad_id] * (longest - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (longest - len(i)) + [1] * len(i) for i in ids])
    first = FirstStep()
    sampled = not greedy and plans[0].temperature > 0
    sampling = {"do_sample": True, "temperature": plans[0].temperature, "top_p": 1.0, "top_k": 0} if sampled else {"do_sample": False}
    if sampled:
        torch.manual_seed(plans[0].seed)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=plans[0].max_tokens, pad_token_id=pad_id, logits_processor=[first], **sampling)
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, list) else [eos])
    outputs = []
    for row in out[:, longest:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        outputs.append(row[:end])
    return outputs, first.at


def run_target(model, tokenizer, plans: list[Plan], arrivals: list[float] | None, pad_id: int, max_batch: int) -> list[Outcome]:
    """A server of ``generate`` calls: each call takes up to ``max_batch`` requests that have
    arrived (closed loop: all have, as each client resubmits when its request ends), in arrival
    order; a request waits for the calls before it."""
    outcomes, began, served = [], time.perf_counter(), 0
    due = [began + (arrivals[i] if arrivals else 0.0) for i in range(len(plans))]
    while served < len(plans):
        wait = due[served] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        now = time.perf_counter()
        count = 1
        while count < max_batch and served + count < len(plans) and due[served + count] <= now:
            count += 1
        group = plans[served : served + count]
        outputs, first = generate(model, tokenizer, group, pad_id, greedy=max_batch > 1)
        ended = time.perf_counter()
        for offset, tokens in enumerate(outputs):
            submitted = due[served + offset] if arrivals else now
            # generate returns every row at the end: its last token is then, its first after prefill.
            outcomes.append(Outcome(group[offset].key, submitted, ended, first_token=first, last_token=ended, tokens=tokens))
        served += count
    return outcomes


# ---- pipeline systems (cosine serve) -----------------------------------------------------------


def pipeline_config(system: str, base: dict, args, window: int | None = None) -> dict:
    config = json.loads(json.dumps(base))
    config.setdefault("model", {}).update({"target": str(Path(args.target).expanduser()), "cache_dir": str(Path(args.cache_dir).expanduser())})
    pipeline = config.setdefault("pipeline", {})
    pipeline["output_ttl_s"] = max(int(pipeline.get("output_ttl_s", 0)), 600)
    speculation = config.setdefault("speculation", {})
    if system in ("plain", "vanilla"):  # the baselines: no load control, first-come batches, no pipelining
        speculation["load_control"] = False
        speculation["pipelining"] = False
        pipeline["batch_choice"] = "fifo"
    elif system == "cosine-fifo":
        pipeline["batch_choice"] = "fifo"
    elif system == "cosine-cost":
        pipeline["batch_choice"] = "cost"
    elif system == "cosine-fixed":
        speculation["load_control"] = False
    elif system == "cosine-no-affinity":
        pipeline["affinity"] = False
    elif system == "cosine-no-pipelining":
        speculation["pipelining"] = False
    if system == "plain":
        speculation.update(window=0, min_window=0, max_window=0, adaptive_window=False)
        config["drafters"] = [{"name": "prompt-lookup", "kind": "prompt-lookup", "expert": "lookup"}]  # never asked: window 0
        config["router"] = {"default_experts": ["lookup"], "max_experts": 1, "online": False}
    elif system == "vanilla":
        speculation.update(mode="chain", window=window, min_window=window, max_window=window, adaptive_window=False)
        config["drafters"] = [d for d in base["drafters"] if d["name"] == args.vanilla_drafter]
        config["router"] = {"default_experts": [config["drafters"][0]["expert"]], "max_experts": 1, "online": False}
    return config


def dump_toml(config: dict) -> str:
    lines: list[str] = []

    def table(prefix: str, values: dict) -> None:
        scalars = {k: v for k, v in values.items() if not isinstance(v, dict)}
        lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in scalars.items())
        for k, v in values.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for name, values in config.items():
        if name == "drafters":
            continue
        table(name, values)
    for drafter in config.get("drafters", []):
        lines.append("[[drafters]]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in drafter.items())
    return "\n".join(lines) + "\n"


async def drive(url: str, plans: list[Plan], concurrency: int | None, arrivals: list[float] | None, tag: str) -> list[Outcome]:
    client = aioredis.from_url(url, decode_responses=True)
    began = time.perf_counter()
    outcomes: list[Outcome] = []

    async def one(index: int, plan: Plan) -> None:
        if arrivals is not None:
            await asyncio.sleep(max(0.0, began + arrivals[index] - time.perf_counter()))
        request_id = f"{tag}-{index}"
        fields = {"id": request_id, "messages": json.dumps(plan.messages), "max_tokens": str(plan.max_tokens), "temperature": str(plan.temperature)}
        if plan.temperature > 0:
            fields["seed"] = str(plan.seed)
        outcome = Outcome(plan.key, time.perf_counter())
        await client.xadd(f"{NAMESPACE}requests", fields)
        cursor, last = "0-0", time.monotonic()
        while time.monotonic() - last < STALL_S:
            reply = await client.xread({f"{NAMESPACE}out:{request_id}": cursor}, block=2_000)
            for _, entries in reply or []:
                last = time.monotonic()
                for entry_id, entry in entries:
                    cursor = entry_id
                    if entry.get("type") == "tokens":
                        outcome.last_token = time.perf_counter()
                        if outcome.first_token is None:
                            outcome.first_token = outcome.last_token
                    if entry.get("type") == "final":
                        outcome.ended = time.perf_counter()
                        outcome.tokens = json.loads(entry.get("token_ids") or "[]")
                        if entry.get("finish_reason") == "error":
                            outcome.error = entry.get("error_code") or "error"
                        outcomes.append(outcome)
                        return
        outcome.ended, outcome.error = time.perf_counter(), "client-timeout"
        outcomes.append(outcome)

    if arrivals is not None:
        await asyncio.gather(*(one(i, p) for i, p in enumerate(plans)))
    else:
        queue = list(enumerate(plans))

        async def client_loop() -> None:
            while queue:
                index, plan = queue.pop(0)
                await one(index, plan)

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    await client.aclose()
    return outcomes


async def stats(url: str) -> dict[str, int]:
    client = aioredis.from_url(url, decode_responses=True)
    values = await client.hgetall(f"{NAMESPACE}stats")
    await client.aclose()
    return {k: int(v) for k, v in values.items() if v.lstrip("-").isdigit()}


def wait_live(url: str) -> None:
    from soak import wait_until_live

    async def go() -> None:
        client = aioredis.from_url(url, decode_responses=True)
        await wait_until_live(client)
        await client.aclose()

    asyncio.run(go())


def run_pipeline(system: str, config: dict, workload: list[tuple[str, float, list[Plan], list[float] | None]], scratch: Path, tag: str) -> list[dict]:
    path = scratch / f"{tag}.toml"
    path.write_text(dump_toml(config))
    serve = Serve(path, scratch / f"{tag}.log", ["--verifiers", str(VERIFIERS)])
    url = serve.start()
    rows = []
    try:
        wait_live(url)
        warm = [workload[0][2][0]]
        asyncio.run(drive(url, warm, 1, None, f"{tag}-warm"))
        for index, (kind, load, plans, arrivals) in enumerate(workload):
            before = asyncio.run(stats(url))
            outcomes = asyncio.run(drive(url, plans, int(load) if kind == "closed" else None, arrivals, f"{tag}-{index}"))
            after = asyncio.run(stats(url))
            sent = after.get("rounds_sent", 0) - before.get("rounds_sent", 0)
            zero = after.get("rounds_window0", 0) - before.get("rounds_window0", 0)
            row = {"system": system, "kind": kind, "load": load, **summarise(outcomes), "rounds": sent, "window0_share": zero / sent if sent else None}
            # Tokens decoded after a multi-step round's first: the share of the output multi-step jobs made.
            row["multi_step_share"] = (after.get("multi_step_tokens", 0) - before.get("multi_step_tokens", 0)) / max(1, row["tokens"])
            row.update(round_figures(before, after))
            if row.get("wall_s"):
                row["verifier_busy_share"] = row["verifier_forward_s"] / row["wall_s"]
            row["outputs"] = {o.key: o.tokens for o in outcomes if o.key.endswith(":greedy") and not o.error}
            print(line(row), flush=True)
            rows.append(row)
    finally:
        stop = serve.stop()
        problems = [ln for ln in serve.log_text().splitlines() if " WARNING " in ln or " ERROR " in ln]
        if problems:
            print(f"  {system}: {len(problems)} warning/error lines in the serve log, e.g. {problems[0][:200]}")
        if stop.get("processes_left_running"):
            print(f"  {system}: processes left running after stop: {stop['processes_left_running']}")
    return rows


def round_figures(before: dict[str, int], after: dict[str, int]) -> dict:
    """The coordinator's counters over one load: rounds' tokens per ms of wall time, drafted and
    at window 0 (what speculation earned at this load), and the cost model's error on batches
    it had not been fitted on."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    out: dict = {}
    for kind in ("drafted", "window0"):
        rounds = delta.get(f"rounds_timed_{kind}", 0)
        wall_ms = delta.get(f"round_wall_us_{kind}", 0) / 1000
        out[f"rounds_{kind}"] = rounds
        out[f"round_ms_{kind}"] = wall_ms / rounds if rounds else None
        out[f"round_tokens_{kind}"] = delta.get(f"round_tokens_{kind}", 0) / rounds if rounds else None
    timed = sum(out[f"rounds_{kind}"] for kind in ("drafted", "window0"))
    if timed:  # where a round's time goes, per round (ms)
        out["round_breakdown_ms"] = {part: delta.get(f"round_{part}_us", 0) / 1000 / timed for part in ("to_pool", "in_pool", "verify_wait", "forward")}
    out["verifier_forward_s"] = delta.get("verify_forward_us", 0) / 1e6
    batches = delta.get("cost_model_batches", 0)
    out["cost_model_batches"] = batches
    out["cost_model_error"] = delta.get("cost_model_error_ppm", 0) / 1e6 / batches if batches else None
    return out


def line(row: dict) -> str:
    load = f"c={int(row['load'])}" if row["kind"] == "closed" else f"poisson {row['load']:.1f}x"
    zero = f"  window0 {row['window0_share']:.0%}" if row.get("window0_share") is not None else ""
    errors = f"  errors {row['errors']}" if row["errors"] else ""
    for kind in ("drafted", "window0"):
        if row.get(f"round_ms_{kind}"):
            errors += f"  {kind} {row[f'round_tokens_{kind}']:.2f} tok/{row[f'round_ms_{kind}']:.0f} ms"
    if row.get("cost_model_error") is not None:
        errors += f"  cost err {row['cost_model_error']:.0%}"
    if row.get("round_breakdown_ms"):
        b = row["round_breakdown_ms"]
        errors += f"  round: to pool {b['to_pool']:.0f} / pool {b['in_pool']:.0f} / verify queue {b['verify_wait']:.0f} / forward {b['forward']:.0f} ms"
    if row.get("verifier_busy_share") is not None:
        errors += f"  verifier busy {row['verifier_busy_share']:.0%}"
    if row.get("multi_step_share") is not None:
        errors += f"  multi-step {row['multi_step_share']:.0%} of tokens"
    ttft = f"{row['p50_ttft_s']:.2f} / {row['p99_ttft_s']:.2f}" if row["p50_ttft_s"] is not None else "-"
    itl = f"{row['p50_itl_s'] * 1000:.0f} / {row['p99_itl_s'] * 1000:.0f} ms" if row.get("p50_itl_s") is not None else "-"
    return (f"{row['system']:>15} {load:>13}: {row['tokens_per_s']:6.1f} tok/s  p50 {row['p50_latency_s']:6.2f} s  p99 {row['p99_latency_s']:6.2f} s"
            f"  ttft p50/p99 {ttft} s  itl p50/p99 {itl}{zero}{errors}")


# ---- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(parser)
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS))
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32])
    parser.add_argument("--poisson", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.5, 0.9, 1.2])
    parser.add_argument("--poisson-requests", type=int, default=48)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sampled", type=float, default=0.3, help="share of requests sampled at temperature 0.7")
    parser.add_argument("--long", type=float, default=0.1, help="share of ~1,000-token prompts")
    parser.add_argument("--vanilla-drafter", default="general-small")
    parser.add_argument("--vanilla-windows", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6])
    parser.add_argument("--sweep-concurrency", type=int, default=4)
    parser.add_argument("--config", default=str(ROOT / "config.toml"), help="the cosine system's config (default: the repository's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="c=1,4 only, 6 Poisson requests, 32 tokens, one vanilla window")
    parser.add_argument("--ablation-concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16])
    parser.add_argument("--verifiers", type=int, default=1, help="verifier processes of every pipeline system (they share the threads)")
    parser.add_argument("--name", default="load")
    args = parser.parse_args()
    global VERIFIERS
    VERIFIERS = args.verifiers
    if args.quick:
        args.concurrency, args.poisson_requests, args.max_tokens, args.vanilla_windows, args.min_requests = [1, 4], 6, 32, [4], 4
    systems = [s for s in args.systems.split(",") if s]
    setup_torch(args.threads)
    machine, other_cpu = stamp(), OtherCpu()
    base = tomllib.loads(Path(args.config).read_text())

    lm = load_target(args)
    model, tokenizer = lm.model.eval(), lm.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chats = [p["messages"] for p in load_prompts()]
    long_chat = long_messages(tokenizer, LONG_TOKENS)
    rng = random.Random(args.seed)
    plans_by_level = [(kind, load, plan_requests(count, rng, chats, long_chat, args)) for kind, load, count in levels(args)]
    closed = [(k, load, plans) for k, load, plans in plans_by_level if k == "closed"]
    poisson = [(k, load, plans) for k, load, plans in plans_by_level if k == "poisson"]
    closed_work = [(k, load, plans, None) for k, load, plans in closed]
    rows: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="cosine-load-"))
    print(f"scratch (configs, serve logs): {scratch}", flush=True)

    # Greedy references for every greedy request, from `target` at batch 1.
    references: dict[str, list[int]] = {}

    def reference(plan: Plan) -> None:
        if plan.key.endswith(":greedy") and plan.key not in references:
            references[plan.key] = generate(model, tokenizer, [plan], pad_id, greedy=True)[0][0]

    capacity_rps = None
    if "plain" in systems:
        plain_rows = run_pipeline("plain", pipeline_config("plain", base, args), closed_work, scratch, "plain-closed")
        rows += plain_rows
        capacity_rps = max(r["requests_per_s"] for r in plain_rows)
        print(f"plain capacity: {capacity_rps:.3f} requests/s", flush=True)
    poisson_work = []
    for kind, load, plans in poisson:
        if capacity_rps is None:
            break
        poisson_work.append((kind, load, plans, arrival_times(kind, load, len(plans), load * capacity_rps, random.Random(args.seed + int(load * 100)))))
    if "plain" in systems and poisson_work:
        rows += run_pipeline("plain", pipeline_config("plain", base, args), poisson_work, scratch, "plain-poisson")

    if "target" in systems or "target-batched" in systems:
        for _, _, plans in plans_by_level:
            for plan in plans:
                reference(plan)
    for system in ("target", "target-batched"):
        if system not in systems:
            continue
        work = closed_work + list(poisson_work)
        for kind, load, plans, arrivals in work:
            if system == "target" and kind == "closed" and load > 1:
                continue  # batch 1: the same throughput as c=1, latency only queues
            batch = 1 if system == "target" else (int(load) if kind == "closed" else max(args.concurrency))
            outcomes = run_target(model, tokenizer, plans, arrivals, pad_id, batch)
            row = {"system": system, "kind": kind, "load": load, **summarise(outcomes), "rounds": None, "window0_share": None}
            print(line(row), flush=True)
            rows.append(row)

    windows = {}
    if "vanilla" in systems:
        sweep_plans = next((p for _, c, p in closed if int(c) == args.sweep_concurrency), closed[-1][2])
        best = None
        for window in args.vanilla_windows:
            row = run_pipeline("vanilla", pipeline_config("vanilla", base, args, window), [("closed", float(args.sweep_concurrency), sweep_plans, None)], scratch, f"vanilla-w{window}-sweep")[0]
            windows[window] = row["tokens_per_s"]
            if best is None or row["tokens_per_s"] > windows[best]:
                best = window
        print(f"vanilla: best window {best} of {windows}", flush=True)
        work = closed_work + list(poisson_work)
        rows += [dict(r, window=best) for r in run_pipeline("vanilla", pipeline_config("vanilla", base, args, best), work, scratch, "vanilla")]
    if "cosine" in systems:
        work = closed_work + list(poisson_work)
        rows += run_pipeline("cosine", pipeline_config("cosine", base, args), work, scratch, "cosine")
    for system in ABLATIONS:
        work = [w for w in closed_work if int(w[1]) in args.ablation_concurrency]
        if system == "cosine-no-affinity" and args.verifiers < 2:
            continue  # one verifier holds every cache: nothing to ablate
        if system in systems and work and pipeline_config(system, base, args) != pipeline_config("cosine", base, args):
            rows += run_pipeline(system, pipeline_config(system, base, args), work, scratch, system)

    # Lossless: every greedy output of a pipeline system equals target's (a prefix of the same
    # length: both stop at max_tokens or EOS).
    for row in rows:
        outputs = row.pop("outputs", {})
        checked = [key for key in outputs if key in references]
        row["greedy_identical"] = f"{sum(outputs[k] == references[k] for k in checked)}/{len(checked)}" if checked else None
    ratios = compare(rows)
    result = {"stamp": machine, "args": vars(args), "capacity_rps": capacity_rps, "vanilla_sweep": windows, "rows": rows, "ratios": ratios,
              "other_cpu_share": other_cpu.share()}
    path = write_result(args.name, result)
    plot(rows, RESULTS_DIR / f"{args.name}-latest.png")
    print(json.dumps(ratios, indent=1))
    print(f"wrote {path}")


def compare(rows: list[dict]) -> dict:
    by = {(r["system"], r["kind"], r["load"]): r for r in rows}
    ratios = {}
    for (system, kind, load), row in by.items():
        if system != "cosine":
            continue
        label = f"{kind}-{load:g}"
        entry = {}
        for other in ("target-batched", "plain", "vanilla", "target", *ABLATIONS):
            base = by.get((other, kind, load)) or (by.get((other, "closed", 1.0)) if other == "target" else None)
            if base:
                entry[f"throughput_vs_{other}"] = row["tokens_per_s"] / base["tokens_per_s"]
                entry[f"p50_latency_vs_{other}"] = row["p50_latency_s"] / base["p50_latency_s"]
        ratios[label] = entry
    return ratios


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, kind in enumerate(("closed", "poisson")):
        for system in ALL_SYSTEMS:
            points = sorted((r["load"], r["tokens_per_s"], r["p50_latency_s"]) for r in rows if r["system"] == system and r["kind"] == kind)
            if not points:
                continue
            loads = [p[0] for p in points]
            axes[0][col].plot(loads, [p[1] for p in points], marker="o", label=system)
            axes[1][col].plot(loads, [p[2] for p in points], marker="o", label=system)
        xlabel = "concurrent requests (closed loop)" if kind == "closed" else "arrival rate / plain's capacity (Poisson)"
        axes[0][col].set(xlabel=xlabel, ylabel="tokens/s", title=f"throughput, {kind}")
        axes[1][col].set(xlabel=xlabel, ylabel="p50 latency (s)", title=f"latency, {kind}")
        if kind == "closed":
            for ax in (axes[0][col], axes[1][col]):
                ax.set_xscale("log", base=2)
        axes[0][col].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
