"""Acceptance against training tokens for ``feature`` drafters: one figure from agreement runs.

    CURVE_TOKENS="300000 1000000 3000000" bash bench/distill_general.sh OUT cuda   # the drafters
    python bench/agreement.py OUT/*/ --device cuda --out A.json                       # their scores
    python bench/feature_curve.py A.json [B.json ...] [--name feature-curve]

Every point is a feature drafter trained for the same number of steps on a seeded random subset
of the same labelled data (``--train-tokens``), so the curve shows what data buys at equal
compute. Two scores per point: first-token agreement with the target's greedy answers to the dev
prompts (``tests/data/chat_prompts.json``, no training data of theirs) per draft step, and the
same on held-out answers of the training distribution. Writes
``bench/results/<name>-latest.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench/agreement.py --out")
    parser.add_argument("--name", default="feature-curve")
    args = parser.parse_args()
    points, sources = [], []
    for path in args.runs:
        run = json.loads(path.read_text())
        sources.append({"file": path.name, "prompts": run["prompts"], "answer_tokens": run["answer_tokens"], "device": run["device"]})
        for name, entry in run["drafters"].items():
            if entry["kind"] == "feature":
                points.append({"drafter": Path(name).name, "train_tokens": entry["train_tokens"], "steps": entry["steps"],
                               "dev_agreement_per_step": entry["agreement_per_step"], "holdout_agreement_per_step": entry["holdout_agreement_per_step"]})
    points.sort(key=lambda p: p["train_tokens"])
    out = {"points": points, "runs": sources}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}-latest.json").write_text(json.dumps(out, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    tokens = [p["train_tokens"] for p in points]
    for step in range(max(len(p["dev_agreement_per_step"]) for p in points)):
        ax.plot(tokens, [p["dev_agreement_per_step"][step] for p in points], "o-", label=f"dev prompts, step {step + 1}")
    ax.plot(tokens, [p["holdout_agreement_per_step"][0] for p in points], "s--", color="grey", label="held-out answers, step 1")
    ax.set_xscale("log")
    ax.set_xlabel(f"training tokens ({points[0]['steps']} steps each)")
    ax.set_ylabel("agreement with the target (greedy)")
    ax.set_ylim(0, max(0.6, max(p["holdout_agreement_per_step"][0] for p in points) + 0.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("feature drafter: acceptance against training data")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}-latest.png", dpi=110)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
