"""advance / fail on RequestState, and its Redis hash round trip."""

import json

from cosine.core.rounds import ACTIVE, FINISHED, RequestState, advance, fail
from cosine.core.sampling import SamplingParams
from cosine.core.stopping import FINISH_CANCELLED, FINISH_ERROR, FINISH_LENGTH, FINISH_STOP
from cosine.policy.routing import RequestRouting, RoundFeedback, RoutingPolicy, tree_feedback
from cosine.policy.window import WindowPolicy
from cosine.wire.convert import feedback_from_wire
from cosine.wire.state import round_fields, state_from_fields, state_to_fields

EOS = 0


class FakeTokenizer:
    """Ids map to fixed strings; EOS decodes to nothing when special tokens are skipped."""

    pieces = {EOS: "</s>", 1: "Hello", 2: " world", 3: "!", 4: " END", 5: " E", 6: "ND", 7: " again"}

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(self.pieces[t] for t in token_ids if not (skip_special_tokens and t == EOS))


TOKENIZER = FakeTokenizer()
POLICY = WindowPolicy()


def new_state(max_tokens=100, stop=(), **overrides):
    return RequestState(
        request_id="req-1",
        prompt_ids=[101, 102, 103],
        sampling=SamplingParams(),
        max_tokens=max_tokens,
        stop=tuple(stop),
        eos_ids=(EOS,),
        **({"experts": ["general"]} | overrides),
    )


def step(state, accepted, next_token, drafted):
    return advance(state, accepted, next_token, drafted, TOKENIZER, POLICY)


def entries_of(update, kind):
    return [entry for entry in update.out_entries if entry["type"] == kind]


def test_round_appends_accepted_and_next_token():
    update = step(new_state(), [1, 2], 3, drafted=4)
    state = update.state
    assert (state.round, state.rounds) == (1, 1)
    assert state.output_ids == [1, 2, 3]
    assert state.context == [101, 102, 103, 1, 2, 3]
    assert (state.draft_tokens, state.accepted_tokens) == (4, 2)
    assert state.status == ACTIVE
    assert not update.finished
    assert update.out_entries == [{"type": "tokens", "text": "Hello world!", "token_ids": "[1, 2, 3]"}]


def test_rounds_accumulate():
    first = step(new_state(), [1], 2, drafted=3).state
    second = step(first, [3, 7], 1, drafted=2)
    state = second.state
    assert (state.round, state.rounds) == (2, 2)
    assert state.output_ids == [1, 2, 3, 7, 1]
    assert (state.draft_tokens, state.accepted_tokens) == (5, 3)
    assert entries_of(second, "tokens") == [{"type": "tokens", "text": "! againHello", "token_ids": "[3, 7, 1]"}]


def test_no_accepted_tokens_still_adds_the_next_token():
    update = step(new_state(), [], 2, drafted=4)
    assert update.state.output_ids == [2]
    assert (update.state.draft_tokens, update.state.accepted_tokens) == (4, 0)
    assert update.out_entries[0]["token_ids"] == "[2]"


def test_max_tokens_finishes_with_length():
    state = step(new_state(max_tokens=3), [1], 2, drafted=2).state
    update = step(state, [3, 7], 1, drafted=2)  # the round overshoots by two tokens
    assert update.finished
    assert update.state.status == FINISHED
    assert update.state.output_ids == [1, 2, 3]
    assert update.state.accepted_tokens == 2  # 1 from the first round, 3 from the second; 7 clipped
    assert update.state.draft_tokens == 4
    assert [entry["type"] for entry in update.out_entries] == ["tokens", "final"]
    tokens, final = update.out_entries
    assert tokens["token_ids"] == "[3]"
    assert tokens["text"] == "!"
    assert final["finish_reason"] == FINISH_LENGTH
    assert final["text"] == "Hello world!"
    assert json.loads(final["token_ids"]) == [1, 2, 3]
    assert (final["prompt_tokens"], final["generated_tokens"], final["rounds"]) == ("3", "3", "2")
    assert (final["draft_tokens"], final["accepted_tokens"]) == ("4", "2")


def test_eos_as_next_token_finishes_with_stop():
    update = step(new_state(), [1, 2], EOS, drafted=2)
    assert update.finished
    assert update.state.output_ids == [1, 2, EOS]
    assert update.state.accepted_tokens == 2
    tokens, final = update.out_entries
    assert tokens == {"type": "tokens", "text": "Hello world", "token_ids": "[1, 2, 0]"}
    assert final["finish_reason"] == FINISH_STOP
    assert final["text"] == "Hello world"


def test_accepted_tokens_after_eos_are_not_counted():
    update = step(new_state(), [1, EOS, 2, 3], 7, drafted=4)
    assert update.state.output_ids == [1, EOS]
    assert update.state.accepted_tokens == 2  # 1 and EOS kept; 2, 3 and the next token clipped
    assert update.state.draft_tokens == 4
    assert update.out_entries[-1]["finish_reason"] == FINISH_STOP
    assert update.out_entries[-1]["text"] == "Hello"


def test_stop_string_clips_accepted_tokens():
    update = step(new_state(stop=[" END"]), [1, 4, 2], 3, drafted=3)
    assert update.finished
    assert update.state.output_ids == [1, 4]
    assert update.state.accepted_tokens == 2
    tokens, final = update.out_entries
    assert tokens["token_ids"] == "[1, 4]"
    assert tokens["text"] == "Hello"
    assert final["finish_reason"] == FINISH_STOP
    assert final["text"] == "Hello"


def test_held_back_text_then_stop_across_rounds():
    first = step(new_state(stop=[" END"]), [1], 5, drafted=1)
    assert first.out_entries == [{"type": "tokens", "text": "Hello", "token_ids": "[1, 5]"}]  # " E" held
    second = step(first.state, [6], 3, drafted=1)
    assert second.finished
    assert second.state.output_ids == [1, 5, 6]
    tokens, final = second.out_entries
    assert (tokens["text"], tokens["token_ids"]) == ("", "[6]")
    assert final["finish_reason"] == FINISH_STOP
    assert final["text"] == "Hello"


def test_held_back_text_released_when_no_stop_follows():
    first = step(new_state(stop=[" END"]), [1], 5, drafted=1)
    second = step(first.state, [7], 3, drafted=1)
    assert not second.finished
    assert second.out_entries[0]["text"] == " E again!"
    assert second.state.output_ids == [1, 5, 7, 3]


def test_pieces_join_to_final_text():
    state, pieces = new_state(max_tokens=9, stop=[" END"]), []
    rounds = [([1], 5), ([7, 2], 3), ([5, 7], 1), ([2, 3], 7)]
    for accepted, next_token in rounds:
        update = step(state, accepted, next_token, drafted=len(accepted) + 1)
        state = update.state
        pieces += [entry["text"] for entry in entries_of(update, "tokens")]
        if update.finished:
            break
    assert update.finished
    final = entries_of(update, "final")[0]
    assert final["finish_reason"] == FINISH_LENGTH
    assert state.output_ids == [1, 5, 7, 2, 3, 5, 7, 1, 2]
    assert final["text"] == "Hello E again world! E againHello world"
    assert "".join(pieces) == final["text"]


def test_fingerprint_kept_from_first_round():
    first = advance(new_state(), [1], 2, 1, TOKENIZER, POLICY, fingerprint="fp-a")
    second = advance(first.state, [3], 7, 1, TOKENIZER, POLICY, fingerprint="fp-b")
    assert first.state.fingerprint == "fp-a"
    assert second.state.fingerprint == "fp-a"


def test_fail_releases_held_back_text():
    state = step(new_state(stop=[" END"]), [1], 5, drafted=1).state
    assert state.emitted_chars == len("Hello")
    update = fail(state, TOKENIZER, "verifier crashed")
    assert update.finished
    assert update.state.status == FINISHED
    assert update.state.round == state.round + 1
    assert update.state.output_ids == [1, 5]
    tokens, final = update.out_entries
    assert tokens["type"] == "tokens"
    assert tokens["text"] == " E"
    assert json.loads(tokens["token_ids"]) == []
    assert final["type"] == "final"
    assert final["finish_reason"] == FINISH_ERROR
    assert final["text"] == "Hello E"
    assert json.loads(final["token_ids"]) == [1, 5]


def test_fail_with_nothing_held_writes_only_the_final():
    state = step(new_state(), [1], 2, drafted=1).state
    update = fail(state, TOKENIZER, "cancelled by client", finish_reason=FINISH_CANCELLED)
    assert [entry["type"] for entry in update.out_entries] == ["final"]
    final = update.out_entries[0]
    assert final["finish_reason"] == FINISH_CANCELLED
    assert final["text"] == "Hello world"
    assert update.state.round == 2


def test_fail_before_any_output():
    update = fail(new_state(), TOKENIZER, "no drafter")
    assert update.state.round == 1
    assert update.state.output_ids == []
    assert [entry["type"] for entry in update.out_entries] == ["final"]
    assert update.out_entries[0]["text"] == ""
    assert update.out_entries[0]["finish_reason"] == FINISH_ERROR


def as_redis_hash(fields):
    """What HGETALL returns for a hash written with these fields: bytes keys and values."""
    return {key.encode(): value if isinstance(value, bytes) else value.encode() for key, value in fields.items()}


def test_fields_round_trip():
    state = RequestState(
        request_id="req-é-42",
        prompt_ids=[5, 6, 7, 70000],
        sampling=SamplingParams(temperature=0.7, top_p=0.9, seed=2**40),
        max_tokens=64,
        stop=("\n\n", "END", "é"),
        eos_ids=(0, 2),
        experts=["code", "general"],
        status=FINISHED,
        round=5,
        window=3,
        output_ids=[1, 2, 3, 0],
        emitted_chars=11,
        rounds=5,
        draft_tokens=17,
        accepted_tokens=9,
        fingerprint="target:abc123",
        created_ms=1_700_000_000_123,
    )
    restored = state_from_fields(as_redis_hash(state_to_fields(state)))
    assert restored == state
    assert restored.stop == ("\n\n", "END", "é")
    assert restored.sampling == SamplingParams(0.7, 0.9, 2**40)


def test_fields_round_trip_of_a_new_request():
    state = new_state()
    restored = state_from_fields(as_redis_hash(state_to_fields(state)))
    assert restored == state
    assert (restored.round, restored.output_ids, restored.status) == (0, [], ACTIVE)


def test_fields_round_trip_after_advance():
    state = step(new_state(stop=[" END"]), [1, 2], 5, drafted=3).state
    restored = state_from_fields(as_redis_hash(state_to_fields(state)))
    assert restored == state
    # The restored state continues exactly like the original.
    assert step(restored, [6], 3, drafted=1) == step(state, [6], 3, drafted=1)


# ---- per-drafter accounting and online routing in the request state ---------------------------

ROUTING = RoutingPolicy(max_experts=1, explore_below=0.0, decay=1.0)


def routed_state():
    routing = RequestRouting.start(["code", "math"], {"code": 0.9, "math": 0.1}, ROUTING)
    return new_state(routing=routing.to_dict(), experts=routing.choose(ROUTING))


def test_drafters_counts_accumulate_into_the_final_entry():
    state = advance(new_state(), [1], 2, 4, TOKENIZER, POLICY, feedback={"a": RoundFeedback(4, 1, 3.0), "b": RoundFeedback(2, 0, 1.0)}).state
    update = advance(state, [], EOS, 2, TOKENIZER, POLICY, feedback={"a": RoundFeedback(2, 0, 1.0)})
    assert update.state.drafters == {"a": [6, 1], "b": [2, 0]}
    final = entries_of(update, "final")[0]
    assert json.loads(final["drafters"]) == {"a": {"drafted": 6, "accepted": 1}, "b": {"drafted": 2, "accepted": 0}}


def test_routing_and_drafters_survive_the_hash_round_trip():
    state = advance(routed_state(), [1], 2, 4, TOKENIZER, POLICY, feedback={"code-small": RoundFeedback(4, 1, 2.0)},
                    routing_policy=ROUTING, expert_of={"code-small": "code"}).state
    fields = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in state_to_fields(state).items()}
    again = state_from_fields(fields)
    assert again.routing == state.routing and again.drafters == {"code-small": [4, 1]}
    assert again.domain == "code"


def test_verified_consistency_moves_the_next_rounds_experts():
    state = routed_state()
    assert state.experts == ["code"]
    # code drafts confidently and is never accepted; math (explored) is accepted throughout
    state = advance(state, [], 1, 4, TOKENIZER, POLICY, feedback={"code-small": RoundFeedback(4, 0, 3.6)}, routing_policy=ROUTING, expert_of={"code-small": "code"}).state
    state = advance(state, [2, 3], 1, 2, TOKENIZER, POLICY, feedback={"math-small": RoundFeedback(2, 2, 1.0)}, routing_policy=ROUTING, expert_of={"math-small": "math"}).state
    assert state.experts == ["math"] and state.routing["first"] == "code"


def test_state_without_routing_keeps_its_experts():
    state = advance(new_state(), [1], 2, 4, TOKENIZER, POLICY, feedback={"a": RoundFeedback(4, 1, 3.0)}, routing_policy=ROUTING).state
    assert state.experts == ["general"] and state.routing is None


def test_tree_feedback_credits_every_source_of_a_node():
    feedback = tree_feedback([("a", "b"), ("a",), ("b",)], [0.9, 0.8, 0.4], accepted_nodes=[0, 1])
    assert (feedback["a"].drafted, feedback["a"].accepted) == (2, 2)
    assert (feedback["b"].drafted, feedback["b"].accepted) == (2, 1)
    assert feedback["b"].confidence_sum == 0.9 + 0.4


def test_feedback_rows_of_the_wrong_shape_are_left_out():
    rows = [["a", 4, 2, 3.0], ["b", -1, 0, 1.0], ["c", 2, 9, 1.0], "junk", ["d", True, 0, 0.0], [1, 2, 3, 4]]
    feedback = feedback_from_wire(rows)
    assert set(feedback) == {"a", "c"} and feedback["c"].accepted == 2  # accepted capped at drafted
    assert feedback_from_wire("not a list") == {}


def test_text_cache_spares_decoding_the_whole_output_and_is_used_only_when_it_matches(counting):
    tok, cache = counting(FakeTokenizer()), {}
    state, cached_state = new_state(max_tokens=400), new_state(max_tokens=400)
    for i in range(100):
        plain = advance(state, [1 + i % 7], 2, 1, tok, POLICY)
        with_cache = advance(cached_state, [1 + i % 7], 2, 1, tok, POLICY, text_cache=cache)
        assert with_cache.out_entries == plain.out_entries
        state, cached_state = plain.state, with_cache.state
    before = tok.decoded
    advance(cached_state, [3], 2, 1, tok, POLICY, text_cache=cache)
    assert tok.decoded - before < 20  # the round's tokens and a few before them
    # Another worker applied a round since: the cache no longer matches, the output is decoded.
    elsewhere = advance(cached_state, [4], 7, 1, TOKENIZER, POLICY).state  # same length as the cached output, other tokens
    before = tok.decoded
    update = advance(elsewhere, [1], 2, 1, tok, POLICY, text_cache=cache)
    assert tok.decoded - before >= len(elsewhere.output_ids)
    assert update.out_entries == advance(elsewhere, [1], 2, 1, TOKENIZER, POLICY).out_entries


def test_a_round_writes_back_only_what_a_round_changes():
    state = new_state(stop=["x"])
    after = step(state, [1, 2], 3, drafted=4).state
    written = round_fields(after)
    assert "prompt_ids" not in written and "stop" not in written and "sampling" not in written
    # Written over the admission's hash, they give the advanced state.
    merged = {**state_to_fields(state), **written}
    assert state_from_fields(as_redis_hash(merged)) == state_from_fields(as_redis_hash(state_to_fields(after)))
