"""Multi-step rounds, the pure parts: a window-0 token is drawn from a stream keyed by its
position (the same output however rounds are cut), and a round's decoded tokens are emitted and
clipped like any other."""

from __future__ import annotations

import torch

from cosine.core.acceptance import decode_token, verify_round
from cosine.core.rounds import advance
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import FINISH_LENGTH, FINISH_STOP
from cosine.core.tree import DraftTree
from tests.unit.test_state import EOS, POLICY, TOKENIZER, new_state

VOCAB = 64
SAMPLED = SamplingParams(temperature=0.9, top_p=1.0, seed=1234)


def empty_tree() -> DraftTree:
    return DraftTree((), (), (), (), (), None)


def logits_at(position: int) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(position))


def decode(start: int, count: int, per_round: int) -> list[int]:
    """``count`` tokens from ``start``, ``per_round`` tokens a round (round numbers follow)."""
    tokens, round_index = [], 0
    while len(tokens) < count:
        position = start + len(tokens)
        tokens.append(verify_round(empty_tree(), logits_at(position)[None], SAMPLED, round_index, position).next_token)
        for _ in range(min(per_round, count - len(tokens) + 1) - 1):  # the rest of a multi-step job
            position = start + len(tokens)
            tokens.append(decode_token(logits_at(position), SAMPLED, position))
        round_index += 1
    return tokens[:count]


def test_sampled_window0_tokens_do_not_depend_on_how_rounds_are_cut():
    one_by_one = decode(10, 24, per_round=1)
    assert decode(10, 24, per_round=4) == one_by_one == decode(10, 24, per_round=8)
    assert len(set(one_by_one)) > 5  # really sampled, not a constant


def test_the_draw_follows_the_seed_and_greedy_takes_the_argmax():
    row = logits_at(3)
    draws = {decode_token(row, SamplingParams(temperature=1.0, seed=s), 7) for s in range(40)}
    assert len(draws) > 3
    assert decode_token(row, SamplingParams(), 7) == int(row.argmax())


def test_decoded_tokens_are_emitted_after_the_next_token():
    update = advance(new_state(), [], 1, 0, TOKENIZER, POLICY, decoded=[2, 3])
    assert update.state.output_ids == [1, 2, 3]
    assert update.out_entries[0]["text"] == "Hello world!"
    assert (update.state.accepted_tokens, update.state.rounds, update.state.draft_tokens) == (0, 1, 0)


def test_decoded_tokens_stop_at_eos_stop_strings_and_max_tokens():
    assert advance(new_state(), [], 1, 0, TOKENIZER, POLICY, decoded=[EOS, 2]).state.output_ids == [1, EOS]
    stopped = advance(new_state(stop=["!"]), [], 1, 0, TOKENIZER, POLICY, decoded=[2, 3, 7])
    assert stopped.finished and stopped.out_entries[-1]["finish_reason"] == FINISH_STOP
    assert stopped.out_entries[-1]["text"] == "Hello world"
    capped = advance(new_state(max_tokens=2), [], 1, 0, TOKENIZER, POLICY, decoded=[2, 3, 7])
    assert capped.state.output_ids == [1, 2] and capped.out_entries[-1]["finish_reason"] == FINISH_LENGTH
