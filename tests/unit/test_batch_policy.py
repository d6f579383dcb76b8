"""BatchPolicy: fair share over live verifiers, flush rules, batch size, validation."""

import pytest

from cosine.policy.batching import BatchPolicy


def flush(policy, pool_size=1, pool_tokens=4, oldest_wait_s=0.0, active_requests=8, live_verifiers=2, busy_verifiers=2, drafting=0, due=1.0, split=0.03):
    """should_flush with keyword defaults: a small pool, every verifier busy, nothing waited yet."""
    return policy.should_flush(pool_size, pool_tokens, oldest_wait_s, active_requests, live_verifiers, busy_verifiers, drafting, due, split)


def test_fair_share_is_ceiling_of_requests_over_verifiers():
    policy = BatchPolicy(max_batch=8)
    assert policy.fair_share(10, 3) == 4
    assert policy.fair_share(9, 3) == 3
    assert policy.fair_share(7, 2) == 4
    assert policy.fair_share(1, 4) == 1


def test_fair_share_capped_by_max_batch():
    policy = BatchPolicy(max_batch=5)
    assert policy.fair_share(40, 2) == 5
    assert policy.fair_share(10, 1) == 5
    assert policy.fair_share(9, 2) == 5


def test_fair_share_is_at_least_one():
    policy = BatchPolicy(max_batch=8)
    assert policy.fair_share(0, 3) == 1
    assert policy.fair_share(0, 0) == 1
    assert policy.fair_share(6, 0) == 6  # no live verifier counted as one


def test_empty_pool_never_flushes():
    policy = BatchPolicy(max_batch=8, max_tokens=16, max_wait_s=0.05)
    assert not flush(policy, pool_size=0, pool_tokens=100, oldest_wait_s=10.0, busy_verifiers=0)


def test_flush_when_pool_reaches_fair_share():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.05)
    # 6 requests over 2 verifiers: a fair share is 3, and every verifier is busy.
    assert not flush(policy, pool_size=2, active_requests=6, live_verifiers=2, busy_verifiers=2)
    assert flush(policy, pool_size=3, active_requests=6, live_verifiers=2, busy_verifiers=2)
    assert flush(policy, pool_size=4, active_requests=6, live_verifiers=2, busy_verifiers=2)


def test_flush_when_pool_reaches_max_batch_under_heavy_load():
    policy = BatchPolicy(max_batch=4, max_tokens=512, max_wait_s=0.05)
    assert not flush(policy, pool_size=3, active_requests=100, live_verifiers=1, busy_verifiers=1)
    assert flush(policy, pool_size=4, active_requests=100, live_verifiers=1, busy_verifiers=1)


def test_flush_on_token_budget():
    policy = BatchPolicy(max_batch=8, max_tokens=32, max_wait_s=0.05)
    # Far below the fair share of 8, every verifier busy: only the token budget can flush.
    assert not flush(policy, pool_size=2, pool_tokens=31, active_requests=16, live_verifiers=2, busy_verifiers=2)
    assert flush(policy, pool_size=2, pool_tokens=32, active_requests=16, live_verifiers=2, busy_verifiers=2)
    assert flush(policy, pool_size=1, pool_tokens=40, active_requests=16, live_verifiers=2, busy_verifiers=2)


def test_hold_while_every_verifier_busy_even_past_max_wait():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.05)
    assert not flush(policy, pool_size=1, oldest_wait_s=10.0, active_requests=8, live_verifiers=2, busy_verifiers=2)
    assert not flush(policy, pool_size=1, oldest_wait_s=10.0, active_requests=8, live_verifiers=2, busy_verifiers=5)


def test_flush_after_max_wait_when_a_verifier_is_idle():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.05)
    assert not flush(policy, pool_size=1, oldest_wait_s=0.049, active_requests=8, live_verifiers=2, busy_verifiers=1)
    assert flush(policy, pool_size=1, oldest_wait_s=0.05, active_requests=8, live_verifiers=2, busy_verifiers=1)
    assert flush(policy, pool_size=1, oldest_wait_s=0.2, active_requests=8, live_verifiers=2, busy_verifiers=0)


def test_no_live_verifier_counts_as_one_idle_verifier():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.05)
    assert flush(policy, pool_size=1, oldest_wait_s=0.1, active_requests=8, live_verifiers=0, busy_verifiers=0)
    assert not flush(policy, pool_size=1, oldest_wait_s=0.1, active_requests=8, live_verifiers=0, busy_verifiers=1)


def test_zero_max_wait_flushes_at_once_to_an_idle_verifier():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.0)
    assert flush(policy, pool_size=1, oldest_wait_s=0.0, active_requests=8, live_verifiers=2, busy_verifiers=1)
    assert not flush(policy, pool_size=1, oldest_wait_s=0.0, active_requests=8, live_verifiers=2, busy_verifiers=2)


def test_first_come_caps_at_max_batch():
    from cosine.policy.batching import Pending

    policy = BatchPolicy(max_batch=4)
    for size, taken in ((0, 0), (3, 3), (4, 4), (11, 4)):
        assert policy.first_come([Pending(0.0, 1, 1.0)] * size) == list(range(taken))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch": 0},
        {"max_batch": -1},
        {"max_tokens": 0},
        {"max_wait_s": -0.001},
    ],
)
def test_invalid_policy_raises(kwargs):
    with pytest.raises(ValueError):
        BatchPolicy(**kwargs)


def test_smallest_valid_policy():
    policy = BatchPolicy(max_batch=1, max_tokens=1, max_wait_s=0.0)
    assert (policy.max_batch, policy.max_tokens, policy.max_wait_s) == (1, 1, 0.0)
    assert policy.fair_share(10, 1) == 1


# ---- select: which candidates, by the cost model ---------------------------------------------

from cosine.policy.batching import Pending  # noqa: E402


def linear_cost(a=30.0, b=1.0, c=1.0):
    return lambda batch, tokens: a + b * batch + c * tokens


def test_select_fills_the_batch_when_every_candidate_pays_its_way():
    policy = BatchPolicy(max_batch=8, max_tokens=512)
    pool = [Pending(0.01 * i, 5, 2.0) for i in range(6)]
    assert policy.select(pool, linear_cost()) == list(range(6))


def test_select_leaves_a_costly_round_out_of_a_decoding_batch_until_it_starves():
    policy = BatchPolicy(max_batch=8, max_tokens=2048)
    decoding = [Pending(0.02, 5, 2.0) for _ in range(6)]
    costly = Pending(0.3, 900, 1.0)  # a huge tree yielding little
    assert policy.select([costly, *decoding], linear_cost()) == [1, 2, 3, 4, 5, 6]
    starved = Pending(1.5, 900, 1.0)
    assert 0 in policy.select([starved, *decoding], linear_cost(), starve_s=1.0)


def test_select_admits_first_rounds_at_once_outside_the_token_budget():
    # Regression (bench/load.py ablation): held back until they starved, new requests' prefills
    # left batches short of requests, and the cost-based choice lost 7-13% to first-come.
    policy = BatchPolicy(max_batch=8, max_tokens=64)
    decoding = [Pending(0.02, 5, 2.0) for _ in range(6)]
    prefill = Pending(0.01, 900, 1.0, first=True)
    assert policy.select([prefill, *decoding], linear_cost()) == list(range(7))
    # max_batch still holds: the first rounds go first, then the best of the rest.
    assert len(BatchPolicy(max_batch=3, max_tokens=64).select([prefill, *decoding], linear_cost())) == 3


def test_select_respects_max_batch_and_the_token_budget():
    policy = BatchPolicy(max_batch=3, max_tokens=12)
    pool = [Pending(0.0, 5, 2.0) for _ in range(5)]
    assert len(policy.select(pool, linear_cost())) == 2  # 3 x 5 tokens > 12
    alone = [Pending(2.0, 40, 1.0)]
    assert policy.select(alone, linear_cost()) == [0]  # over the budget, but alone: it goes


def test_latency_weight_favours_the_oldest_in_a_smaller_batch():
    policy = BatchPolicy(max_batch=8, max_tokens=512)
    pool = [Pending(0.9, 9, 1.2), *[Pending(0.0, 9, 1.2) for _ in range(5)]]
    throughput_first = policy.select(pool, linear_cost(a=5.0, c=3.0))
    latency_first = policy.select(pool, linear_cost(a=5.0, c=3.0), latency_weight=50.0)
    assert 0 in latency_first and len(latency_first) < len(throughput_first)


def test_select_of_an_empty_pool():
    assert BatchPolicy().select([], linear_cost()) == []


def test_idle_verifier_does_not_wait_for_drafting_requests():
    policy = BatchPolicy(max_batch=8, max_tokens=512, max_wait_s=0.1)
    # 8 active, 5 pooled, the verifier idle: 3 missing still drafting -> go now.
    assert flush(policy, pool_size=5, active_requests=8, live_verifiers=1, busy_verifiers=0, drafting=3)
    # 3 missing, only 1 drafting: 2 are about to come back from verification -> wait (a while).
    assert not flush(policy, pool_size=5, active_requests=8, live_verifiers=1, busy_verifiers=0, drafting=1)
    assert flush(policy, pool_size=5, oldest_wait_s=0.1, active_requests=8, live_verifiers=1, busy_verifiers=0, drafting=1)
    # A busy verifier: a small batch would only queue, drafting or not.
    assert not flush(policy, pool_size=5, active_requests=8, live_verifiers=1, busy_verifiers=1, drafting=3)


def test_idle_verifier_waits_for_drafts_due_sooner_than_a_batch_of_their_own_costs():
    policy = BatchPolicy(max_batch=8, max_wait_s=0.05)
    # Drafts due in 10 ms, a verification's fixed cost 30 ms: one batch later beats two now.
    assert not flush(policy, pool_size=2, active_requests=4, live_verifiers=1, busy_verifiers=0, drafting=2, due=0.01, split=0.03)
    assert flush(policy, pool_size=2, oldest_wait_s=0.05, active_requests=4, live_verifiers=1, busy_verifiers=0, drafting=2, due=0.01, split=0.03)
    # Overdue drafts (a slow drafter): wait no longer than max_wait_s either.
    assert not flush(policy, pool_size=2, active_requests=4, live_verifiers=1, busy_verifiers=0, drafting=2, due=-0.5, split=0.03)
    # Drafts due later than the fixed cost: go now.
    assert flush(policy, pool_size=2, active_requests=4, live_verifiers=1, busy_verifiers=0, drafting=2, due=0.08, split=0.03)


# ---- the verifier's K/V pool bounds a batch --------------------------------------------------


def test_select_keeps_a_batch_within_the_verifiers_kv_pool():
    policy = BatchPolicy(max_batch=8, max_tokens=512)
    pool = [Pending(0.01 * (5 - i), 5, 2.0, kv_rows=400) for i in range(5)]
    assert len(policy.select(pool, linear_cost())) == 5  # not bounded
    assert len(policy.select(pool, linear_cost(), kv_rows=1000)) == 2  # 3 x 400 rows > 1000
    long_one = Pending(0.5, 5, 2.0, kv_rows=900)
    chosen = policy.select([long_one, *pool], linear_cost(), kv_rows=1000)
    assert sum([long_one, *pool][i].kv_rows for i in chosen) <= 1000
    # A candidate bigger than the whole pool still goes, alone (it fails alone at the verifier).
    assert policy.select([Pending(2.0, 5, 2.0, kv_rows=5000), *pool], linear_cost(), kv_rows=1000, starve_s=1.0) == [0]


def test_first_come_batches_skip_what_does_not_fit_the_kv_pool():
    policy = BatchPolicy(max_batch=3)
    pool = [Pending(0.0, 5, 2.0, kv_rows=rows) for rows in (600, 500, 300, 100, 50)]
    assert policy.first_come(pool) == [0, 1, 2]  # max_batch only
    assert policy.first_come(pool, kv_rows=1000) == [0, 2, 3]  # the second does not fit beside the first
    assert policy.first_come([Pending(0.0, 5, 2.0, kv_rows=4000)], kv_rows=1000) == [0]
    assert policy.first_come([]) == []
