"""The HTTP gateway's own cost: the same load through the gateway and straight to Redis.

The pipeline is ``cosine serve``'s processes with the instant test-only target of
``bench/pipeline.py`` (a 2-layer, 32-wide random-weight Llama with the demo tokenizer; drafting
with prompt lookup), so model compute is ~0 and what is measured is the serving path. Closed
loop: ``--clients`` (64) clients each submit a chat request (``--max-tokens`` tokens, greedy),
read it to its final entry, and submit the next, for ``--warmup-s`` (not measured: connections
opening, every client's first request at once) and then ``--seconds``; first straight to Redis
(``XADD`` + ``XREAD BLOCK``, as any Redis client), then through the gateway (the same requests as
``POST /v1/chat/completions`` with ``stream: true`` and ``include_usage``, over HTTP/1.1
keep-alive connections), then both again in the same order (``--repeats``, medians reported).
Reported for each: verification
rounds per second (the requests' ``rounds``, of requests finished in the window), time to first
token (the first ``tokens`` entry with text / the first content chunk) p50 and p99, split at the
router's admission into ``intake`` and ``after`` (``ttft_parts``), tokens per second.
Goals (issue "What serving users expect"): through the gateway at least 90% of the rounds per
second, and at most 5 ms p50 / 20 ms p99 added to the time to first token.

Example:
    python bench/gateway.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from common import OtherCpu, add_model_options, load_prompts, load_target, stamp, write_result
from pipeline import CONFIG, MODEL_FREE_DRAFTER, make_instant_model

from cosine.config import load_config
from cosine.serve import Supervisor

MODEL = "instant"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def direct_client(url: str, prompts: list, max_tokens: int, until: float, out: list) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        index = 0
        while time.perf_counter() < until:
            messages = prompts[index % len(prompts)]
            index += 1
            request_id = uuid.uuid4().hex
            sent, sent_wall = time.perf_counter(), time.time()
            await client.xadd("cosine:requests", {"id": request_id, "messages": json.dumps(messages), "max_tokens": str(max_tokens)})
            cursor, first = "0-0", None
            while True:
                reply = await client.xread({f"cosine:out:{request_id}": cursor}, block=5000)
                now = time.perf_counter()
                done = None
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        if fields[b"type"] == b"tokens" and fields.get(b"text") and first is None:
                            first, first_wall = now, time.time()
                        if fields[b"type"] == b"final":
                            done = fields
                if done is not None:
                    out.append({"sent": sent, "ttft_s": (first or now) - sent, "end": now, "rounds": int(done[b"rounds"]), "tokens": int(done[b"generated_tokens"]),
                                "ok": done[b"finish_reason"] in (b"length", b"stop"), "id": request_id, "sent_wall": sent_wall,
                                "first_wall": first_wall if first else None})
                    break
    finally:
        await client.aclose()


async def gateway_client(http: httpx.AsyncClient, base: str, prompts: list, max_tokens: int, until: float, out: list) -> None:
    index = 0
    while time.perf_counter() < until:
        messages = prompts[index % len(prompts)]
        index += 1
        body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}
        sent, sent_wall = time.perf_counter(), time.time()
        first, usage = None, None
        written: list[float] = []

        async def trace(name: str, info: dict, written=written) -> None:
            if name == "http11.send_request_body.complete":
                written.append(time.time())

        async with http.stream("POST", f"{base}/v1/chat/completions", json=body, extensions={"trace": trace}) as response:
            request_id = response.headers.get("x-request-id")
            marks = dict((k.strip(), float(v)) for k, _, v in (m.partition("=") for m in response.headers.get("x-cosine-timing", "").split(",") if m))
            if response.status_code != 200:
                await response.aread()
                out.append({"sent": sent, "ttft_s": 0.0, "end": time.perf_counter(), "rounds": 0, "tokens": 0, "ok": False})
                continue
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first, first_wall = time.perf_counter(), time.time()
                if chunk.get("usage"):
                    usage = chunk
        now = time.perf_counter()
        out.append({"sent": sent, "ttft_s": (first or now) - sent, "end": now, "rounds": usage["cosine"]["num_verification_rounds"] if usage else 0,
                    "tokens": usage["usage"]["completion_tokens"] if usage else 0, "ok": usage is not None, "id": request_id,
                    "sent_wall": sent_wall, "first_wall": first_wall if first else None, "marks": marks,
                    "written": written[0] if written else None})


async def ttft_parts(url: str, window: list[dict]) -> dict:
    """Where each request's time to first token went, by the wall clock (one host), p50 / p99
    in ms. Both kinds: ``intake``, from the client's send to the router's admission
    (``created_ms`` in the request hash), and ``after``, from the admission to the client
    holding the first text. Through the gateway (its ``X-Cosine-Timing`` marks and httpx's
    trace), intake is ``client`` (the load generator's httpx until the body is written),
    ``wire`` (to the gateway's handler), ``gateway`` (parsing, submitting) and ``router`` (to the
    admission); after is ``first_round`` (to the gateway holding the first output) and
    ``delivery`` (its SSE chunk reaching the client's loop)."""
    client = aioredis.Redis.from_url(url)
    parts: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        parts.setdefault(name, []).append(value)

    try:
        rows = [d for d in window if d.get("id") and d.get("first_wall")]
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            async with client.pipeline(transaction=False) as pipe:
                for d in chunk:
                    pipe.hget(f"cosine:req:{d['id']}", "created_ms")
                replies = await pipe.execute()
            for d, created in zip(chunk, replies):
                if created is None:
                    continue
                created, sent, first = int(created), d["sent_wall"] * 1000, d["first_wall"] * 1000
                add("intake", created - sent)
                add("after", first - created)
                marks, written = d.get("marks"), d.get("written")
                if marks and written:
                    add("client", written * 1000 - sent)
                    add("wire", marks["arrived"] - written * 1000)
                    add("gateway", marks["submitted"] - marks["arrived"])
                    add("router", created - marks["submitted"])
                    add("first_round", marks["first"] - created)
                    add("delivery", first - marks["first"])
    finally:
        await client.aclose()
    out = {}
    for name, values in parts.items():
        out[f"{name}_ms_p50"], out[f"{name}_ms_p99"] = quantile(values, 0.5), quantile(values, 0.99)
    return out


def summarise(done: list[dict], began: float, until: float) -> dict:
    """Requests sent after the warm-up (connections opening, the first burst of every client
    at once) and finished in the window."""
    window = in_window(done, began, until)
    wall = until - began
    ttfts = [d["ttft_s"] * 1000 for d in window]
    return {
        "requests": len(window),
        "failed": sum(not d["ok"] for d in window),
        "rounds_per_s": sum(d["rounds"] for d in window) / wall,
        "tokens_per_s": sum(d["tokens"] for d in window) / wall,
        "ttft_ms_p50": quantile(ttfts, 0.5),
        "ttft_ms_p99": quantile(ttfts, 0.99),
    }


def parts_of(row: dict) -> list[str]:
    return [k[: -len("_ms_p50")] for k in row if k.endswith("_ms_p50") and k != "ttft_ms_p50"]


def in_window(done: list[dict], began: float, until: float) -> list[dict]:
    return [d for d in done if d["end"] <= until and d["sent"] >= began]


async def run(kind: str, url: str, base: str, prompts: list, args) -> dict:
    out: list[dict] = []
    began = time.perf_counter()
    until = began + args.warmup_s + args.seconds
    if kind == "redis":
        await asyncio.gather(*(direct_client(url, prompts[i:] + prompts[:i], args.max_tokens, until, out) for i in range(args.clients)))
    else:
        limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
        async with httpx.AsyncClient(limits=limits, timeout=120) as http:
            await asyncio.gather(*(gateway_client(http, base, prompts[i:] + prompts[:i], args.max_tokens, until, out) for i in range(args.clients)))
    row = summarise(out, began + args.warmup_s, until)
    row.update(await ttft_parts(url, in_window(out, began + args.warmup_s, until)))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup-s", type=float, default=3.0, help="each run's first seconds, not measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="redis,gateway", help="which runs, in this order, each repeat (profiling: gateway alone)")
    parser.add_argument("--name", default="gateway")
    args = parser.parse_args()
    prompts = [item["messages"] for item in load_prompts()]
    scratch = Path(tempfile.mkdtemp(prefix="cosine-bench-gateway-"))
    loaded = load_target(args)  # for its tokenizer
    instant_dir = make_instant_model(scratch / "instant-model", loaded.tokenizer)
    del loaded
    config_path = scratch / "instant.toml"
    config_path.write_text(CONFIG.format(target=str(instant_dir), cache_dir=str(Path(args.cache_dir).expanduser()), threads=1,
                                         batch_wait_ms=100, drafter=MODEL_FREE_DRAFTER))
    port = free_port()
    config = load_config(config_path, environ={})
    supervisor = Supervisor(config, None, config_path, verifiers=1, drafters_per_expert=1,
                            gateway=("--port", str(port), "--served-model-name", MODEL, "--timing-header"))
    url = supervisor.start()
    base = f"http://127.0.0.1:{port}"
    result: dict = {"stamp": stamp(), "args": vars(args), "runs": []}
    other = OtherCpu()
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            supervisor.check()
            time.sleep(0.5)
        else:
            raise TimeoutError("the pipeline did not come up")
        warm = {"model": MODEL, "messages": prompts[0], "max_tokens": 4}
        httpx.post(f"{base}/v1/chat/completions", json=warm, timeout=60).raise_for_status()
        for repeat in range(args.repeats):
            for kind in args.kinds.split(","):
                row = asyncio.run(run(kind, url, base, prompts, args))
                row.update(kind=kind, repeat=repeat)
                result["runs"].append(row)
                print(f"{kind:8s} #{repeat}: {row['rounds_per_s']:.0f} rounds/s, {row['tokens_per_s']:.0f} tokens/s, TTFT p50 "
                      f"{row['ttft_ms_p50']:.1f} ms p99 {row['ttft_ms_p99']:.1f} ms, {row['requests']} requests, {row['failed']} failed")
                print("         TTFT parts p50/p99 ms: " + ", ".join(f"{name} {row[f'{name}_ms_p50']:.1f}/{row[f'{name}_ms_p99']:.1f}"
                                                              for name in parts_of(row)))
    finally:
        supervisor.stop()
    by = {kind: [r for r in result["runs"] if r["kind"] == kind] for kind in ("redis", "gateway")}
    if not all(by.values()):
        print(f"wrote {write_result(args.name, result)}")
        return

    def med(kind: str, key: str) -> float:  # the median of the repetitions
        return statistics.median(r[key] for r in by[kind])

    result["summary"] = {
        "gateway_vs_redis_rounds_per_s": med("gateway", "rounds_per_s") / med("redis", "rounds_per_s"),
        "gateway_vs_redis_tokens_per_s": med("gateway", "tokens_per_s") / med("redis", "tokens_per_s"),
        "added_ttft_ms_p50": med("gateway", "ttft_ms_p50") - med("redis", "ttft_ms_p50"),
        "added_ttft_ms_p99": med("gateway", "ttft_ms_p99") - med("redis", "ttft_ms_p99"),
        # Where the added time is: before the router admits the request, or after it.
        **{f"added_{part}_ms_{q}": med("gateway", f"{part}_ms_{q}") - med("redis", f"{part}_ms_{q}")
           for part in ("intake", "after") for q in ("p50", "p99")},
    }
    result["other_cpu_share"] = other.share()
    for key, value in result["summary"].items():
        print(f"{key:34s} {value:.3f}")
    print(f"wrote {write_result(args.name, result)}")


if __name__ == "__main__":
    main()
