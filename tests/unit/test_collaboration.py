"""The collaboration core: step-mode fusion, the paper's routing, the suffix datastore and the
per-drafter accounting of a round (``verify_and_credit``: the verifier's and the engine's)."""

import pytest
import torch

from cosine.core.acceptance import verify_and_credit, verify_greedy
from cosine.core.sampling import SamplingParams
from cosine.core.tree import ROOT, DraftChain, fuse_steps, fused_token, merge_chains
from cosine.drafters.base import DraftRequest
from cosine.drafters.suffix import SuffixDrafter, SuffixStore
from cosine.policy.routing import PromptClassifier, RequestRouting, RoundFeedback, RoutingPolicy


def one(token, confidence, drafter):
    return DraftChain((token,), (confidence,), None, drafter)


# ---- step fusion -------------------------------------------------------------------------------


def test_step_fusion_continues_from_most_confident_token():
    levels = [[one(5, 0.4, "a"), one(7, 0.9, "b")], [one(8, 0.6, "a"), one(9, 0.5, "b")]]
    tree = fuse_steps(levels)
    assert tree.tokens == (5, 7, 8, 9)
    assert tree.parents == (ROOT, ROOT, 1, 1)  # step 2 hangs under 7, the fused token of step 1
    assert [d.node for d in tree.draws] == [0, 1, 2, 3]  # rank order within each step
    assert fused_token(levels[1]) == 8


def test_step_fusion_merges_equal_proposals_into_one_node_two_draws():
    tree = fuse_steps([[one(5, 0.4, "a"), one(5, 0.7, "b")]])
    assert tree.tokens == (5,) and tree.sources == (("a", "b"),) and tree.confidences == (0.7,)
    assert len(tree.draws) == 2


def test_step_fusion_tie_goes_to_higher_rank():
    assert fused_token([one(3, 0.5, "a"), one(4, 0.5, "b")]) == 3


def test_step_fusion_stops_at_a_step_without_proposals():
    tree = fuse_steps([[one(5, 0.4, "a")], [DraftChain((), (), None, "a")], [one(6, 0.9, "a")]])
    assert tree.tokens == (5,)


def test_greedy_verification_walks_the_fused_path_or_takes_a_sibling():
    tree = fuse_steps([[one(5, 0.4, "a"), one(7, 0.9, "b")], [one(8, 0.6, "a"), one(9, 0.5, "b")]])
    # target wants 7 then 9 then 4: both steps accepted (9 is a sibling leaf under 7)
    argmax = {ROOT: 7, 0: 1, 1: 9, 2: 1, 3: 4}
    verdict = verify_greedy(tree, [argmax[n] for n in (ROOT, 0, 1, 2, 3)])
    assert verdict.accepted_tokens == (7, 9) and verdict.next_token == 4
    # target wants 5: the unfused sibling is accepted, then the walk ends there
    verdict = verify_greedy(tree, [5, 2, 2, 2, 2])
    assert verdict.accepted_tokens == (5,) and verdict.next_token == 2


# ---- per-drafter accounting ----------------------------------------------------------------------


def _greedy_logits(tree, wanted: dict[int, int]) -> torch.Tensor:
    """Logits whose argmax after the root and after each node is ``wanted`` (node -> token;
    ROOT for the root), token 0 elsewhere."""
    logits = torch.zeros(len(tree) + 1, 16)
    for node in range(-1, len(tree)):
        logits[node + 1, wanted.get(node, 0)] = 1.0
    return logits


def test_a_chain_is_credited_while_it_follows_the_accepted_path():
    chains = [DraftChain((1, 2, 3), (0.9, 0.8, 0.7), None, "a"), DraftChain((1, 9, 3), (0.5, 0.5, 0.5), None, "b")]
    tree = merge_chains(chains)
    node = {tokens: i for i, tokens in enumerate(zip(tree.parents, tree.tokens))}
    one, two = node[(ROOT, 1)], node[(node[(ROOT, 1)], 2)]
    three = node[(two, 3)]
    verdict, feedback = verify_and_credit(tree, _greedy_logits(tree, {ROOT: 1, one: 2, two: 3, three: 4}), SamplingParams(), 0, 5)
    assert verdict.accepted_tokens == (1, 2, 3) and verdict.next_token == 4
    assert (feedback["a"].drafted, feedback["a"].accepted) == (3, 3)
    assert (feedback["b"].drafted, feedback["b"].accepted) == (3, 1)  # its 3 came after its own 9
    assert feedback["a"].confidence_sum == pytest.approx(2.4)


def test_a_step_is_credited_to_the_drafter_whose_token_was_accepted():
    levels = [[one(1, 0.9, "a"), one(4, 0.5, "b")], [one(9, 0.8, "a"), one(2, 0.5, "b")]]
    tree = fuse_steps(levels)
    first = tree.tokens.index(1)
    second = next(n for n in range(len(tree)) if tree.parents[n] == first and tree.tokens[n] == 2)
    verdict, feedback = verify_and_credit(tree, _greedy_logits(tree, {ROOT: 1, first: 2, second: 7}), SamplingParams(), 0, 5)
    assert verdict.accepted_tokens == (1, 2)
    assert feedback["a"].accepted == 1 and feedback["b"].accepted == 1
    assert feedback["a"].drafted == 2 and feedback["b"].drafted == 2


# ---- routing -----------------------------------------------------------------------------------


def classifier():
    return PromptClassifier({"code": {1: 50, 2: 50, 3: 1}, "math": {3: 60, 4: 40, 1: 1}}, vocab_size=10)


def test_classifier_prefers_the_expert_whose_data_the_prompt_resembles():
    probs = classifier().probabilities([1, 2, 1])
    assert probs["code"] > 0.9 and sum(probs.values()) == pytest.approx(1.0)
    assert classifier().probabilities([3, 4])["math"] > 0.9


def test_classifier_without_tokens_is_uniform():
    assert classifier().probabilities([]) == {"code": 0.5, "math": 0.5}


def test_score_is_harmonic_mean_of_confidence_and_consistency():
    routing = RequestRouting.start(["a"], {}, RoutingPolicy())
    score = routing.scores["a"]
    score.confidence, score.consistency = 0.8, 0.2
    assert score.score == pytest.approx(2 * 0.8 * 0.2 / 1.0)


def test_cold_start_ranks_by_classifier_and_cooperation_is_capped():
    policy = RoutingPolicy(max_experts=2, cooperate_ratio=0.0)
    routing = RequestRouting.start(["chat", "code", "math"], {"code": 0.7, "math": 0.2, "chat": 0.1}, policy)
    assert routing.first_choice == "code"
    assert routing.choose(policy) == ["code", "math"]


def test_pinned_expert_is_the_only_one():
    policy = RoutingPolicy()
    routing = RequestRouting.start(["chat", "code"], {"chat": 0.9}, policy, pinned="code")
    assert routing.choose(policy) == ["code"] and routing.first_choice == "code"


def test_verified_consistency_overtakes_a_wrong_first_choice():
    policy = RoutingPolicy(max_experts=1, explore_below=0.0)
    routing = RequestRouting.start(["code", "math"], {"code": 0.8, "math": 0.2}, policy)
    routing.observe({"code": RoundFeedback(4, 0, 3.2)}, 0, policy)  # confident but never accepted
    routing.observe({"math": RoundFeedback(4, 4, 2.0)}, 4, policy)  # accepted throughout
    routing.observe({"code": RoundFeedback(4, 0, 3.2)}, 0, policy)
    assert routing.best() == "math" and routing.choose(policy) == ["math"]


def test_low_acceptance_explores_an_untried_expert():
    policy = RoutingPolicy(max_experts=1, explore_below=1.0)
    routing = RequestRouting.start(["code", "math", "chat"], {"code": 0.6, "math": 0.3, "chat": 0.1}, policy)
    assert routing.choose(policy) == ["code"]  # no round yet: no exploration
    routing.observe({"code": RoundFeedback(4, 0, 2.0)}, 0, policy)
    assert routing.choose(policy) == ["math"]  # acceptance 0 < 1: the best untried one takes the place
    routing.observe({"math": RoundFeedback(4, 0, 2.0)}, 0, policy)
    assert routing.choose(policy) == ["chat"]
    assert routing.explored == ["math", "chat"]


def test_good_acceptance_does_not_explore():
    policy = RoutingPolicy(max_experts=1, explore_below=1.0)
    routing = RequestRouting.start(["code", "math"], {"code": 0.6, "math": 0.4}, policy)
    routing.observe({"code": RoundFeedback(4, 3, 3.0)}, 3, policy)
    assert routing.choose(policy) == ["code"] and routing.explored == []


def test_weak_expert_stops_cooperating():
    policy = RoutingPolicy(max_experts=2, cooperate_ratio=0.6, explore_below=0.0, decay=1.0)
    routing = RequestRouting.start(["code", "math"], {}, policy)
    assert routing.choose(policy) == ["code", "math"]
    routing.observe({"code": RoundFeedback(4, 4, 3.6), "math": RoundFeedback(4, 0, 0.4)}, 4, policy)
    assert routing.choose(policy) == ["code"]


def test_policy_validation():
    with pytest.raises(ValueError):
        RoutingPolicy(max_experts=0)
    with pytest.raises(ValueError):
        RoutingPolicy(decay=0.0)


# ---- suffix datastore ----------------------------------------------------------------------------


def test_store_continues_what_followed_the_same_suffix():
    store = SuffixStore(max_depth=3)
    store.extend("r1", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4])
    token, confidence = store.next_token([9, 2, 3], min_count=1)
    assert token == 4 and confidence == pytest.approx(2 / 3)


def test_store_is_bounded_and_forgets_the_oldest_sequence():
    store = SuffixStore(max_depth=2, max_tokens=6)
    store.extend("old", [1, 2, 3])
    store.extend("new", [7, 8, 9, 7, 8])
    assert store.tokens <= 6 and "old" not in store.sequences
    assert store.next_token([1, 2], min_count=1) is None  # counts of the forgotten sequence are gone
    assert store.next_token([7, 8], min_count=1) == (9, 1.0)


def request(key, context, window=4, domain="code"):
    return DraftRequest(key, context, window, SamplingParams(), 0, None, domain)


def test_suffix_drafter_learns_from_earlier_requests_of_its_domain_only():
    drafter = SuffixDrafter(min_count=1, min_depth=2)
    drafter.propose([request("r1", [10, 11, 12, 13, 14, 15])])
    chain = drafter.propose([request("r2", [99, 11, 12])])[0]
    assert chain.tokens == (13, 14, 15)  # then r1 ended: nothing followed 14, 15
    assert chain.confidences[0] == 1.0 and chain.draft_probs is None
    assert drafter.propose([request("r3", [99, 11, 12], domain="math")])[0].tokens == ()  # another store


def test_suffix_drafter_adds_only_new_tokens_each_round():
    drafter = SuffixDrafter(min_count=1)
    drafter.propose([request("r1", [1, 2, 3])])
    drafter.propose([request("r1", [1, 2, 3, 4, 5])])
    assert drafter.store("code").sequences["r1"] == [1, 2, 3, 4, 5]
    drafter.clear()
    assert drafter.store("code").tokens == 0


def test_only_drafters_with_a_forward_and_nothing_to_learn_draft_ahead():
    # Drafting ahead calls propose() on a guessed context: a suffix datastore would learn the
    # guess as if the target had written it, and prompt lookup costs nothing to run on time.
    from cosine.drafters.distilled import SmallDrafter
    from cosine.drafters.lookup import PromptLookupDrafter
    from cosine.drafters.model import ModelDrafter
    from cosine.drafters.suffix import SuffixDrafter

    assert not SuffixDrafter().drafts_ahead and not PromptLookupDrafter().drafts_ahead
    assert SmallDrafter.drafts_ahead and ModelDrafter.drafts_ahead
