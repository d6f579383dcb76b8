"""How much of each evaluation prompt and reference output appears in a drafter's training data.

For every prompt of ``bench/prompts.jsonl`` and ``bench/prompts_holdout.jsonl`` (the user's text)
and, with ``--references RESULT.json`` (a ``bench/speedup.py`` result, whose ``target_outputs``
are the target's greedy outputs), its reference output: the longest run of target tokens it
shares with the training data, and that run's text.

Training data read:

- ``--work DIR`` (repeatable): the conversations of a ``cosine distill`` work directory
  (``data/answers.jsonl``: prompt and answer token ids, as trained on);
- ``--text N@SEED`` (repeatable): the first N tokens of the built-in general mix shuffled with
  SEED, as ``cosine distill --seed SEED --text-tokens N`` forces them through the target.

Method: every 4-token window of the evaluation sequences is indexed; the training stream is
scanned once and each hit extended to its full length. Runs shorter than 4 tokens count as 0.
Results: bench/results/overlap-latest.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import BENCH_DIR, load_prompts, stamp, write_result

from cosine.config import load_config

SETS = {"prompts": BENCH_DIR / "prompts.jsonl", "holdout": BENCH_DIR / "prompts_holdout.jsonl"}
SEED_LEN = 4


def longest_shared(queries: list[list[int]], streams: list[list[int]]) -> list[tuple[int, int]]:
    """For each query, (length, start in the query) of its longest token run that also occurs in
    one of ``streams``; (0, 0) when none reaches ``SEED_LEN`` tokens."""
    index: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for q, query in enumerate(queries):
        for i in range(len(query) - SEED_LEN + 1):
            index.setdefault(tuple(query[i : i + SEED_LEN]), []).append((q, i))
    best = [(0, 0)] * len(queries)
    for stream in streams:
        for j in range(len(stream) - SEED_LEN + 1):
            hits = index.get(tuple(stream[j : j + SEED_LEN]))
            if not hits:
                continue
            for q, i in hits:
                query, n = queries[q], SEED_LEN
                while i + n < len(query) and j + n < len(stream) and query[i + n] == stream[j + n]:
                    n += 1
                if n > best[q][0]:
                    best[q] = (n, i)
    return best


def training_streams(args, tokenizer) -> tuple[list[list[int]], dict]:
    streams, described = [], {}
    for work in args.work or []:
        path = Path(work).expanduser() / "data" / "answers.jsonl"
        rows = [json.loads(line)["ids"] for line in path.open(encoding="utf-8") if line.strip()]
        streams += rows
        described[str(path)] = {"conversations": len(rows), "tokens": sum(map(len, rows))}
    for spec in args.text or []:
        from cosine.distill import corpus
        from cosine.distill.data import tokenize_documents

        tokens, _, seed = spec.partition("@")
        documents = corpus.general_mix(corpus.SOURCES, seed=int(seed or 0))
        stream, _ = tokenize_documents(tokenizer, documents, int(tokens), 0)
        streams.append(stream)
        described[f"general mix, seed {int(seed or 0)}"] = {"tokens": len(stream)}
    return streams, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", action="append", help="a `cosine distill` work directory (repeatable)")
    parser.add_argument("--text", action="append", help="N@SEED: the first N tokens of the general mix shuffled with SEED (repeatable)")
    parser.add_argument("--references", help="a bench/speedup.py result JSON with target_outputs")
    parser.add_argument("--config", default=str(BENCH_DIR.parent / "config.toml"))
    args = parser.parse_args()
    from cosine.models.loading import load_model

    config = load_config(Path(args.config))
    tokenizer = load_model(config.model.target_path, cache_dir=config.model.cache_path).tokenizer
    names, queries = [], []
    references = json.loads(Path(args.references).read_text())["target_outputs"] if args.references else {}
    for set_name, path in SETS.items():
        for index, item in enumerate(load_prompts(path)):
            user = " ".join(m["content"] for m in item["messages"] if m["role"] == "user")
            names.append((set_name, item["id"], "prompt"))
            queries.append(tokenizer(user, add_special_tokens=False)["input_ids"])
            if references:
                names.append((set_name, item["id"], "reference"))
                queries.append(references[set_name][index])
    streams, described = training_streams(args, tokenizer)
    best = longest_shared(queries, streams)
    rows = [
        {"set": s, "id": i, "what": w, "tokens": n, "text": tokenizer.decode(q[start : start + n]) if n else ""}
        for (s, i, w), q, (n, start) in zip(names, queries, best)
    ]
    summary = {}
    for what in ("prompt", "reference"):
        lengths = sorted(r["tokens"] for r in rows if r["what"] == what)
        if lengths:
            summary[what] = {"max": lengths[-1], "median": lengths[len(lengths) // 2], "items": len(lengths)}
    result = {"training": described, "summary": summary, "rows": rows, "stamp": stamp(), "seed_len": SEED_LEN}
    path = write_result("overlap", result)
    for r in sorted(rows, key=lambda r: -r["tokens"])[:10]:
        print(f"{r['set']:8s} {r['id']:10s} {r['what']:9s} {r['tokens']:3d}  {r['text'][:80]!r}")
    print(json.dumps({"training": described, "summary": summary}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
