"""bench/load.py's bookkeeping for the target baselines (the benchmark's own code, not timed)."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def load(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import load as module

    yield module
    sys.modules.pop("load", None)


def test_the_target_baselines_count_their_tokens(load, monkeypatch):
    """Regression: adding each outcome's last-token time shifted run_target's positional
    arguments, so the target baselines' tokens went into that field: 0.0 tok/s, no ITL."""
    made = {"a": [5, 6, 7, 8], "b": [9, 10]}

    def fake_generate(model, tokenizer, plans, pad_id, greedy):
        return [made[p.key] for p in plans], load.time.perf_counter()

    monkeypatch.setattr(load, "generate", fake_generate)
    plans = [load.Plan(key, [{"role": "user", "content": "hi"}], 0.0, 0, 4) for key in made]
    outcomes = load.run_target(None, None, plans, None, 0, max_batch=2)
    assert [o.tokens for o in outcomes] == [made["a"], made["b"]]
    summary = load.summarise(outcomes)
    assert summary["tokens"] == 6 and summary["tokens_per_s"] > 0 and summary["p50_itl_s"] is not None
