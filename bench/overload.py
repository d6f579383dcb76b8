"""Overload: a burst of 10x the admission bound while the verifiers are saturated.

What is measured (issue "Untrusted clients"): ``cosine serve`` with the repository's config (its
admission bound ``pipeline.max_requests`` and the K/V reservation of ``pipeline.admission_kv``)
is first filled: ``--fill`` requests (default: the bound) are submitted at once, so that the
pipeline holds as many requests as it admits and the verifier is saturated. Then a burst of
``--burst-factor`` x the bound more requests is written at once (pipelined XADDs). Reported:

- how many requests were admitted and whether every admitted one finished (``length``/``stop``),
- for every refused request (``error_code=busy``), the time from the moment its XADD was sent
  (its chunk of pipelined XADDs) to the moment its refusal was written (the server's keyspace
  notification of the XADD on its output stream, one subscriber started before the burst),
  p50 / p99 / max,
- every final's ``error_code`` counts (nothing but ``busy`` expected),
- the peak resident memory of every process of the serve tree and the server's ``used_memory``
  (sampled every second), against the same figures before the burst.

Example:
    python bench/overload.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import tomllib
from collections import Counter
from pathlib import Path

import redis.asyncio as aioredis
from common import load_prompts, stamp, write_result
from soak import NAMESPACE, Sampler, Serve

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def submit_all(client: aioredis.Redis, requests: list[dict[str, str]], chunk: int = 256) -> dict[str, float]:
    """XADD every request, pipelined in chunks; request id -> when its chunk was sent."""
    sent: dict[str, float] = {}
    for start in range(0, len(requests), chunk):
        part = requests[start : start + chunk]
        now = time.monotonic()
        async with client.pipeline(transaction=False) as pipe:
            for fields in part:
                pipe.xadd(f"{NAMESPACE}requests", fields)
            await pipe.execute()
        sent.update({fields["id"]: now for fields in part})
    return sent


async def first_seen(client: aioredis.Redis, ids: list[str], timeout_s: float, started: asyncio.Event) -> dict[str, float]:
    """Request id -> when the first entry of its output stream was written, from the server's
    keyspace notifications of stream commands (one subscriber; no polling, no blocking reads on
    thousands of keys competing with the router for the server). ``started`` is set once
    subscribed."""
    await client.config_set("notify-keyspace-events", "Kt")
    prefix = f"__keyspace@0__:{NAMESPACE}out:"
    wanted = set(ids)
    seen: dict[str, float] = {}
    pubsub = client.pubsub()
    await pubsub.psubscribe(f"{prefix}*")
    started.set()
    deadline = time.monotonic() + timeout_s
    try:
        while wanted - seen.keys() and time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message and message.get("data") == "xadd":
                request_id = message["channel"][len(prefix):]
                if request_id in wanted and request_id not in seen:
                    seen[request_id] = time.monotonic()
    finally:
        await pubsub.punsubscribe()
        await pubsub.aclose()
    return seen


async def finals(client: aioredis.Redis, ids: list[str], timeout_s: float) -> dict[str, dict]:
    """Request id -> its final entry, waiting up to ``timeout_s`` for all of them."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < len(ids) and time.monotonic() < deadline:
        async with client.pipeline(transaction=False) as pipe:
            waiting = [r for r in ids if r not in found]
            for request_id in waiting:
                pipe.xrevrange(f"{NAMESPACE}out:{request_id}", count=1)
            replies = await pipe.execute()
        for request_id, entries in zip(waiting, replies):
            if entries and entries[0][1].get("type") == "final":
                found[request_id] = entries[0][1]
        if len(found) < len(ids):
            await asyncio.sleep(1.0)
    return found


def peaks(samples: list[dict]) -> dict:
    rss: dict[str, float] = {}
    used = 0.0
    for sample in samples:
        for role, mib in sample.get("rss_mib", {}).items():
            role = role.split(":")[0] if role.count(":") and role.split(":")[-1].isdigit() else role
            rss[role] = max(rss.get(role, 0.0), mib)
        used = max(used, sample.get("used_memory_mib", 0.0))
    return {"rss_mib": dict(sorted(rss.items())), "used_memory_mib": used}


async def run(args: argparse.Namespace) -> dict:
    config_text = Path(args.config).read_text()
    pipeline = tomllib.loads(config_text).get("pipeline", {})
    bound = args.bound or int(pipeline.get("max_requests", 256))
    fill = args.fill or bound
    burst = args.burst_factor * bound
    prompts = [p["messages"] for p in load_prompts()]
    tag = f"ovl{int(time.time())}"

    def request(i: int, phase: str) -> dict[str, str]:
        return {"id": f"{tag}-{phase}-{i}", "messages": json.dumps(prompts[i % len(prompts)]), "max_tokens": str(args.max_tokens), "temperature": "0"}

    scratch = Path(tempfile.mkdtemp(prefix="cosine-overload-"))
    (scratch / "config.toml").write_text(config_text)
    serve = Serve(scratch / "config.toml", scratch / "serve.log")
    url = serve.start()
    client = aioredis.Redis.from_url(url, decode_responses=True)
    sampler = Sampler(serve, client, every_s=1.0)
    sampling = asyncio.create_task(sampler.run())
    try:
        await asyncio.sleep(3.0)
        idle = peaks(sampler.samples)
        fill_requests = [request(i, "fill") for i in range(fill)]
        fill_ids = [r["id"] for r in fill_requests]
        started = asyncio.Event()
        watching = asyncio.create_task(first_seen(client, fill_ids, 120.0, started))
        await started.wait()
        await submit_all(client, fill_requests)
        await watching  # every fill request started or refused
        await asyncio.sleep(2.0)  # the verifier busy with what was admitted
        active_before = await client.zcard(f"{NAMESPACE}deadlines")
        saturated = peaks(sampler.samples)
        print(f"filled: {active_before} active of {fill} submitted (bound {bound}); bursting {burst}", flush=True)
        burst_requests = [request(i, "burst") for i in range(burst)]
        burst_ids = [r["id"] for r in burst_requests]
        started = asyncio.Event()
        watching = asyncio.create_task(first_seen(client, burst_ids, 120.0, started))
        await started.wait()
        sent = await submit_all(client, burst_requests)
        seen = await watching
        print(f"burst answered or started: {len(seen)}/{burst}", flush=True)
        all_ids = fill_ids + burst_ids
        ended = await finals(client, all_ids, args.timeout_s)
        final_peaks = peaks(sampler.samples)
    finally:
        sampling.cancel()
        await client.aclose()
        stopped = serve.stop()
    codes = Counter(f.get("error_code") or f.get("finish_reason") for f in ended.values())
    admitted = [r for r in all_ids if r in ended and ended[r].get("error_code") != "busy"]
    refused = [r for r in burst_ids if r in ended and ended[r].get("error_code") == "busy"]
    refusal_ms = [(seen[r] - sent[r]) * 1000 for r in refused if r in seen]
    finished = [r for r in admitted if ended[r].get("finish_reason") in ("length", "stop")]
    result = {
        "stamp": stamp(),
        "args": vars(args),
        "bound": bound,
        "fill": fill,
        "burst": burst,
        "active_before_burst": active_before,
        "admitted": len(admitted),
        "admitted_finished": len(finished),
        "refused_busy_in_burst": len(refused),
        "refused_busy_in_fill": sum(1 for r in fill_ids if r in ended and ended[r].get("error_code") == "busy"),
        "without_final": len(all_ids) - len(ended),
        "final_codes": dict(codes),
        "refusal_ms": {"p50": percentile(refusal_ms, 0.5), "p99": percentile(refusal_ms, 0.99), "max": max(refusal_ms, default=float("nan")),
                       "mean": statistics.fmean(refusal_ms) if refusal_ms else float("nan")},
        "memory_idle": idle,
        "memory_saturated": saturated,
        "memory_peak": final_peaks,
        "serve_stop": stopped,
        "serve_log_warnings": [line for line in serve.log_text().splitlines() if " WARNING " in line or " ERROR " in line][:50],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "config.toml"), help="serve's config (default: the repository's)")
    parser.add_argument("--bound", type=int, default=0, help="the admission bound to fill and burst against (default: the config's pipeline.max_requests)")
    parser.add_argument("--fill", type=int, default=0, help="requests submitted before the burst (default: the bound)")
    parser.add_argument("--burst-factor", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="how long admitted requests may take to finish")
    parser.add_argument("--name", default="overload")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    path = write_result(args.name, result)
    summary = {k: result[k] for k in ("bound", "active_before_burst", "admitted", "admitted_finished", "refused_busy_in_burst", "without_final", "final_codes", "refusal_ms")}
    print(json.dumps(summary, indent=2))
    print("memory peak:", json.dumps(result["memory_peak"]), "\nsaturated:", json.dumps(result["memory_saturated"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
