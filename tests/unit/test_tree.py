"""merge_chains, the tree attention mask and the small DraftTree helpers."""

import pytest
import torch

from cosine.core.tree import ROOT, DraftChain, DraftTree, Draw, chain_tree, merge_chains

V = 10


def sampled(tokens, confidences, drafter, offset=0.0):
    """A sampled chain whose draft_probs rows are recognisable: row d is filled with offset + d."""
    probs = torch.stack([torch.full((V,), offset + depth) for depth in range(len(tokens))])
    return DraftChain(tuple(tokens), tuple(confidences), probs, drafter)


def three_chains():
    a = sampled((5, 6, 7), (0.9, 0.8, 0.7), "a", offset=0)
    b = sampled((5, 6, 8), (0.6, 0.5, 0.95), "b", offset=10)
    c = sampled((4, 1), (0.95, 0.2), "c", offset=20)
    return [a, b, c]


def test_single_chain():
    tree = chain_tree(DraftChain((3, 1, 4), (0.5, 0.4, 0.3), drafter="lookup"))
    assert tree.tokens == (3, 1, 4)
    assert tree.parents == (ROOT, 0, 1)
    assert tree.is_chain
    assert tree.draft_probs is None
    assert tree.draws == (Draw(0, None), Draw(1, None), Draw(2, None))
    assert tree.sources == (("lookup",),) * 3


def test_shared_prefix_becomes_shared_nodes():
    tree = merge_chains(three_chains())
    # Root children: 4 (0.95) before 5 (0.9); below 6: 8 (0.95) before 7 (0.7). Pre-order walk.
    assert tree.tokens == (4, 1, 5, 6, 8, 7)
    assert tree.parents == (ROOT, 0, ROOT, 2, 3, 3)
    assert tree.confidences == (0.95, 0.2, 0.9, 0.8, 0.95, 0.7)  # a shared node keeps the highest
    assert tree.sources == (("c",), ("c",), ("a", "b"), ("a", "b"), ("b",), ("a",))
    assert not tree.is_chain


def test_nodes_in_topological_order():
    tree = merge_chains(three_chains())
    assert all(parent == ROOT or parent < node for node, parent in enumerate(tree.parents))
    with pytest.raises(ValueError):
        DraftTree(tokens=(1, 2), parents=(1, ROOT), confidences=(0.5, 0.5), sources=((), ()), draws=())


def test_siblings_ordered_by_confidence():
    low = DraftChain((1,), (0.1,), drafter="low")
    high = DraftChain((2,), (0.7,), drafter="high")
    mid = DraftChain((3,), (0.4,), drafter="mid")
    tree = merge_chains([low, high, mid])
    assert tree.tokens == (2, 3, 1)
    assert tree.children(ROOT) == [0, 1, 2]


def test_draws_recorded_per_chain_in_rank_order():
    tree = merge_chains(three_chains())
    # Chain a: nodes 2, 3, 5; chain b: 2, 3, 4; chain c: 0, 1. Rows follow the same order.
    assert [d.node for d in tree.draws] == [2, 3, 5, 2, 3, 4, 0, 1]
    assert [d.probs_row for d in tree.draws] == list(range(8))
    assert tree.draft_probs[:, 0].tolist() == [0, 1, 2, 10, 11, 12, 20, 21]


def test_same_token_two_drafters_one_node_two_draws():
    first = sampled((7,), (0.3,), "first", offset=0)
    second = sampled((7,), (0.6,), "second", offset=10)
    tree = merge_chains([first, second])
    assert tree.tokens == (7,)
    assert tree.draws == (Draw(0, 0), Draw(0, 1))
    assert tree.draws_below(ROOT) == list(tree.draws)
    assert tree.draft_probs[:, 0].tolist() == [0, 10]  # the rank-1 draw is tried first


def test_mixed_fixed_and_sampled_draws():
    fixed = DraftChain((5, 6), (1.0, 1.0), None, "lookup")
    drawn = sampled((5, 9), (0.5, 0.5), "model", offset=30)
    tree = merge_chains([fixed, drawn])
    assert tree.tokens == (5, 6, 9)
    assert [(d.node, d.probs_row) for d in tree.draws] == [(0, None), (1, None), (0, 0), (2, 1)]
    assert tree.draft_probs[:, 0].tolist() == [30, 31]


def test_max_nodes_truncates_by_rank():
    chains = three_chains()  # 3 + 3 + 2 draws
    tree = merge_chains(chains, max_nodes=4)
    # Chain a is kept whole, chain b keeps its first token (which merges with a's), c is dropped.
    assert tree.tokens == (5, 6, 7)
    assert [d.node for d in tree.draws] == [0, 1, 2, 0]
    assert tree.draft_probs[:, 0].tolist() == [0, 1, 2, 10]
    whole = merge_chains(chains)
    assert merge_chains(chains, max_nodes=8).draws == whole.draws  # within budget: untouched
    assert len(merge_chains(chains, max_nodes=2)) == 2


def test_max_nodes_does_not_depend_on_token_values():
    # The budget counts draws, not distinct nodes: whether chains happen to share tokens (a
    # property of the drawn values) must not change which draws survive.
    same = [DraftChain((1, 2), (0.5, 0.5), drafter="a"), DraftChain((1, 2), (0.5, 0.5), drafter="b")]
    different = [DraftChain((1, 2), (0.5, 0.5), drafter="a"), DraftChain((3, 4), (0.5, 0.5), drafter="b")]
    assert len(merge_chains(same, max_nodes=3).draws) == len(merge_chains(different, max_nodes=3).draws) == 3


def test_path_to_is_the_node_and_its_ancestors():
    tree = merge_chains(three_chains())  # parents (ROOT, 0, ROOT, 2, 3, 3)
    assert [tree.path_to(node) for node in range(len(tree))] == [[0], [0, 1], [2], [2, 3], [2, 3, 4], [2, 3, 5]]


def test_depths():
    tree = merge_chains(three_chains())
    assert tree.depths() == [0, 1, 0, 1, 2, 2]
    assert chain_tree(DraftChain((1, 2, 3), (0.1, 0.1, 0.1))).depths() == [0, 1, 2]


def test_children_and_child_with_token():
    tree = merge_chains(three_chains())
    assert tree.children(ROOT) == [0, 2]
    assert tree.children(3) == [4, 5]
    assert tree.children(5) == []
    assert tree.child_with_token(3, 7) == 5
    assert tree.child_with_token(3, 9) is None


def test_is_chain():
    assert merge_chains([DraftChain((1, 2), (0.5, 0.5)), DraftChain((1, 2), (0.9, 0.9))]).is_chain
    assert not merge_chains([DraftChain((1, 2), (0.5, 0.5)), DraftChain((1, 3), (0.9, 0.9))]).is_chain
    assert merge_chains([]).is_chain and len(merge_chains([])) == 0


def test_chain_validation():
    with pytest.raises(ValueError):
        DraftChain((1, 2), (0.5,))
    with pytest.raises(ValueError):
        DraftChain((1, 2), (0.5, 0.5), torch.zeros(3, V))


def test_tree_depth_is_the_longest_path():
    from cosine.core.tree import tree_depth

    assert tree_depth([]) == 0
    assert tree_depth([-1, 0, 1]) == 3
    assert tree_depth([-1, -1, 0, 2, 1]) == 3
