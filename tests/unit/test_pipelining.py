"""Drafting ahead (pipelining): a draft made ahead for a guessed context is the draft a fresh
call would make for that round, so serving it changes nothing but the time it takes."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.core.sampling import SamplingParams
from cosine.drafters.base import DraftRequest, propose_ahead
from cosine.drafters.model import ModelDrafter
from cosine.models.runner import ModelRunner


def tiny_drafter() -> ModelDrafter:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return ModelDrafter("tiny", ModelRunner(LlamaForCausalLM(config).eval()))


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.7, top_p=0.9, seed=3)])
def test_a_draft_made_ahead_is_the_fresh_draft_of_its_round(sampling):
    ahead_drafter, fresh_drafter = tiny_drafter(), tiny_drafter()
    context = list(range(3, 40))
    for round_index in range(1, 6):  # several rounds: the random streams differ per round
        [draft] = ahead_drafter.propose([DraftRequest("r", context, 3, sampling, round_index)])
        made = propose_ahead(ahead_drafter, DraftRequest("r", context, 4, sampling, round_index + 1), draft.tokens)
        assert made is not None
        guessed, chain = made
        assert guessed[: len(context) + 3] == [*context, *draft.tokens] and len(guessed) == len(context) + 4
        # The guess is the drafter's most likely next token (no draw from a random stream).
        [greedy] = fresh_drafter.propose([DraftRequest("g", guessed[:-1], 1, SamplingParams(), round_index + 1)])
        assert guessed[-1] == greedy.tokens[0]
        # The chain is what a fresh call for the next round on that context draws.
        [fresh] = fresh_drafter.propose([DraftRequest(f"f{round_index}", guessed, 4, sampling, round_index + 1)])
        assert chain.tokens == fresh.tokens
        if sampling.greedy:
            assert chain.draft_probs is None
        else:
            torch.testing.assert_close(chain.draft_probs, fresh.draft_probs, atol=1e-5, rtol=1e-4)
        context = guessed


@pytest.mark.parametrize("drafter_width", [72, 56])
def test_a_drafter_with_a_differently_padded_vocabulary_drafts_target_tokens(drafter_width):
    """A drafter whose lm_head is wider or narrower than the target's (another size of the
    family) failed every sampled request: its distributions did not have the target's width.
    Its logits are cut or padded to the target's: draws are target tokens, distributions the
    verifier's shape, and the round verifies."""
    from cosine.core.acceptance import verify_round
    from cosine.core.tree import merge_chains

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=drafter_width, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2)
    drafter = ModelDrafter("padded", ModelRunner(LlamaForCausalLM(config).eval()), vocab_size=64)
    sampling = SamplingParams(temperature=1.0, seed=5)
    for request in (DraftRequest("s", list(range(3, 20)), 4, sampling, 1), DraftRequest("g", list(range(3, 20)), 4, SamplingParams(), 1)):
        [chain] = drafter.propose([request])
        assert all(0 <= t < 64 for t in chain.tokens)
        if chain.draft_probs is not None:
            assert chain.draft_probs.shape == (4, 64)
        target_logits = torch.randn(5, 64)
        verdict = verify_round(merge_chains([chain]), target_logits, request.sampling, 1, len(request.context))
        assert 0 <= verdict.next_token < 64


def test_a_draft_made_ahead_fits_in_the_time_before_the_requests_next_job():
    """Drafting ahead is one window longer than the round's, but work still running when the
    request's next job comes delays that job (on a missed guess, the whole round): the window is
    shortened until the work fits in the turnaround the drafter measured, none when nothing fits."""
    from cosine.policy.window import Turnaround, ahead_window

    def job_ms(tokens):  # the guessed token and the window, 1.5 ms each
        return 1.5 * tokens

    assert ahead_window(3, 8, None, job_ms) == 4  # turnaround not known yet: one longer
    assert ahead_window(3, 8, 100.0, job_ms) == 4 and ahead_window(8, 8, 100.0, job_ms) == 8
    assert ahead_window(3, 8, 6.0, job_ms) == 3  # 4 + 1 tokens take 7.5 ms: one shorter
    assert ahead_window(3, 8, 2.9, job_ms) == 0
    turnaround = Turnaround(smoothing=0.5)
    turnaround.observe(10.0)
    turnaround.observe(20.0)
    assert turnaround.ms == 15.0


def test_a_draft_made_ahead_fits_before_the_next_job_of_any_request_the_drafter_serves():
    """Work drafted ahead delays every job that comes while it runs, another request's as much
    as its own: the budget is the time to the first job the drafter expects. A request overdue
    by more than a turnaround went elsewhere (another drafter of the expert, or it ended)."""
    from cosine.policy.window import ahead_budget

    def written(*others):  # request "a" written at 100 ms, after the others (oldest first)
        return {**{f"o{i}": (1, ms) for i, ms in enumerate(others)}, "a": (1, 100.0)}

    assert ahead_budget(None, 100.0, "a", written(95.0)) is None  # turnaround not known yet
    assert ahead_budget(10.0, 100.0, "a", written()) == 10.0  # its own job, a turnaround after its draft
    assert ahead_budget(10.0, 102.0, "a", written()) == 8.0
    assert ahead_budget(10.0, 100.0, "new", {}) == 10.0  # not written here: a turnaround from now
    assert ahead_budget(10.0, 100.0, "a", written(96.0)) == 6.0  # another request's job comes first
    assert ahead_budget(10.0, 100.0, "a", written(88.0)) == 0.0  # overdue: may come any moment
    assert ahead_budget(10.0, 100.0, "a", written(80.0)) == 10.0  # overdue by a turnaround: gone elsewhere
    assert ahead_budget(10.0, 100.0, "a", written(96.0, 80.0)) == 10.0  # newest first: older ones are not read


def test_a_drafter_drafts_ahead_only_what_fits_before_its_other_requests_jobs():
    from cosine.config import Config
    from cosine.wire import DraftJob
    from cosine.workers.drafter import DrafterWorker

    worker = DrafterWorker(Config(), "redis://127.0.0.1:9", "general", instance="d1")
    worker.cost_profile = (0.0, 1.5, 0.0)  # 1.5 ms a drafted token
    worker.turnaround.ms = 30.0

    def job(request_id, round_, window=3):
        return DraftJob(request_id, round_, [1, 2], window, SamplingParams(), ["general"])

    now = worker.clock.now() * 1000
    worker._written([job("a", 4)], now)
    assert worker.ahead_window(job("a", 4)) == 4  # alone: one longer (5 tokens, 7.5 ms, fit in 30)
    worker._written([job("b", 2)], now - 25)  # b's next job is due in about 5 ms
    assert worker.ahead_window(job("a", 4)) == 2  # 3 tokens (4.5 ms) fit before it
    worker._written([job("b", 2)], now - 29.5)
    assert worker.ahead_window(job("a", 4)) == 0


def test_the_drafter_measures_the_turnaround_from_its_draft_to_the_requests_next_job():
    """From writing a round's draft (the server's clock) to the request's next job (its entry
    ID: when the server took it) — not to when the drafter read it, which its own drafting ahead
    delays."""
    from cosine.config import Config
    from cosine.wire import DraftJob
    from cosine.workers.drafter import DrafterWorker

    worker = DrafterWorker(Config(), "redis://127.0.0.1:9", "general", instance="d1")
    worker.cost_profile = (0.0, 1.5, 0.0)  # 1.5 ms a drafted token
    worker.clock.synced = True

    def job(request_id, round_, window=3):
        return DraftJob(request_id, round_, [1, 2], window, SamplingParams(), ["general"])

    worker._written([job("a", 4), job("b", 4)], 1_000.0)
    worker._observe_turnaround([(b"1006-0", {}), (b"1030-0", {})], [job("a", 5), job("b", 7)])  # b: a later round, no sample
    assert worker.turnaround.ms == 6.0 and "b" not in worker.written
    assert worker.ahead_window(job("a", 5)) == 3  # 4 tokens + the guess would take 7.5 ms
    # A sample from before the server's clock was synced (another host's clock), or negative: not taken.
    worker._written([job("a", 5)], 2_000.0)
    worker._observe_turnaround([(b"1990-0", {})], [job("a", 6)])
    worker.clock.synced = False
    worker._written([job("a", 6)], 2_000.0)
    worker._observe_turnaround([(b"2050-0", {})], [job("a", 7)])
    assert worker.turnaround.ms == 6.0
