"""Adaptive speculation control: expected yield, the cost fit, and the window it chooses."""

from __future__ import annotations

import random

import pytest

from cosine.policy.control import (
    AcceptanceCurve,
    LinearCost,
    SpeculationControl,
    acceptance_estimate,
    drafting_prior,
    expected_tokens,
    optimistic_estimate,
)


def test_expected_tokens_of_a_round():
    assert expected_tokens(0.6, 0) == pytest.approx(1.0)
    assert expected_tokens(0.6, 1) == pytest.approx(1.6)
    assert expected_tokens(0.6, 4) == pytest.approx(1 + 0.6 + 0.36 + 0.216 + 0.1296)
    assert expected_tokens(0.0, 8) == pytest.approx(1.0)


def test_acceptance_estimate_counts_one_failure_per_drafted_round():
    assert acceptance_estimate(0, 0) == pytest.approx(0.5)  # the prior alone
    assert acceptance_estimate(30, 10) == pytest.approx(32 / 44)  # two pseudo rounds at 0.5: 2 accepted, 2 failures
    assert acceptance_estimate(0, 0, prior=0.3, prior_rounds=4) == pytest.approx(0.3)
    assert acceptance_estimate(0, 20) < 0.1


def test_cost_fit_recovers_the_coefficients_from_noisy_batches():
    rng = random.Random(0)
    cost = LinearCost(prior=(10.0, 1.0, 1.0))
    for _ in range(200):
        batch = rng.randint(1, 16)
        tokens = batch * rng.randint(1, 6)
        cost.observe((1.0, batch, tokens), 30 + 2.5 * batch + 0.8 * tokens + rng.gauss(0, 1))
    a, b, c = cost.coefficients
    assert a == pytest.approx(30, abs=2) and b == pytest.approx(2.5, abs=0.3) and c == pytest.approx(0.8, abs=0.1)


def test_prior_holds_until_observations_say_otherwise():
    cost = LinearCost(prior=(30.0, 2.0, 1.0))
    assert cost.predict((1.0, 4, 8)) == pytest.approx(30 + 8 + 8)
    cost.observe((1.0, 4, 8), 46.0)
    assert cost.predict((1.0, 4, 8)) == pytest.approx(46.0, rel=0.01)


def control(a: float, b: float, c: float, d0: float, d1: float, alpha: float, overhead: float = 0.0, d2: float = 0.0, multi_step: int = 1) -> SpeculationControl:
    """A controller whose curve says ``alpha`` at every position (2000 rounds of a chain of 8)."""
    ctl = SpeculationControl(verify_prior=(a, b, c, 0.0), draft_prior=(d0, d1, d2), overhead_prior=overhead, multi_step=multi_step)
    rng = random.Random(0)
    for _ in range(2000):
        accepted = 0
        while accepted < 8 and rng.random() < alpha:
            accepted += 1
        ctl.observe_round(8, accepted)
    return ctl


def test_drafting_pays_when_one_verification_is_long_and_tokens_are_cheap():
    # One request: 33 ms to verify 1 token, +1 ms per extra token, drafting 10 ms + 2 ms per token.
    assert control(30, 2, 1, 10, 2, alpha=0.7).choose(limit=8, batch_size=1) >= 3
    assert control(30, 2, 1, 10, 2, alpha=0.05).choose(limit=8, batch_size=1) == 0  # nothing is accepted: never draft


def test_window_goes_to_zero_when_the_verifier_is_loaded():
    # Per-token cost dominates at a large batch: each drafted token costs a whole batch more
    # time than its expected yield, so the verifier decodes plainly.
    ctl = control(30, 1, 4, 10, 2, alpha=0.6)
    assert ctl.choose(limit=8, batch_size=1) > 0
    assert ctl.choose(limit=8, batch_size=16) == 0


def test_window_shrinks_as_drafting_gets_slower():
    fast, slow = control(30, 2, 1, 2, 1, alpha=0.6), control(30, 2, 1, 60, 10, alpha=0.6)
    assert fast.choose(8, 4) > slow.choose(8, 4)


def test_round_overhead_makes_drafting_pay():
    # Without overhead one drafted token does not pay for its drafting hop; a round's fixed
    # overhead (hops, batch forming) is paid at window 0 too, so the extra token tips it.
    # (The cost model alone: no optimism about the request's acceptance.)
    ctl = control(30, 2, 1, 20, 2, alpha=0.5)
    ctl.optimism = 0.0
    assert ctl.choose(8, 1) == 0
    for _ in range(200):
        ctl.observe_overhead(40.0)
    assert ctl.overhead_ms == pytest.approx(40.0, rel=0.01)
    assert ctl.choose(8, 1) > 0


def test_multi_step_decoding_is_what_drafting_must_beat():
    """Regression (bench/load.py, uniform chat prompts, one request): drafted rounds gave 1.52
    tokens per 104 ms while window-0 rounds decoded 8 tokens a job at 57 ms each; the control
    compared drafting with a one-token round that pays the whole overhead and kept drafting."""
    def tuned(multi_step: int) -> SpeculationControl:
        ctl = control(30, 2, 1, 20, 2, alpha=0.5, multi_step=multi_step)
        for _ in range(200):
            ctl.observe_overhead(40.0)
        return ctl

    assert tuned(1).choose(8, 1) > 0  # as above: the overhead tips it
    assert tuned(8).decoding_ms(1) == pytest.approx(40.0 / 8 + tuned(8).verify_ms(1, 1), rel=0.02)
    assert tuned(8).choose(8, 1) == 0  # decoding 8 tokens a job beats half-accepted drafts
    likely = control(30, 2, 1, 10, 2, alpha=0.9, multi_step=8)
    assert likely.choose(8, 1) > 0  # drafts that are mostly accepted still pay


def test_window_0_rounds_that_decode_one_token_pay_the_whole_overhead():
    """Regression (bench/emulate.py, an emulated 8B target on H100s, 16 requests over four
    verifiers): rounds without drafts decoded one token each (the pool held other requests,
    so no multi-step job), yet the control divided the round overhead by multi_step = 8 and
    chose window 0 for every round: 0.99 tokens a round, behind a fixed window of 2 (1.97)."""
    ctl = control(30, 2, 1, 20, 2, alpha=0.5, multi_step=8)
    for _ in range(200):
        ctl.observe_overhead(40.0)
    assert ctl.choose(8, 1) == 0  # as above, while jobs decode 8 tokens
    for _ in range(200):
        ctl.observe_decoding(1)  # what window-0 rounds yield at this load
    assert ctl.decode_tokens == pytest.approx(1.0, abs=0.01)
    assert ctl.decoding_ms(1) == pytest.approx(40.0 + ctl.verify_ms(1, 1), rel=0.02)
    assert ctl.choose(8, 1) > 0


def test_a_request_that_accepts_more_than_the_others_drafts_longer():
    ctl = control(30, 2, 1, 10, 3, alpha=0.4)
    assert ctl.choose(8, 1, accepted=400, drafted_rounds=100) > ctl.choose(8, 1)
    assert ctl.choose(8, 1, accepted=0, drafted_rounds=100) == 0
    # In a batch every request gets the batch's window: the shared estimate decides.
    assert ctl.choose(8, 4, accepted=400, drafted_rounds=100) == ctl.choose(8, 4, accepted=0, drafted_rounds=100)


def test_an_optimistic_acceptance_narrows_with_a_request_s_own_rounds():
    assert acceptance_estimate(0, 0, 0.75, 4) < optimistic_estimate(0, 0, prior=0.75, prior_rounds=4) < 0.95
    few = optimistic_estimate(2, 2, prior=0.75, prior_rounds=4) - acceptance_estimate(2, 2, 0.75, 4)
    many = optimistic_estimate(60, 60, prior=0.75, prior_rounds=4) - acceptance_estimate(60, 60, 0.75, 4)
    assert few > 0.09 and 0 < many < 0.05
    assert optimistic_estimate(2, 2, prior=0.75, prior_rounds=4, optimism=0.0) == pytest.approx(acceptance_estimate(2, 2, 0.75, 4))


def test_a_low_estimate_does_not_stop_drafting_for_good_at_low_load():
    """Regression (bench/emulate.py, one request at a time, an emulated 8B target): the shared
    estimate, made of the first requests' rounds (routing not settled yet: first-position
    acceptance 0.47), priced drafting below multi-step decoding; every later request went to
    window 0 after its first two drafted rounds, whatever they accepted (8 of 8), and window-0
    rounds observe nothing that could show the estimate wrong (run-0-0: 16 of 18 rounds)."""
    ctl = control(6, 0.2, 0.3, 2, 1, alpha=0.5, multi_step=8)  # everyone's early rounds: half accepted
    for _ in range(300):
        ctl.observe_overhead(10.0)
    assert ctl.choose(8, 1) == 0  # at everyone's acceptance drafting does not pay
    assert ctl.choose(8, 1, accepted=8, drafted_rounds=2) > 0  # a request's own two rounds accepted all: it drafts on
    assert ctl.choose(8, 1, accepted=6, drafted_rounds=12) == 0  # a request whose drafts keep missing stops
    ctl.optimism = 0.0
    assert ctl.choose(8, 1, accepted=8, drafted_rounds=2) == 0  # what the estimate alone says
    ctl = control(6, 0.2, 0.3, 2, 1, alpha=0.75, multi_step=8)
    for _ in range(300):
        ctl.observe_overhead(10.0)
    ctl.optimism = 0.0
    # The window is the estimate's: optimism decides only whether to draft.
    chosen = ctl.choose(8, 1)
    ctl.optimism = 1.0
    assert ctl.choose(8, 1) == chosen
    # Not under load: a drafted round costs the batch-mates too.
    unlucky = (8, 2, 2)
    assert ctl.plan([unlucky] * 2) == [4, 4]
    assert ctl.plan([unlucky] * 3) == [0, 0, 0]
    ctl.explore_max_batch = 3
    assert ctl.plan([unlucky] * 3) == [4, 4, 4]


def test_disabled_control_keeps_the_limit():
    ctl = SpeculationControl(enabled=False)
    assert ctl.choose(5, 32, accepted=0, drafted_rounds=100) == 5
    assert ctl.choose(0, 1) == 0


def test_acceptance_curve_is_by_position():
    curve = AcceptanceCurve()
    assert curve.expected(0) == pytest.approx(1.0)
    assert curve.expected(2) == pytest.approx(1 + 0.5 + 0.25)  # the prior
    for _ in range(3000):  # position 1 accepted half the time; position 2 always once reached
        curve.observe(depth=2, accepted=0)
        curve.observe(depth=2, accepted=2)
    p = curve.conditional()
    assert p[0] == pytest.approx(0.5, abs=0.01) and p[1] == pytest.approx(1.0, abs=0.01)
    assert p[2] == pytest.approx(p[1], abs=0.01)  # never reached: the position before it
    assert curve.expected(2) == pytest.approx(2.0, abs=0.02)  # 1 + 0.5 + 0.5 * 1
    # The geometric estimate of the same rounds would say otherwise: 2 tokens per 2 rounds.
    assert curve.geometric == pytest.approx(0.5, abs=0.01)
    assert expected_tokens(curve.geometric, 2) == pytest.approx(1.75, abs=0.02)


def test_old_observations_leave_the_fit():
    cost = LinearCost(prior=(1.0, 1.0, 1.0), keep=256)
    for i in range(200):
        cost.observe((1.0, i % 8, i % 20), 100.0 + i % 8)  # an old regime
    for i in range(256):
        cost.observe((1.0, i % 8, i % 20), 10.0 + 2 * (i % 8) + 0.5 * (i % 20))
    assert cost.observations == 256
    for batch, tokens in ((1, 2), (4, 10), (7, 19)):  # the old regime (over 100) is gone
        assert cost.predict((1.0, batch, tokens)) == pytest.approx(10 + 2 * batch + 0.5 * tokens, rel=0.05)


def test_verification_error_is_measured_before_the_batch_is_fitted():
    ctl = SpeculationControl(verify_prior=(30.0, 2.0, 1.0, 0.0))
    assert ctl.observe_verification(1, 1, 66.0) == pytest.approx(0.5)  # predicted 33 ms
    for _ in range(100):
        ctl.observe_verification(4, 8, 40 + 2 * 4 + 1 * 8 + 3 * 4 * 0.5, longest_context=500)
    assert ctl.observe_verification(4, 8, 62.0, longest_context=500) < 0.05
    assert ctl.verify_ms(4, 8) == pytest.approx(62.0, rel=0.05)  # the running mean of the batches' context


def test_acceptance_prior_is_all_requests_recent_rounds():
    ctl = SpeculationControl()
    assert ctl.acceptance_prior == pytest.approx(0.5)
    for _ in range(200):  # every drafted round accepts 1 token, then one is rejected
        ctl.observe_round(depth=4, accepted=1)
    ctl.observe_round(depth=0, accepted=0)  # a round at window 0 says nothing
    assert ctl.acceptance_prior == pytest.approx(0.5, abs=0.02)
    for _ in range(2000):
        ctl.observe_round(depth=4, accepted=0)
    assert ctl.acceptance_prior < 0.05  # old rounds decay away
    # A new request starts at the prior; its own rounds take over.
    assert ctl.acceptance(0, 0) == pytest.approx(ctl.acceptance_prior, abs=0.01)
    assert ctl.acceptance(60, 20) > 0.6


def test_exploration_until_drafting_is_measured_then_now_and_then():
    ctl = SpeculationControl(explore_until=3, explore_every=10)
    assert all(ctl.explore("r", i) for i in range(5))  # nothing measured yet: every round drafts
    for _ in range(3):
        ctl.observe_drafting(4, 20.0)
    assert ctl.explore("r", 9, drafted_rounds=0) and ctl.explore("r", 9, drafted_rounds=1)  # a request's first drafted rounds
    share = sum(ctl.explore(f"r{i}", j, drafted_rounds=5) for i in range(100) for j in range(20)) / 2000
    assert 0.06 < share < 0.14  # then about one round in ten
    assert ctl.explore("r7", 3) == ctl.explore("r7", 3)  # the same answer for the same round


def test_a_batch_drafts_for_the_requests_that_accept_most():
    ctl = control(30, 2, 1, 10, 2, alpha=0.4, overhead=5)
    # Four requests verified together: two accept far more than the rest.
    windows = ctl.plan([(6, 400, 100), (6, 0, 100), (6, 380, 100), (6, 2, 100)])
    assert windows[0] > 0 and windows[2] > 0 and windows[1] == windows[3] == 0
    assert windows[0] == windows[2]  # one drafting hop for the batch: one window
    # Limits hold; nobody drafts when nobody accepts.
    assert ctl.plan([(1, 400, 100), (6, 380, 100)])[0] <= 1
    assert ctl.plan([(6, 0, 100), (6, 1, 100)]) == [0, 0]
    # A larger batch of alike requests: the per-token verification cost decides.
    assert ctl.plan([(6, 0, 0)] * 4, batch_size=16) == ctl.plan([(6, 0, 0)] * 4, batch_size=16)[:1] * 4


def test_drafting_for_many_requests_at_once_costs_more():
    # Drafters draft a batch's requests together: 3 ms per token per request drafting at once.
    ctl = control(30, 2, 0.5, 5, 0, alpha=0.6, overhead=5, d2=3)
    assert ctl.draft_ms(4, together=4) == pytest.approx(5 + 3 * 16)
    assert ctl.choose(8, 1) > 0
    assert ctl.plan([(8, 0, 0)] * 8) == [0] * 8
    for _ in range(300):  # measured: the hop does not grow with the requests after all
        ctl.observe_drafting(4, 9.0, together=8)
        ctl.observe_drafting(2, 7.0, together=1)
        ctl.observe_drafting(4, 8.5, together=1)
    assert ctl.draft_ms(4, together=8) == pytest.approx(9.0, rel=0.1)
    assert ctl.plan([(8, 0, 0)] * 8)[0] > 0


def test_fewer_drafters_cooperate_as_batches_grow():
    ctl = SpeculationControl()
    assert [ctl.cooperating(4, b) for b in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]
    assert ctl.cooperating(2, 1) == 2 and ctl.cooperating(2, 2) == 1
    assert ctl.cooperating(0, 1) == 0
    assert SpeculationControl(enabled=False).cooperating(3, 16) == 3  # load control off: all of them


def test_drafters_with_compute_of_their_own_cooperate_while_the_verifier_takes_their_chains_cheaply():
    """Drafted side by side, more chains cost the round no drafting time, only the verifier's
    extra tokens: on a GPU-like cost (6 ms a forward, 0.01 ms a token) every expert drafts at
    batch 4, three at batch 16 (four chains would cost 28% more than one), one at 64; on a
    CPU-like one (a millisecond a token) no more than the shared rule."""
    gpu = SpeculationControl(verify_prior=(6.0, 0.0, 0.01, 0.0), drafters_share_compute=False)
    assert [gpu.cooperating(4, b, window=4) for b in (1, 4, 16, 64)] == [4, 4, 3, 1]
    cpu = SpeculationControl(verify_prior=(30.0, 2.0, 1.0, 0.0), drafters_share_compute=False)
    assert [cpu.cooperating(4, b, window=4) for b in (1, 2, 4, 8)] == [4, 2, 1, 1]
    assert SpeculationControl(drafters_share_compute=False, enabled=False).cooperating(4, 16, window=4) == 4


def test_a_hop_measured_at_one_window_stays_a_fixed_cost():
    """Regression: rounds all at window 1 cannot tell the drafting hop's fixed part (network,
    fusion, wake-ups) from its per-token part; with an even prior a 25 ms hop over 6 ms of
    drafting was fitted as 25 ms per token, window 4 priced at 100 ms, and load control kept
    the windows at 0-1 for good. The per-token terms keep to the drafters' profile."""
    ctl = SpeculationControl(verify_prior=(26.0, 0.0, 0.02, 0.0), draft_prior=(0.0, 6.0, 0.1), overhead_prior=2.0, multi_step=8)
    for _ in range(48):
        ctl.observe_drafting(1, 25.0, together=1)
    assert ctl.draft_ms(1) == pytest.approx(25.0, rel=0.05)
    assert ctl.draft_ms(4) == pytest.approx(25.0 + 3 * 6.1, rel=0.1)  # 100 ms before
    for _ in range(2000):
        accepted = 0
        while accepted < 8 and random.random() < 0.8:
            accepted += 1
        ctl.observe_round(8, accepted)
    assert ctl.choose(8, 1) >= 4


def test_a_coefficient_held_at_zero_leaves_the_others_fitted_to_the_observations():
    """Regression: the fit clipped a negative coefficient after solving, so the others stayed
    fitted to it: a drafter's start-up profile taken under load (33 ms per token) and 48 rounds
    of 35 ms at window 4 gave 0 + 27 ms per token, window 4 priced at 109 ms, and load control
    chose window 0 over rounds it had just seen take a third of that."""
    ctl = SpeculationControl(draft_prior=(0.0, 33.0, 0.0))
    for _ in range(48):
        ctl.observe_drafting(4, 35.0, together=1)
    assert all(c >= 0 for c in ctl.draft.coefficients)
    assert 35.0 <= ctl.draft_ms(4) < 45.0  # 109 ms before; what is left is the prior's pull (4 observations of 132 ms)


def test_one_start_up_transient_does_not_price_drafting_for_good():
    """Regression: the first drafted round after a start went to a drafter still starting (950
    ms among hops of 45 ms); in a least-squares fit of 30 rounds it priced window 5 at twice its
    time, and load control at one request chose window 0 from then on."""
    ctl = SpeculationControl(draft_prior=(0.0, 5.9, 0.12))
    ctl.observe_drafting(4, 950.0)
    for _ in range(30):
        ctl.observe_drafting(5, 45.0)
    assert ctl.draft_ms(5) == pytest.approx(45.0, rel=0.15)


def test_a_drafter_profiled_while_others_built_does_not_let_a_cold_hop_into_the_fit():
    """Regression (bench/emulate.py, 16 emulated drafters in one process): the first drafter to
    register had been profiled while the others were still building (118 ms fixed cost; 0.08
    ms alone), the prior taken from it let the first hop after the start (a cold drafter, 253
    ms) into the fit unclipped, and 40 rounds later window 4 was priced at 15.7 ms against 9
    measured: load control at one request chose decoding over drafting."""
    assert drafting_prior([(118.2, 1.48, 0.03), (0.1, 1.5, 0.02), (0.08, 1.6, 0.03)], (10.0, 1.0, 1.0)) == pytest.approx([0.1, 1.5, 0.03])
    prior = drafting_prior([(118.2, 1.48, 0.03)], (10.0, 1.0, 1.0))
    assert prior == pytest.approx([10.0, 1.48, 0.03])  # the fixed part: the hop, for the rounds to tell
    assert drafting_prior([], (10.0, 1.0, 1.0)) == [10.0, 1.0, 1.0]
    # The first to register were profiled while the others started: half of those expected first.
    assert drafting_prior([(0.0, 14.2, 4.7)], (10.0, 1.0, 1.0), expected=16) == [10.0, 1.0, 1.0]
    assert drafting_prior([(0.0, 14.2, 4.7)] + [(0.08, 1.47, 0.03)] * 8, (10.0, 1.0, 1.0), expected=16) == pytest.approx([0.08, 1.47, 0.03])
    ctl = SpeculationControl()
    ctl.draft.set_prior(prior)
    ctl.observe_drafting(4, 253.0)
    for i in range(40):
        window = 3 + i % 4
        ctl.observe_drafting(window, 2.5 + 1.6 * window)
    assert ctl.draft_ms(4) == pytest.approx(2.5 + 1.6 * 4, rel=0.2)


def test_a_round_s_overhead_is_learnt_when_requests_outnumber_the_verifiers():
    """Regression (bench/emulate.py, 16 requests on four emulated verifiers): the round overhead
    was learnt only from batches holding every active request, which never formed there: it
    stayed at its one-request value (1–3 ms against 18 measured), load control priced window-0
    rounds at half their time and chose them for three rounds in four (vanilla speculation at
    window 2 ran 50% faster)."""
    import time

    from cosine.config import Config
    from cosine.wire import VerifiedBatch, VerifiedItem
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.batching import SentBatch
    from cosine.workers.coordinator.records import RoundClock

    coordinator = Coordinator(Config(), "redis://127.0.0.1:1")  # no I/O here: what one verified batch teaches
    coordinator.active = 16
    before = coordinator.control.overhead_ms
    for n in range(100):
        now = time.monotonic()
        record = coordinator.records.of(f"r{n}")
        record.clock = RoundClock(3, now - 0.030, pooled=now - 0.025, sent=now - 0.015)  # 30 ms: 10 of it the forward
        coordinator.sent_batches[f"b{n}"] = SentBatch(1, 1, 64, False, {f"r{n}": 0})
        coordinator._observe(VerifiedBatch(f"b{n}", "v1", [VerifiedItem(f"r{n}", 3, [], 7, 0)], 1, 10.0))
    assert before != pytest.approx(20.0, abs=2.0)
    assert coordinator.control.overhead_ms == pytest.approx(20.0, abs=2.0)


def test_a_drafter_s_first_round_is_no_measure_of_the_drafting_hop():
    """Regression (bench/emulate.py): the first round of each drafter after a start took 200-260
    ms (its first call, its first connection) among hops of 10 ms; in the fit it priced drafting
    above decoding for a run at one request."""
    from cosine.config import Config
    from cosine.wire import Candidate
    from cosine.workers.coordinator import Coordinator

    coordinator = Coordinator(Config(), "redis://127.0.0.1:1")  # no I/O here

    def candidate(*instances: str) -> Candidate:
        return Candidate("r", 1, [5], [-1], [0.9], [["code"]], [], homes=[["code", i] for i in instances])

    assert coordinator._cold(candidate("d1"))
    assert not coordinator._cold(candidate("d1"))
    assert coordinator._cold(candidate("d1", "d2"))  # one of them new
    assert not coordinator._cold(candidate("d2", "d1"))
    assert not coordinator._cold(candidate())  # no drafter named (a draft made by none)
