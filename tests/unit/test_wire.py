"""Wire encode/decode: every message kind round-trips; malformed entries raise WireError."""

import struct

import msgpack
import pytest
import torch

import cosine.wire.messages
from cosine import wire
from cosine.core.sampling import SamplingParams
from cosine.wire import (
    PAYLOAD_FIELD,
    SCHEMA_VERSION,
    Candidate,
    Draft,
    DraftJob,
    VerifiedBatch,
    VerifiedItem,
    VerifyBatch,
    VerifyItem,
    WireError,
    decode,
    encode,
)


def draft_job():
    return DraftJob(
        request_id="req-1",
        round=3,
        context=[1, 2, 3, 70000],
        window=4,
        sampling=SamplingParams(temperature=0.8, top_p=0.95, seed=7),
        experts=["general", "code"],
        issued_ms=1_700_000_000_000,
    )


def draft():
    return Draft(
        request_id="req-1",
        round=3,
        expert="code",
        drafter="smol",
        rank=1,
        tokens=[5, 6],
        confidences=[0.9, 0.25],
        draft_probs=[b"\x00\x00\x80?" * 3, b"\x00\x00\x00\x00" * 3],
        experts=["general", "code"],
        context_len=4,
        instance="host-12-abc123",
    )


def candidate():
    return Candidate(
        request_id="req-1",
        round=3,
        tokens=[5, 6, 8],
        parents=[-1, 0, 0],
        confidences=[0.9, 0.5, 0.4],
        sources=[["smol", "lookup"], ["smol"], ["lookup"]],
        draws=[[0, 0], [1, -1], [2, 1]],
        draft_probs=[b"\x01\x02", b"\x03\x04"],
        homes=[["code", "host-12-abc123"], ["general", "host-13-def456"]],
    )


def verify_batch():
    items = [
        VerifyItem("req-1", 3, [1, 2, 3], candidate(), SamplingParams(0.0, 1.0, 0), "fp-1", logprobs=2),
        VerifyItem("req-2", 9, [4], Candidate("req-2", 9, [7], [-1], [1.0], [["smol"]], [[0, -1]]), SamplingParams(), "fp-1"),
    ]
    return VerifyBatch(batch_id="batch-17", items=items)


def verified_batch():
    items = [
        VerifiedItem("req-1", 3, accepted_tokens=[5, 6], next_token=9, draft_tokens=3,
                     logprobs=[[-0.5, [5, 7], [-0.5, -1.25]], [-0.125, [6, 5], [-0.125, -3.0]], [-2.0, [8, 9], [-1.0, -2.0]]]),
        VerifiedItem("req-2", 9, accepted_tokens=[], next_token=0, draft_tokens=1, error="out of memory"),
    ]
    return VerifiedBatch(
        batch_id="batch-17", verifier="verifier-a", items=items, batch_size=2, forward_ms=12.5, fingerprint="fp-1"
    )


ALL_MESSAGES = [draft_job, draft, candidate, verify_batch, verified_batch]


def envelope_of(message):
    """The decoded envelope of an encoded message, to tamper with."""
    return msgpack.unpackb(encode(message)[PAYLOAD_FIELD], raw=False)


def entry(envelope):
    return {PAYLOAD_FIELD: msgpack.packb(envelope, use_bin_type=True)}


@pytest.mark.parametrize("make", ALL_MESSAGES, ids=lambda make: make.__name__)
def test_round_trip(make):
    message = make()
    fields = encode(message)
    assert list(fields) == [PAYLOAD_FIELD]
    assert isinstance(fields[PAYLOAD_FIELD], bytes)
    assert decode(fields) == message
    assert decode(fields, expected=type(message)) == message


def test_envelope_shape():
    envelope = envelope_of(draft_job())
    assert envelope["v"] == SCHEMA_VERSION
    assert envelope["kind"] == "draft_job"
    assert envelope["body"]["sampling"] == {"temperature": 0.8, "top_p": 0.95, "seed": 7}


def test_round_trip_keeps_nested_types():
    batch = decode(encode(verify_batch()), expected=VerifyBatch)
    assert isinstance(batch.items[0], VerifyItem)
    assert isinstance(batch.items[0].tree, Candidate)
    assert isinstance(batch.items[0].sampling, SamplingParams)
    assert batch.items[0].tree.draft_probs == [b"\x01\x02", b"\x03\x04"]
    assert batch.items[1].tree.draws == [[0, -1]]
    verified = decode(encode(verified_batch()), expected=VerifiedBatch)
    assert [type(item) for item in verified.items] == [VerifiedItem, VerifiedItem]
    assert verified.items[1].error == "out of memory"


def test_defaults_fill_in_when_optional_fields_are_left_out():
    envelope = envelope_of(draft())
    for name in ("draft_probs", "experts", "context_len"):
        del envelope["body"][name]
    message = decode(entry(envelope), expected=Draft)
    assert (message.draft_probs, message.experts, message.context_len) == ([], [], 0)
    assert message.tokens == [5, 6]


def test_missing_payload_field():
    with pytest.raises(WireError, match="no payload"):
        decode({})
    with pytest.raises(WireError, match="no payload"):
        decode({b"payload": encode(draft_job())[PAYLOAD_FIELD]})


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", b"", b"\x92\x01", b"\x01\x02\x03", b"not msgpack at all \xff\xfe"],
    ids=["reserved-byte", "empty", "truncated", "extra-data", "text"],
)
def test_payload_not_msgpack(payload):
    with pytest.raises(WireError):
        decode({PAYLOAD_FIELD: payload})


def test_truncated_real_payload():
    payload = encode(verify_batch())[PAYLOAD_FIELD]
    with pytest.raises(WireError, match="not msgpack"):
        decode({PAYLOAD_FIELD: payload[:-5]})


def test_non_string_map_keys_rejected():
    with pytest.raises(WireError):
        decode({PAYLOAD_FIELD: msgpack.packb({1: "x", "v": SCHEMA_VERSION})})


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, "1", None])
def test_wrong_schema_version(version):
    envelope = envelope_of(draft_job())
    envelope["v"] = version
    with pytest.raises(WireError, match="schema version"):
        decode(entry(envelope))


def test_missing_schema_version():
    envelope = envelope_of(draft_job())
    del envelope["v"]
    with pytest.raises(WireError, match="schema version"):
        decode(entry(envelope))


@pytest.mark.parametrize("payload", [msgpack.packb([1, "draft_job", {}]), msgpack.packb(1), msgpack.packb("draft_job")])
def test_envelope_not_a_map(payload):
    with pytest.raises(WireError, match="schema version"):
        decode({PAYLOAD_FIELD: payload})


@pytest.mark.parametrize("kind", ["bogus", "verify_item", "DraftJob", "", None, 3])
def test_unknown_kind(kind):
    envelope = envelope_of(draft_job())
    envelope["kind"] = kind
    with pytest.raises(WireError, match="kind"):
        decode(entry(envelope))


def test_missing_kind():
    envelope = envelope_of(draft_job())
    del envelope["kind"]
    with pytest.raises(WireError, match="kind"):
        decode(entry(envelope))


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (draft_job, Draft),
        (draft, DraftJob),
        (candidate, VerifyBatch),
        (verify_batch, VerifiedBatch),
        (verified_batch, VerifyItem),
    ],
)
def test_expected_kind_mismatch(make, expected):
    with pytest.raises(WireError, match="kind"):
        decode(encode(make()), expected=expected)


def test_body_not_a_map():
    envelope = envelope_of(draft_job())
    envelope["body"] = ["req-1", 3]
    with pytest.raises(WireError, match="not a map"):
        decode(entry(envelope))
    del envelope["body"]
    with pytest.raises(WireError, match="not a map"):
        decode(entry(envelope))


def test_unknown_body_field():
    envelope = envelope_of(draft_job())
    envelope["body"]["priority"] = 1
    with pytest.raises(WireError, match="priority"):
        decode(entry(envelope))


def test_unknown_field_in_nested_sampling():
    envelope = envelope_of(draft_job())
    envelope["body"]["sampling"]["top_k"] = 50
    with pytest.raises(WireError, match="top_k"):
        decode(entry(envelope))


def test_unknown_field_in_batch_item():
    envelope = envelope_of(verified_batch())
    envelope["body"]["items"][1]["entropy"] = [0.1]
    with pytest.raises(WireError, match="entropy"):
        decode(entry(envelope))


def test_unknown_field_in_nested_tree():
    envelope = envelope_of(verify_batch())
    envelope["body"]["items"][0]["tree"]["depth"] = 2
    with pytest.raises(WireError, match="depth"):
        decode(entry(envelope))


@pytest.mark.parametrize(
    ("make", "field", "value"),
    [
        (draft_job, "round", "3"),  # str where int
        (draft_job, "round", True),  # bool where int
        (draft_job, "window", 4.0),  # float where int
        (draft_job, "request_id", 17),  # int where str
        (draft_job, "context", ["1", "2"]),  # list of str where list[int]
        (draft_job, "context", [1, True]),  # bool inside list[int]
        (draft_job, "context", 5),  # scalar where list[int]
        (draft_job, "experts", ["general", 3]),  # int inside list[str]
        (draft, "tokens", [5, "6"]),
        (draft, "rank", False),
        (candidate, "parents", [-1, 0.5, 0]),
        (verified_batch, "forward_ms", "12.5"),  # str where float
        (verified_batch, "batch_size", None),
        (verified_batch, "verifier", b"verifier-a"),  # bytes where str
    ],
)
def test_wrong_field_type(make, field, value):
    envelope = envelope_of(make())
    envelope["body"][field] = value
    with pytest.raises(WireError, match=field):
        decode(entry(envelope))


@pytest.mark.parametrize(
    ("field", "value"),
    [("next_token", "9"), ("next_token", True), ("accepted_tokens", ["5", "6"]), ("draft_tokens", 3.0), ("request_id", 1)],
)
def test_wrong_field_type_in_batch_item(field, value):
    envelope = envelope_of(verified_batch())
    envelope["body"]["items"][0][field] = value
    with pytest.raises(WireError, match=field):
        decode(entry(envelope))


def test_wrong_field_type_in_nested_sampling():
    envelope = envelope_of(draft_job())
    envelope["body"]["sampling"]["seed"] = "7"
    with pytest.raises(WireError, match="seed"):
        decode(entry(envelope))


def test_wrong_field_type_in_nested_tree():
    envelope = envelope_of(verify_batch())
    envelope["body"]["items"][0]["tree"]["tokens"] = ["5"]
    with pytest.raises(WireError, match="tokens"):
        decode(entry(envelope))


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (draft_job, "request_id"),
        (draft_job, "round"),
        (draft_job, "sampling"),
        (draft, "tokens"),
        (candidate, "parents"),
        (verify_batch, "batch_id"),
        (verified_batch, "forward_ms"),
    ],
)
def test_missing_required_field(make, field):
    envelope = envelope_of(make())
    del envelope["body"][field]
    with pytest.raises(WireError, match=field):
        decode(entry(envelope))


def test_missing_required_field_in_batch_item():
    envelope = envelope_of(verified_batch())
    del envelope["body"]["items"][0]["next_token"]
    with pytest.raises(WireError, match="next_token"):
        decode(entry(envelope))


def test_missing_required_field_in_nested_tree():
    envelope = envelope_of(verify_batch())
    del envelope["body"]["items"][1]["tree"]["sources"]
    with pytest.raises(WireError, match="sources"):
        decode(entry(envelope))


def test_oversized_payload(monkeypatch):
    fields = encode(verify_batch())
    size = len(fields[PAYLOAD_FIELD])
    monkeypatch.setattr(wire.messages, "MAX_PAYLOAD_BYTES", size)
    assert decode(fields) == verify_batch()  # exactly at the limit is fine
    monkeypatch.setattr(wire.messages, "MAX_PAYLOAD_BYTES", size - 1)
    with pytest.raises(WireError, match="exceeds"):
        decode(fields)


def test_oversized_payload_checked_before_parsing(monkeypatch):
    monkeypatch.setattr(wire.messages, "MAX_PAYLOAD_BYTES", 8)
    with pytest.raises(WireError, match="exceeds"):
        decode({PAYLOAD_FIELD: b"\xc1" * 9})  # garbage, but the size check comes first


def test_wire_error_is_a_value_error():
    with pytest.raises(ValueError):
        decode({})


def test_stage_workers_do_not_import_the_local_engine():
    """Workers import the models and the wire, not the single-process engine (nor its factory
    path into it)."""
    import subprocess
    import sys

    code = ("import sys\nimport cosine.workers.coordinator, cosine.workers.verifier, cosine.workers.drafter, "
            "cosine.workers.router, cosine.workers.fusion\nprint('cosine.engine' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_draft_distributions_travel_sparse_and_come_back_exact():
    from cosine.wire.convert import probs_from_bytes, probs_to_bytes

    vocab = 49_152
    probs = torch.zeros(3, vocab)
    probs[0, [7, 300, 49_151]] = torch.tensor([0.5, 0.25, 0.25])
    probs[1, 11] = 1.0
    probs[2, torch.arange(0, 64, 2)] = 1 / 32
    rows = probs_to_bytes(probs)
    assert [len(r) for r in rows] == [4 + 8 * 3, 4 + 8, 4 + 8 * 32]  # against 4 * vocab bytes dense
    assert torch.equal(torch.from_numpy(probs_from_bytes(rows, vocab)), probs)
    assert probs_to_bytes(None) == [] and probs_from_bytes([]) is None


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([b"\x00\x01"], "uint32 vocabulary size"),
        ([struct.pack("<I", 10) + b"\x00" * 5], "uint32 vocabulary size"),
        ([struct.pack("<I", 10) + struct.pack("<i", 10) + struct.pack("<f", 1.0)], "increasing and in"),
        ([struct.pack("<I", 10) + struct.pack("<i", -1) + struct.pack("<f", 1.0)], "increasing and in"),
        ([struct.pack("<I", 10) + struct.pack("<2i", 3, 3) + struct.pack("<2f", 0.5, 0.5)], "increasing and in"),
        ([struct.pack("<I", 10) + struct.pack("<i", 3) + struct.pack("<f", -0.5)], "finite and >= 0"),
        ([struct.pack("<I", 10) + struct.pack("<i", 3) + struct.pack("<f", float("nan"))], "finite and >= 0"),
        ([struct.pack("<I", 10) + struct.pack("<i", 3) + struct.pack("<f", 1.0), struct.pack("<I", 11)], "differ in vocabulary size"),
        ([struct.pack("<I", 11) + struct.pack("<i", 3) + struct.pack("<f", 1.0)], "the vocabulary has 10"),
    ],
)
def test_malformed_draft_distributions_are_refused(rows, match):
    from cosine.wire.convert import probs_from_bytes

    with pytest.raises(WireError, match=match):
        probs_from_bytes(rows, 10)


def test_a_context_by_reference_is_its_tail_and_a_digest_of_the_rest():
    from cosine.wire.context import TAIL, by_reference, check_stored, digest, resolve

    context = list(range(1000, 1000 + 3 * TAIL))
    start, prefix_digest, tail = by_reference(context)
    assert start == 2 * TAIL and tail == context[start:] and prefix_digest == digest(context[:start])
    # A worker that holds the request's last context (shorter, or longer: its own draft) resolves it.
    assert resolve(context[: start + 3], start, prefix_digest, tail) == context
    assert resolve(context + [7, 8], start, prefix_digest, tail) == context
    # Not what it holds: too short, another prefix, nothing held.
    assert resolve(context[: start - 1], start, prefix_digest, tail) is None
    assert resolve([0] + context[1:], start, prefix_digest, tail) is None
    assert resolve(None, start, prefix_digest, tail) is None
    # Short contexts travel whole.
    assert by_reference(context[:TAIL]) == (0, b"", context[:TAIL]) and resolve(None, 0, b"", [5, 6]) == [5, 6]
    # Read back from the request's hash: the referenced context, unless the request moved on.
    assert check_stored(context, start, tail) == context
    assert check_stored(context + [9], start, tail) is None and check_stored(context[:-1] + [0], start, tail) is None
    assert digest([1, 2]) != digest([2, 1]) and len(digest([])) == 8


def test_jobs_and_items_say_their_whole_context_length():
    job = DraftJob("r", 2, [5, 6, 7], 4, SamplingParams(), ["general"], context_start=100, context_digest=b"\x01" * 8)
    assert job.context_len == 103 and decode(encode(job)) == job
    item = VerifyItem("r", 2, [5], Candidate("r", 2, [], [], [], [], []), SamplingParams(), "", context_start=10, context_digest=b"\x02" * 8)
    assert item.context_len == 11 and decode(encode(VerifyBatch("b", [item]))).items[0] == item


def test_rounds_in_reads_what_decode_refuses(monkeypatch):
    """An entry no worker can decode (another schema version, over the size cap) still names the
    rounds it carried, so the stage that dead-letters it can end or redo them."""
    items = [VerifiedItem("{a}r1", 4, [1], 2, 0), VerifiedItem("r2", 0, [], 3, 0)]
    fields = encode(VerifiedBatch("b", "v", items, 2, 1.0))
    body = msgpack.unpackb(fields[PAYLOAD_FIELD])
    future = {PAYLOAD_FIELD: msgpack.packb({**body, "v": SCHEMA_VERSION + 1})}
    with pytest.raises(WireError):
        decode(future)
    assert wire.rounds_in(future) == [("{a}r1", 4), ("r2", 0)]
    monkeypatch.setattr(cosine.wire.messages, "MAX_PAYLOAD_BYTES", 16)
    with pytest.raises(WireError, match="exceeds"):
        decode(fields)
    assert wire.rounds_in(fields) == [("{a}r1", 4), ("r2", 0)]
    assert wire.rounds_in(encode(draft_job())) == [("req-1", 3)]
    for garbage in ({}, {PAYLOAD_FIELD: b"\xc1"}, {PAYLOAD_FIELD: msgpack.packb([1, 2])}, {PAYLOAD_FIELD: msgpack.packb({"body": {"items": [{"request_id": 1, "round": "x"}]}})}):
        assert wire.rounds_in(garbage) == []


def test_one_list_of_the_pipelines_streams_from_its_registries():
    keys = wire.Keys("cosine:")
    registries = keys.stream_registries()
    assert registries == ("cosine:experts", "cosine:fingerprints", "cosine:verifier-streams", "cosine:drafter-streams", "cosine:tenants",
                          "cosine:coordinator-streams")
    streams = keys.streams({b"code", "general"}, [b"fp1"], {b"v-1"}, {b"d-1": b"x"}, {b"acme": b"{}"}, {b"c-1"})
    assert streams[:7] == [keys.requests, keys.cancel, keys.drafts, keys.candidates, keys.verify, keys.verified, keys.dead]
    assert streams[7:] == [keys.draft("code"), keys.draft("general"), keys.verify_for("fp1"), keys.verify_at("v-1"), keys.draft_at("d-1"),
                           keys.verified_at("c-1"), keys.requests_of("acme"), keys.cancel_of("acme")]
