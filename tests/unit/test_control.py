"""Adaptive speculation control: expected yield, the cost fit, and the window it chooses."""

from __future__ import annotations

import random

import pytest

from cosine.policy.control import LinearCost, SpeculationControl, acceptance_estimate, expected_tokens


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


def control(a: float, b: float, c: float, d0: float, d1: float) -> SpeculationControl:
    control = SpeculationControl(verify_prior=(a, b, c), draft_prior=(d0, d1))
    return control


def test_drafting_pays_when_one_verification_is_long_and_tokens_are_cheap():
    # One request: 33 ms to verify 1 token, +1 ms per extra token, drafting 10 ms + 2 ms per token.
    ctl = control(30, 2, 1, 10, 2)
    assert ctl.choose(alpha=0.7, limit=8, batch_size=1) >= 3
    assert ctl.choose(alpha=0.05, limit=8, batch_size=1) == 0  # nothing is accepted: never draft


def test_window_goes_to_zero_when_the_verifier_is_loaded():
    # Per-token cost dominates at a large batch: each drafted token costs a whole batch more
    # time than its expected yield, so the verifier decodes plainly.
    ctl = control(30, 1, 4, 10, 2)
    assert ctl.choose(alpha=0.6, limit=8, batch_size=1) > 0
    assert ctl.choose(alpha=0.6, limit=8, batch_size=16) == 0


def test_window_shrinks_as_drafting_gets_slower():
    fast, slow = control(30, 2, 1, 2, 1), control(30, 2, 1, 60, 10)
    assert fast.choose(0.6, 8, 4) > slow.choose(0.6, 8, 4)


def test_disabled_control_keeps_the_limit():
    ctl = SpeculationControl(enabled=False)
    assert ctl.choose(0.01, 5, 32) == 5
    assert ctl.choose(0.9, 0, 1) == 0


def test_old_observations_leave_the_fit():
    cost = LinearCost(prior=(1.0, 1.0, 1.0), keep=256)
    for i in range(200):
        cost.observe((1.0, i % 8, i % 20), 100.0 + i % 8)  # an old regime
    for i in range(256):
        cost.observe((1.0, i % 8, i % 20), 10.0 + 2 * (i % 8) + 0.5 * (i % 20))
    assert cost.observations == 256
    for batch, tokens in ((1, 2), (4, 10), (7, 19)):  # the old regime (over 100) is gone
        assert cost.predict((1.0, batch, tokens)) == pytest.approx(10 + 2 * batch + 0.5 * tokens, rel=0.05)


def test_acceptance_prior_is_all_requests_recent_rounds():
    ctl = SpeculationControl()
    assert ctl.acceptance_prior == pytest.approx(0.5)
    for _ in range(200):  # every drafted round accepts 1 token, then one is rejected
        ctl.observe_round(drafted=4, accepted=1)
    ctl.observe_round(drafted=0, accepted=0)  # a round at window 0 says nothing
    assert ctl.acceptance_prior == pytest.approx(0.5, abs=0.02)
    for _ in range(2000):
        ctl.observe_round(drafted=4, accepted=0)
    assert ctl.acceptance_prior < 0.05  # old rounds decay away
    # A new request starts at the prior; its own rounds take over.
    assert ctl.acceptance(0, 0) == pytest.approx(ctl.acceptance_prior, abs=0.01)
    assert ctl.acceptance(60, 20) > 0.6


def test_exploration_until_drafting_is_measured_then_now_and_then():
    ctl = SpeculationControl(explore_until=3, explore_every=10)
    assert all(ctl.explore("r", i) for i in range(5))  # nothing measured yet: every round drafts
    for _ in range(3):
        ctl.observe_drafting(4, 20.0)
    share = sum(ctl.explore(f"r{i}", j) for i in range(100) for j in range(20)) / 2000
    assert 0.06 < share < 0.14  # about one round in ten
    assert ctl.explore("r7", 3) == ctl.explore("r7", 3)  # the same answer for the same round
