"""verify_greedy on chains and trees.

Layout reminder: target rows are [n + 1]; row 0 is the target's prediction at the root (after
the committed context), row i + 1 its prediction after tree node i.
"""

import torch

from cosine.core.acceptance import verify_greedy
from cosine.core.tree import DraftChain, chain_tree, merge_chains


def chain(*tokens):
    return chain_tree(DraftChain(tokens, (0.5,) * len(tokens)))


def test_perfect_match():
    tree = chain(1, 2, 3)
    verdict = verify_greedy(tree, [1, 2, 3, 9])
    assert verdict.accepted_nodes == (0, 1, 2)
    assert verdict.accepted_tokens == (1, 2, 3)
    assert verdict.next_token == 9  # bonus: the target's argmax after the last node
    assert verdict.new_tokens == (1, 2, 3, 9)
    assert verdict.accepted_len == 3


def test_early_mismatch():
    verdict = verify_greedy(chain(1, 2, 3), [1, 7, 3, 9])
    assert verdict.accepted_tokens == (1,)
    assert verdict.next_token == 7  # recovered: the target's argmax where the draft went wrong
    assert verdict.new_tokens == (1, 7)


def test_mismatch_at_first_token():
    verdict = verify_greedy(chain(1, 2, 3), [4, 2, 3, 9])
    assert verdict.accepted_len == 0
    assert verdict.new_tokens == (4,)


def test_argmax_as_tensor():
    verdict = verify_greedy(chain(1, 2), torch.tensor([1, 2, 5]))
    assert verdict.new_tokens == (1, 2, 5)


def test_single_token_draft():
    assert verify_greedy(chain(6), [6, 0]).new_tokens == (6, 0)
    assert verify_greedy(chain(6), [3, 0]).new_tokens == (3,)


def test_empty_draft():
    empty = merge_chains([])
    assert verify_greedy(empty, [8]).new_tokens == (8,)


def test_tree_second_branch_is_right():
    # Two drafters disagree on the first token; the less confident one is right.
    tree = merge_chains([DraftChain((1, 2), (0.9, 0.9), drafter="a"), DraftChain((4, 5), (0.3, 0.3), drafter="b")])
    assert tree.tokens == (1, 2, 4, 5)  # nodes 0, 1: branch a; nodes 2, 3: branch b
    verdict = verify_greedy(tree, [4, 2, 0, 5, 6])  # root -> 4 -> 5 -> bonus 6 (row 4 = after node 3)
    assert verdict.accepted_nodes == (2, 3)
    assert verdict.new_tokens == (4, 5, 6)


def test_tree_recovered_token_after_branch():
    tree = merge_chains([DraftChain((1, 2), (0.9, 0.9), drafter="a"), DraftChain((4, 5), (0.3, 0.3), drafter="b")])
    verdict = verify_greedy(tree, [4, 2, 0, 7, 6])  # after 4 the target wants 7, not 5
    assert verdict.accepted_nodes == (2,)
    assert verdict.new_tokens == (4, 7)


def test_tree_deeper_path():
    # Shared prefix 1, 2, then three continuations; the right one is the deepest.
    tree = merge_chains(
        [
            DraftChain((1, 2, 3), (0.9, 0.9, 0.9), drafter="a"),
            DraftChain((1, 2, 8, 9), (0.5, 0.5, 0.5, 0.5), drafter="b"),
            DraftChain((1, 5), (0.2, 0.2), drafter="c"),
        ]
    )
    assert tree.tokens == (1, 2, 3, 8, 9, 5)
    assert tree.parents == (-1, 0, 1, 1, 3, 0)
    argmax = [0] * (len(tree) + 1)
    argmax[0], argmax[1], argmax[2], argmax[4], argmax[5] = 1, 2, 8, 9, 4  # root, after 1, 2, 8, 9
    verdict = verify_greedy(tree, argmax)
    assert verdict.accepted_nodes == (0, 1, 3, 4)
    assert verdict.new_tokens == (1, 2, 8, 9, 4)


def test_tree_no_branch_matches():
    tree = merge_chains([DraftChain((1,), (0.9,), drafter="a"), DraftChain((2,), (0.3,), drafter="b")])
    assert verify_greedy(tree, [3, 0, 0]).new_tokens == (3,)
