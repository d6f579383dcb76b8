"""Resident memory of a default ``cosine serve`` after N requests.

Starts the deployment ``cosine serve`` would (the repository's config.toml, the embedded Valkey,
the deployment plan for this machine's cores), notes each worker's resident set once all are
live, sends ``--requests`` chat requests
(``bench/prompts.jsonl`` in turn, ``--concurrency`` at a time, ``--max-tokens`` each), then sums
the resident set (VmRSS) of every worker process and of the server. Writes
``bench/results/memory-*.json`` with the per-process figures.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
from common import BENCH_DIR, load_prompts, stamp, write_result

from cosine.client import Client
from cosine.config import load_config
from cosine.demo import _wait_for_workers
from cosine.serve import Supervisor


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(BENCH_DIR.parent / "config.toml"))
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    config = load_config(Path(args.config))
    prompts = load_prompts(BENCH_DIR / "prompts.jsonl")
    supervisor = Supervisor(config, None, Path(args.config))
    print(supervisor.describe(), flush=True)
    url = supervisor.start()
    try:
        _wait_for_workers(redis.Redis.from_url(url), config.redis.namespace)
        client = Client(url, config.redis.namespace, timeout=300)
        at_start = {slot.name: rss_mib(slot.process.pid) for slot in supervisor.slots if slot.process is not None}
        began = time.perf_counter()

        def ask(index: int) -> int:
            final = client.generate(messages=prompts[index % len(prompts)]["messages"], request_id=f"mem-{index}-{time.time_ns()}", max_tokens=args.max_tokens)
            return final.generated_tokens

        with ThreadPoolExecutor(args.concurrency) as pool:
            tokens = sum(pool.map(ask, range(args.requests)))
        processes = {slot.name: rss_mib(slot.process.pid) for slot in supervisor.slots if slot.process is not None}
        if supervisor.embedded is not None and supervisor.embedded.pid is not None:
            processes["valkey-server"] = rss_mib(supervisor.embedded.pid)
        total = sum(processes.values())
        result = {"benchmark": "memory", "deployment": supervisor.describe(), "requests": args.requests, "tokens": tokens,
                  "seconds": time.perf_counter() - began, "rss_mib": processes, "total_rss_mib": total,
                  "rss_mib_at_start": at_start, "total_rss_mib_at_start": sum(at_start.values()), "stamp": stamp()}
        print(json.dumps(result, indent=1))
        print(f"total resident: {total / 1024:.2f} GiB; wrote {write_result('memory', result)}")
    finally:
        supervisor.stop()


if __name__ == "__main__":
    main()
