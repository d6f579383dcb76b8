"""A golden trace: a fixed workload's final entries, to show that a change of structure changed
no behaviour. Run it on two checkouts and compare:

    PYTHONPATH=/path/to/before python bench/golden.py --out before.json
    PYTHONPATH=/path/to/after  python bench/golden.py --out after.json
    python bench/golden.py --compare before.json after.json

The workload: the test prompts as chat requests, one at a time (no batch-mates, so no batch
effects), greedy and seeded-sampled, through ``cosine serve``'s processes (embedded Redis, one
process per stage, the repository's config.toml and its drafters). Speculation is made
deterministic for the trace: load control off (its choices follow measured times) and a
drafting deadline no drafter misses, so every round's window follows from the request's own
acceptance. Every field of each final entry is compared, the rounds and the drafted and
accepted tokens included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "tests" / "data" / "chat_prompts.json"
# Speculation made deterministic for the trace, over the repository's config.toml.
OVERRIDES = {"COSINE_SPECULATION_LOAD_CONTROL": "false", "COSINE_PIPELINE_DRAFTER_DEADLINE_MS": "60000"}


def run(out: Path, requests: int, max_tokens: int) -> None:
    import redis

    from cosine.client import Client
    from cosine.config import load_config
    from cosine.serve import Supervisor

    os.environ.update(OVERRIDES)  # the workers inherit them
    texts = json.loads(PROMPTS.read_text())[:requests]
    config_path = ROOT / "config.toml"
    config = load_config(config_path)
    supervisor = Supervisor(config, None, config_path, verifiers=1, drafters_per_expert=1, verbose=False)
    url = supervisor.start()
    try:
        admin = redis.Redis.from_url(url)
        deadline = time.monotonic() + 300
        while {k.decode().split(":")[2] for k in admin.scan_iter(match="cosine:live:*")} < {"router", "coordinator", "fusion", "verifier"}:
            if time.monotonic() > deadline:
                raise TimeoutError("the pipeline did not come up")
            time.sleep(0.5)
        finals = []
        with Client(url, timeout=300) as client:
            # Not recorded: every drafter registers and warms up (the first request's rounds
            # would depend on which drafters were live yet).
            time.sleep(2.0)
            client.generate(prompt="Warm up.", max_tokens=8, request_id="golden-warm-up")
            for index, text in enumerate(texts):
                for mode in ("greedy", "sampled"):
                    params = {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + index} if mode == "sampled" else {}
                    final = client.generate(messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                                            request_id=f"golden-{mode}-{index}", **params)
                    final = final.to_fields() if hasattr(final, "to_fields") else final  # older checkouts' clients return the fields
                    finals.append({"request": f"{mode}-{index}", **{k: v for k, v in final.items() if k not in ("id",)}})
                    print(f"{mode}-{index}: {final['finish_reason']} {final['generated_tokens']} tokens, {final['rounds']} rounds", flush=True)
    finally:
        supervisor.stop()
    out.write_text(json.dumps(finals, indent=1, ensure_ascii=False) + "\n")


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differing = [(x["request"], sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))) for x, y in zip(a, b) if x != y]
    print(f"{len(a)} and {len(b)} final entries; {len(differing)} differ")
    for request, fields in differing:
        print(f"  {request}: {', '.join(fields)}")
    return 0 if len(a) == len(b) and not differing else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--requests", type=int, default=8, help="prompts (each greedy and seeded-sampled)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.out is None:
        parser.error("--out or --compare")
    run(args.out, args.requests, args.max_tokens)


if __name__ == "__main__":
    main()
