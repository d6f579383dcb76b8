"""OutputAssembler: stop conditions, clipping and the text-emission rules."""

import random

import pytest

from cosine.core.stopping import FINISH_LENGTH, FINISH_STOP, OutputAssembler, StopRules

EOS = 0
E_ACUTE_1, E_ACUTE_2 = 8, 9  # "é" is b"\xc3\xa9": split over two tokens


class FakeTokenizer:
    """A byte-level tokenizer: ids map to bytes, decoding replaces incomplete UTF-8 with U+FFFD."""

    pieces = {
        EOS: b"</s>",
        1: b"Hello",
        2: b" world",
        3: b"!",
        4: b" END",
        5: b" E",
        6: b"ND",
        7: b"NOT",
        E_ACUTE_1: b"\xc3",
        E_ACUTE_2: b"\xa9",
        10: b" caf",
    }

    def decode(self, token_ids, skip_special_tokens=True):
        ids = [t for t in token_ids if not (skip_special_tokens and t == EOS)]
        return b"".join(self.pieces[t] for t in ids).decode("utf-8", errors="replace")


def assembler(max_tokens=100, stop=()):
    return OutputAssembler(FakeTokenizer(), StopRules(max_tokens, frozenset({EOS}), tuple(stop)))


def test_fake_tokenizer():
    tok = FakeTokenizer()
    assert tok.decode([10, E_ACUTE_1]) == " caf\ufffd"
    assert tok.decode([10, E_ACUTE_1, E_ACUTE_2]) == " café"
    assert tok.decode([1, EOS]) == "Hello"
    assert tok.decode([1, EOS], skip_special_tokens=False) == "Hello</s>"


def test_no_stop():
    out = assembler()
    emission = out.extend([1, 2])
    assert (emission.token_ids, emission.text, emission.finish_reason) == ((1, 2), "Hello world", None)


def test_eos_stops():
    out = assembler()
    emission = out.extend([1, 2, EOS, 3])
    assert emission.token_ids == (1, 2, EOS)  # tokens after EOS are clipped
    assert emission.text == "Hello world"
    assert emission.finish_reason == FINISH_STOP
    assert out.token_ids == [1, 2, EOS]


def test_max_tokens_clips_round():
    out = assembler(max_tokens=3)
    assert out.extend([1, 2]).finish_reason is None
    emission = out.extend([3, 2, 1])  # the round overshoots by two tokens
    assert emission.token_ids == (3,)
    assert emission.text == "!"
    assert emission.finish_reason == FINISH_LENGTH
    assert out.text == "Hello world!"


def test_eos_as_last_allowed_token_is_stop():
    out = assembler(max_tokens=2)
    assert out.extend([1, EOS]).finish_reason == FINISH_STOP


def test_stop_string_left_out_and_rest_clipped():
    out = assembler(stop=[" END"])
    emission = out.extend([1, 4, 2, 3])
    assert emission.token_ids == (1, 4)  # 4 completes the stop string; 2 and 3 are clipped
    assert emission.text == "Hello"
    assert emission.finish_reason == FINISH_STOP
    assert out.text == "Hello"


def test_stop_string_inside_tokens():
    out = assembler(stop=["lo w"])
    emission = out.extend([1, 2, 3])
    assert emission.token_ids == (1, 2)
    assert emission.text == "Hel"


def test_stop_completed_first_wins_over_stop_started_first():
    # "lo" completes in token 1; "Hello world" starts earlier but needs token 2, which would never
    # have been generated. The result must not depend on both tokens arriving in one round.
    out = assembler(stop=["Hello world", "lo"])
    emission = out.extend([1, 2])
    assert (emission.token_ids, emission.text) == ((1,), "Hel")


def test_possible_stop_prefix_held_back_then_released():
    out = assembler(stop=[" END"])
    first = out.extend([1, 5])
    assert first.text == "Hello"  # " E" may start " END": held back
    assert out.text == "Hello E"
    second = out.extend([7])
    assert second.text == " ENOT"  # it did not: released
    assert second.finish_reason is None


def test_stop_string_split_across_rounds():
    out = assembler(stop=[" END"])
    assert out.extend([1, 5]).text == "Hello"
    emission = out.extend([6, 2])
    assert emission.token_ids == (6,)
    assert emission.text == ""
    assert emission.finish_reason == FINISH_STOP
    assert out.text == "Hello"
    assert out.token_ids == [1, 5, 6]


def test_multibyte_character_held_until_complete():
    out = assembler()
    assert out.extend([10, E_ACUTE_1]).text == " caf"
    assert out.extend([E_ACUTE_2, 3]).text == "é!"


def test_held_text_flushed_on_finish():
    out = assembler(max_tokens=2, stop=[" END"])
    emission = out.extend([1, 5])
    assert emission.finish_reason == FINISH_LENGTH
    assert emission.text == "Hello E"


def test_extend_after_finish_raises():
    out = assembler()
    out.extend([1, EOS])
    with pytest.raises(ValueError):
        out.extend([2])


def test_stop_rules_validation():
    with pytest.raises(ValueError):
        StopRules(0, frozenset({EOS}))
    with pytest.raises(ValueError):
        StopRules(5, frozenset({EOS}), ("",))


def test_pieces_join_to_final_text():
    rng = random.Random(0)
    ids = list(FakeTokenizer.pieces)
    stops = [" END", "!!", "d N", "é!", "NOTNOT"]
    for _ in range(500):
        out = assembler(max_tokens=rng.randint(1, 20), stop=rng.sample(stops, rng.randint(0, 3)))
        pieces, tokens = [], []
        while out.finish_reason is None:
            emission = out.extend(rng.choices(ids, weights=[1] + [6] * (len(ids) - 1), k=rng.randint(1, 5)))
            pieces.append(emission.text)
            tokens.extend(emission.token_ids)
            assert out.text.startswith("".join(pieces))
        assert "".join(pieces) == out.text
        assert tokens == out.token_ids
        assert not any(stop in out.text for stop in out.rules.stop_strings)
        assert FakeTokenizer().decode(out.token_ids).startswith(out.text)


def test_round_boundaries_do_not_matter():
    # A speculative round is a batch of tokens; the result must equal one-token-at-a-time decoding.
    rng = random.Random(1)
    ids = list(FakeTokenizer.pieces)
    stops = [" END", "!!", "d N", "é!", "ND", "E", "o w", "Hello world", "lo", " ", "caf"]
    for _ in range(1000):
        stream = rng.choices(ids, weights=[1] + [6] * (len(ids) - 1), k=20)
        max_tokens, stop = rng.randint(1, 20), rng.sample(stops, rng.randint(0, 4))
        results = []
        for sizes in ([1] * 20, [rng.randint(1, 6) for _ in range(20)]):
            out, pos = assembler(max_tokens, stop), 0
            for size in sizes:
                if out.finish_reason is None:
                    out.extend(stream[pos : pos + size])
                    pos += size
            results.append((out.text, out.token_ids, out.finish_reason))
        assert results[0] == results[1], (stream, max_tokens, stop)


def test_incremental_text_equals_a_whole_decode_and_costs_what_a_round_adds(counting):
    rng = random.Random(3)
    tokens = []
    while len(tokens) < 3000:  # text with an "é" (two tokens, one character) now and then
        tokens += [E_ACUTE_1, E_ACUTE_2] if rng.random() < 0.1 else [rng.choice([1, 2, 3, 5, 6, 7, 10])]
    tok = counting(FakeTokenizer())
    out = OutputAssembler(tok, StopRules(10_000, frozenset({EOS})))
    i = 0
    while i < len(tokens):
        step = rng.randint(1, 6)
        out.extend(tokens[i : i + step])
        i += step
        assert out.text == FakeTokenizer().decode(out.token_ids)
    # A whole decode per round would be ~1.5 million tokens; the spliced ones decode the
    # new tokens and a few before them (the whole text again only after a round that ended
    # inside a character).
    assert tok.decoded < 300_000
