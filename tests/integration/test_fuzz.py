"""Hostile input through running workers (issue "Untrusted clients"): hypothesis makes 10,000
malformed client entries and 2,000 malformed entries for each internal stream; every client
entry gets exactly one ``error`` final (``invalid``, naming a field), the internal garbage is
dead-lettered, no worker dies, and afterwards a normal request still gives the target's output.

Each client entry is a valid request with exactly one thing wrong, so that "malformed" is
certain, not likely: an unknown field, a number that is not one or is out of range (NaN,
infinities, huge integers), a bad stop list, messages that are not a list of role/content
strings (or too many), a bad id, invalid UTF-8, both or neither of prompt and messages, an
unknown expert, a bad deadline.
"""

from __future__ import annotations

import json
import time

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import cache_dir
from tests.integration.harness import Pipeline, final_of, read_output, submit, write_config

CLIENT_ENTRIES = 10_000
INTERNAL_ENTRIES = 2_000  # per internal stream
INTERNAL_STREAMS = ("cosine:drafts", "cosine:candidates", "cosine:verify", "cosine:verified", "cosine:draft:lookup")
LOOKUP = {"name": "prompt-lookup", "kind": "prompt-lookup", "expert": "lookup"}
NUMBERS = ("max_tokens", "temperature", "top_p", "seed", "deadline_s", "logprobs")

text = st.text(max_size=40)
not_a_number = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "1e400", "-1e400", "", " ", "0x10", "one", "[]", "{}", "null"]),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz!@#", min_size=1, max_size=20),
)
bad_value = {
    "max_tokens": st.one_of(not_a_number, st.integers(max_value=0).map(str), st.integers(min_value=10**6).map(str), st.just("9" * 5000), st.just("1.5")),
    "temperature": st.one_of(not_a_number, st.floats(max_value=-1e-9, allow_nan=False).map(repr), st.floats(min_value=100.5).map(repr)),
    "top_p": st.one_of(not_a_number, st.floats(max_value=0.0, allow_nan=False).map(repr), st.floats(min_value=1.0001).map(repr)),
    "seed": st.one_of(not_a_number, st.integers(max_value=-1).map(str), st.integers(min_value=2**63).map(str), st.just("2.5")),
    "deadline_s": st.one_of(not_a_number, st.floats(max_value=0.0, allow_nan=False).map(repr), st.floats(min_value=7 * 24 * 3600 + 1).map(repr)),
    "logprobs": st.one_of(not_a_number, st.integers(max_value=-1).map(str), st.integers(min_value=21).map(str), st.just("2.5")),
}
bad_stop = st.one_of(
    st.lists(st.text(min_size=1, max_size=5), min_size=17, max_size=40).map(json.dumps),
    st.lists(st.text(min_size=129, max_size=300), min_size=1, max_size=2).map(json.dumps),
    st.lists(st.one_of(st.integers(), st.none(), st.booleans(), st.just([])), min_size=1, max_size=4).map(json.dumps),
    st.sampled_from(['[""]', "[[]]", "{}", "[1]", '{"a": 1}', "[null]"]),
)
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": text})
bad_messages = st.one_of(
    st.text(max_size=30).filter(lambda s: not _json_list(s)),  # not JSON, or not a list
    st.just("[]"),
    st.lists(st.fixed_dictionaries({"role": text.filter(lambda r: r not in ("user", "system", "assistant")), "content": text}), min_size=1, max_size=3).map(json.dumps),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(st.integers(), st.none(), st.lists(st.integers()))}), min_size=1, max_size=3).map(json.dumps),
    st.lists(st.fixed_dictionaries({"role": st.just("user")}), min_size=1, max_size=2).map(json.dumps),
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": text, "name": text}), min_size=1, max_size=2).map(json.dumps),
    st.lists(message, min_size=513, max_size=600).map(json.dumps),  # too many
)
bad_id = st.one_of(st.just(""), st.text(min_size=1, max_size=10).map(lambda s: s + " x"), st.text(max_size=5).map(lambda s: "{" + s), st.just("i" * 201))


def _json_list(s: str) -> bool:
    try:
        return isinstance(json.loads(s), list) and bool(json.loads(s))
    except (ValueError, RecursionError):
        return False


@st.composite
def malformed_client_entry(draw) -> tuple[dict, str]:
    """(fields, the field the refusal should name)."""
    fields: dict = {"prompt": draw(st.sampled_from(["Hello", "Tell me a story.", "2 + 2 ="])), "max_tokens": "4"}
    kind = draw(st.sampled_from(["unknown", "number", "stop", "messages", "id", "utf8", "both", "neither", "expert", "empty"]))
    if kind == "unknown":
        name = draw(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).filter(lambda n: n not in {"id", "prompt", "messages", "expert", "stop", *NUMBERS}))
        fields[name] = draw(text)
        return fields, name
    if kind == "number":
        name = draw(st.sampled_from(NUMBERS))
        fields[name] = draw(bad_value[name])
        return fields, name
    if kind == "stop":
        fields["stop"] = draw(bad_stop)
        return fields, "stop"
    if kind == "messages":
        del fields["prompt"]
        fields["messages"] = draw(bad_messages)
        return fields, "messages"
    if kind == "id":  # unreadable, or missing (pipeline.require_id)
        value = draw(st.one_of(st.none(), bad_id))
        if value is not None:
            fields["id"] = value
        return fields, "id"
    if kind == "utf8":
        name = draw(st.sampled_from(["prompt", "max_tokens", "stop"]))
        fields[name] = draw(st.binary(min_size=1, max_size=10)).replace(b"\x80", b"") + b"\xff\xfe"
        return fields, name
    if kind == "both":
        fields["messages"] = json.dumps([{"role": "user", "content": "hi"}])
        return fields, "prompt"
    if kind == "neither":
        del fields["prompt"]
        return fields, "messages"
    if kind == "expert":
        fields["expert"] = draw(text.filter(lambda e: e != "lookup"))
        return fields, "expert"
    fields["prompt"] = ""
    return fields, "prompt"


packable = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
garbage_fields = st.one_of(
    st.dictionaries(st.binary(min_size=1, max_size=8), st.binary(max_size=64), min_size=1, max_size=4),  # no payload field, or a random one
    st.binary(max_size=200).map(lambda b: {b"m": b}),  # not msgpack, or msgpack of anything
    st.recursive(st.none() | st.booleans() | packable | st.text(max_size=10) | st.binary(max_size=10),
                 lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
                 max_leaves=12).map(lambda v: {b"m": msgpack.packb(v)}),
    st.fixed_dictionaries({"v": st.integers(0, 3), "kind": st.sampled_from(["draft", "candidate", "verify_batch", "verified_batch", "draft_job", "nope"]),
                           "body": st.dictionaries(st.text(max_size=12), packable | st.text(max_size=8) | st.none(), max_size=5)})
      .map(lambda v: {b"m": msgpack.packb(v)}),
)


def generate(strategy, count: int) -> list:
    """``count`` examples of ``strategy``, reproducibly (derandomized), without the database."""
    examples: list = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), phases=("generate",))
    @given(strategy)
    def collect(example):
        examples.append(example)

    collect()
    return examples


def test_ten_thousand_malformed_requests_and_internal_garbage(embedded_url, tmp_path, demo_target, greedy_references, pipelines):
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=[LOOKUP])
    pipeline = Pipeline(embedded_url, config)
    pipelines.append(pipeline)
    pipeline.start_stages("lookup")
    client = pipeline.client()

    entries = generate(malformed_client_entry(), CLIENT_ENTRIES)
    while len(entries) < CLIENT_ENTRIES:  # hypothesis may stop early when it runs out of new examples
        entries += entries[: CLIENT_ENTRIES - len(entries)]
    expected: dict[str, str] = {}  # where the answer goes -> the field it names
    sent = 0
    for start in range(0, len(entries), 500):
        with client.pipeline(transaction=False) as pipe:
            ids = []
            for fields, param in entries[start : start + 500]:
                fields = dict(fields)
                if param != "id":
                    fields["id"] = f"fz-{sent}"
                ids.append((fields.get("id"), param))
                pipe.xadd("cosine:requests", fields)
                sent += 1
            entry_ids = pipe.execute()
        for (request_id, param), entry_id in zip(ids, entry_ids):
            expected[request_id if param != "id" else entry_id.decode()] = param
    for stream in INTERNAL_STREAMS:
        garbage = generate(garbage_fields, INTERNAL_ENTRIES)
        while len(garbage) < INTERNAL_ENTRIES:
            garbage += garbage[: INTERNAL_ENTRIES - len(garbage)]
        with client.pipeline(transaction=False) as pipe:
            for fields in garbage:
                pipe.xadd(stream, fields)
            pipe.execute()

    # Every client entry: exactly one final, an error naming the field.
    deadline = time.monotonic() + 900
    waiting = dict(expected)
    finals: dict[str, dict] = {}
    while waiting and time.monotonic() < deadline:
        keys = list(waiting)[:2000]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.xrange(f"cosine:out:{key}")
            replies = pipe.execute()
        for key, stream_entries in zip(keys, replies):
            kinds = [f.get(b"type") for _, f in stream_entries]
            if b"final" in kinds:
                assert kinds == [b"final"], (key, stream_entries)
                finals[key] = {k.decode(): v.decode(errors="replace") for k, v in stream_entries[0][1].items()}
                del waiting[key]
        if waiting:
            time.sleep(0.5)
    assert not waiting, f"{len(waiting)} entries without a final, e.g. {list(waiting.items())[:5]}\n{pipeline.log_tails()}"
    wrong = {k: (f.get("error_code"), f.get("error_param"), expected[k]) for k, f in finals.items()
             if f.get("finish_reason") != "error" or f.get("error_code") != "invalid" or not f.get("error_param")}
    assert not wrong, list(wrong.items())[:10]
    named = sum(f["error_param"] == expected[k] for k, f in finals.items())
    assert named >= 0.95 * len(finals), f"only {named} of {len(finals)} refusals name the corrupted field"

    # The internal garbage is dead-lettered; no worker died.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        pending = sum(client.xpending(stream, group)["pending"] + (_lag(client, stream, group) or 0)
                      for stream in INTERNAL_STREAMS for group in _groups(client, stream))
        if pending == 0:
            break
        time.sleep(1.0)
    assert pending == 0, f"{pending} internal entries still unhandled\n{pipeline.log_tails()}"
    assert client.xlen("cosine:dead") >= len(INTERNAL_STREAMS) * INTERNAL_ENTRIES * 0.99
    assert all(p.poll() is None for p in pipeline.processes), pipeline.log_tails()

    # And the service still serves.
    messages = _first_chat_messages()
    submit(client, id="after-fuzz", messages=json.dumps(messages), max_tokens=8)
    final = final_of(read_output(client, "after-fuzz", timeout=120))
    assert json.loads(final["token_ids"]) == greedy_references[0][:8]


def _groups(client, stream: str) -> list[str]:
    try:
        return [g["name"].decode() for g in client.xinfo_groups(stream)]
    except Exception:  # a stream nobody created a group for yet
        return []


def _lag(client, stream: str, group: str) -> int:
    for g in client.xinfo_groups(stream):
        if g["name"].decode() == group:
            return int(g.get("lag") or 0)
    return 0


def _first_chat_messages() -> list[dict]:
    from pathlib import Path

    texts = json.loads((Path(__file__).resolve().parents[1] / "data" / "chat_prompts.json").read_text())
    return [{"role": "user", "content": texts[0]}]
