"""The Redis Streams pipeline end to end: a real server, real worker processes, the real target.

Clients here are plain Redis clients (XADD / XREAD), not ``cosine.client``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cosine.core.protocol import prompt_token_ids
from cosine.wire import Candidate, DraftJob, VerifiedBatch, decode
from tests.conftest import cache_dir
from tests.integration.harness import (
    ROOT,
    Pipeline,
    RedisServerProcess,
    final_of,
    read_output,
    redis_server_binaries,
    submit,
    write_config,
)

pytestmark = pytest.mark.model
MAX_TOKENS = 24
EARLY_EXIT = {"name": "early-exit-2", "kind": "early-exit", "layers": 2, "expert": "general"}
LOOKUP = {"name": "prompt-lookup", "kind": "prompt-lookup", "expert": "lookup"}
RAW_PROMPTS = [
    "The three primary colours are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "The French Revolution began in 1789 when",
    "To make a cup of tea, first",
    "Summarize: The meeting moved to Friday. Summarize: The meeting moved to",
    "SELECT name, COUNT(*) FROM orders",
    "A prime number is",
]


@pytest.fixture()
def server(request):
    """A fresh real server per test: the embedded Valkey, or Debian's redis-server."""
    kind = getattr(request, "param", "valkey")
    if kind == "valkey":
        from cosine.embedded import EmbeddedRedis

        embedded = EmbeddedRedis()
        url = embedded.start()
        yield url
        embedded.stop()
    else:
        process = RedisServerProcess()
        yield process.url
        process.stop()


def make_pipeline(tmp_path, url, demo_target, drafters, pipeline=None, speculation=None) -> Pipeline:
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=drafters, pipeline=pipeline,
                          speculation=speculation)
    return Pipeline(url, config)


def reference(demo_target, ids: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = demo_target.model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), max_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(ids) :].tolist()


def assert_matches(tokens: list[int], expected: list[int]) -> None:
    assert tokens == expected[: len(tokens)], (tokens, expected)
    assert len(tokens) == len(expected) or tokens[-1] == 2


def assert_text_joins(entries: list[dict]) -> None:
    final = final_of(entries)
    pieces = "".join(e["text"] for e in entries if e["type"] == "tokens")
    assert pieces == final["text"]


# Debian's redis-server case is a slow test: the TLS/ACL tests run whole pipelines on it by default.
SERVER_KINDS = [pytest.param(kind, marks=pytest.mark.slow) if kind == "redis-server" else kind for kind in redis_server_binaries()]


@pytest.mark.parametrize("server", SERVER_KINDS, indirect=True)
def test_sixteen_concurrent_requests_match_the_reference(server, tmp_path, demo_target, chat_prompts, greedy_references, pipelines):
    # Trimming stays on (every second): the fused trees are watched by a plain XREAD reader.
    # require_id off: the completion-form requests are answered under their entry IDs.
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT, LOOKUP], pipeline={"trim_interval_s": 1.0, "require_id": False})
    pipelines.append(pipeline)
    # two coordinators share the work: rounds are applied with a compare-and-set
    for role in ("router", "coordinator", "coordinator", "fusion", "verifier", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.start("drafter", "--expert", "general")
    pipeline.start("drafter", "--expert", "lookup")
    pipeline.wait_live("verifier", 2)
    pipeline.wait_live("drafter", 3)
    pipeline.wait_live("router", 1)
    pipeline.wait_live("coordinator", 2)
    client = pipeline.client()
    watcher = CandidateWatcher(pipeline.client())
    watcher.start()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    expected: dict[str, list[int]] = {}
    raw_references = [reference(demo_target, demo_target.tokenizer(p, add_special_tokens=False)["input_ids"], MAX_TOKENS) for p in RAW_PROMPTS]
    for index in range(8):  # chat form, with the chat template applied by the router
        messages = json.dumps([{"role": "user", "content": texts[index]}])
        expected[submit(client, id=f"chat-{index}", messages=messages, max_tokens=MAX_TOKENS)] = greedy_references[index][:MAX_TOKENS]
    for prompt, tokens in zip(RAW_PROMPTS, raw_references):  # completion form: the text tokenized as is
        expected[submit(client, prompt=prompt, max_tokens=MAX_TOKENS)] = tokens  # id = the entry ID
    for request_id, tokens in expected.items():
        entries = read_output(client, request_id)
        final = final_of(entries)
        assert final["finish_reason"] in ("stop", "length"), final
        assert_matches(json.loads(final["token_ids"]), tokens)
        assert_text_joins(entries)
        assert int(final["rounds"]) <= int(final["generated_tokens"])
        # Accounting per drafter: who drafted what, and what of it the target kept.
        drafters = json.loads(final["drafters"])
        assert set(drafters) <= {"early-exit-2", "prompt-lookup"}, drafters
        assert all(0 <= d["accepted"] <= d["drafted"] for d in drafters.values()), drafters
        assert sum(d["drafted"] for d in drafters.values()) >= int(final["draft_tokens"])  # a shared node counts for each source
        assert sum(d["accepted"] for d in drafters.values()) >= int(final["accepted_tokens"])
        if int(final["draft_tokens"]):
            assert drafters, final
    stats = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
    assert stats["verify_items"] / stats["verify_batches"] >= 2, stats
    # Two drafters cooperated on the summary request: its fused trees hold tokens of both.
    watcher.stop()
    sources = [{s for node in c.sources for s in node} for c in watcher.candidates if c.request_id in expected and c.tokens]
    assert any({"early-exit-2", "prompt-lookup"} <= s for s in sources), sources
    # Trimming ran: acknowledged entries are gone from the internal streams.
    assert client.xlen("cosine:candidates") < len(watcher.candidates)


def test_step_mode_fuses_step_by_step_and_matches_the_reference(server, tmp_path, demo_target, greedy_references, pipelines):
    # The paper's fusion through the pipeline: each step's drafts are fused, the most confident
    # token goes back to both drafters, and the next step drafts after it.
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT, LOOKUP], speculation={"mode": "step", "window": 3, "adaptive_window": False})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.start("drafter", "--expert", "lookup")
    pipeline.wait_live("drafter", 2)
    pipeline.wait_live("verifier", 1)
    pipeline.wait_live("coordinator", 1)
    client = pipeline.client()
    watcher = CandidateWatcher(pipeline.client())
    watcher.start()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    for index in range(3):
        submit(client, id=f"step-{index}", messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=16)
    for index in range(3):
        entries = read_output(client, f"step-{index}")
        final = final_of(entries)
        assert_matches(json.loads(final["token_ids"]), greedy_references[index][:16])
        assert_text_joins(entries)
        assert set(json.loads(final["drafters"])) <= {"early-exit-2", "prompt-lookup"}
    watcher.stop()
    trees = [c for c in watcher.candidates if c.request_id.startswith("step-") and c.tokens]
    assert trees
    for tree in trees:  # step shape: every node of a level hangs from the one fused node above it
        depth = []
        for parent in tree.parents:
            depth.append(0 if parent < 0 else depth[parent] + 1)
        for level in set(depth):
            assert len({p for p, d in zip(tree.parents, depth) if d == level}) == 1, tree
    assert max(max(0 if p < 0 else 1 for p in t.parents) for t in trees) == 1  # some step was continued
    assert any(len(t.tokens) > max(1, len(set(t.parents))) for t in trees)  # some step had two proposals


class CandidateWatcher(threading.Thread):
    """Reads every fused candidate as it is written (outside any consumer group)."""

    def __init__(self, client) -> None:
        super().__init__(daemon=True)
        self.client, self.candidates, self.stopped = client, [], threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stopped.is_set():
            for _, entries in self.client.xread({"cosine:candidates": last}, block=200) or []:
                for entry_id, fields in entries:
                    last = entry_id
                    self.candidates.append(decode(fields, Candidate))

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)


def test_cancellation_and_bad_input(server, tmp_path, demo_target, pipelines):
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT, LOOKUP])
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.wait_live("verifier", 1)
    pipeline.wait_live("drafter", 1)
    client = pipeline.client()
    bad = {
        "bad-field": dict(prompt="hi", colour="red"),
        "bad-json": dict(messages="[{not json"),
        "both": dict(prompt="hi", messages='[{"role":"user","content":"x"}]'),
        "bad-expert": dict(prompt="hi", expert="astrology"),
        "zero-tokens": dict(prompt="hi", max_tokens=0),
        "absurd-tokens": dict(prompt="hi", max_tokens=10**9),
        "bad-temperature": dict(prompt="hi", temperature="hot"),
        "too-long": dict(prompt="word " * 9000, max_tokens=8),
    }
    for request_id, fields in bad.items():
        submit(client, id=request_id, **fields)
    # garbage in an internal stream goes to the dead-letter stream
    client.xadd("cosine:drafts", {"m": b"\xff\x00garbage"})
    client.xadd("cosine:verified", {"nonsense": "1"})
    params = {"bad-field": "colour", "bad-json": "messages", "both": "prompt", "bad-expert": "expert", "zero-tokens": "max_tokens",
              "absurd-tokens": "max_tokens", "bad-temperature": "temperature", "too-long": "prompt"}
    for request_id in bad:
        final = final_of(read_output(client, request_id, timeout=60))
        assert final["finish_reason"] == "error" and final["error"], (request_id, final)
        assert (final["error_code"], final["error_param"]) == ("invalid", params[request_id]), (request_id, final)
    assert "general" in final_of(read_output(client, "bad-expert"))["error"]  # lists the valid experts
    # a reused id is refused on out:{entry ID}; the first request's stream is untouched
    submit(client, id="twice", prompt="The capital of France is", max_tokens=4)
    first = final_of(read_output(client, "twice"))
    assert first["finish_reason"] == "length"
    second_entry = client.xadd("cosine:requests", {"id": "twice", "prompt": "Something else", "max_tokens": "4"}).decode()
    refusal = final_of(read_output(client, second_entry, timeout=60))
    assert refusal["finish_reason"] == "error" and "in use" in refusal["error"] and refusal["error_code"] == "invalid"
    assert [f[b"type"] for _, f in client.xrange("cosine:out:twice")].count(b"final") == 1
    # cancellation stops a request within one round
    submit(client, id="long", prompt="1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=400)  # counts on and on
    entries = []
    key, last = "cosine:out:long", "0-0"
    while not entries:
        for _, items in client.xread({key: last}, block=1000) or []:
            entries.extend(items)
    seen = client.xlen("cosine:out:long")
    client.xadd("cosine:cancel", {"id": "long"})
    out = read_output(client, "long", timeout=60)
    final = final_of(out)
    assert final["finish_reason"] == "cancelled" and final["error_code"] == "cancelled"
    assert int(final["generated_tokens"]) < 400
    # within one round: at most the round in flight, the held-back text released, the final entry
    assert len(out) - seen <= 3, out[seen:]
    assert_text_joins(out)
    # the workers kept serving, and the garbage was dead-lettered
    submit(client, id="after", prompt="The capital of France is", max_tokens=4)
    assert final_of(read_output(client, "after"))["finish_reason"] == "length"
    dead = client.xrange("cosine:dead")
    assert len(dead) >= 2, dead
    assert all(p.poll() is None for p in pipeline.processes)


def test_no_live_drafter_falls_back_to_the_target_alone(server, tmp_path, demo_target, greedy_references, pipelines):
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT])
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.wait_live("verifier", 1)
    pipeline.wait_live("coordinator", 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    submit(client, id="alone", messages=json.dumps([{"role": "user", "content": texts[0]}]), max_tokens=8)
    final = final_of(read_output(client, "alone", timeout=120))
    assert json.loads(final["token_ids"]) == greedy_references[0][:8]
    assert final["draft_tokens"] == "0"
    # the Python client, sync and async, on the same server
    from cosine.client import AsyncClient, Client

    messages = [{"role": "user", "content": texts[1]}]
    with Client(server, timeout=120) as sync_client:
        pieces = list(sync_client.stream(messages=messages, max_tokens=6))
    assert pieces[-1].type == "final" and pieces[-1].token_ids == greedy_references[1][:6]
    assert "".join(p.text for p in pieces[:-1]) == pieces[-1].text

    async def ask():
        async with AsyncClient(server, timeout=120) as async_client:
            return await async_client.generate(messages=messages, max_tokens=6)

    import asyncio

    assert asyncio.run(ask()).token_ids == greedy_references[1][:6]


def burst_finals(client, prefix: str, count: int, messages: str) -> tuple[dict[int, dict], dict[int, float]]:
    """Submit ``count`` requests {prefix}-{i} in one transaction (read by the router together)
    and read every final: request index -> its final entry, and -> seconds from the burst to it."""
    sent = time.monotonic()
    with client.pipeline(transaction=True) as pipe:
        for i in range(count):
            pipe.xadd("cosine:requests", {"id": f"{prefix}-{i}", "messages": messages, "max_tokens": "24"})
        pipe.execute()
    finals, answered = {}, {}
    last = {f"cosine:out:{prefix}-{i}": "0-0" for i in range(count)}
    deadline = time.monotonic() + 120
    while len(finals) < count and time.monotonic() < deadline:
        for key, items in client.xread(last, block=200) or []:
            for entry_id, fields in items:
                last[key.decode()] = entry_id
                if fields[b"type"] == b"final":
                    i = int(key.decode().rsplit("-", 1)[1])
                    finals[i] = {k.decode(): v.decode() for k, v in fields.items()}
                    answered[i] = time.monotonic() - sent
    assert len(finals) == count, finals
    return finals, answered


def test_admission_refuses_a_burst_past_its_bound_at_once(server, tmp_path, demo_target, greedy_references, pipelines):
    """pipeline.max_requests = 2: of a burst of six, two are admitted and finish with the
    reference output; each of the others gets one busy final, quickly; admitted requests reserve
    their rows against the verifier's K/V pool (its roster value); afterwards a request gets in."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], pipeline={"max_requests": 2})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "verifier"):
        pipeline.start(role)
    for role in ("verifier", "coordinator", "router"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    messages = json.dumps([{"role": "user", "content": texts[0]}])
    finals, answered = burst_finals(client, "burst", 6, messages)
    assert all([f[b"type"] for _, f in client.xrange(f"cosine:out:burst-{i}")].count(b"final") == 1 for i in range(6))
    busy = [i for i, f in finals.items() if f["finish_reason"] == "error"]
    done = [i for i, f in finals.items() if f["finish_reason"] == "length"]
    assert len(done) == 2 and len(busy) == 4, finals
    assert all(finals[i]["error_code"] == "busy" and "capacity" in finals[i]["error"] for i in busy)
    assert all(json.loads(finals[i]["token_ids"]) == greedy_references[0][:24] for i in done)
    assert max(answered[i] for i in busy) < min(answered[i] for i in done), answered  # refusals do not wait for the work
    reserved = {k.decode(): int(v) for k, v in client.hgetall("cosine:reserved").items()}
    assert set(reserved) == {f"burst-{i}" for i in done} and all(v > 24 for v in reserved.values()), reserved
    submit(client, id="after-burst", messages=messages, max_tokens=4)
    assert final_of(read_output(client, "after-burst", timeout=120))["finish_reason"] == "length"


def test_past_the_bound_requests_wait_their_turn_within_their_deadline(server, tmp_path, demo_target, greedy_references, pipelines):
    """pipeline.max_requests = 1, max_waiting = 2: of a burst of four, one starts, two wait and
    finish after it in arrival order with the reference output, the fourth is refused (busy) at
    once; a waiting request whose deadline passes ends with error_code=deadline, and one whose
    client cancels it ends cancelled, both without ever starting."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], pipeline={"max_requests": 1, "max_waiting": 2})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "verifier"):
        pipeline.start(role)
    for role in ("verifier", "coordinator", "router"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    messages = json.dumps([{"role": "user", "content": texts[0]}])
    finals, answered = burst_finals(client, "queue", 4, messages)
    assert finals[3]["error_code"] == "busy" and "2 waiting" in finals[3]["error"], finals[3]
    assert all(finals[i]["finish_reason"] == "length" and json.loads(finals[i]["token_ids"]) == greedy_references[0][:24] for i in range(3))
    assert answered[3] < answered[0] < answered[1] < answered[2], answered  # refused at once; the rest in arrival order

    # While a long request holds the slot: one waits past its deadline, one is cancelled waiting.
    submit(client, id="holder", messages=messages, max_tokens=64)
    settle_by = time.monotonic() + 60
    # Started: admitted with a deadline, not waiting. (Not `rounds`: a round decoded at window 0
    # never goes to drafting, so the holder may never be listed there.)
    while not (client.zscore("cosine:deadlines", "holder") and client.zscore("cosine:waiting", "holder") is None) and time.monotonic() < settle_by:
        time.sleep(0.01)
    assert time.monotonic() < settle_by, "the holder did not start"
    submit(client, id="too-late", messages=messages, max_tokens=4, deadline_s=0.2)
    submit(client, id="cancelled", messages=messages, max_tokens=4)
    while client.zcard("cosine:waiting") < 2 and time.monotonic() < settle_by:
        time.sleep(0.01)
    client.xadd("cosine:cancel", {"id": "cancelled"})
    late, cancelled = final_of(read_output(client, "too-late", timeout=60)), final_of(read_output(client, "cancelled", timeout=60))
    assert late.get("error_code") == "deadline" and cancelled["finish_reason"] == "cancelled", (late, cancelled)
    assert int(late["rounds"]) == 0 and int(cancelled["rounds"]) == 0  # never started
    assert final_of(read_output(client, "holder", timeout=120))["finish_reason"] == "length"
    assert client.zcard("cosine:waiting") == 0 and client.zcard("cosine:deadlines") == 0


def test_logs_hold_no_prompt_and_no_output(server, tmp_path, demo_target, pipelines):
    """Every worker's log of a run (debug level, as the harness starts them) is searched for a
    canary prompt, the output it got, and canaries a client put where refusal reasons quote it
    (a message role, a field value) or in garbage on an internal stream: none is there."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [LOOKUP])
    pipelines.append(pipeline)
    pipeline.start_stages("lookup")
    client = pipeline.client()
    canary = "Quokkaberry Zanzibarino"
    submit(client, id="canary", messages=json.dumps([{"role": "user", "content": f"Say {canary} twice, then explain the name."}]), max_tokens=24)
    submit(client, id="canary-role", messages=json.dumps([{"role": f"{canary}-role", "content": "hi"}]))
    submit(client, id="canary-value", prompt="hi", temperature=f"{canary}-value")
    client.xadd("cosine:drafts", {"m": f"{canary}-garbage".encode()})
    output = final_of(read_output(client, "canary", timeout=120))
    assert output["finish_reason"] == "length" and len(output["text"]) > 20, output
    for refused in ("canary-role", "canary-value"):
        assert final_of(read_output(client, refused, timeout=60))["error_code"] == "invalid"
    deadline = time.monotonic() + 30
    while not client.xlen("cosine:dead") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.xlen("cosine:dead") >= 1
    logs = {path.name: path.read_text(errors="replace") for path in sorted(tmp_path.glob("*.log"))}
    assert len(logs) >= 5 and all(logs.values()), list(logs)
    needles = [canary, canary.lower(), "Quokka", "Zanzibar", output["text"].strip(), *[line for line in output["text"].splitlines() if len(line) >= 12]]
    for name, text in logs.items():
        for needle in needles:
            assert needle not in text, f"{needle!r} in {name}"


def test_generate_times_out_clearly_without_a_server_behind_redis(server, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "cosine.cli", "generate", "--redis-url", server, "--prompt", "hi", "--timeout", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert completed.returncode == 2
    assert "no output" in completed.stderr and "cosine serve" in completed.stderr


def test_load_control_starts_without_drafts_and_stays_lossless(server, tmp_path, demo_target, greedy_references, pipelines):
    """With load control on, the first round goes straight to verification (nothing is known of
    the request yet), the verifier publishes its cost profile, later rounds draft or not as the
    cost model says, and the output is the target's."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], pipeline={"trim_interval_s": 3600.0}, speculation={"load_control": True})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.wait_live("verifier", 1)
    pipeline.wait_live("drafter", 1)
    pipeline.wait_live("coordinator", 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    for index in range(3):
        submit(client, id=f"lc-{index}", messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=MAX_TOKENS)
    for index in range(3):
        final = final_of(read_output(client, f"lc-{index}", timeout=180))
        assert_matches(json.loads(final["token_ids"]), greedy_references[index][:MAX_TOKENS])
    stats = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
    assert stats["rounds_window0"] >= 3 and stats["rounds_sent"] >= stats["rounds_window0"], stats
    jobs = [decode(fields, DraftJob) for _, fields in client.xrange("cosine:draft:general")]
    assert all(job.round > 0 for job in jobs), [(j.request_id, j.round) for j in jobs]  # no first round was drafted
    profiles = [client.hgetall(key) for key in client.scan_iter("cosine:cost:*")]
    assert len(profiles) == 1 and {b"a", b"b", b"c"} <= set(profiles[0]) and float(profiles[0][b"a"]) > 0, profiles


def test_a_long_prompt_prefills_in_chunks_beside_decoding_requests(server, tmp_path, demo_target, pipelines):
    """A prompt longer than ``prefill_chunk`` reaches the verifier a chunk per batch (its first
    round drafted: the drafts wait until the prompt is in), short requests decode meanwhile,
    and every output is the target's."""
    chunk = 64
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], pipeline={"prefill_chunk": chunk, "batch_wait_ms": 50})
    pipelines.append(pipeline)
    pipeline.start_stages("general")
    client = pipeline.client()
    long_prompt = " ".join(RAW_PROMPTS) * 4
    prompts = [long_prompt, RAW_PROMPTS[0], RAW_PROMPTS[2]]
    ids = [demo_target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(ids[0]) > 4 * chunk
    expected = {submit(client, id=f"long-{i}", prompt=p, max_tokens=MAX_TOKENS): reference(demo_target, tokens, MAX_TOKENS)
                for i, (p, tokens) in enumerate(zip(prompts, ids))}
    for request_id, tokens in expected.items():
        entries = read_output(client, request_id, timeout=180)
        assert_matches(json.loads(final_of(entries)["token_ids"]), tokens)
        assert_text_joins(entries)
    stats = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
    # At least one partial result per chunk but the last (shared prefix blocks may skip none here:
    # the prompts differ from their first tokens on).
    assert stats.get("prefill_chunks", 0) >= (len(ids[0]) - 1) // chunk, stats


def test_rounds_stay_with_the_verifier_that_holds_their_caches(server, tmp_path, demo_target, greedy_references, pipelines):
    """Two verifiers: a request's rounds go to the one that verified its round before (its own
    stream), which holds its caches; another one only when that one has work queued while the
    other is free."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], pipeline={"trim_interval_s": 3600.0})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier", "verifier"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.wait_live("verifier", 2)
    pipeline.wait_live("drafter", 1)
    pipeline.wait_live("coordinator", 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    ids = [submit(client, id=f"aff-{i}", messages=json.dumps([{"role": "user", "content": texts[i]}]), max_tokens=MAX_TOKENS) for i in range(6)]
    for index, request_id in enumerate(ids):
        final = final_of(read_output(client, request_id, timeout=180))
        assert_matches(json.loads(final["token_ids"]), greedy_references[index][:MAX_TOKENS])
    # Each round's verifier against the one of the request's round before: the same unless the
    # home verifier had work queued while the other was free (then the first free one takes it).
    last: dict[str, str] = {}
    stayed = moved = 0
    results = [entry for stream in [b"cosine:verified", *client.keys("cosine:verified:at:*")] for entry in client.xrange(stream)]
    for _, fields in sorted(results, key=lambda entry: tuple(int(part) for part in entry[0].split(b"-"))):  # in the order written
        batch = decode(fields, VerifiedBatch)
        for item in batch.items:
            if item.request_id in last:
                stayed += last[item.request_id] == batch.verifier
                moved += last[item.request_id] != batch.verifier
            last[item.request_id] = batch.verifier
    print(f"rounds on the verifier of the round before: {stayed}, elsewhere: {moved}")
    assert set(last) == set(ids) and stayed >= 3 * moved, (stayed, moved)
    own = [key.decode() for key in client.scan_iter("cosine:verify:at:*")]
    assert len(own) == 2 and sum(client.xlen(key) for key in own) > 0, own


def test_logprobs_are_the_targets_for_every_token_under_speculation(server, tmp_path, demo_target, pipelines):
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT, LOOKUP])
    pipelines.append(pipeline)
    pipeline.start_stages("general", "lookup")
    client = pipeline.client()
    tokenizer = demo_target.tokenizer
    prompt = RAW_PROMPTS[5]  # repetitive: drafted tokens are accepted, so rows past the root are read
    submit(client, id="greedy", prompt=prompt, max_tokens=MAX_TOKENS, logprobs=3)
    submit(client, id="sampled", prompt=prompt, max_tokens=MAX_TOKENS, logprobs=0, temperature=0.8, seed=11)
    submit(client, id="plain", prompt=prompt, max_tokens=4)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for request_id, top in (("greedy", 3), ("sampled", 0)):
        entries = read_output(client, request_id, timeout=240)
        final = final_of(entries)
        output = json.loads(final["token_ids"])
        rows = []
        for entry in entries[:-1]:
            logprobs = json.loads(entry["logprobs"])
            assert [row["id"] for row in logprobs] == json.loads(entry["token_ids"])
            rows += logprobs
        assert [row["id"] for row in rows] == output and output
        with torch.inference_mode():  # the target over prompt + output in one forward: the reference
            logits = demo_target.model(torch.tensor([prompt_ids + output])).logits[0, len(prompt_ids) - 1 : -1]
        reference = torch.log_softmax(logits.float(), -1)
        for position, row in enumerate(rows):
            assert row["logprob"] == pytest.approx(reference[position, row["id"]].item(), abs=0.02), (request_id, position)
            assert len(row["top_logprobs"]) == top
            assert [a["logprob"] for a in row["top_logprobs"]] == sorted((a["logprob"] for a in row["top_logprobs"]), reverse=True)
            for alternative in row["top_logprobs"]:
                assert alternative["logprob"] == pytest.approx(reference[position, alternative["id"]].item(), abs=0.02)
            if request_id == "greedy":
                assert row["top_logprobs"][0]["id"] == row["id"]
        assert b"".join(bytes(row["bytes"]) for row in rows).decode(errors="replace").startswith(final["text"])
        if request_id == "greedy":
            assert int(final["accepted_tokens"]) > 0, final
    assert all("logprobs" not in e for e in read_output(client, "plain", timeout=120))
    submit(client, id="bad", prompt=prompt, logprobs=21)
    assert final_of(read_output(client, "bad", timeout=60))["error_param"] == "logprobs"


def test_pipelining_sends_drafts_made_ahead_and_stays_lossless(server, tmp_path, demo_target, greedy_references, pipelines):

    from cosine.models.files import model_directory

    # The target itself as the drafter: every draft accepted, every guess of the next token
    # right, so each round after the first finds its draft made ahead (greedy).
    twin = {"name": "twin", "kind": "model", "model": str(model_directory(demo_target.source, cache_dir())), "expert": "general"}
    pipeline = make_pipeline(tmp_path, server, demo_target, [twin], speculation={"window": 3, "adaptive_window": False, "pipelining": "on"})  # "auto" is off on a machine of few cores
    pipelines.append(pipeline)
    pipeline.start_stages("general")
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    submit(client, id="ahead", messages=json.dumps([{"role": "user", "content": texts[0]}]), max_tokens=MAX_TOKENS)
    submit(client, id="sampled", messages=json.dumps([{"role": "user", "content": texts[1]}]), max_tokens=MAX_TOKENS, temperature=0.8, seed=5)
    final = final_of(read_output(client, "ahead", timeout=240))
    assert json.loads(final["token_ids"]) == greedy_references[0][:MAX_TOKENS]
    assert final_of(read_output(client, "sampled", timeout=240))["finish_reason"] in ("stop", "length")
    rounds = int(final["rounds"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the drafter writes its counts after each read
        metrics = {k.decode(): float(v) for k, v in client.hgetall("cosine:metrics").items()}
        used = metrics.get("drafts_ahead_used|drafter=twin", 0)
        if used >= rounds - 2:
            break
        time.sleep(0.2)
    assert rounds >= 4 and used >= rounds - 2, (rounds, metrics)  # every round after the first but one, at least
    assert metrics["drafts_ahead|drafter=twin"] >= used
    pipeline.stop()
    assert "drafting ahead failed" not in pipeline.log_tails(200)


def test_rounds_stay_with_their_drafter_and_move_on_when_it_is_gone(server, tmp_path, demo_target, greedy_references, pipelines):

    from cosine.models.files import model_directory
    from cosine.wire import Draft

    twin = {"name": "twin", "kind": "model", "model": str(model_directory(demo_target.source, cache_dir())), "expert": "general"}
    # A gone drafter is seen within a second; a round whose draft never comes would wait 60 s.
    pipeline = make_pipeline(tmp_path, server, demo_target, [twin], pipeline={"trim_interval_s": 3600.0, "heartbeat_ms": 300, "drafter_deadline_ms": 60_000},
                             speculation={"window": 3, "adaptive_window": False})
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    drafters = [pipeline.start("drafter", "--expert", "general") for _ in range(2)]
    pipeline.wait_live("drafter", 2)
    pipeline.wait_live("verifier", 1)
    pipeline.wait_live("coordinator", 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    for index in range(4):
        submit(client, id=f"stay-{index}", messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=MAX_TOKENS)
    for index in range(4):
        assert json.loads(final_of(read_output(client, f"stay-{index}", timeout=240))["token_ids"]) == greedy_references[index][:MAX_TOKENS]
    drafts = [decode(fields, Draft) for _, fields in client.xrange("cosine:drafts")]
    for index in range(4):
        mine = [d for d in drafts if d.request_id == f"stay-{index}"]
        assert len(mine) >= 4 and len({d.instance for d in mine}) == 1, [(d.round, d.instance) for d in mine]

    # The drafter of a running request is killed: the job waiting in its own stream goes to the
    # expert's stream, the other drafter takes the request on, and it ends as the target's.
    submit(client, id="moved", messages=json.dumps([{"role": "user", "content": texts[4]}]), max_tokens=64)
    deadline = time.monotonic() + 120
    home = None
    while home is None and time.monotonic() < deadline:
        home = next((decode(f, Draft).instance for _, f in client.xrange("cosine:drafts", min=f"{int(time.time() * 1000) - 60_000}")
                     if decode(f, Draft).request_id == "moved"), None)
        time.sleep(0.02)
    victim = next(p for p in drafters if f"-{p.pid}-" in home)
    victim.send_signal(signal.SIGSTOP)  # holds its jobs without answering: gone once its liveness expires
    killed_at = time.monotonic()
    entries = read_output(client, "moved", timeout=120)
    pipeline.kill(victim)
    assert time.monotonic() - killed_at < 30, "the request waited for its drafter's deadline"
    final = final_of(entries)
    assert final["finish_reason"] in ("stop", "length") and int(final["rounds"]) >= 4
    ids = prompt_token_ids(demo_target.tokenizer, messages=[{"role": "user", "content": texts[4]}])
    assert json.loads(final["token_ids"]) == reference(demo_target, ids, 64)[: len(json.loads(final["token_ids"]))]
    assert home.encode() not in client.hkeys("cosine:drafter-streams")
    later = {decode(f, Draft).instance for _, f in client.xrange("cosine:drafts") if decode(f, Draft).request_id == "moved"} - {home}
    assert later, "no other drafter drafted the request"


def test_one_process_hosts_several_drafters_on_their_experts_queues(server, tmp_path, demo_target, pipelines):
    """``cosine worker drafter --drafter A --drafter B``: one process, each drafter live under its
    own instance and reading its own expert's queue; both draft, and outputs are the target's."""
    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT, LOOKUP])
    pipelines.append(pipeline)
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.start(role)
    host = pipeline.start("drafter", "--drafter", EARLY_EXIT["name"], "--drafter", LOOKUP["name"])
    pipeline.wait_live("drafter", 2)
    for role in ("verifier", "coordinator", "router", "fusion"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    roster = {k.decode(): v.decode() for k, v in client.hgetall("cosine:roster:drafter").items()}
    assert {f"expert={e}" for e in ("general", "lookup")} <= {p for v in roster.values() for p in v.split()}, roster
    prompts = [RAW_PROMPTS[0], RAW_PROMPTS[5], RAW_PROMPTS[2]]  # the "Summarize" one also goes to lookup (router.keywords)
    drafted_by: set[str] = set()
    for index, prompt in enumerate(prompts):
        ids = demo_target.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        final = final_of(read_output(client, submit(client, id=f"host-{index}", prompt=prompt, max_tokens=MAX_TOKENS), timeout=180))
        assert_matches(json.loads(final["token_ids"]), reference(demo_target, ids, MAX_TOKENS))
        drafted_by |= {name for name, counts in json.loads(final["drafters"]).items() if counts["drafted"]}
    assert drafted_by == {EARLY_EXIT["name"], LOOKUP["name"]}, drafted_by
    # A request may turn speculation off (max_window 0) or cap its window: same output.
    ids = demo_target.tokenizer(RAW_PROMPTS[5], add_special_tokens=False)["input_ids"]
    for cap in (0, 1):
        final = final_of(read_output(client, submit(client, id=f"cap-{cap}", prompt=RAW_PROMPTS[5], max_tokens=MAX_TOKENS, max_window=cap), timeout=180))
        assert_matches(json.loads(final["token_ids"]), reference(demo_target, ids, MAX_TOKENS))
        assert int(final["draft_tokens"]) <= cap * 2 * int(final["rounds"]), final  # two experts' chains of at most `cap`
    assert host.poll() is None


def test_multi_step_rounds_are_lossless_and_sample_as_the_engine(server, tmp_path, demo_target, pipelines):
    """Every round at window 0 decodes up to ``multi_step`` tokens in one verifier job: greedy
    outputs are the target's, with far fewer rounds than tokens, and seeded sampled outputs equal
    the local engine's decoding one token a round (window-0 draws are keyed by position)."""
    from cosine.core.sampling import SamplingParams
    from cosine.core.stopping import StopRules
    from cosine.engine import GenerationRequest, LocalEngine
    from cosine.models.runner import ModelRunner
    from cosine.policy.window import WindowPolicy

    pipeline = make_pipeline(tmp_path, server, demo_target, [EARLY_EXIT], speculation={"window": 0, "min_window": 0, "max_window": 0, "multi_step": 6})
    pipelines.append(pipeline)
    pipeline.start_stages("general")
    client = pipeline.client()
    prompts = [RAW_PROMPTS[0], RAW_PROMPTS[3]]
    ids = [demo_target.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    for index, prompt in enumerate(prompts):
        entries = read_output(client, submit(client, id=f"ms-greedy-{index}", prompt=prompt, max_tokens=MAX_TOKENS), timeout=180)
        final = final_of(entries)
        assert_matches(json.loads(final["token_ids"]), reference(demo_target, ids[index], MAX_TOKENS))
        assert_text_joins(entries)
        assert int(final["rounds"]) <= 1 + -(-(int(final["generated_tokens"]) - 1) // 6), final  # the first round makes one token
        assert int(final["draft_tokens"]) == 0
    stats = {k.decode(): int(v) for k, v in client.hgetall("cosine:stats").items()}
    assert stats["multi_step_tokens"] >= MAX_TOKENS, stats
    sampled = [SamplingParams(temperature=0.8, top_p=0.95, seed=seed) for seed in (11, 12)]
    finals = []
    for index, (prompt, sampling) in enumerate(zip(prompts, sampled)):
        request_id = submit(client, id=f"ms-sampled-{index}", prompt=prompt, max_tokens=MAX_TOKENS, temperature=sampling.temperature, top_p=sampling.top_p,
                            seed=sampling.seed)
        finals.append(final_of(read_output(client, request_id, timeout=180)))
    engine = LocalEngine(ModelRunner(demo_target.model), demo_target.tokenizer, [], window=WindowPolicy(0, 0, 0, False), max_batch=1)
    eos = frozenset({demo_target.tokenizer.eos_token_id})
    for index, sampling in enumerate(sampled):
        expected = engine.generate([GenerationRequest(f"e{index}", tuple(ids[index]), sampling, StopRules(MAX_TOKENS, eos))])[0]
        assert json.loads(finals[index]["token_ids"]) == expected.token_ids, (finals[index], expected)
        assert int(finals[index]["rounds"]) < int(finals[index]["generated_tokens"])
