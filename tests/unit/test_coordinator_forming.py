"""The coordinator's pure parts, without Redis: batch forming (which candidates, which verifier,
how many multi-step tokens, which drafter) and the bounded per-request record."""

from cosine.core.params import SamplingParams
from cosine.policy.batching import BatchPolicy
from cosine.wire import Candidate, VerifyItem
from cosine.workers.coordinator.forming import (
    DRAFTER_BACKLOG,
    Verifiers,
    Waiting,
    batch_home,
    draft_home,
    drafting_due_s,
    multi_steps,
    next_batch,
    with_steps,
)
from cosine.workers.coordinator.records import Drafting, Records, RoundClock


def waiting(request_id: str, *, round_=1, drafted=(), fingerprint="fp", context=8, arrived=0.0, room=100) -> Waiting:
    tokens = list(drafted)
    candidate = Candidate(request_id, round_, tokens, [-1] + list(range(len(tokens) - 1)) if tokens else [], [0.5] * len(tokens), [["a"]] * len(tokens), [])
    item = VerifyItem(request_id, round_, list(range(context)), candidate, SamplingParams(), fingerprint)
    return Waiting(request_id.encode(), item, arrived, len(tokens) + 1, 1.0, len(tokens), room)


def flat_cost(batch_size: int, fed_tokens: int, longest: float | None = None) -> float:
    return 10.0 + fed_tokens


def test_a_batch_serves_the_oldest_candidates_target_and_home():
    pool = [waiting("a", fingerprint="x"), waiting("b", fingerprint="y"), waiting("c", fingerprint="x"), waiting("d", fingerprint="x")]
    homes = {"a": "v1", "c": "v2", "d": ""}
    taken, home, fingerprint = next_batch(pool, 1.0, lambda r: homes.get(r, ""), Verifiers(count=2), BatchPolicy(8), "fifo", flat_cost, 0.0, 1.0)
    assert (fingerprint, home) == ("x", "v1")
    assert [w.item.request_id for w in taken] == ["a", "d"]  # b: another target; c: another verifier's caches


def test_a_batch_fits_its_verifiers_kv_pool():
    pool = [waiting(name, context=40) for name in ("a", "b", "c")]
    small = Verifiers(count=1, kv_rows={"v1": 100}, kv_block=16)  # 48 rows each: two fit
    for choice in ("fifo", "cost"):
        taken, _, _ = next_batch(pool, 1.0, lambda r: "", small, BatchPolicy(8), choice, flat_cost, 0.0, 1.0)
        assert [w.item.request_id for w in taken] == ["a", "b"], choice


def test_a_busy_home_is_passed_over_only_while_another_verifier_is_free():
    verifiers = Verifiers(live=frozenset({"v1", "v2"}), count=2, busy_at={"v1": 1})
    assert batch_home("v1", verifiers) == "v1"  # nobody free: it stays with its caches
    stealing = Verifiers(live=frozenset({"v1", "v2"}), count=2, busy_at={"v1": 1}, steal=True)
    assert batch_home("v1", stealing) == "" and batch_home("v2", stealing) == "v2"
    assert batch_home("gone", verifiers) == ""  # not live: any verifier
    assert batch_home("v1", Verifiers(live=frozenset({"v1"}), count=1, affinity=False)) == ""


def test_multi_step_decodes_all_when_the_batch_is_everyone_else_until_drafts_are_due():
    plain = [waiting("a"), waiting("b")]
    verify_ms = lambda batch, fed, longest: 10.0  # noqa: E731
    draft_ms = lambda window, together: 35.0  # noqa: E731
    assert multi_steps(8, plain, 0, 2, [], 0.0, draft_ms, verify_ms) == 8  # the whole load, nobody drafting
    assert multi_steps(8, plain, 1, 3, [], 0.0, draft_ms, verify_ms) == 1  # others wait in the pool
    # Others in verification: all steps when their batches have verifiers of their own (they
    # come back to them), one when they would come back to this batch's verifier.
    assert multi_steps(8, plain, 0, 6, [], 0.0, draft_ms, verify_ms, own_verifier=True) == 8
    assert multi_steps(8, plain, 0, 6, [], 0.0, draft_ms, verify_ms, own_verifier=False) == 1
    assert multi_steps(8, plain, 1, 6, [], 0.0, draft_ms, verify_ms, own_verifier=True) == 1  # but not while others wait in the pool
    drafting = [Drafting(3, 0.0, 4, 1)]
    assert multi_steps(8, plain, 0, 3, drafting, 0.0, draft_ms, verify_ms) == 4  # 35 ms until the draft is back: 1 + 3 steps
    assert multi_steps(1, plain, 0, 2, [], 0.0, draft_ms, verify_ms) == 1  # multi-step off
    assert multi_steps(8, [waiting("c", drafted=[5, 6])], 0, 1, [], 0.0, draft_ms, verify_ms) == 1  # a drafted round: one
    # A drafted round in the batch waits for every step (the batch's result comes back after
    # its last): one step, even with the whole load in the batch.
    assert multi_steps(8, [*plain, waiting("c", drafted=[5, 6])], 0, 3, [], 0.0, draft_ms, verify_ms) == 1
    assert drafting_due_s(drafting, 0.01, draft_ms) == 0.025


def test_steps_apply_only_to_later_rounds_without_drafts_and_stop_at_max_tokens():
    assert with_steps(waiting("a", room=3), 8).steps == 3
    assert with_steps(waiting("a", round_=0), 8).steps == 1  # a first round: its first token at once
    assert with_steps(waiting("a", drafted=[5]), 8).steps == 1


def test_a_drafting_job_goes_home_unless_home_has_a_backlog_and_a_sibling_idles():
    experts = {"a": "general", "b": "general", "c": "code"}
    assert draft_home("a", "general", {"a", "b"}, experts, {"a": (DRAFTER_BACKLOG - 1, 0)}) == "a"
    assert draft_home("a", "general", {"a", "b"}, experts, {"a": (DRAFTER_BACKLOG, 0)}) == ""  # b has nothing: b may take it
    assert draft_home("a", "general", {"a", "b"}, experts, {"a": (DRAFTER_BACKLOG, 0), "b": (0, 1)}) == "a"  # b busy too
    assert draft_home("a", "general", {"b"}, experts, {}) == "" and draft_home(None, "general", {"a"}, experts, {}) == ""


def test_records_are_bounded_and_a_request_s_record_goes_with_it():
    records = Records(bound=3)
    for name in ("a", "b", "c"):
        records.of(name).home = name
    records.of("a")  # touched: now the most recent
    records.of("d")
    assert "b" not in records and {"a", "c", "d"} == {n for n in "abcd" if n in records}
    records.drafting["a"] = Drafting(1, 5.0, 4, 1)
    records.of("a").clock = RoundClock(1, 5.0)
    records.forget("a")
    assert "a" not in records and "a" not in records.drafting
    records.drafting.update({"c": Drafting(1, 1.0, 4, 1), "d": Drafting(1, 9.0, 4, 1)})
    records.expire_drafting(5.0)
    assert list(records.drafting) == ["d"]


def test_records_hold_advances_text_cache():
    records = Records()
    texts = records.texts
    texts["r"] = (2, (5, 6), "hi")
    assert texts.get("r") == (2, (5, 6), "hi") and records.get("r").text == (2, (5, 6), "hi") and len(texts) == 1
    assert texts.pop("r", None) == (2, (5, 6), "hi") and texts.get("r") is None and "r" in records
    assert texts.pop("missing", None) is None
