"""Offline agreement of distilled drafters with the target along its own greedy answers.

    python bench/agreement.py DRAFTER_DIR [DRAFTER_DIR ...] [--prompts FILE] [--max-tokens 96]
                              [--steps 3] [--device cpu] [--out FILE.json]

The target answers every prompt greedily (``--prompts``: a JSON list of strings or a JSONL file
of ``{"messages"}`` / ``{"prompt"}`` rows; default ``tests/data/chat_prompts.json``, the dev set
that no drafter is trained or evaluated on); each drafter is then teacher-forced along prompt +
answer and scored on the answer tokens: the share where its top token is the target's greedy
token. ``feature`` drafters are scored per draft step k (step k reads its own predicted features
for the k-1 positions before, as drafting does). This is the first-position acceptance of a chain
at temperature 0 without a verifier in the loop; acceptance through the pipeline is measured by
``bench/speedup.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cosine.config import load_config  # noqa: E402
from cosine.core.protocol import prompt_token_ids  # noqa: E402
from cosine.distill.data import DataPlan, generate_answers, no_progress  # noqa: E402
from cosine.drafters.artifact import load_drafter_net  # noqa: E402
from cosine.factory import load_target  # noqa: E402


def read_prompts(path: Path) -> list[list[dict]]:
    text = path.read_text()
    if path.suffix == ".json":
        return [[{"role": "user", "content": p}] for p in json.loads(text)]
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r["messages"] if "messages" in r else [{"role": "user", "content": r["prompt"]}] for r in rows]


def answers(model, tokenizer, conversations: list[list[dict]], max_tokens: int, batch: int = 32) -> list[tuple[list[int], int]]:
    """(prompt + greedy answer ids, prompt length) per conversation: ``cosine distill``'s own
    batched answering, into a scratch file."""
    plan = DataPlan(text_tokens=0, chat_prompts=len(conversations), answer_tokens=max_tokens, seq_len=0, reduced_vocab=0, generation_batch=batch)
    with tempfile.TemporaryDirectory() as scratch:
        rows = generate_answers(model, tokenizer, conversations, plan, Path(scratch) / "answers.jsonl", no_progress)
    return [(row, len(prompt_token_ids(tokenizer, messages=m))) for row, m in zip(rows, conversations)]


@torch.inference_mode()
def score(net, model, sequences: list[tuple[list[int], int]], steps: int) -> list[float]:
    """Agreement per draft step (one step for ``small``) over the answer tokens."""
    device = net.head.device
    hits, total = [0] * (steps if net.spec.kind == "feature" else 1), 0
    for row, start in sequences:
        seq = torch.tensor([row], device=device)
        length = len(row)
        positions = torch.arange(length, device=device)[None]
        answer = seq[0, start:]
        if net.spec.kind == "small":
            h, _ = net(seq, positions)
            predicted = net.vocab[net.logits(h[0]).argmax(-1)]  # position i predicts token i + 1
            hits[0] += int((predicted[start - 1 : length - 1] == answer).sum())
            total += len(answer)
            continue
        features = model.model(input_ids=seq).last_hidden_state.to(net.head.dtype)
        own = features[:, :-1]
        for k in range(steps):
            h, _ = net(seq[:, 1:], positions[:, 1:], own)  # index i: token i + 1 and feature i predict token i + 2
            predicted = net.vocab[net.logits(h[0]).argmax(-1)]
            hits[k] += int((predicted[start - 2 : length - 2] == answer).sum())
            own = torch.cat((features[:, :1], h[:, :-1]), dim=1)
        total += len(answer)
    return [round(h / max(1, total), 4) for h in hits]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("drafters", nargs="+", type=Path)
    parser.add_argument("--prompts", type=Path, default=ROOT / "tests" / "data" / "chat_prompts.json")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: model.device")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = load_config(None)
    if args.device:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=args.device))
    target = load_target(config)
    began = time.perf_counter()
    sequences = answers(target.model, target.tokenizer, read_prompts(args.prompts), args.max_tokens)
    results = {"prompts": str(args.prompts), "answer_tokens": sum(len(r) - s for r, s in sequences), "device": str(next(target.model.parameters()).device), "drafters": {}}
    for path in args.drafters:
        net, meta = load_drafter_net(path, target.model)
        net = net.to(next(target.model.parameters()).device)
        results["drafters"][str(path)] = {
            "kind": net.spec.kind, "agreement_per_step": score(net, target.model, sequences, args.steps),
            "train_tokens": meta.get("training", {}).get("train_tokens"), "steps": meta.get("training", {}).get("steps"),
            "holdout_agreement_per_step": meta.get("measured", {}).get("holdout_agreement_per_step"),
        }
        print(path, json.dumps(results["drafters"][str(path)]), flush=True)
    results["seconds"] = round(time.perf_counter() - began, 1)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
