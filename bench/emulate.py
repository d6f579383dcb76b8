"""The pipeline at GPU speed: the real ``cosine serve`` processes with emulated GPUs.

Real Redis, the real router, coordinator, fusion, verifier and drafter processes and their code;
the target and the drafters are emulated (``cosine.emulate``: an oracle that sleeps for a
profiled GPU's time on the worker's model thread; drafters behind a profiled network). The
cluster is the paper's shape: ``--drafters`` drafter workers (experts of ``--domains``, three
per domain, the rest generalists), verifiers per the target profile (four one-GPU verifiers for
an 8B target on H100s, one tensor-parallel verifier for a 70B one on four A100s).

Per load (closed loop at each ``--concurrency``, then Poisson arrivals at each ``--poisson``
rate in requests per emulated second): throughput, latency, the verifiers' busy share (their
profiled time over wall time), and beside it the ideal's (``cosine.emulate.ideal``: the same
cluster simulated in virtual time with the pipeline's policies and no control-plane cost).
Every profiled time is slowed by a factor k (``--slowdown``; "auto": the smallest of 1, 2, 4,
... at which this machine's CPU, Redis included, stays under ``--cpu-limit`` of its cores in a
probe run and the emulated calls keep to their times); figures are reported in emulated time
(wall time / k). A run whose emulated calls (the target's, the drafters', the network's)
overshoot their profiled time by more than 2% in all is marked machine-limited.

Control-plane figures, from the same runs: CPU seconds per verified round of each process
(router, coordinator, fusion, Redis, the drafter host, the verifiers), the round rate at which
each single-threaded one saturates a core at k = 1, and Redis commands per round with the rate
at which one Redis saturates (its own ``INFO commandstats``: microseconds per call of this run's
command mix).

    python bench/emulate.py                                  # 8B on H100s, c = 1, 4, 16, 64
    python bench/emulate.py --target llama-70b-a100x4 --drafter-profile llama-68m-2080ti
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import redis
import redis.asyncio as aioredis
from common import stamp, write_result
from load import dump_toml, percentile, round_figures, stats
from soak import Serve

from cosine.config import load_config
from cosine.emulate.oracle import Oracle
from cosine.emulate.profiles import GENERAL, load_profiles
from cosine.emulate.timing import read_records
from cosine.factory import target_tokenizer

NAMESPACE = "cosine:"
STALL_S = 30  # a request with no output for this long is counted as failed (client-timeout)
MACHINE_LIMITED = 0.02  # mean overshoot over the profiled time past which a run measured this machine
ON_VERIFIER = "@verifier"  # a system's suffix: its drafters on the verifiers' GPUs
MAX_SLOWDOWN = 32.0  # the largest k the probes try (and a machine-limited run doubles to)
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which one all were when we there "
         "can more if out so what up its about into than them only other new some could time these two may first then do any like "
         "my now over such our man me even most made after also did many before must through back years where much your way well").split()


@dataclass
class Outcome:
    index: int
    submitted: float
    ended: float = 0.0
    first_token: float | None = None
    tokens: list[int] = field(default_factory=list)
    error: str = ""


def prompts(tokenizer, domains: list[str], count: int, length: int, seed: int) -> list[tuple[str, str]]:
    """``count`` prompts of about ``length`` tokens, each ``domain: words...``, domains in turn."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        domain = domains[i % len(domains)]
        words = [rng.choice(WORDS) for _ in range(length)]
        text = f"{domain}: " + " ".join(words)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append((domain, tokenizer.decode(ids[:length])))
    return out


def _setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def system_settings(system: str, experts: list[str]) -> tuple[dict, bool]:
    """A system's config sections over the cluster's, and whether its drafters are all generalists.

    ``cosine``: everything on. ``no-speculation``: window 0 (the target alone, batched).
    ``vanilla-wN``: one generalist drafter a request (all 16 drafters generalists), a fixed
    window N, no routing, no load control, no drafts made ahead. ``specinfer-wN``: every expert's
    drafter on every request (no routing), their chains fused into one tree, a fixed window N, no
    load control, no drafts made ahead. ``cosine-no-X``: CoSine with one part off. A suffix
    ``@verifier`` places the system's drafters on the verifiers' GPUs (``cluster_config``).
    """
    system = system.removesuffix(ON_VERIFIER)
    name, _, window = system.partition("-w")
    fixed = {"adaptive_window": False, "load_control": False, "pipelining": "off", "window": int(window or 4), "max_window": int(window or 4)}
    if name == "cosine":
        return {}, False
    if name == "no-speculation":
        return {"speculation": {"window": 0, "min_window": 0}}, False
    if name == "vanilla":
        return {"speculation": fixed, "router": {"online": False, "default_experts": [GENERAL], "max_experts": 1, "keywords": {}}}, True
    if name == "specinfer":
        distinct = list(dict.fromkeys(experts))
        return {"speculation": fixed, "router": {"online": False, "default_experts": distinct, "max_experts": len(distinct), "keywords": {}}}, False
    ablations = {
        "cosine-no-routing": {"router": {"online": False, "default_experts": [GENERAL], "max_experts": 2, "keywords": {}}},
        "cosine-no-fusion": {"router": {"max_experts": 1}},
        "cosine-no-pipelining": {"speculation": {"pipelining": "off"}},
        "cosine-no-batch-choice": {"pipeline": {"batch_choice": "fifo"}},
        "cosine-no-load-control": {"speculation": {"load_control": False}},
    }
    if system not in ablations:
        raise SystemExit(f"unknown system {system!r}")
    return ablations[system], False


def verifier_count(args) -> int:
    """Verifiers of the cluster: ``--verifiers``, else four one-GPU ones or one multi-GPU one."""
    return args.verifiers or (4 if load_profiles().target(args.target).gpus == 1 else 1)


def cluster_config(args, base: Path, slowdown: float, records: Path, system: str = "cosine") -> dict:
    """The cluster's config. Drafters on the drafter hosts: ``--drafters`` of them, three
    experts a domain, the rest generalists (a ``vanilla`` system's all generalists). With
    ``@verifier``: on the verifiers' GPUs instead (no network), each of the system's distinct
    experts once per verifier GPU, the drafter hosts unused."""
    experts = [d for d in args.domains for _ in range(3)][: args.drafters]
    experts += [GENERAL] * (args.drafters - len(experts))
    overrides, generalists = system_settings(system, experts)
    if generalists:
        experts = [GENERAL] * args.drafters
    on_verifier = system.endswith(ON_VERIFIER)
    if on_verifier:  # in turn, so that drafter i on GPU i mod verifiers puts every expert on every GPU
        experts = list(dict.fromkeys(experts)) * verifier_count(args)
    drafters = [{"name": f"{e}-{i}", "kind": "emulated", "expert": e, "profile": args.drafter_profile} for i, e in enumerate(experts)]
    model = load_config(base).model
    config = {
        "model": {"target": model.target_path, "cache_dir": str(model.cache_path), "threads": 1},
        "defaults": {"max_tokens": args.max_tokens},
        # Drafters on GPUs of their own draft the next round ahead (the CPU deployment rule would
        # turn it off on this machine's two cores).
        "speculation": {"mode": "tree", "max_batch": args.max_batch, "pipelining": "on", **dict(_setting(kv) for kv in args.speculation)},
        "pipeline": {"max_requests": 1024},
        "router": {"default_experts": [GENERAL], "max_experts": 2, "keywords": {d: [f"{d}:"] for d in args.domains}},
        "serve": {"drafter_processes": "shared"},
        "emulate": {"target": args.target, "slowdown": slowdown, "network": args.network, "gap_scale": args.gap_scale,
                    "domains": list(args.domains), "record_dir": str(records), "seed": args.seed,
                    **({"shared_gpus": verifier_count(args), "gpu_dir": f"{records}-gpus"} if on_verifier else {})},
        "drafters": drafters,
    }
    for section, values in overrides.items():
        config[section] = {**config[section], **values}
    return config


async def drive(url: str, plans: list[tuple[str, str]], max_tokens: int, concurrency: int | None, arrivals: list[float] | None, tag: str) -> list[Outcome]:
    """Closed loop of ``concurrency`` clients, or one request at each of ``arrivals`` (seconds)."""
    client = aioredis.from_url(url, decode_responses=True, socket_timeout=60)
    began = time.perf_counter()
    outcomes: list[Outcome] = []

    async def one(index: int, prompt: str) -> None:
        if arrivals is not None:
            await asyncio.sleep(max(0.0, began + arrivals[index] - time.perf_counter()))
        request_id = f"{tag}-{index}"
        outcome = Outcome(index, time.perf_counter())
        await client.xadd(f"{NAMESPACE}requests", {"id": request_id, "prompt": prompt, "max_tokens": str(max_tokens)})
        cursor = "0-0"
        while True:
            reply = await client.xread({f"{NAMESPACE}out:{request_id}": cursor}, block=STALL_S * 1000)
            if not reply:
                outcome.error = "client-timeout"
                break
            for _, entries in reply:
                for entry_id, entry in entries:
                    cursor = entry_id
                    if entry.get("type") == "tokens" and outcome.first_token is None:
                        outcome.first_token = time.perf_counter()
                    if entry.get("type") == "final":
                        outcome.tokens = json.loads(entry.get("token_ids") or "[]")
                        outcome.error = entry.get("error_code", "") if entry.get("finish_reason") == "error" else ""
                        outcome.ended = time.perf_counter()
                        outcomes.append(outcome)
                        return
        outcome.ended = time.perf_counter()
        outcomes.append(outcome)

    if arrivals is not None:
        await asyncio.gather(*(one(i, p) for i, (_, p) in enumerate(plans)))
    else:
        queue = list(enumerate(p for _, p in plans))

        async def loop() -> None:
            while queue:
                index, prompt = queue.pop(0)
                await one(index, prompt)

        await asyncio.gather(*(loop() for _ in range(concurrency or 1)))
    await client.aclose()
    return outcomes


def role_of(process: psutil.Process) -> str:
    try:
        command = process.cmdline()
    except psutil.Error:
        return "gone"
    if any("valkey-server" in part or "redis-server" in part for part in command[:1]):
        return "redis"
    if "worker" in command:
        return command[command.index("worker") + 1]
    return "serve" if "serve" in command else "other"


def cpu_by_role(serve: Serve) -> dict[str, float]:
    total: dict[str, float] = {}
    for process in serve.tree():
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        role = role_of(process)
        total[role] = total.get(role, 0.0) + times.user + times.system
    return total


def commandstats(url: str) -> dict[str, tuple[int, float]]:
    with redis.Redis.from_url(url) as client:
        info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), float(v["usec"])) for name, v in info.items()}


def overshoot(before: dict, after: dict) -> dict[str, dict]:
    out = {}
    for kind, tally in after.items():
        prior = before.get(kind)
        calls = tally.calls - (prior.calls if prior else 0)
        profiled = tally.profiled_s - (prior.profiled_s if prior else 0.0)
        actual = tally.actual_s - (prior.actual_s if prior else 0.0)
        if calls:
            out[kind] = {"calls": calls, "profiled_s": profiled, "mean_overshoot": (actual - profiled) / profiled if profiled else None}
    return out


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times in emulated seconds, ``rate`` requests per second."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def run_level(url: str, admin_url: str, serve: Serve, records: Path, plans, args, kind: str, load: float, slowdown: float, verifiers: int, tag: str,
              emulated_arrivals: list[float] | None = None) -> dict:
    arrivals = [t * slowdown for t in emulated_arrivals[: len(plans)]] if emulated_arrivals is not None else None
    time.sleep(1.2)  # the processes write their records every second: what came before is in this reading
    cpu0, cmd0, rec0, stats0 = cpu_by_role(serve), commandstats(admin_url), read_records(records), asyncio.run(stats(url))
    outcomes = asyncio.run(drive(url, plans, args.max_tokens, int(load) if kind == "closed" else None, arrivals, tag))
    time.sleep(1.2)  # the processes' records are written once a second
    cpu1, cmd1, rec1, stats1 = cpu_by_role(serve), commandstats(admin_url), read_records(records), asyncio.run(stats(url))
    wall = max(o.ended for o in outcomes) - min(o.submitted for o in outcomes)
    tokens = sum(len(o.tokens) for o in outcomes)
    rounds = stats1.get("rounds_sent", 0) - stats0.get("rounds_sent", 0)
    cpu = {role: cpu1.get(role, 0.0) - cpu0.get(role, 0.0) for role in cpu1}
    calls = sum(cmd1[c][0] - cmd0.get(c, (0, 0))[0] for c in cmd1)
    usec = sum(cmd1[c][1] - cmd0.get(c, (0, 0))[1] for c in cmd1)
    sleeps = overshoot(rec0, rec1)
    target = sleeps.get("target", {})
    latencies = sorted((o.ended - o.submitted) / slowdown for o in outcomes)
    emulated_wall = wall / slowdown
    oracle, tokenizer = Oracle(args.seed), target_tokenizer(load_config(args.config))
    identical = sum(1 for o in outcomes if o.tokens == oracle.continuation(tokenizer(plans[o.index][1], add_special_tokens=False)["input_ids"], args.max_tokens))
    row = {
        "kind": kind, "load": load, "slowdown": slowdown, "requests": len(outcomes), "errors": sum(1 for o in outcomes if o.error),
        "identical_to_oracle": identical,  # lossless: every greedy output is the emulated target's own
        "tokens": tokens, "emulated_wall_s": emulated_wall, "tokens_per_s": tokens / emulated_wall,
        "mean_latency_s": sum(latencies) / len(latencies), "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
        "p50_ttft_s": percentile(sorted((o.first_token - o.submitted) / slowdown for o in outcomes if o.first_token), 50),
        "rounds": rounds, "tokens_per_round": tokens / rounds if rounds else None,
        "verifier_busy_share": target.get("profiled_s", 0.0) / (wall * verifiers) if wall else None,
        "cpu_share": sum(cpu.values()) / (wall * psutil.cpu_count()),
        "cpu_ms_per_round": {role: 1000 * s / rounds for role, s in sorted(cpu.items())} if rounds else {},
        "redis_calls_per_round": calls / rounds if rounds else None, "redis_usec_per_round": usec / rounds if rounds else None,
        "redis_commands_per_round": {c: round((cmd1[c][0] - cmd0.get(c, (0, 0))[0]) / rounds, 2) for c in sorted(cmd1)
                                     if cmd1[c][0] > cmd0.get(c, (0, 0))[0]} if rounds else {},  # the run's command mix
        "overshoot": sleeps,
        # the coordinator's counters: rounds drafted and at window 0, their wall time and tokens, where a round's time goes (real ms)
        **round_figures(stats0, stats1),
    }
    # Every emulated call's overshoot over all of their profiled time (the target's, the drafters' and
    # the network's): past 2% the run measured this machine, not the cluster.
    profiled = sum(s["profiled_s"] for s in sleeps.values())
    row["mean_overshoot"] = sum(s["profiled_s"] * (s.get("mean_overshoot") or 0) for s in sleeps.values()) / profiled if profiled else 0.0
    row["machine_limited"] = row["mean_overshoot"] > MACHINE_LIMITED
    if rounds:  # k = 1 projections: rounds per second at which each one-threaded process fills a core
        row["saturating_rounds_per_s"] = {role: 1000 / ms for role, ms in row["cpu_ms_per_round"].items() if ms > 0 and role in ("router", "coordinator", "fusion", "redis")}
        row["redis_saturating_rounds_per_s"] = 1e6 / row["redis_usec_per_round"] if row["redis_usec_per_round"] else None
        row["emulated_rounds_per_s"] = rounds / emulated_wall
    return row


def line(row: dict) -> str:
    load = f"c={int(row['load'])}" if row["kind"] == "closed" else f"poisson {row['load']:.1f}/s"
    flag = "  MACHINE-LIMITED" if row["machine_limited"] else ""
    ideal = f"  ideal {row['ideal_tokens_per_s']:.0f} tok/s ({row['tokens_per_s'] / row['ideal_tokens_per_s']:.2f})" if row.get("ideal_tokens_per_s") else ""
    return (f"{load:>14} k={row['slowdown']:<4g} {row['tokens_per_s']:8.0f} tok/s  mean latency {row['mean_latency_s'] * 1000:7.0f} ms  "
            f"busy {row['verifier_busy_share']:.2f}  cpu {row['cpu_share']:.2f}  tok/round {row['tokens_per_round'] or 0:.2f}  "
            f"overshoot {row['mean_overshoot']:+.1%} (target {row['overshoot'].get('target', {}).get('mean_overshoot') or 0:+.1%}){ideal}{flag}")


def serve_cluster(args, scratch: Path, slowdown: float, tag: str, system: str) -> tuple[Serve, str, str, Path, int]:
    records = scratch / f"records-{tag}"
    records.mkdir(exist_ok=True)
    config = cluster_config(args, args.config, slowdown, records, system)
    path = scratch / f"{tag}.toml"
    path.write_text(dump_toml(config))
    verifiers = verifier_count(args)
    serve = Serve(path, scratch / f"{tag}.log", ["--verifiers", str(verifiers), "--replicas", str(args.replicas)])
    url = serve.start()
    admin = url
    from load import wait_live

    wait_live(url)
    return serve, url, admin, records, verifiers


def probe_size(count: int, kind: str, load: float) -> int:
    """Requests in a probe of ``count``: a quarter, at most 16 — but a closed load's probe
    keeps the load's concurrency (fewer requests than that would probe a lighter load)."""
    size = max(1, min(16, count // 4))
    return min(count, max(size, int(load))) if kind == "closed" else size


def slowdown_again(row: dict, probed: bool) -> float | None:
    """The k to run a load again at: a run that the probes let through (``probed``: k was
    chosen here, not given) but that ran machine-limited is no result, so twice its k (up to
    ``MAX_SLOWDOWN``); None: the run stands."""
    if not (row["machine_limited"] and probed and row["slowdown"] < MAX_SLOWDOWN):
        return None
    return 2 * row["slowdown"]


def find_slowdown(args, scratch: Path, plans, kind: str, load: float, arrivals, index: int, system: str) -> float:
    """The smallest k of 1, 2, 4, ... at which a probe (``probe_size`` requests) keeps this
    machine's CPU under ``--cpu-limit`` with the sleeps on time."""
    candidates = [2.0**i for i in range(int(math.log2(MAX_SLOWDOWN)) + 1)]
    for slowdown in candidates:
        serve, url, admin, records, verifiers = serve_cluster(args, scratch, slowdown, f"probe-{index}-{slowdown:g}", system)
        try:
            asyncio.run(drive(url, plans[:1], args.max_tokens, 1, None, f"probe-warm-{index}"))
            probe = run_level(url, admin, serve, records, plans[: probe_size(len(plans), kind, load)], args, kind, load, slowdown, verifiers,
                              f"probe-{index}-{slowdown:g}", arrivals)
        finally:
            serve.stop()
        print(f"  probe k={slowdown:g}: cpu {probe['cpu_share']:.2f}, overshoot {probe['mean_overshoot']:+.1%}", flush=True)
        if probe["cpu_share"] <= args.cpu_limit and not probe["machine_limited"]:
            return slowdown
    return candidates[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("config.toml"), help="where the target's files are ([model])")
    parser.add_argument("--target", default="llama-8b-h100")
    parser.add_argument("--drafter-profile", default="llama-68m-2080ti")
    parser.add_argument("--network", default="paper")
    parser.add_argument("--domains", type=lambda s: s.split(","), default=["code", "math", "chat", "finance"])
    parser.add_argument("--drafters", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1, help="processes of each of router, coordinator and fusion")
    parser.add_argument("--verifiers", type=int, default=0, help="0: four one-GPU verifiers, or one for a multi-GPU profile")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 4, 16, 64])
    parser.add_argument("--poisson", type=lambda s: [float(x) for x in s.split(",") if x], default=[], help="arrival rates, requests per emulated second")
    parser.add_argument("--requests", type=int, default=0, help="per load (0: max(8, 2c); Poisson: 64)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--speculation", action="append", default=[], help="KEY=VALUE of [speculation] (repeatable)")
    parser.add_argument("--slowdown", default="auto", help='k, or "auto" (the smallest power of two under --cpu-limit), or c:k,c:k')
    parser.add_argument("--cpu-limit", type=float, default=0.7)
    parser.add_argument("--gap-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", type=lambda s: s.split(","), default=["cosine"],
                        help="cosine, no-speculation, vanilla-wN, specinfer-wN, cosine-no-{routing,fusion,pipelining,batch-choice,load-control}; "
                             "a suffix @verifier places the drafters on the verifiers' GPUs")
    parser.add_argument("--tag", default="emulate")
    args = parser.parse_args()
    tokenizer = target_tokenizer(load_config(args.config))
    loads = [("closed", float(c)) for c in args.concurrency] + [("poisson", r) for r in args.poisson]
    fixed = {}
    if args.slowdown != "auto":
        if ":" in args.slowdown:
            fixed = {float(c): float(k) for c, k in (part.split(":") for part in args.slowdown.split(","))}
        else:
            fixed = {load: float(args.slowdown) for _, load in loads}
    rows = []
    probed: set[float] = set()  # loads whose k the probes chose (a machine-limited run doubles it)
    from cosine.emulate.ideal import simulate

    scratch = Path(tempfile.mkdtemp(prefix="cosine-emulate-"))  # configs and serve logs, kept for a look
    print(f"configs and logs in {scratch}", flush=True)
    for index, (kind, load) in enumerate(loads):
        count = args.requests or (max(8, 2 * int(load)) if kind == "closed" else 64)
        plans = prompts(tokenizer, args.domains, count, args.prompt_tokens, args.seed + index)
        arrivals = poisson_arrivals(load, count, args.seed + index) if kind == "poisson" else None
        for system in args.systems:
            if load not in fixed:  # k for this load, found with the first system and kept for the others
                fixed[load] = find_slowdown(args, scratch, plans, kind, load, arrivals, index, system)
                probed.add(load)
            slowdown = fixed[load]
            while True:
                serve, url, admin, records, verifiers = serve_cluster(args, scratch, slowdown, f"{args.tag}-{index}-{system}-{slowdown:g}", system)
                try:
                    asyncio.run(drive(url, plans[:1], args.max_tokens, 1, None, f"warm-{index}-{system}"))
                    row = run_level(url, admin, serve, records, plans, args, kind, load, slowdown, verifiers, f"run-{index}", arrivals)  # the same ids, so the same draws, for every system
                except Exception as error:  # one system's failure is reported, the others still run
                    print(f"{system:>24} {kind} {load:g}: FAILED ({type(error).__name__}: {error}); its serve log: {serve.log_path}", flush=True)
                    row = {"system": system, "kind": kind, "load": load, "slowdown": slowdown, "failed": f"{type(error).__name__}: {error}"}
                    break
                finally:
                    serve.stop()
                again = slowdown_again(row, load in probed)
                if again is None:
                    break
                print(f"  k={slowdown:g} ran machine-limited (overshoot {row['mean_overshoot']:+.1%}): again at k={again:g}", flush=True)
                slowdown = fixed[load] = again
            if "failed" in row:
                rows.append(row)
                continue
            ideal_config = scratch / "ideal.toml"
            ideal_config.write_text(dump_toml(cluster_config(args, args.config, 1.0, scratch, system)))
            ids, texts = [f"run-{index}-{i}" for i in range(count)], [p for _, p in plans]
            for name, greedy in (("ideal", False), ("never_idle", True)):
                figures = simulate(load_config(ideal_config), tokenizer, ids, texts, args.max_tokens, verifiers,
                                   int(load) if kind == "closed" else None, arrivals, greedy=greedy)
                row.update({f"{name}_{k}": v for k, v in figures.items()})
            row["system"] = system
            row["throughput_vs_ideal"] = row["tokens_per_s"] / row["ideal_tokens_per_s"]
            row["latency_vs_ideal"] = row["mean_latency_s"] / row["ideal_mean_latency_s"]
            print(f"{system:>24} " + line(row), flush=True)
            rows.append(row)
    result = {"rows": rows, "stamp": stamp(), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    print(f"wrote {write_result(args.tag, result)}")


if __name__ == "__main__":
    sys.exit(main())
