"""Regression tests for "the pipeline stays up": real servers, real worker processes.

Each case fails without its fix: the verify stream no longer grows with no verifier; requests
end at their deadline; a pooled candidate stays pending (not taken for a duplicate by its own
coordinator) and a drain hands it on; answers reach the id a client reads; a Redis OOM spell
neither kills workers nor dead-letters good entries; a poison request fails alone; caches of
finished requests are released; workers recover from a server restart that lost everything.
"""

from __future__ import annotations

import json
import signal
import time

import pytest
import redis

from cosine.bus import setup_library
from cosine.embedded import EmbeddedRedis
from tests.conftest import cache_dir
from tests.integration.harness import ROOT, Pipeline, final_of, read_output, skewed, submit, write_config

pytestmark = pytest.mark.model
MAX_TOKENS = 10


@pytest.fixture()
def server():
    embedded = EmbeddedRedis(persistence=False)
    embedded.start()
    yield embedded
    embedded.stop()


def make(tmp_path, server, demo_target, pipelines, drafters=(), **settings) -> Pipeline:
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=list(drafters), pipeline=settings)
    pipeline = Pipeline(server.url, config)
    pipelines.append(pipeline)
    return pipeline


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def group_pending(client, stream: str, group: str) -> int:
    return int(client.xpending(stream, group)["pending"]) if client.exists(stream) else 0


def test_without_a_verifier_nothing_piles_up_and_deadlines_end_requests(server, tmp_path, demo_target, pipelines):
    pipeline = make(tmp_path, server, demo_target, pipelines, drafter_deadline_ms=500, block_ms=100)
    for role in ("router", "coordinator", "fusion"):
        pipeline.start(role)
    pipeline.wait_live("coordinator", 1)
    pipeline.wait_live("router", 1)
    client = pipeline.client()
    submit(client, id="waits", prompt="The capital of France is", max_tokens=4, deadline_s=4)
    wait_for(lambda: client.xlen("cosine:verify") >= 1, 30, "a verification batch")
    time.sleep(2.5)  # five drafter deadlines: the old sweep re-issued the queued round each time
    assert client.xlen("cosine:verify") == 1
    final = final_of(read_output(client, "waits", timeout=30))
    assert (final["finish_reason"], final["error_code"]) == ("error", "deadline"), final
    assert client.zcard("cosine:deadlines") == 0
    # Answers go to the id the client reads: a readable id with a non-UTF-8 field, and an
    # unreadable id (answered on the entry ID XADD returned).
    client.xadd("cosine:requests", {"id": "latin1", "prompt": "caf\xe9".encode("latin-1")})
    final = final_of(read_output(client, "latin1", timeout=30))
    assert (final["error_code"], final["error_param"]) == ("invalid", "prompt"), final
    entry_id = client.xadd("cosine:requests", {"id": b"\xff\xfe", "prompt": "hi"}).decode()
    final = final_of(read_output(client, entry_id, timeout=30))
    assert (final["error_code"], final["error_param"]) == ("invalid", "id"), final
    # No id at all (pipeline.require_id, the default): refused on the entry ID, nothing started.
    entry_id = client.xadd("cosine:requests", {"prompt": "hi", "max_tokens": "2"}).decode()
    final = final_of(read_output(client, entry_id, timeout=30))
    assert (final["error_code"], final["error_param"]) == ("invalid", "id") and "required" in final["error"], final
    assert client.zcard("cosine:deadlines") == 0
    # The client library hears the refusal of an id in use (on out:{entry ID}).
    from cosine.client import Client

    with Client(server.url, timeout=30) as library:
        library.submit(prompt="The capital of France is", request_id="taken", max_tokens=2)
        final = library.generate(prompt="Something else", request_id="taken", max_tokens=2)
    assert final.error_code == "invalid" and "in use" in final.error, final


def test_a_pooled_candidate_stays_claimed_and_a_drain_hands_it_on(server, tmp_path, demo_target, pipelines):
    pipeline = make(tmp_path, server, demo_target, pipelines, claim_idle_ms=500, batch_wait_ms=60_000, block_ms=100)
    router = pipeline.start("router")
    coordinator = pipeline.start("coordinator")
    pipeline.wait_live("coordinator", 1)
    pipeline.wait_live("router", 1)
    client = pipeline.client()
    # Four more active requests (far deadlines) make the fair share 5: one candidate waits.
    client.zadd("cosine:deadlines", {f"other-{i}": 2**50 for i in range(4)})
    submit(client, id="pooled", prompt="The capital of France is", max_tokens=4)
    wait_for(lambda: group_pending(client, "cosine:candidates", "cosine:coordinator") == 1, 30, "the candidate pooled")
    time.sleep(2.0)  # four claim_idle_ms: XAUTOCLAIM returned it to its own coordinator meanwhile
    assert group_pending(client, "cosine:candidates", "cosine:coordinator") == 1
    assert client.xlen("cosine:verify") == 0
    coordinator.send_signal(signal.SIGTERM)
    assert coordinator.wait(20) == 0
    assert client.xlen("cosine:verify") == 1  # handed on at once, not after an idle-time reclaim
    assert group_pending(client, "cosine:candidates", "cosine:coordinator") == 0
    router.terminate()


def test_oom_poison_and_a_server_restart_lose_nothing(server, tmp_path, demo_target, greedy_references, pipelines):
    pipeline = make(tmp_path, server, demo_target, pipelines, [{"name": "lookup", "kind": "prompt-lookup", "expert": "general"}])
    for role in ("router", "coordinator", "fusion"):
        pipeline.start(role)
    pipeline.start("drafter", "--expert", "general")
    pipeline.start("verifier", env={"COSINE_TEST_FAULTS": "verifier.forward=raise:poison"})
    for role in ("router", "coordinator", "fusion", "drafter", "verifier"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())

    def ask(request_id: str, index: int) -> str:
        return submit(client, id=request_id, messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=MAX_TOKENS)

    def check(request_id: str, index: int) -> None:
        entries = read_output(client, request_id, timeout=180)
        final = final_of(entries)
        assert final["finish_reason"] in ("stop", "length"), final
        assert json.loads(final["token_ids"]) == greedy_references[index][:MAX_TOKENS]
        assert "".join(e["text"] for e in entries if e["type"] == "tokens") == final["text"]
        assert [f[b"type"] for _, f in client.xrange(f"cosine:out:{request_id}")].count(b"final") == 1

    # A poison request fails alone; the requests verified in its batch finish as the reference.
    ask("poison-1", 0)
    for index in range(1, 4):
        ask(f"healthy-{index}", index)
    poison = final_of(read_output(client, "poison-1", timeout=180))
    assert (poison["finish_reason"], poison["error_code"]) == ("error", "internal") and "injected fault" in poison["error"], poison
    for index in range(1, 4):
        check(f"healthy-{index}", index)
    assert int(client.hget("cosine:stats", "verify_items")) > int(client.hget("cosine:stats", "verify_batches"))  # batched together

    # Every write refused for a while (OOM): nothing is dead-lettered, nobody dies, all finish.
    for index in range(4, 8):
        ask(f"oom-{index}", index)
    wait_for(lambda: client.exists("cosine:out:oom-4"), 120, "the first output under load")
    client.config_set("maxmemory", "1")
    time.sleep(4)
    client.config_set("maxmemory", "0")
    for index in range(4, 8):
        check(f"oom-{index}", index)
    assert client.xlen("cosine:dead") == 0
    assert all(process.poll() is None for process in pipeline.processes)
    for role in ("router", "coordinator", "fusion", "drafter", "verifier"):  # heartbeats came back
        pipeline.wait_live(role, 1, timeout=30)

    # Finished requests' KV caches are released by the verifier.
    def verifier_caches() -> int:
        values = [client.get(k).decode() for k in client.scan_iter(match="cosine:live:verifier:*")]
        return int(next(p for p in values[0].split() if p.startswith("caches=")).split("=")[1]) if values else -1

    wait_for(lambda: verifier_caches() == 0, 30, "the verifier's caches released")

    # The server restarts empty (no persistence). The function library is an administrator's to
    # load: the workers wait, naming `cosine setup`, and make their groups again once it is run.
    server.kill()
    server.restart()
    client = redis.Redis.from_url(server.url)
    logs = list(pipeline.config_path.parent.glob("*.log"))
    wait_for(lambda: all("cosine setup" in log.read_text(errors="replace") for log in logs), 60, "every worker naming `cosine setup`")
    setup_library(server.url)
    for role in ("router", "coordinator", "fusion", "drafter", "verifier"):
        pipeline.wait_live(role, 1, timeout=60)
    time.sleep(1.0)  # every worker's read loop has met the empty server and made its groups again
    ask("after-restart", 8)
    check("after-restart", 8)
    assert all(process.poll() is None for process in pipeline.processes)


@pytest.mark.slow
def test_a_rolling_restart_of_every_role_loses_nothing(server, tmp_path, demo_target, greedy_references, pipelines):
    import threading

    pipeline = make(tmp_path, server, demo_target, pipelines, [{"name": "lookup", "kind": "prompt-lookup", "expert": "general"}])
    roles = {"router": [], "coordinator": [], "fusion": [], "drafter": ["--expert", "general"], "verifier": []}
    old = {role: pipeline.start(role, *args) for role, args in roles.items()}
    for role in roles:
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    submitted: list[tuple[str, int]] = []
    rolling = threading.Event()

    def keep_submitting() -> None:
        while not rolling.is_set() or len(submitted) < 6:
            index = len(submitted) % 20
            messages = json.dumps([{"role": "user", "content": texts[index]}])
            submitted.append((submit(client, id=f"roll-{len(submitted)}", messages=messages, max_tokens=MAX_TOKENS), index))
            time.sleep(1.0)

    submitter = threading.Thread(target=keep_submitting, daemon=True)
    submitter.start()
    for role, args in roles.items():  # one role at a time: a new worker up, then the old one drained
        pipeline.start(role, *args)
        pipeline.wait_live(role, 2)
        old[role].send_signal(signal.SIGTERM)
        assert old[role].wait(60) == 0, f"{role} did not drain cleanly"
    rolling.set()
    submitter.join(60)
    for request_id, index in submitted:
        entries = read_output(client, request_id, timeout=180)
        final = final_of(entries)
        assert final["finish_reason"] in ("stop", "length"), final
        assert json.loads(final["token_ids"]) == greedy_references[index][:MAX_TOKENS], request_id
        assert [f[b"type"] for _, f in client.xrange(f"cosine:out:{request_id}")].count(b"final") == 1
    assert client.xlen("cosine:dead") == 0
    streams = ["cosine:requests", "cosine:draft:general", "cosine:drafts", "cosine:candidates", "cosine:verify", "cosine:verified"]
    streams += [key.decode() for key in client.keys("cosine:verify:*")]  # per-target verify streams
    streams += [key.decode() for key in client.keys("cosine:verified:at:*")]  # coordinators' own result streams
    wait_for(lambda: all(group_pending(client, s, g["name"]) == 0 for s in streams if client.exists(s) for g in client.xinfo_groups(s)), 30, "nothing pending")


def test_a_result_the_coordinator_cannot_apply_strands_nothing(server, tmp_path, demo_target, greedy_references, pipelines):
    """A verified result whose application fails every time is dead-lettered; its round is
    verified again once, then its request ends (internal, naming the cause) long before its
    deadline; the batch-mates of its result are applied alone and finish as the reference."""
    pipeline = make(tmp_path, server, demo_target, pipelines)
    for role in ("router", "fusion", "verifier"):
        pipeline.start(role)
    pipeline.start("coordinator", env={"COSINE_TEST_FAULTS": "coordinator.apply=raise:unappliable"})
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())

    def ask(request_id: str, index: int) -> None:
        submit(client, id=request_id, messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=MAX_TOKENS, deadline_s=300)

    ask("unappliable-1", 0)
    began = time.monotonic()
    final = final_of(read_output(client, "unappliable-1", timeout=120))
    assert (final["finish_reason"], final["error_code"]) == ("error", "internal"), final
    assert "could not be applied, twice" in final["error"] and "injected fault" in final["error"], final
    assert time.monotonic() - began < 120
    for index in range(1, 4):  # together: their results share batches with the unappliable one
        ask(f"healthy-{index}", index)
    ask("unappliable-2", 4)
    assert final_of(read_output(client, "unappliable-2", timeout=120))["error_code"] == "internal"
    for index in range(1, 4):
        final = final_of(read_output(client, f"healthy-{index}", timeout=180))
        assert final["finish_reason"] in ("stop", "length") and json.loads(final["token_ids"]) == greedy_references[index][:MAX_TOKENS], final
    assert {f[b"stage"] for _, f in client.xrange("cosine:dead")} == {b"coordinator"}
    assert client.zcard("cosine:deadlines") == 0 and all(process.poll() is None for process in pipeline.processes)


def test_workers_on_hosts_whose_clocks_disagree_by_twenty_seconds_serve_as_one(server, tmp_path, demo_target, greedy_references, pipelines):
    """Every stage's wall clock is 10 s off, half of them ahead, half behind: deadlines, the
    drafting deadline, liveness and roster expiry are all read from the server's clock, so
    requests with an 8 s deadline finish (a router behind wrote deadlines long past for a
    coordinator ahead), rounds are drafted (rounds looked overdue, drafters dead), and every
    worker is seen live."""
    pipeline = make(tmp_path, server, demo_target, pipelines, [{"name": "lookup", "kind": "prompt-lookup", "expert": "general"}])
    for role, skew in (("router", -10), ("coordinator", 10), ("fusion", 10), ("verifier", -10)):
        pipeline.start(role, env=skewed(skew))
    pipeline.start("drafter", "--expert", "general", env=skewed(-10))
    for role in ("router", "coordinator", "fusion", "drafter", "verifier"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    for index in range(4):
        submit(client, id=f"skew-{index}", messages=json.dumps([{"role": "user", "content": texts[index]}]), max_tokens=MAX_TOKENS, deadline_s=8)
    drafted = 0
    for index in range(4):
        final = final_of(read_output(client, f"skew-{index}", timeout=120))
        assert final["finish_reason"] in ("stop", "length"), final
        assert json.loads(final["token_ids"]) == greedy_references[index][:MAX_TOKENS]
        drafted += int(final["draft_tokens"])
    assert drafted > 0, "no round was drafted"
    seconds, micros = client.time()
    for role in ("router", "coordinator", "fusion", "drafter", "verifier"):
        roster = client.hgetall(f"cosine:roster:{role}")
        assert [v for v in roster.values() if float(v.split()[0]) > seconds * 1000 + micros / 1000], (role, roster)
    logs = pipeline.log_tails(400)
    assert "no draft after" not in logs and "no result" not in logs and "is gone" not in logs, logs[-3000:]


def test_a_round_pooled_in_place_outlives_its_coordinator(server, tmp_path, demo_target, greedy_references, pipelines):
    """A round without drafts is pooled by the coordinator that applied its request's last
    round, with no candidates entry: the round is in the rounds set only. The coordinator killed
    while it holds that round (asleep after applying), the next one's drafter-deadline sweep
    sends the round on, and the request finishes as the reference."""
    pipeline = make(tmp_path, server, demo_target, pipelines, drafter_deadline_ms=1000)
    for role in ("router", "fusion", "verifier"):
        pipeline.start(role)
    first = pipeline.start("coordinator", env={"COSINE_TEST_FAULTS": "coordinator.after_apply=sleep:120"})
    for role in ("router", "coordinator", "fusion", "verifier"):
        pipeline.wait_live(role, 1)
    client = pipeline.client()
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    submit(client, id="in-place", messages=json.dumps([{"role": "user", "content": texts[0]}]), max_tokens=MAX_TOKENS, deadline_s=300)
    wait_for(lambda: client.hget("cosine:req:in-place", "round") == b"1", 120, "the first round applied")
    time.sleep(0.5)  # inside its sleep after applying: the next round is pooled in place
    assert client.zcard("cosine:rounds") == 1  # the round is recorded ...
    pending = group_pending(client, "cosine:candidates", "cosine:coordinator")
    unread = client.xinfo_groups("cosine:candidates")[0]["lag"]
    assert pending == 0 and not unread  # ... and no candidates entry holds it
    pipeline.kill(first)
    pipeline.start("coordinator")
    final = final_of(read_output(client, "in-place", timeout=180))
    assert json.loads(final["token_ids"]) == greedy_references[0][:MAX_TOKENS], final
    assert client.zcard("cosine:rounds") == 0
