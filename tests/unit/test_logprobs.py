"""Log-probabilities: the verifier's rows per emitted token, their client form, the request field."""

import json
import math

import pytest
import torch

from cosine.core.acceptance import Verdict, emitted_logprobs, verify_greedy
from cosine.core.logprobs import LogprobsError, _byte_decoder, token_logprobs
from cosine.core.protocol import RequestError, logprobs_count
from cosine.core.rounds import RequestState, advance
from cosine.core.sampling import SamplingParams
from cosine.core.tree import DraftChain, merge_chains
from cosine.policy.window import WindowPolicy
from cosine.wire.state import state_from_fields, state_to_fields

VOCAB = 12


def test_each_emitted_token_gets_the_row_it_was_drawn_at_on_a_branching_tree():
    tree = merge_chains([DraftChain((1, 2), (0.9, 0.9), drafter="a"), DraftChain((4, 5), (0.3, 0.3), drafter="b")])
    assert tree.tokens == (1, 2, 4, 5)
    logits = torch.randn(len(tree) + 1, VOCAB, generator=torch.Generator().manual_seed(3))
    # The target wants 4 at the root, 5 after node 2 (token 4) and 6 after node 3 (token 5).
    logits[0, 4] = logits[3, 5] = logits[4, 6] = 10.0
    verdict = verify_greedy(tree, logits.argmax(-1))
    assert verdict.accepted_nodes == (2, 3) and verdict.new_tokens == (4, 5, 6)
    rows = emitted_logprobs(logits, verdict, top=3)
    reference = torch.log_softmax(logits, -1)
    for (value, ids, values), row, token in zip(rows, (0, 3, 4), verdict.new_tokens):
        assert value == pytest.approx(reference[row, token].item(), abs=1e-6)
        best = reference[row].topk(3)
        assert ids == best.indices.tolist() and values == pytest.approx(best.values.tolist(), abs=1e-6)
        assert ids[0] == token  # greedy: the emitted token is the most likely one
    # Rows 1 and 2 (after the rejected branch) are not used: changing them changes nothing.
    logits[1:3] = torch.randn(2, VOCAB)
    assert emitted_logprobs(logits, verdict, top=3) == rows


def test_no_alternatives_and_impossible_tokens():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7] = -math.inf
    rows = emitted_logprobs(logits, Verdict((), (), 7), top=0)
    assert rows == [[-9999.0, [], []]]  # JSON-safe, as OpenAI's floor
    json.dumps(rows, allow_nan=False)
    assert emitted_logprobs(logits, Verdict((), (), 3), top=VOCAB + 5)[0][1].__len__() == VOCAB


class PlainTokenizer:
    """Not byte-level: a token's bytes are its decoded text's UTF-8."""

    pieces = {1: "Hello", 2: " wörld", 3: "!", 9: "</s>"}

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(self.pieces[t] for t in token_ids if not (skip_special_tokens and t == 9))


def test_client_entries_carry_text_bytes_and_alternatives():
    entries = token_logprobs(PlainTokenizer(), [2, 3], [[-0.5, [2, 1], [-0.5, -1.5]], [-0.25, [], []], [-9.0, [], []]])
    assert entries[0] == {"id": 2, "token": " wörld", "bytes": list(" wörld".encode()), "logprob": -0.5,
                          "top_logprobs": [{"id": 2, "token": " wörld", "bytes": list(" wörld".encode()), "logprob": -0.5},
                                           {"id": 1, "token": "Hello", "bytes": list(b"Hello"), "logprob": -1.5}]}
    assert entries[1]["token"] == "!" and entries[1]["top_logprobs"] == []
    assert len(entries) == 2  # a clipped round: rows past the kept tokens are left out


@pytest.mark.parametrize("rows", [[], [[-0.5, [1], []]], [[-0.5, [1]]], ["x"], [[-0.5, [1] * 21, [0.0] * 21]], [["a", [], []]]])
def test_rows_that_do_not_fit_raise(rows):
    with pytest.raises(LogprobsError):
        token_logprobs(PlainTokenizer(), [1], rows)


def test_the_byte_level_table_is_a_bijection_onto_bytes():
    table = _byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["a"] == ord("a") and table["Ċ"] == ord("\n")


@pytest.mark.model
def test_byte_level_tokens_keep_their_exact_bytes(demo_target):
    tokenizer = demo_target.tokenizer
    text = "héllo 日本 wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    entries = token_logprobs(tokenizer, ids, [[-1.0, [], []]] * len(ids))
    assert b"".join(bytes(e["bytes"]) for e in entries) == text.encode()
    assert any("\ufffd" in e["token"] for e in entries)  # a token holding part of a character
    eos = token_logprobs(tokenizer, [tokenizer.eos_token_id], [[-1.0, [], []]])[0]
    assert eos["token"] == tokenizer.eos_token and bytes(eos["bytes"]) == tokenizer.eos_token.encode()


def test_a_round_with_logprobs_puts_them_on_its_tokens_entry_clipped_like_its_tokens():
    state = RequestState("r", [5], SamplingParams(), max_tokens=2, stop=(), eos_ids=(9,), experts=[], logprobs=1)
    rows = [[-0.5, [1], [-0.5]], [-0.25, [2], [-0.25]], [-2.0, [1], [-0.1]]]
    update = advance(state, [1, 2], 3, 2, PlainTokenizer(), WindowPolicy(), logprobs=rows)  # max_tokens clips token 3
    tokens = update.out_entries[0]
    assert json.loads(tokens["token_ids"]) == [1, 2]
    assert [(e["id"], e["logprob"]) for e in json.loads(tokens["logprobs"])] == [(1, -0.5), (2, -0.25)]
    without = advance(RequestState("r", [5], SamplingParams(), 8, (), (9,), []), [1], 2, 1, PlainTokenizer(), WindowPolicy())
    assert "logprobs" not in without.out_entries[0]
    with pytest.raises(LogprobsError):  # asked for, none came
        advance(state, [1], 2, 1, PlainTokenizer(), WindowPolicy())


def test_the_setting_survives_the_request_hash():
    state = RequestState("r", [5], SamplingParams(), 8, (), (9,), ["general"], logprobs=4)
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in state_to_fields(state).items()}
    assert state_from_fields(fields).logprobs == 4
    del fields[b"logprobs"]  # a request admitted before the field existed
    assert state_from_fields(fields).logprobs == -1


@pytest.mark.parametrize("value, expected", [(None, -1), ("0", 0), ("20", 20), (3, 3)])
def test_the_request_field(value, expected):
    assert logprobs_count(value) == expected


@pytest.mark.parametrize("value", ["-1", "21", "x", "1.5", ""])
def test_bad_request_fields_name_logprobs(value):
    with pytest.raises(RequestError) as caught:
        logprobs_count(value)
    assert caught.value.param == "logprobs"
