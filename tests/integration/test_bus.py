"""The Lua functions against a real server (no model): admission, refusal, round application
with cancellation, fusion shared by workers, and a stage that survives its own tick failing."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from cosine import bus
from cosine.config import Config, PipelineConfig
from cosine.core.protocol import refusal_entry
from cosine.embedded import EmbeddedRedis
from cosine.wire import Keys
from cosine.wire.state import state_to_fields

KEYS = Keys()
GROUP = "cosine:router"


@pytest.fixture(scope="module")
def server():
    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()
    yield url
    embedded.stop()


def run(coro):
    return asyncio.run(coro)


async def fresh(url: str) -> aioredis.Redis:
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    bus.setup_library(url)
    await bus.ensure_group(client, KEYS.requests, GROUP)
    return client


async def submit(client, **fields) -> bytes:
    entry_id = await client.xadd(KEYS.requests, fields)
    await client.xreadgroup(GROUP, "test", {KEYS.requests: ">"}, count=1)
    return entry_id


async def admit(client, entry_id, request_id="r1", fields=None, deadline_ms=2**42, **admission) -> str:
    return await bus.admit_request(
        client, KEYS, group=GROUP, entry_id=entry_id, request_id=request_id, deadline_ms=deadline_ms, ttl_s=60,
        fields=fields or {"round": "0", "status": "active", "id": request_id}, job_streams=[KEYS.draft("general")],
        payload=b"job", refusal=refusal_entry(f"request id {request_id!r} is already in use", "invalid", "id"),
        busy=refusal_entry("at capacity", "busy"), **admission,
    )


def test_admission_refuses_past_the_request_bound_with_one_busy_final(server):
    """max_requests active requests: the next is refused (busy) in the same atomic call that
    would have created it; its id stays taken; once one ends, a new request gets in."""

    async def scenario():
        client = await fresh(server)
        outcomes = []
        for name in ("r1", "r2", "r3"):
            entry_id = await submit(client, prompt="hi")
            outcomes.append(await admit(client, entry_id, name, max_requests=2))
        assert outcomes == ["created", "created", "busy"]
        assert [(f["finish_reason"], f["error_code"]) for f in await finals(client, KEYS.out("r3"))] == [("error", "busy")]
        assert await client.zrange(KEYS.deadlines, 0, -1) == [b"r1", b"r2"]
        assert await client.xlen(KEYS.draft("general")) == 2  # no job for the refused one
        assert (await client.xpending(KEYS.requests, GROUP))["pending"] == 0  # every entry acknowledged
        again = await submit(client, prompt="hi")
        assert await admit(client, again, "r3", max_requests=2) == "in_use"  # a busy id is spent
        await client.zrem(KEYS.deadlines, "r1")  # r1 ended
        assert await admit(client, await submit(client, prompt="hi"), "r4", max_requests=2) == "created"
        await client.aclose()

    run(scenario())


def test_admission_keeps_reserved_rows_within_the_kv_budget(server):
    """Each admitted request reserves prompt + max_tokens rows; past the live verifiers' pools
    a request is refused (busy), except one alone; reservations of ended requests are dropped."""

    async def scenario():
        client = await fresh(server)

        async def go(name, tokens, budget=100):
            return await admit(client, await submit(client, prompt="hi"), name, token_budget=budget, tokens=tokens)

        assert await go("big", 500) == "created"  # alone: let in (it fails alone if it cannot fit)
        assert await go("r1", 10) == "busy"
        await client.zrem(KEYS.deadlines, "big")  # ended: its reservation goes at the next admission
        assert await go("r2", 60) == "created"
        assert await go("r3", 50) == "busy"  # 60 + 50 > 100
        assert await go("r4", 40) == "created"  # 60 + 40 fits
        assert await client.hgetall(KEYS.reserved) == {b"r2": b"60", b"r4": b"40"}
        assert await go("r5", 50, budget=0) == "created"  # no budget: not bounded, not reserved
        assert await client.hexists(KEYS.reserved, "r5") == 0
        await client.aclose()

    run(scenario())


def test_past_the_bounds_requests_wait_in_a_bounded_queue_first_come_first_started(server):
    """max_waiting: past the bound a request waits (state and deadline written, no job) while
    fewer than max_waiting do, else it is refused; a new request never starts ahead of one
    waiting; the first waiting starts when a slot frees; one that ended while waiting (cancelled,
    past its deadline) is dropped from the queue and the next one starts."""

    async def scenario():
        client = await fresh(server)
        bounds = {"max_requests": 1, "max_waiting": 2}
        outcomes = [await admit(client, await submit(client, prompt="hi"), f"r{i}", **bounds) for i in range(4)]
        assert outcomes == ["created", "waiting", "waiting", "busy"]
        assert await client.zrange(KEYS.waiting, 0, -1) == [b"r1", b"r2"]
        assert sorted(await client.zrange(KEYS.deadlines, 0, -1)) == [b"r0", b"r1", b"r2"]  # waiting ones can expire
        assert await client.xlen(KEYS.draft("general")) == 1  # only r0 has a job
        assert [f["error_code"] for f in await finals(client, KEYS.out("r3"))] == ["busy"]
        assert (await client.xpending(KEYS.requests, GROUP))["pending"] == 0

        async def start(name):
            return await bus.start_waiting(client, KEYS, request_id=name, job_streams=[KEYS.draft("general")], payload=b"job", max_requests=1)

        assert await start("r2") == "later"  # r1 is first
        assert await start("r1") == "busy"  # r0 still holds the only slot
        await client.zrem(KEYS.deadlines, "r0")  # r0 ended
        assert await start("r1") == "created"
        assert await client.xlen(KEYS.draft("general")) == 2 and await client.zrange(KEYS.waiting, 0, -1) == [b"r2"]
        assert await client.zscore(KEYS.rounds, "r1") is not None
        await client.zrem(KEYS.deadlines, "r1")  # a slot is free, but r2 waits: a newcomer queues behind it
        assert await admit(client, await submit(client, prompt="hi"), "r4", **bounds) == "waiting"
        # r2 ends while waiting (a cancellation or its deadline: the finishing round application).
        ended = bus.apply_round_call(KEYS, request_id="r2", expected_round=0, fields={"status": "finished"},
                                     out_entries=[{"type": "final", "finish_reason": "cancelled"}], ttl_s=60)
        assert await bus.apply_rounds(client, [ended]) == ["applied"]
        assert await client.zrange(KEYS.waiting, 0, -1) == [b"r4"]
        assert await start("r2") == "gone"
        assert await start("r4") == "created"
        assert await client.zcard(KEYS.waiting) == 0
        # Regression: a router whose max_waiting is 0 (a changed config) while others wait
        # refused every newcomer busy, free slots or not; it now admits within the bounds.
        await client.zrem(KEYS.deadlines, "r4")
        assert await admit(client, await submit(client, prompt="hi"), "r5", **bounds) == "created"
        assert await admit(client, await submit(client, prompt="hi"), "r6", **bounds) == "waiting"
        assert await client.zrem(KEYS.deadlines, "r5") == 1
        assert await admit(client, await submit(client, prompt="hi"), "r7", max_requests=1, max_waiting=0) == "created"
        await client.aclose()

    run(scenario())


def test_a_waiting_request_past_its_deadline_never_starts_nor_holds_back_the_next(server):
    """Regression (CI): a slot that freed between a waiting request's deadline and the
    coordinator's next deadline sweep started it, and it ran to its end instead of ending with
    error_code=deadline. Past its deadline it now stays for the sweep, and the next one starts."""

    async def scenario():
        client = await fresh(server)
        bounds = {"max_requests": 1, "max_waiting": 2}
        now_ms = int(time.time() * 1000)
        assert await admit(client, await submit(client, prompt="hi"), "holder", **bounds) == "created"
        assert await admit(client, await submit(client, prompt="hi"), "late", deadline_ms=now_ms - 1, **bounds) == "waiting"
        assert await admit(client, await submit(client, prompt="hi"), "next", **bounds) == "waiting"
        await client.zrem(KEYS.deadlines, "holder")  # the holder ended: a slot is free

        async def start(name):
            return await bus.start_waiting(client, KEYS, request_id=name, job_streams=[KEYS.draft("general")], payload=b"job", max_requests=1)

        assert await start("late") == "expired"
        assert await start("next") == "created"
        assert await client.zrange(KEYS.waiting, 0, -1) == [b"late"]  # for the deadline sweep to end
        assert await client.zscore(KEYS.rounds, "late") is None and await client.xlen(KEYS.draft("general")) == 2
        await client.aclose()

    run(scenario())


def test_a_cancel_that_overtakes_its_request_ends_it_before_it_starts(server):
    """Regression (review): a cancel handled before its request was admitted (two routers, a
    backlog, a gateway whose client left at once) found nothing, and the request then ran to
    its end with nobody reading. Now the cancel leaves the request's tombstone and a cancelled
    final; its entry, when it comes, is refused as an id in use and starts nothing."""

    async def scenario():
        client = await fresh(server)
        final = refusal_entry("cancelled by client before it started", "cancelled", finish_reason="cancelled")
        assert await bus.flag_cancel(client, KEYS, "early", ttl_s=60, final=final) == "early"
        assert await bus.flag_cancel(client, KEYS, "early", ttl_s=60, final=final) == "finished"  # a second cancel
        entry = await submit(client, id="early", prompt="hi")
        assert await admit(client, entry, "early") == "in_use"
        assert await client.xlen(KEYS.draft("general")) == 0 and await client.zcard(KEYS.deadlines) == 0
        assert [f["finish_reason"] for f in await finals(client, KEYS.out("early"))] == ["cancelled"]
        assert 0 < await client.ttl(KEYS.request("early")) <= 60
        await client.aclose()

    run(scenario())


async def finals(client, stream: str) -> list[dict]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in await client.xrange(stream) if f[b"type"] == b"final"]


def test_an_id_in_use_is_refused_on_the_entry_stream_only(server):
    async def scenario():
        client = await fresh(server)
        first = await submit(client, id="r1", prompt="a")
        assert await admit(client, first) == "created"
        assert await admit(client, first) == "duplicate"  # a redelivery changes nothing
        second = await submit(client, id="r1", prompt="b")
        assert await admit(client, second) == "in_use"
        assert await admit(client, second) == "in_use"
        assert await client.xlen(KEYS.out("r1")) == 0  # the original's stream is untouched
        refusals = await finals(client, KEYS.out(second.decode()))
        assert len(refusals) == 1 and refusals[0]["error_code"] == "invalid" and refusals[0]["error_param"] == "id"
        assert await client.xlen(KEYS.draft("general")) == 1
        assert (await client.xpending(KEYS.requests, GROUP))["pending"] == 0

    run(scenario())


def test_a_refusal_is_written_once_and_keeps_the_id(server):
    async def scenario():
        client = await fresh(server)
        entry = await submit(client, id="bad", prompt="")
        refusal = refusal_entry("'prompt' must be a non-empty string", "invalid", "prompt")
        for _ in range(2):  # redelivered: still one final
            await bus.refuse_request(client, KEYS, group=GROUP, entry_id=entry, request_id="bad", ttl_s=60, entry=refusal)
        assert len(await finals(client, KEYS.out("bad"))) == 1
        # An internal error on an entry that already created its request writes nothing.
        created = await submit(client, id="ok", prompt="x")
        assert await admit(client, created, "ok") == "created"
        outcome = await bus.refuse_request(client, KEYS, group=GROUP, entry_id=created, request_id="ok", ttl_s=60, entry=refusal)
        assert outcome == "duplicate" and await client.xlen(KEYS.out("ok")) == 0

    run(scenario())


def test_a_burst_is_refused_in_one_call_each_entry_on_its_own(server):
    """refuse_requests: many entries, one atomic call: a busy final on each free id, the
    in-use id's refusal on its entry's stream, outcomes in order, every entry acknowledged."""

    async def scenario():
        client = await fresh(server)
        assert await admit(client, await submit(client, prompt="x"), "taken") == "created"
        entries = [await submit(client, prompt="y") for _ in range(4)]
        names = ["b0", "b1", "taken", "b3"]
        busy = refusal_entry("at capacity", "busy")
        outcomes = await bus.refuse_requests(client, KEYS, group=GROUP, refusals=list(zip(entries, names)), ttl_s=60, entry=busy)
        assert outcomes == ["refused", "refused", "in_use", "refused"]
        for name in ("b0", "b1", "b3"):
            assert [f["error_code"] for f in await finals(client, KEYS.out(name))] == ["busy"]
        assert await client.xlen(KEYS.out("taken")) == 0
        assert [f["error_code"] for f in await finals(client, KEYS.out(entries[2].decode()))] == ["busy"]
        assert (await client.xpending(KEYS.requests, GROUP))["pending"] == 0
        assert await bus.refuse_requests(client, KEYS, group=GROUP, refusals=[], ttl_s=60, entry=busy) == []

    run(scenario())


def test_cancellation_wins_over_a_round_in_flight(server):
    async def scenario():
        client = await fresh(server)
        await admit(client, await submit(client, id="r1", prompt="a"))
        tokens = {"type": "tokens", "text": "x", "token_ids": "[1]"}
        assert await bus.apply_round(client, KEYS, request_id="r1", expected_round=0, fields={"round": "1"}, out_entries=[tokens]) == "applied"
        assert await bus.flag_cancel(client, KEYS, "r1") == "flagged"
        # The coordinator computed round 1 before the cancel: not applied, it must end the request.
        outcome = await bus.apply_round(client, KEYS, request_id="r1", expected_round=1, fields={"round": "2"}, out_entries=[tokens])
        assert outcome == "cancelled"
        final = {"type": "final", "finish_reason": "cancelled", "error_code": "cancelled"}
        assert await bus.apply_round(
            client, KEYS, request_id="r1", expected_round=1, fields={"round": "2", "status": "finished"}, out_entries=[final], ttl_s=60,
        ) == "applied"
        assert await bus.flag_cancel(client, KEYS, "r1") == "finished"
        entries = await client.xrange(KEYS.out("r1"))
        assert [e[0] for e in entries] == [b"1-0", b"2-0"]  # IDs from the round number
        assert len(await finals(client, KEYS.out("r1"))) == 1
        assert await client.zscore(KEYS.deadlines, "r1") is None

    run(scenario())


def test_a_batch_of_rounds_in_one_round_trip_keeps_each_requests_outcome(server):
    """apply_rounds pipelines one compare-and-set per request: a stale, a cancelled and a
    missing request do not stop the others, and the outcomes come back in order."""

    async def scenario():
        client = await fresh(server)
        for rid in ("r1", "r2", "r3"):
            await admit(client, await submit(client, id=rid, prompt="a"), request_id=rid)
        assert await bus.flag_cancel(client, KEYS, "r2") == "flagged"
        tokens = {"type": "tokens", "text": "x", "token_ids": "[1]"}
        calls = [
            bus.apply_round_call(KEYS, request_id="r1", expected_round=0, fields={"round": "1"}, out_entries=[tokens], job_streams=[KEYS.candidates], payload=b"next"),
            bus.apply_round_call(KEYS, request_id="r2", expected_round=0, fields={"round": "1"}, out_entries=[tokens]),
            bus.apply_round_call(KEYS, request_id="r3", expected_round=5, fields={"round": "6"}, out_entries=[tokens]),
            bus.apply_round_call(KEYS, request_id="nobody", expected_round=0, fields={"round": "1"}, out_entries=[tokens]),
            bus.apply_round_call(KEYS, request_id="r3", expected_round=0, fields={"round": "1"}, out_entries=[tokens]),
        ]
        assert await bus.apply_rounds(client, calls) == ["applied", "cancelled", "stale", "missing", "applied"]
        assert await client.xlen(KEYS.out("r1")) == 1 and await client.xlen(KEYS.out("r3")) == 1
        assert not await client.exists(KEYS.out("r2"))
        assert await client.hget(KEYS.request("r2"), "round") == b"0"
        assert await client.xlen(KEYS.candidates) == 1  # r1's next round
        assert await bus.apply_rounds(client, []) == []

    run(scenario())


def test_a_replayed_round_does_not_repeat_output(server):
    async def scenario():
        client = await fresh(server)
        await admit(client, await submit(client, id="r1", prompt="a"))
        tokens = {"type": "tokens", "text": "x", "token_ids": "[1]"}
        await bus.apply_round(client, KEYS, request_id="r1", expected_round=0, fields={"round": "1"}, out_entries=[tokens])
        # The server lost the state write but not the output (or a client read it): the round
        # is applied again; its entry ID exists, so nothing is written twice.
        await client.hset(KEYS.request("r1"), "round", "0")
        await bus.apply_round(client, KEYS, request_id="r1", expected_round=0, fields={"round": "1"}, out_entries=[tokens])
        assert await client.xlen(KEYS.out("r1")) == 1

    run(scenario())


def test_a_finished_request_keeps_a_tombstone_without_its_tokens(server):
    """Regression (soak run): a finished request's hash kept its prompt and output token ids
    for output_ttl_s, so Redis memory followed how many long prompts had ended recently."""
    from dataclasses import replace

    from cosine.core.rounds import FINISHED, RequestState
    from cosine.core.sampling import SamplingParams

    async def scenario():
        client = await fresh(server)
        state = RequestState("r1", list(range(3000)), SamplingParams(), 8, (), (2,), ["general"], output_ids=[5, 6])
        await admit(client, await submit(client, id="r1", prompt="a"), fields=state_to_fields(state))
        finished = replace(state, round=1, status=FINISHED)
        final = {"type": "final", "finish_reason": "cancelled", "error_code": "cancelled"}
        assert await bus.apply_round(
            client, KEYS, request_id="r1", expected_round=0, fields=state_to_fields(finished), out_entries=[final], ttl_s=60,
        ) == "applied"
        key = KEYS.request("r1")
        assert await client.hget(key, "status") == FINISHED.encode()
        assert not await client.hexists(key, "prompt_ids") and not await client.hexists(key, "output_ids")
        assert 0 < await client.ttl(key) <= 60
        assert await client.memory_usage(key) < 2048  # the 3,000 token ids alone were ~15 KB; the hash itself ~1 KB
        # Later rounds and cancels of it are refused as before.
        assert await bus.apply_round(client, KEYS, request_id="r1", expected_round=1, fields={"round": "2"}, out_entries=[]) == "stale"
        assert await bus.flag_cancel(client, KEYS, "r1") == "finished"

    run(scenario())


def test_a_requests_states_are_stored_with_its_rounds_and_go_with_it(server):
    """feat:{id} holds rows 0..feat_n-1: appended from feat_n, replaced from an earlier position,
    emptied on a gap (the next round ships every row), deleted when the request ends."""

    def rows(*values: int) -> bytes:
        return b"".join(bytes([v]) * 4 for v in values)  # rows of 4 bytes

    async def scenario():
        client = await fresh(server)
        await admit(client, await submit(client, id="r1", prompt="a"))
        key = KEYS.features("r1")

        async def apply(round_index: int, data: bytes, start: int, count: int, ttl: int = 0) -> str:
            return await bus.apply_round(client, KEYS, request_id="r1", expected_round=round_index, fields={"round": str(round_index + 1)},
                                         out_entries=[], features=data, features_start=start, feature_rows=count, ttl_s=ttl)

        assert await apply(0, rows(1, 2, 3), 0, 3) == "applied"  # the prompt's rows
        assert await client.get(key) == rows(1, 2, 3) and await client.hget(KEYS.request("r1"), "feat_n") == b"3"
        assert await apply(1, rows(4, 5), 3, 2) == "applied"  # appended
        assert await client.get(key) == rows(1, 2, 3, 4, 5)
        assert await apply(2, rows(9, 8), 2, 2) == "applied"  # from an earlier position: replaces what follows
        assert await client.get(key) == rows(1, 2, 9, 8) and await client.hget(KEYS.request("r1"), "feat_n") == b"4"
        assert await apply(3, rows(7), 6, 1) == "applied"  # a gap: emptied, the next round asks for all
        assert not await client.exists(key) and await client.hget(KEYS.request("r1"), "feat_n") == b"0"
        assert await apply(4, rows(1, 2), 0, 2) == "applied"
        assert await apply(5, b"", 0, 0, ttl=60) == "applied"  # finished
        assert not await client.exists(key) and not await client.hexists(KEYS.request("r1"), "feat_n")

    run(scenario())


def test_two_fusion_workers_make_one_tree(server):
    async def scenario():
        client = await fresh(server)
        await bus.ensure_group(client, KEYS.drafts, "cosine:fusion")
        ids = [await client.xadd(KEYS.drafts, {"m": name}) for name in (b"general", b"code")]
        await client.xreadgroup("cosine:fusion", "a", {KEYS.drafts: ">"}, count=1)
        await client.xreadgroup("cosine:fusion", "b", {KEYS.drafts: ">"}, count=1)
        key = KEYS.fuse("r1", 0)
        common = dict(group="cosine:fusion", hash_key=key, expected=2, deadline_ms=2**40, ttl_ms=60_000, retake_ms=2**40)
        # Worker a reads one expert's draft, worker b the other's: the second completes the set.
        assert await bus.fuse_add(client, KEYS, entry_id=ids[0], expert="general", payload=b"general", **common) == []
        assert sorted(await bus.fuse_add(client, KEYS, entry_id=ids[1], expert="code", payload=b"code", **common)) == [b"code", b"general"]
        assert (await client.xpending(KEYS.drafts, "cosine:fusion"))["pending"] == 0
        assert await bus.fuse_emit(client, KEYS, key, b"tree", 60_000) == "emitted"
        assert await bus.fuse_emit(client, KEYS, key, b"tree", 60_000) == "duplicate"
        assert await client.xlen(KEYS.candidates) == 1
        # A late redelivery of a fused round's draft is dropped.
        late = await client.xadd(KEYS.drafts, {"m": b"general"})
        assert await bus.fuse_add(client, KEYS, entry_id=late, expert="general", payload=b"general", **common) == []

    run(scenario())


def test_a_fused_round_keeps_its_done_marker_for_the_deadlines_only(server):
    """Regression (soak run): the marker lived 66.5 s, so the number of keys followed the round
    rate of the last minute and Redis memory was not flat under steady load."""
    from cosine.wire import Draft, encode
    from cosine.workers.fusion import FusionWorker

    async def scenario():
        client = await fresh(server)
        config = Config()
        fusion = FusionWorker(config, server)
        fusion.redis = client
        await fusion.setup()
        await bus.ensure_group(client, KEYS.drafts, fusion.group)
        draft = Draft("r1", 0, "general", "lookup", 0, [5, 6], [0.9, 0.8], experts=["general"])
        await client.xadd(KEYS.drafts, encode(draft))
        entries = (await client.xreadgroup(fusion.group, "a", {KEYS.drafts: ">"}))[0][1]
        await fusion.handle(KEYS.drafts, entries)
        assert await client.xlen(KEYS.candidates) == 1
        key = KEYS.fuse("r1", 0)
        assert await client.hgetall(key) == {b"#done": b"1"}
        pipeline = config.pipeline
        assert 0 < await client.pttl(key) <= pipeline.fusion_deadline_ms + pipeline.drafter_deadline_ms
        await client.aclose()

    run(scenario())


def test_a_round_drafted_by_one_expert_is_fused_in_one_call(server):
    """One expert's draft is the whole set: acknowledged and its candidate written in one call
    (two before, and the draft stored in between); a redelivery of it writes nothing more."""
    from cosine.wire import Candidate, Draft, decode, encode
    from cosine.workers.fusion import FusionWorker

    async def scenario():
        client = await fresh(server)
        fusion = FusionWorker(Config(), server)
        fusion.redis = client
        await fusion.setup()
        await bus.ensure_group(client, KEYS.drafts, fusion.group)
        draft = Draft("r1", 2, "code", "code-0", 0, [5, 6], [0.9, 0.8], experts=["code"], instance="d1")
        entry_id = await client.xadd(KEYS.drafts, encode(draft))
        entries = (await client.xreadgroup(fusion.group, "a", {KEYS.drafts: ">"}))[0][1]
        await client.config_resetstat()
        await fusion.handle(KEYS.drafts, entries)
        stats = await client.info("commandstats")
        assert stats["cmdstat_fcall"]["calls"] == 1
        [(_, fields)] = await client.xrange(KEYS.candidates)
        candidate = decode(fields, Candidate)
        assert (candidate.request_id, candidate.round, candidate.tokens, candidate.homes) == ("r1", 2, [5, 6], [["code", "d1"]])
        assert (await client.xpending(KEYS.drafts, fusion.group))["pending"] == 0
        assert not await client.zcard(KEYS.fusing)
        await fusion.handle(KEYS.drafts, [(entry_id, entries[0][1])])  # redelivered
        assert await client.xlen(KEYS.candidates) == 1
        await client.aclose()

    run(scenario())


def test_an_incomplete_round_is_fused_after_its_deadline_by_any_worker(server):
    async def scenario():
        client = await fresh(server)
        key = KEYS.fuse("r2", 5)
        common = dict(group="cosine:fusion", hash_key=key, expected=2, ttl_ms=60_000, retake_ms=2**40)
        await bus.fuse_add(client, KEYS, entry_id=b"1-1", expert="general", payload=b"general", deadline_ms=1000, **common)
        due = await client.zrangebyscore(KEYS.fusing, 0, 2000)
        assert due == [key.encode()]
        # A worker takes it and dies before emitting; after the retake time another takes it.
        assert await bus.fuse_take(client, KEYS, key, 3000) == [b"general"]
        assert await client.zrangebyscore(KEYS.fusing, 0, 2000) == []
        assert await client.zrangebyscore(KEYS.fusing, 0, 3000) == [key.encode()]
        assert await bus.fuse_take(client, KEYS, key, 9000) == [b"general"]

    run(scenario())


def test_a_stage_survives_its_own_tick_and_task_failures(server):
    from cosine.workers.base import StageWorker

    class Flaky(StageWorker):
        role = "flaky"
        ticks = 0

        def input_streams(self):
            return [f"{KEYS.prefix}flaky"]

        async def handle(self, stream, entries):
            raise AssertionError("no entries expected")

        async def tick(self):
            self.ticks += 1
            if self.ticks < 4:
                raise ValueError("invalid literal for int() with base 10: 'None'")
            self.stopping.set()

    config = Config(pipeline=PipelineConfig(block_ms=10))
    worker = Flaky(config, server)
    run(worker.run())  # without guarded ticks the first ValueError ends the worker
    assert worker.ticks == 4


def test_a_stale_pooled_round_does_not_swallow_the_next_one(server):
    """A coordinator still pooling round 3 of a request that moved on (a duplicate of round 3
    was verified elsewhere) must pool round 4, not acknowledge it as a duplicate."""
    import time

    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyItem, encode
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import Waiting

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis, coordinator.pool = client, []
        state = RequestState("r1", [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=4, output_ids=[5, 6, 7, 8])
        await client.hset(KEYS.request("r1"), mapping=state_to_fields(state))
        await bus.ensure_group(client, KEYS.candidates, coordinator.group)
        old = Candidate("r1", 3, [], [], [], [], [])
        new = Candidate("r1", 4, [], [], [], [], [])
        ids = [await client.xadd(KEYS.candidates, encode(c)) for c in (old, new)]
        await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
        coordinator.pool.append(Waiting(ids[0], VerifyItem("r1", 3, [1, 2], old, None, ""), time.monotonic()))
        await coordinator._pool_candidate(ids[1], new, state)
        assert [(w.entry_id, w.item.round) for w in coordinator.pool] == [(ids[1], 4)]
        pending = await client.xpending_range(KEYS.candidates, coordinator.group, "-", "+", 10)
        assert [p["message_id"] for p in pending] == [ids[1]]  # the new round stays claimed
        await client.aclose()

    run(scenario())


def test_a_cancellation_turned_into_a_redis_error_still_cancels(server):
    """redis-py can answer a cancellation inside a command with a Redis error; swallowing it
    kept a verifier's claim-renewal task alive forever, and the verifier's batch with it."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from cosine.workers.base import StageWorker

    class Stage(StageWorker):
        role = "stage"

        def input_streams(self):
            return []

    async def command_that_converts_cancellation():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by server.") from None

    async def scenario():
        worker = Stage(Config(), server)
        task = asyncio.create_task(worker.guarded(command_that_converts_cancellation))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)
        # A renewal around a call ends with the call, whatever its Redis calls do.
        worker.redis = aioredis.Redis.from_url(server)
        began = asyncio.get_running_loop().time()
        async with worker.renewing("cosine:nothing", [b"1-0"]):
            await asyncio.sleep(0.05)
        assert asyncio.get_running_loop().time() - began < 2
        await worker.redis.aclose()

    run(scenario())


def test_a_verifier_spends_no_forward_on_rounds_already_applied(server):
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyItem
    from cosine.workers.verifier import VerifierWorker

    async def scenario():
        client = await fresh(server)
        verifier = VerifierWorker(Config(), server)
        verifier.redis = client
        state = RequestState("r1", [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=4)
        await client.hset(KEYS.request("r1"), mapping=state_to_fields(state))

        def item(round_index: int, request_id: str = "r1") -> VerifyItem:
            return VerifyItem(request_id, round_index, [1, 2], Candidate(request_id, round_index, [], [], [], [], []), SamplingParams(), "")

        kept = await verifier._still_open([item(3), item(4), item(4, "gone")])
        assert [(i.request_id, i.round) for i in kept] == [("r1", 4)]
        await client.aclose()

    run(scenario())


def test_entries_waiting_their_turn_are_not_reclaimed_by_their_own_worker(server):
    """A read returns entries of several streams; while the first stream's are handled for
    longer than claim_idle_ms, the others must not be taken (and handled twice) meanwhile."""
    from cosine.workers.base import StageWorker

    streams = [f"{KEYS.prefix}slow", f"{KEYS.prefix}queued"]

    class TwoStreams(StageWorker):
        role = "two"
        read_count = 1

        def input_streams(self):
            return streams

        async def handle(self, stream, entries):
            for entry_id, _ in entries:
                handled.append((stream, entry_id))
            if stream == streams[0]:
                await asyncio.sleep(2.0)  # four claim_idle_ms: the reclaimer runs meanwhile
            await self.redis.xack(stream, self.group, *(e for e, _ in entries))
            if len(handled) >= 2:
                self.stopping.set()

    handled: list = []

    async def scenario():
        client = await fresh(server)
        for stream in streams:
            await client.xadd(stream, {"m": b"x"})
        worker = TwoStreams(Config(pipeline=PipelineConfig(block_ms=50, claim_idle_ms=500)), server)
        await asyncio.wait_for(worker.run(), 30)
        await asyncio.sleep(0.5)
        assert sorted(s for s, _ in handled) == sorted(streams)  # each entry handled once
        await client.aclose()

    run(scenario())


def test_the_coordinator_reads_verifier_load_and_hands_rounds_to_verification(server):
    """The batch decision's load (active requests, batches queued or in verification on the
    shared and per-target verify streams, one of which may not exist yet) comes from one
    pipelined read; a flushed batch is written, its candidates acknowledged and its rounds taken
    off the drafter-deadline set, together."""
    import time

    from cosine.core.sampling import SamplingParams
    from cosine.policy.batching import BatchPolicy
    from cosine.wire import Candidate, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import Verifiers, Waiting

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis, coordinator.pool, coordinator.verifiers = client, [], Verifiers(count=1)
        coordinator.batch_policy = BatchPolicy(8, max_wait_s=0.1)
        coordinator.fingerprints = coordinator.live_fingerprints = {"target-a"}  # its stream does not exist yet
        verifier_group = KEYS.group("verifier")
        assert await coordinator._load() == (0, 0)
        await client.zadd(KEYS.deadlines, {"r1": 2**40, "r2": 2**40})
        await bus.ensure_group(client, KEYS.verify, verifier_group)
        await client.xadd(KEYS.verify, {"m": b"queued"})  # unread: lag 1
        await client.xadd(KEYS.verify, {"m": b"taken"})
        await client.xreadgroup(verifier_group, "v1", {KEYS.verify: ">"}, count=1)  # pending 1, lag 1
        assert await coordinator._load() == (2, 2)

        await bus.ensure_group(client, KEYS.candidates, coordinator.group)
        await client.zadd(KEYS.rounds, {"r1": 1, "r2": 1})
        candidate = Candidate("r1", 0, [], [], [], [], [])
        entry_id = await client.xadd(KEYS.candidates, encode(candidate))
        await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
        coordinator.pool.append(Waiting(entry_id, VerifyItem("r1", 0, [1, 2], candidate, SamplingParams(), ""), time.monotonic()))
        await coordinator._flush(force=True)
        assert coordinator.pool == []
        # r1's drafting is over: the rounds' sweep now waits verify_retry_ms for its result.
        retry_at = coordinator.clock.now_ms() + coordinator.config.pipeline.verify_retry_ms - coordinator.config.pipeline.drafter_deadline_ms
        assert abs(await client.zscore(KEYS.rounds, "r1") - retry_at) < 1000
        assert await client.zscore(KEYS.rounds, "r2") == 1
        assert await client.xpending_range(KEYS.candidates, coordinator.group, "-", "+", 10) == []
        _, fields = (await client.xrange(KEYS.verify))[-1]
        assert [item.request_id for item in decode(fields, VerifyBatch).items] == ["r1"]
        await client.aclose()

    run(scenario())


async def forming_coordinator(server: str, client, **pipeline):
    """A coordinator forming batches on ``client`` for one verifier of no pinned target, its
    candidates' group made, with ``pipeline`` settings."""
    from cosine.policy.batching import BatchPolicy
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import Verifiers

    coordinator = Coordinator(Config(pipeline=PipelineConfig(**pipeline)), server)
    coordinator.redis, coordinator.pool, coordinator.verifiers = client, [], Verifiers(count=1)
    coordinator.batch_policy = BatchPolicy(8, max_wait_s=0.1)
    coordinator.fingerprints = coordinator.live_fingerprints = set()
    await bus.ensure_group(client, KEYS.candidates, coordinator.group)
    return coordinator


def test_a_round_lost_after_it_went_to_verification_is_verified_again(server):
    """A round left the rounds' sweep once its batch was written, so a batch or a result that a
    fault lost (a stream nobody reads any more, a worker or the server killed at the wrong
    moment) left its request waiting for its deadline, 600 s (a fault-matrix run lost one).
    Now the sweep waits ``verify_retry_ms`` for the result, then verifies the round again
    without drafts; a request that ended meanwhile is not brought back."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyItem, decode, encode
    from cosine.workers.coordinator.forming import Waiting

    async def scenario():
        client = await fresh(server)
        coordinator = await forming_coordinator(server, client, verify_retry_ms=400)
        for request_id in ("r1", "r2"):
            state = RequestState(request_id, [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=3, output_ids=[5, 6, 7])
            await client.hset(KEYS.request(request_id), mapping=state_to_fields(state))
            await client.zadd(KEYS.rounds, {request_id: coordinator.clock.now_ms()})
            candidate = Candidate(request_id, 3, [], [], [], [], [])
            entry_id = await client.xadd(KEYS.candidates, encode(candidate))
            await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
            coordinator.pool.append(Waiting(entry_id, VerifyItem(request_id, 3, [1, 2, 5, 6, 7], candidate, SamplingParams(), ""), time.monotonic()))
        await coordinator._flush(force=True)
        written = await client.xlen(KEYS.candidates)
        await coordinator._fallback_overdue_rounds()
        assert await client.xlen(KEYS.candidates) == written  # within the retry time: nothing
        await client.xtrim(KEYS.verify, maxlen=0)  # the batch is lost
        await client.zrem(KEYS.rounds, "r2")  # r2 ended meanwhile (its end takes it off the set)
        await asyncio.sleep(0.5)
        await coordinator._fallback_overdue_rounds()
        again = [decode(fields, Candidate) for _, fields in await client.xrange(KEYS.candidates)][written:]
        assert [(c.request_id, c.round, c.tokens) for c in again] == [("r1", 3, [])]
        assert await client.zscore(KEYS.rounds, "r2") is None
        await client.aclose()

    run(scenario())


def test_a_stale_rounds_batch_leaves_the_current_round_to_the_sweep(server):
    """A request's entry in the rounds set names no round. A duplicate of an applied round (the
    drafting deadline's empty candidate, a result re-verified after another version's garbage,
    a redelivery) sent in a batch took the request off the set while its next round was
    drafting: that round's job, lost with a drafter or the server, then had no sweep to send it
    on, and the request waited for its deadline. Now the entry stays (the sweep sends the round
    on after verify_retry_ms at the latest)."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyItem, decode, encode
    from cosine.workers.coordinator.forming import Waiting

    async def scenario():
        client = await fresh(server)
        coordinator = await forming_coordinator(server, client, verify_retry_ms=300)
        state = RequestState("r1", [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=4, output_ids=[5, 6, 7, 8])
        await client.hset(KEYS.request("r1"), mapping=state_to_fields(state))
        await client.zadd(KEYS.rounds, {"r1": coordinator.clock.now_ms()})  # round 4 went to the drafters
        stale = Candidate("r1", 3, [], [], [], [], [])  # round 3, applied already
        entry_id = await client.xadd(KEYS.candidates, encode(stale))
        await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
        coordinator.pool.append(Waiting(entry_id, VerifyItem("r1", 3, [1, 2, 5, 6, 7], stale, SamplingParams(), ""), time.monotonic()))
        await coordinator._flush(force=True)
        assert await client.zscore(KEYS.rounds, "r1") is not None
        written = await client.xlen(KEYS.candidates)
        await asyncio.sleep(0.4)  # round 4's job is lost: no draft comes
        await coordinator._fallback_overdue_rounds()
        again = [decode(fields, Candidate) for _, fields in await client.xrange(KEYS.candidates)][written:]
        assert [(c.request_id, c.round) for c in again] == [("r1", 4)]
        await client.aclose()

    run(scenario())


def test_a_retired_targets_batches_neither_hold_others_nor_wait_for_their_deadline(server):
    """A request pinned to a target fingerprint with no live verifier waited for its deadline,
    and the unread batches of that target's stream counted as busy verifiers for good (healthy
    batches were held). Now only live targets' streams count, and after the grace such requests
    end with error_code=target_gone, their batches taken off the stream."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyBatch, VerifyItem, encode
    from cosine.workers.coordinator import Coordinator

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(pipeline=PipelineConfig(target_grace_s=0.0)), server)
        coordinator.redis, coordinator.tokenizer, coordinator.target_gone_since = client, None, {}
        coordinator.fingerprints, coordinator.live_fingerprints = {"old", "new"}, {"new"}
        state = RequestState("r1", [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=3, fingerprint="old", deadline_ms=2**42)
        await client.hset(KEYS.request("r1"), mapping=state_to_fields(state))
        await client.zadd(KEYS.deadlines, {"r1": 2**42})
        await bus.ensure_group(client, KEYS.verify_for("old"), KEYS.group("verifier"))
        item = VerifyItem("r1", 3, [1, 2], Candidate("r1", 3, [], [], [], [], []), SamplingParams(), "old")
        await client.xadd(KEYS.verify_for("old"), encode(VerifyBatch("b1", [item])))
        _, busy = await coordinator._load()
        assert busy == 0, "a retired target's queue counted as busy verifiers"
        coordinator.live_fingerprints = set()  # no verifier live at all (a restart): not a retired target
        await coordinator._end_rounds_of_gone_targets()
        assert await client.xlen(KEYS.verify_for("old")) == 1 and not await client.exists(KEYS.out("r1"))
        coordinator.live_fingerprints = {"new"}  # another target is served: "old" is retired
        await coordinator._end_rounds_of_gone_targets()
        finals = [f for _, f in await client.xrange(KEYS.out("r1")) if f[b"type"] == b"final"]
        assert [f[b"error_code"] for f in finals] == [b"target_gone"]
        assert await client.xlen(KEYS.verify_for("old")) == 0 and not await client.zscore(KEYS.deadlines, "r1")
        await client.aclose()

    run(scenario())


def test_batches_fit_the_verifiers_kv_pool(server):
    """A verifier's K/V pool (kv_rows and kv_block in its roster value) bounds the batches the
    coordinator forms: two requests whose contexts do not fit it together go in two batches,
    with first-come and with cost-based batch choice alike (a batch that does not fit would
    make the verifier serve its requests one at a time)."""
    import time

    from cosine.bus import Liveness
    from cosine.config import PipelineConfig
    from cosine.core.sampling import SamplingParams
    from cosine.policy.batching import BatchPolicy
    from cosine.wire import Candidate, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import Verifiers, Waiting, kv_rows_of

    live = Liveness.parse("1.5 fingerprint=x kv_rows=4096 kv_block=16")
    assert (live.beat_s, live.fingerprint, live.number("kv_rows"), live.number("kv_block")) == (1.5, "x", 4096, 16)
    assert Liveness.parse(live.text()) == live
    assert Liveness.parse("2 kv_rows=lots").number("kv_rows") == 0 and Liveness.parse("2 caches=3").number("kv_rows") == 0
    item = VerifyItem("r", 1, list(range(40)), Candidate("r", 1, [5, 6], [-1, 0], [], [], []), SamplingParams(), "")
    assert kv_rows_of(item, 16) == 48 and kv_rows_of(item, 1) == 42

    async def scenario(choice: str):
        client = await fresh(server)
        coordinator = Coordinator(Config(pipeline=PipelineConfig(batch_choice=choice)), server)
        coordinator.redis, coordinator.pool, coordinator.verifiers = client, [], Verifiers(count=1)
        coordinator.batch_policy = BatchPolicy(8, max_wait_s=0.1)
        coordinator.verifiers = Verifiers(count=1, kv_rows={"v1": 64}, kv_block=16)
        await bus.ensure_group(client, KEYS.candidates, coordinator.group)
        for name in ("r1", "r2"):
            candidate = Candidate(name, 1, [], [], [], [], [])
            entry_id = await client.xadd(KEYS.candidates, encode(candidate))
            coordinator.pool.append(Waiting(entry_id, VerifyItem(name, 1, list(range(40)), candidate, SamplingParams(), ""), time.monotonic(), 1, 1.0))
        await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
        await coordinator._flush(force=True)
        batches = [decode(fields, VerifyBatch) for _, fields in await client.xrange(KEYS.verify)]
        assert [[i.request_id for i in b.items] for b in batches] == [["r1"], ["r2"]]
        coordinator.verifiers = Verifiers(count=1, kv_rows={"v1": 4096}, kv_block=16)
        for name in ("r3", "r4"):
            candidate = Candidate(name, 1, [], [], [], [], [])
            entry_id = await client.xadd(KEYS.candidates, encode(candidate))
            coordinator.pool.append(Waiting(entry_id, VerifyItem(name, 1, list(range(40)), candidate, SamplingParams(), ""), time.monotonic(), 1, 1.0))
        await coordinator._flush(force=True)
        batches = [decode(fields, VerifyBatch) for _, fields in await client.xrange(KEYS.verify)]
        assert [i.request_id for i in batches[-1].items] == ["r3", "r4"]
        await client.aclose()

    for choice in ("fifo", "cost"):
        run(scenario(choice))


def test_a_gone_verifiers_own_stream_goes_to_the_shared_streams(server):
    """Cache affinity: batches left in a verifier's own stream (one unread, one read and not
    acknowledged) go to the shared stream when the verifier is no longer live; what it had
    acknowledged is not verified again; a live verifier's stream stays."""
    import time

    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.coordinator import Coordinator

    def batch(name: str, fingerprint: str) -> dict:
        return encode(VerifyBatch(name, [VerifyItem(name, 1, [1, 2], Candidate(name, 1, [], [], [], [], []), SamplingParams(), fingerprint)]))

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis = client
        group = KEYS.group("verifier")
        for instance in ("gone", "alive"):
            await bus.ensure_group(client, KEYS.verify_at(instance), group)
            await client.sadd(KEYS.verifier_streams, instance)
        await client.xadd(KEYS.verify_at("gone"), batch("done", "fp"))
        await client.xadd(KEYS.verify_at("gone"), batch("held", "fp"))
        await client.xadd(KEYS.verify_at("gone"), batch("unread", ""))
        read = await client.xreadgroup(group, "gone", {KEYS.verify_at("gone"): ">"}, count=2)
        await client.xack(KEYS.verify_at("gone"), group, read[0][1][0][0])  # "done" verified
        await client.xadd(KEYS.verify_at("alive"), batch("kept", "fp"))
        # "alive" is in the roster, not yet in the coordinator's cached view of it (it just
        # started): it must not be taken for gone.
        await client.hset(KEYS.roster("verifier"), "alive", f"{time.time() * 1000 + 60_000:.0f} 0 fingerprint=fp")
        await coordinator._move_gone_verifier_streams()
        moved = [decode(f, VerifyBatch).batch_id for _, f in await client.xrange(KEYS.verify)]
        assert moved == ["held", "unread"]
        assert not await client.exists(KEYS.verify_at("gone"))
        assert await client.smembers(KEYS.verifier_streams) == {b"alive"}
        assert await client.xlen(KEYS.verify_at("alive")) == 1
        await coordinator._move_gone_verifier_streams()  # nothing left to move
        assert await client.xlen(KEYS.verify) == 2
        await client.aclose()

    run(scenario())


def test_work_for_a_moved_stream_goes_to_the_shared_stream(server):
    """A coordinator whose view of the roster still had a gone verifier (or drafter) wrote a
    request's next batch (or job) to that worker's own stream after the stream was moved: the
    write made the stream again, unregistered and with no group, and nobody ever read it (the
    requests waited for their deadline). Now such a write goes to the shared stream, and a live
    worker's own stream still gets its work."""
    import time

    from cosine.core.sampling import SamplingParams
    from cosine.policy.batching import BatchPolicy
    from cosine.wire import Candidate, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import Verifiers, Waiting

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis, coordinator.pool, coordinator.verifiers = client, [], Verifiers(count=1)
        coordinator.batch_policy = BatchPolicy(8)
        group = KEYS.group("verifier")
        await bus.ensure_group(client, KEYS.verify_at("gone"), group)
        await client.sadd(KEYS.verifier_streams, "gone")
        await bus.ensure_group(client, KEYS.candidates, coordinator.group)
        coordinator.verifiers = Verifiers(live=frozenset({"gone"}), count=1)  # its cached view: the verifier's liveness not yet expired
        coordinator.records.of("r1").home = "gone"
        other = Coordinator(Config(), server)  # another coordinator, whose view has it gone
        other.redis, other.verifier_ids = client, set()
        await other._move_gone_verifier_streams()
        assert not await client.exists(KEYS.verify_at("gone"))
        candidate = Candidate("r1", 1, [], [], [], [], [])
        entry_id = await client.xadd(KEYS.candidates, encode(candidate))
        await client.xreadgroup(coordinator.group, coordinator.instance, {KEYS.candidates: ">"})
        coordinator.pool.append(Waiting(entry_id, VerifyItem("r1", 1, [1, 2], candidate, SamplingParams(), ""), time.monotonic()))
        assert coordinator._home("r1") == "gone"
        await coordinator._flush(force=True)
        assert not await client.exists(KEYS.verify_at("gone")), "a stream nobody reads"
        assert [[i.request_id for i in decode(f, VerifyBatch).items] for _, f in await client.xrange(KEYS.verify)] == [["r1"]]

        # Drafting jobs: the same for a gone drafter's stream; a live one's gets its job.
        await bus.ensure_group(client, KEYS.draft_at("alive"), KEYS.group("drafter"))
        for name, home in (("r2", "gone"), ("r3", "alive")):
            await client.hset(KEYS.request(name), mapping={"round": "0", "status": "active", "id": name})
            key_list, args = bus.apply_round_call(KEYS, request_id=name, expected_round=0, fields={"round": "1"}, out_entries=[],
                                                  job_streams=[(KEYS.draft_at(home), KEYS.draft("general"))], payload=name.encode())
            assert await bus.apply_rounds(client, [(key_list, args)]) == ["applied"]
        assert not await client.exists(KEYS.draft_at("gone"))
        assert [f[b"m"] for _, f in await client.xrange(KEYS.draft("general"))] == [b"r2"]
        assert [f[b"m"] for _, f in await client.xrange(KEYS.draft_at("alive"))] == [b"r3"]
        await client.aclose()

    run(scenario())


def test_a_worker_registers_before_it_makes_its_own_stream(server):
    """A verifier made its own stream again (after a data loss, or after a coordinator moved it
    while the verifier was only slow) before registering it: one that died in between left a
    stream that writers still fed and no sweep knew of."""
    from cosine.workers.verifier import VerifierWorker

    async def scenario():
        client = await fresh(server)
        verifier = VerifierWorker(Config(), server, instance="v1")
        verifier.redis, verifier.fingerprint, verifier.cost_profile = client, "fp", (1.0, 0.1, 0.01, 0.0)
        verifier.liveness_fields = lambda: {}  # its model's figures: none loaded here
        seen = []
        beat = verifier._beat

        async def beat_and_look(key: str, ttl_ms: int) -> None:
            seen.append(await client.exists(KEYS.verify_at("v1")))
            await beat(key, ttl_ms)

        verifier._beat = beat_and_look
        await verifier._after_data_loss()
        assert seen and seen[0] == 0, "registered only after its stream was made"
        assert await client.sismember(KEYS.verifier_streams, "v1")
        groups = await client.xinfo_groups(KEYS.verify_at("v1"))
        assert [g["name"] for g in groups] == [KEYS.group("verifier").encode()]
        await client.aclose()

    run(scenario())


def test_a_verifier_resolves_contexts_by_reference_from_what_it_keeps_or_from_redis(server):
    """Items carry the context's tail and a digest of the rest: a verifier that kept nothing
    reads the committed tokens from the request's hash, drops an item whose request moved on,
    and after verifying keeps the context that the next round references."""
    from collections import OrderedDict

    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifiedItem, VerifyItem
    from cosine.wire.context import by_reference
    from cosine.workers.verifier import VerifierWorker

    def item(request_id: str, context: list[int]) -> VerifyItem:
        start, prefix_digest, tail = by_reference(context)
        assert start > 0
        return VerifyItem(request_id, 4, tail, Candidate(request_id, 4, [], [], [], [], []), SamplingParams(), "", context_start=start, context_digest=prefix_digest)

    async def scenario():
        client = await fresh(server)
        verifier = VerifierWorker(Config(), server)
        verifier.redis, verifier.contexts = client, OrderedDict()
        prompt = list(range(10, 110))
        for request_id, output in (("r1", [5, 6]), ("r2", [5, 6, 7])):
            state = RequestState(request_id, prompt, SamplingParams(), 8, (), (2,), ["general"], round=4, output_ids=output)
            await client.hset(KEYS.request(request_id), mapping=state_to_fields(state))
        context = prompt + [5, 6]
        # r2 moved on (one more output token than its item's context): stale, dropped.
        resolved = await verifier._whole_contexts([item("r1", context), item("r2", context)])
        assert [(i.request_id, i.context, i.context_start) for i in resolved] == [("r1", context, 0)]
        verifier._remember(resolved, [VerifiedItem("r1", 4, [7], 8, 1)])
        await client.delete(KEYS.request("r1"))  # from now on only what the verifier kept
        again = await verifier._whole_contexts([item("r1", context + [7, 8])])
        assert [i.context for i in again] == [context + [7, 8]]
        await client.aclose()

    run(scenario())


def test_a_backlogged_or_late_home_drafter_lets_its_requests_go(server):
    """Drafter affinity sends a request's rounds to the drafter that drafted its last one; a home
    with a backlog while another drafter of the expert idles, or one that missed the drafting
    deadline, held its requests: they waited behind it (a stuck one: a deadline every round)."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.coordinator.forming import DRAFTER_BACKLOG

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis = client
        coordinator.drafter_ids = {"a", "b"}
        coordinator.drafter_expert = {"a": "general", "b": "general"}
        coordinator.records.of("r1").draft_homes = {"general": "a"}
        group = KEYS.group("drafter")
        await bus.ensure_group(client, KEYS.draft_at("a"), group)
        for _ in range(DRAFTER_BACKLOG - 1):
            await client.xadd(KEYS.draft_at("a"), {"m": b"job"})
        coordinator.drafter_queued = await coordinator._drafter_queues()
        assert coordinator.drafter_queued == {"a": (DRAFTER_BACKLOG - 1, 0)}
        assert coordinator._draft_stream("r1", "general") == (KEYS.draft_at("a"), KEYS.draft("general"))  # a short queue: it stays
        await client.xadd(KEYS.draft_at("a"), {"m": b"job"})
        coordinator.drafter_queued = await coordinator._drafter_queues()
        assert coordinator._draft_stream("r1", "general") == KEYS.draft("general")  # a backlog, b idle: any drafter
        await bus.ensure_group(client, KEYS.draft_at("b"), group)
        await client.xadd(KEYS.draft_at("b"), {"m": b"job"})
        await client.xreadgroup(group, "b", {KEYS.draft_at("b"): ">"})  # b has one in hand
        coordinator.drafter_queued = await coordinator._drafter_queues()
        assert coordinator._draft_stream("r1", "general") == (KEYS.draft_at("a"), KEYS.draft("general"))  # nobody idle: it stays
        # A round of r1 past the drafting deadline goes on without drafts, and r1's next round
        # goes to any drafter, not back to the late one.
        state = RequestState("r1", [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=3, output_ids=[5, 6, 7])
        await client.hset(KEYS.request("r1"), mapping=state_to_fields(state))
        await client.zadd(KEYS.rounds, {"r1": 1})
        await coordinator._fallback_overdue_rounds()
        assert await client.xlen(KEYS.candidates) == 1
        assert coordinator._draft_stream("r1", "general") == KEYS.draft("general")
        await client.aclose()

    run(scenario())


def test_every_heartbeat_registers_a_workers_own_stream(server):
    """A coordinator that took a slow drafter or verifier for gone moves its stream and drops its
    registration; the worker makes its stream again, but its registration came only at start-up
    (or after a data loss): a live worker's stream was then never trimmed or moved again."""
    from cosine.workers.drafter import DrafterWorker
    from cosine.workers.verifier import VerifierWorker

    async def scenario():
        client = await fresh(server)
        drafter = DrafterWorker(Config(), server, "general", instance="d1")
        verifier = VerifierWorker(Config(), server, instance="v1")
        verifier.liveness_fields = lambda: {}  # its model's figures: none loaded here
        for worker in (drafter, verifier):
            worker.redis = client
            await worker._beat(KEYS.live(worker.role, worker.instance), 3000)
        assert await client.hget(KEYS.drafter_streams, "d1") == b"general"
        assert await client.sismember(KEYS.verifier_streams, "v1")
        await client.hdel(KEYS.drafter_streams, "d1")  # what the move of a "gone" stream does
        await client.srem(KEYS.verifier_streams, "v1")
        for worker in (drafter, verifier):
            await worker._beat(KEYS.live(worker.role, worker.instance), 3000)
        assert await client.hget(KEYS.drafter_streams, "d1") == b"general"
        assert await client.sismember(KEYS.verifier_streams, "v1")
        await client.aclose()

    run(scenario())


def test_a_drafter_makes_its_own_stream_once_registered(server):
    """A drafter made its own stream before loading its model: one that died while loading left a
    stream no coordinator knew of (not registered), never trimmed or removed."""
    from cosine.workers.drafter import DrafterWorker

    async def scenario():
        client = await fresh(server)
        drafter = DrafterWorker(Config(), server, "general", instance="d1")
        drafter.redis = client
        await drafter._prepare_server()  # what runs before the model is loaded
        assert await client.exists(KEYS.draft("general")) and not await client.exists(KEYS.draft_at("d1"))
        await drafter.on_connect()
        await drafter._make_own_streams()
        assert await client.hget(KEYS.drafter_streams, "d1") == b"general"
        groups = await client.xinfo_groups(KEYS.draft_at("d1"))
        assert [g["name"] for g in groups] == [KEYS.group("drafter").encode()]
        await client.aclose()

    run(scenario())


def test_a_named_data_directory_keeps_its_mode_and_the_servers_files_are_private(tmp_path):
    """Regression: the embedded server made a directory the user named 0700. It now leaves that
    directory's mode alone and keeps what it writes there (its config with the password, its
    append-only file of prompts and outputs, its log) to the owner; a directory it makes is 0700."""
    import stat

    named = tmp_path / "named"
    named.mkdir()
    named.chmod(0o755)
    (named / "valkey.conf").write_text("# an earlier start's\n")
    (named / "valkey.conf").chmod(0o644)
    made = tmp_path / "made" / "data"
    for directory in (named, made):
        embedded = EmbeddedRedis(directory)
        embedded.start()
        try:
            run(_write_one(embedded.url))
        finally:
            embedded.stop()
    assert stat.S_IMODE(named.stat().st_mode) == 0o755 and stat.S_IMODE(made.stat().st_mode) == 0o700
    for directory in (named, made):
        written = [p for p in directory.rglob("*")]
        assert any(p.name == "valkey.conf" for p in written) and any("appendonly" in p.name for p in written), written
        for path in written:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, (path, oct(mode))


async def _write_one(url: str) -> None:
    client = aioredis.Redis.from_url(url)
    await client.set("k", "v")
    await client.aclose()


def test_no_worker_gateway_or_client_user_can_load_replace_delete_flush_or_restore_functions(server):
    """Regression (review): every role user had +@scripting, so a drafter's user loaded a forged
    library, and the coordinator's next call of the round-applying function wrote a forged final
    into another request's output. Now only an administrator loads the library (``cosine
    setup``): every worker, gateway and client user is refused FUNCTION LOAD, DELETE, FLUSH and
    RESTORE (and EVAL, SCRIPT LOAD); the workers' users still call the functions and see the
    library; the library on the server stays the one loaded."""
    from urllib.parse import urlsplit

    import redis as sync_redis

    from cosine.acl import ROLE_KEYS, acl_setuser_rules, client_rules, gateway_rules, role_rules, worker_rules

    run(fresh(server))
    admin = sync_redis.Redis.from_url(server)
    address = urlsplit(server).netloc.rpartition("@")[2]
    dump = admin.function_dump()
    forged = bus._LIBRARY_CODE.replace("local function apply_round(keys, args)",
                                       "local function apply_round(keys, args)\n  redis.call('XADD', keys[2], '*', 'type', 'final', 'text', 'forged')")
    assert forged != bus._LIBRARY_CODE
    users = {"worker": worker_rules(), **{f"role-{r}": role_rules(r) for r in ROLE_KEYS}, "gateway": gateway_rules(), "client": client_rules()}
    for name, rules in users.items():
        admin.execute_command("ACL", "SETUSER", name, *acl_setuser_rules("pw", rules))
        user = sync_redis.Redis.from_url(f"redis://{name}:pw@{address}")
        attempts = {
            "load": lambda user=user: user.function_load(forged, replace=True),
            "load new": lambda user=user: user.function_load(forged.replace(bus.LIBRARY, "cosine_forged")),
            "delete": lambda user=user: user.function_delete(bus.LIBRARY),
            "flush": lambda user=user: user.function_flush(),
            "restore": lambda user=user: user.function_restore(dump, "REPLACE"),
            "eval": lambda user=user: user.eval("return 1", 0),
            "script load": lambda user=user: user.script_load("return 1"),
        }
        for what, attempt in attempts.items():
            with pytest.raises(sync_redis.exceptions.NoPermissionError):
                attempt()
                pytest.fail(f"{name} could {what}")
        if name not in ("gateway", "client"):  # workers call the functions and check the library is there
            assert run(bus.library_loaded(aioredis.Redis.from_url(f"redis://{name}:pw@{address}")))
    [entry] = admin.function_list(library=bus.LIBRARY, withcode=True)
    code = dict(zip(entry[::2], entry[1::2]))[b"library_code"] if isinstance(entry, list) else entry[b"library_code"]
    assert code.decode() == bus._LIBRARY_CODE
    # The coordinator's user applies a round through the real function.
    coordinator = aioredis.Redis.from_url(f"redis://role-coordinator:pw@{address}")
    call = bus.apply_round_call(KEYS, request_id="nobody", expected_round=0, fields={"status": "finished"},
                                out_entries=[{"type": "final", "finish_reason": "stop"}], ttl_s=60)
    assert run(bus.apply_rounds(coordinator, [call])) != ["applied"]  # no such request: nothing written
    assert admin.xlen(KEYS.out("nobody")) == 0
    # Regression: the functions read the server's clock (TIME), which no role's user could run
    # ("ACL failure in script"): every admission and every round with a next job failed for
    # workers connected as their role's users (what `cosine serve` does).
    run(bus.ensure_group(aioredis.Redis.from_url(server), KEYS.requests, GROUP))
    entry_id = admin.xadd(KEYS.requests, {"id": "timed"})
    admin.xreadgroup(GROUP, "test", {KEYS.requests: ">"})

    async def timed() -> tuple[str, list[str]]:
        router = aioredis.Redis.from_url(f"redis://role-router:pw@{address}")
        coordinator = aioredis.Redis.from_url(f"redis://role-coordinator:pw@{address}")
        admitted = await bus.admit_request(router, KEYS, group=GROUP, entry_id=entry_id, request_id="timed", deadline_ms=2**42, ttl_s=60,
                                           fields={"round": "0", "status": "active", "id": "timed"}, job_streams=[KEYS.candidates],
                                           payload=b"job", refusal={"type": "final"})
        call = bus.apply_round_call(KEYS, request_id="timed", expected_round=0, fields={"round": "1"}, out_entries=[],
                                    job_streams=[KEYS.candidates], payload=b"next")
        applied = await bus.apply_rounds(coordinator, [call])
        await router.aclose()
        await coordinator.aclose()
        return admitted, applied

    assert run(timed()) == ("created", ["applied"])
    assert admin.zscore(KEYS.rounds, "timed") is not None


def test_a_worker_refuses_to_start_without_its_library_and_names_cosine_setup(server):
    from cosine.workers.base import StartupError
    from cosine.workers.fusion import FusionWorker

    async def scenario():
        client = aioredis.Redis.from_url(server)
        await client.flushall()
        await client.function_flush()
        assert not await bus.library_loaded(client)
        with pytest.raises(StartupError, match="cosine setup"):
            await FusionWorker(Config(), server).run(signals=False)
        assert bus.setup_library(server) == [bus.LIBRARY]
        assert await bus.library_loaded(client)
        await client.aclose()

    run(scenario())


def test_serve_on_a_server_of_others_loads_the_library_only_where_its_url_may(server):
    """`cosine serve --redis-url`: an administrator's URL loads the library; a worker user's URL
    may not, and serve stops at once, naming `cosine setup`, unless the library is there."""
    from urllib.parse import urlsplit

    import redis as sync_redis

    from cosine.acl import acl_setuser_rules, worker_rules
    from cosine.serve import Supervisor, SupervisorError

    admin = sync_redis.Redis.from_url(server)
    admin.function_flush()
    admin.execute_command("ACL", "SETUSER", "serve-worker", *acl_setuser_rules("pw", worker_rules()))
    worker_url = f"redis://serve-worker:pw@{urlsplit(server).netloc.rpartition('@')[2]}"
    with pytest.raises(SupervisorError, match="cosine setup"):
        Supervisor._library_on_a_server_of_others(worker_url)
    Supervisor._library_on_a_server_of_others(server)
    assert run(bus.library_loaded(aioredis.Redis.from_url(worker_url)))
    Supervisor._library_on_a_server_of_others(worker_url)  # there now
    with pytest.raises(SupervisorError, match="127.0.0.1:1"):
        Supervisor._library_on_a_server_of_others("redis://127.0.0.1:1")


def _future_schema(fields: dict) -> dict:
    import msgpack

    from cosine.wire import PAYLOAD_FIELD, SCHEMA_VERSION

    return {PAYLOAD_FIELD: msgpack.packb({**msgpack.unpackb(fields[PAYLOAD_FIELD]), "v": SCHEMA_VERSION + 1})}


def test_a_verified_result_that_cannot_be_applied_is_verified_again_once_then_ends(server):
    """A verified entry the coordinator dead-letters (here another schema version's) does not
    strand its rounds: each current one is sent to verification again, without drafts; when
    that fails too, the request ends with one internal final naming the cause. Rounds already
    past are left alone."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifiedBatch, VerifiedItem, decode, encode
    from cosine.workers.coordinator import Coordinator

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis, coordinator.tokenizer = client, None
        for request_id, round_ in (("r1", 3), ("moved-on", 7)):
            state = RequestState(request_id, [1, 2], SamplingParams(), 8, (), (2,), ["general"], round=round_, deadline_ms=2**42)
            await client.hset(KEYS.request(request_id), mapping=state_to_fields(state))
        items = [VerifiedItem("r1", 3, [5], 6, 1), VerifiedItem("moved-on", 6, [5], 6, 1)]
        entry = (b"1-0", _future_schema(encode(VerifiedBatch("b1", "v1", items, 2, 1.0))))
        await coordinator.reject(KEYS.verified, entry, "unknown schema version 2")
        again = [decode(f, Candidate) for _, f in await client.xrange(KEYS.candidates)]
        assert [(c.request_id, c.round, c.tokens) for c in again] == [("r1", 3, [])]
        assert not await client.exists(KEYS.out("r1"))
        await coordinator.reject(KEYS.verified, entry, "unknown schema version 2")  # the second time: it ends
        finals = [f for _, f in await client.xrange(KEYS.out("r1")) if f[b"type"] == b"final"]
        assert [(f[b"error_code"], b"unknown schema version 2" in f[b"error"]) for f in finals] == [(b"internal", True)]
        assert await client.xlen(KEYS.candidates) == 1 and not await client.exists(KEYS.out("moved-on"))
        await client.aclose()

    run(scenario())


def test_an_unreadable_verification_batch_ends_the_rounds_it_names(server):
    """A verify entry that cannot be decoded (another schema version, over the size cap) is
    dead-lettered with an error result for every round it names: the coordinator ends those
    requests (internal, naming the cause) instead of leaving them to their deadline."""
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifiedBatch, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.verifier import VerifierWorker

    async def scenario():
        client = await fresh(server)
        verifier = VerifierWorker(Config(), server)
        verifier.redis, verifier.fingerprint = client, "fp"
        items = [VerifyItem(r, 2, [1, 2], Candidate(r, 2, [], [], [], [], []), SamplingParams(), "fp") for r in ("r1", "{t}r2")]
        await verifier.reject(KEYS.verify, (b"5-0", _future_schema(encode(VerifyBatch("b1", items)))), "unknown schema version 2")
        results = [decode(f, VerifiedBatch) for _, f in await client.xrange(KEYS.verified)]
        assert [[(i.request_id, i.round, i.error_code) for i in b.items] for b in results] == [[("r1", 2, "internal"), ("{t}r2", 2, "internal")]]
        assert all("unknown schema version 2" in i.error for i in results[0].items)
        await client.aclose()

    run(scenario())


def test_a_draining_worker_gives_back_what_it_read_and_did_not_start(server):
    """A drain that cuts a blocking read short leaves what the server delivered pending for the
    draining worker (here read under its name beforehand): it gives those entries back, a fresh
    entry each (no delivery counted), which another worker reads at once; an own stream's go to
    the shared stream; entries it holds on purpose and others' entries stay as they are."""
    from cosine.workers.base import StageWorker

    shared, own = f"{KEYS.prefix}shared", f"{KEYS.prefix}own"

    class Draining(StageWorker):
        role = "draining"

        def input_streams(self):
            return [own, shared]

        def hand_back_to(self, stream):
            return shared

        def held(self):
            return {shared: [kept]}

        async def handle(self, stream, entries):
            raise AssertionError("a draining worker started an entry")

    async def scenario():
        nonlocal kept
        client = await fresh(server)
        worker = Draining(Config(pipeline=PipelineConfig(block_ms=50)), server)
        for stream in (own, shared):
            await bus.ensure_group(client, stream, worker.group)
        kept = await client.xadd(shared, {"m": b"pooled"})
        for body in (b"a", b"b"):
            await client.xadd(shared, {"m": body})
        await client.xadd(own, {"m": b"c"})
        await client.xreadgroup(worker.group, worker.instance, {shared: ">", own: ">"}, count=10)
        other_worker = await client.xreadgroup(worker.group, "other", {shared: ">"}, count=1)  # nothing left unread
        assert other_worker == []
        await client.xadd(shared, {"m": b"d"})
        await client.xreadgroup(worker.group, "other", {shared: ">"}, count=1)  # the other worker's
        worker.stopping.set()
        await asyncio.wait_for(worker.run(), 30)
        taken = await client.xreadgroup(worker.group, "other", {shared: ">"}, count=10, block=1000)
        assert sorted(f[b"m"] for _, items in taken for _, f in items) == [b"a", b"b", b"c"]
        mine = await client.xpending_range(shared, worker.group, "-", "+", 10, consumername=worker.instance)
        assert [m["message_id"] for m in mine] == [kept]  # the held one stays its own
        others = await client.xpending_range(shared, worker.group, "-", "+", 10, consumername="other")
        assert len(others) == 4 and all(m["times_delivered"] == 1 for m in others)
        assert (await client.xpending(own, worker.group))["pending"] == 0
        await client.aclose()

    kept = None
    run(scenario())


def test_a_worker_that_was_frozen_does_not_take_back_what_another_took_over(server):
    """A worker frozen past claim_idle_ms (SIGSTOP) finds the entries it held taken over by
    another worker: it lets go of them (drops them from its pool) instead of claiming them back
    and handling them a second time; those still its own are renewed."""
    from cosine.workers.base import StageWorker

    stream = f"{KEYS.prefix}held"

    class Holding(StageWorker):
        role = "holding"

        def input_streams(self):
            return [stream]

        def held(self):
            return {stream: list(pool)}

        def let_go(self, stream_, entry_ids):
            pool.difference_update(entry_ids)

    async def scenario():
        client = await fresh(server)
        worker = Holding(Config(), server)
        worker.redis = client
        await bus.ensure_group(client, stream, worker.group)
        ids = [await client.xadd(stream, {"m": b"x"}, id=f"5-{n}") for n in (8, 9, 10)]  # "5-10" < "5-9" as bytes
        await client.xreadgroup(worker.group, worker.instance, {stream: ">"}, count=3)
        pool.update(ids)
        await client.xclaim(stream, worker.group, "other", 0, [ids[0]], justid=True)  # taken over meanwhile
        await client.xack(stream, worker.group, ids[1])  # and finished by the other
        await worker._renew_held()
        assert pool == {ids[2]}
        owners = {p["message_id"]: p["consumer"] for p in await client.xpending_range(stream, worker.group, "-", "+", 10)}
        assert owners == {ids[0]: b"other", ids[2]: worker.instance.encode()}
        await client.aclose()

    pool: set = set()
    run(scenario())


def test_a_coordinator_applies_a_next_round_from_the_state_it_left(server, demo_target):
    """The coordinator keeps the state each round it applied left, and applies the request's
    next round from it without reading the request's hash (a read per round that grew with the
    context); the apply's compare-and-set still sees what others did meanwhile: a cancellation
    flagged since ends the request, a round applied elsewhere is not applied again."""
    from cosine.core.rounds import RequestState
    from cosine.core.sampling import SamplingParams
    from cosine.wire import VerifiedBatch, VerifiedItem, encode
    from cosine.workers.coordinator import Coordinator

    async def hgetalls(client) -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    async def scenario():
        client = await fresh(server)
        coordinator = Coordinator(Config(), server)
        coordinator.redis = client
        await coordinator.setup()
        own = KEYS.verified_at(coordinator.instance)  # results of batches it formed come back here
        await bus.ensure_group(client, own, coordinator.group)

        async def verified(request_id: str, round_: int) -> None:
            batch = VerifiedBatch(f"b-{request_id}-{round_}", "v1", [VerifiedItem(request_id, round_, [], 300 + round_, 0)], 1, 1.0)
            entry_id = await client.xadd(own, encode(batch))
            await client.xreadgroup(coordinator.group, coordinator.instance, {own: ">"})
            await coordinator._apply_verified(entry_id, batch, own)

        def out_tokens(entries) -> list[int]:
            import json

            return [t for _, f in entries if f[b"type"] == b"tokens" for t in json.loads(f[b"token_ids"])]

        for request_id in ("kept", "cancelled", "elsewhere"):
            state = RequestState(request_id, [1, 2, 3], SamplingParams(), 32, (), (2,), [], round=1, deadline_ms=2**42)
            await client.hset(KEYS.request(request_id), mapping=state_to_fields(state))
        separate_reads = []
        read_states = coordinator._states_and_load

        async def counted(request_ids):
            separate_reads.append(list(request_ids))
            return await read_states(request_ids)

        coordinator._states_and_load = counted
        await verified("kept", 1)
        reads = await hgetalls(client)
        await verified("kept", 2)  # from the state round 1 left: no read, the load read with the application
        assert await hgetalls(client) == reads
        assert separate_reads == [["kept"]]
        assert coordinator.records.get("kept").state.round == 3
        assert out_tokens(await client.xrange(KEYS.out("kept"))) == [301, 302]

        await verified("cancelled", 1)
        assert await bus.flag_cancel(client, KEYS, "cancelled") == "flagged"
        await verified("cancelled", 2)
        finals = [f for _, f in await client.xrange(KEYS.out("cancelled")) if f[b"type"] == b"final"]
        assert [f[b"finish_reason"] for f in finals] == [b"cancelled"]

        await verified("elsewhere", 1)
        await client.hset(KEYS.request("elsewhere"), "round", "3")  # another coordinator applied round 2
        await verified("elsewhere", 2)
        assert out_tokens(await client.xrange(KEYS.out("elsewhere"))) == [301]
        assert coordinator.records.get("elsewhere").state is None
        assert (await client.xpending(own, coordinator.group))["pending"] == 0  # each acknowledged where it was read
        await client.aclose()

    run(scenario())


def test_a_result_goes_back_to_the_coordinator_that_formed_its_batch(server):
    """A verifier writes a batch's result to the own stream of the coordinator named in it
    (which applies it with what it remembers of the batch), to the shared stream when that
    coordinator's stream is gone; a gone coordinator's stream is moved to the shared one by
    another coordinator's sweep, its unapplied results with it."""
    from cosine.core.sampling import SamplingParams
    from cosine.wire import Candidate, VerifiedBatch, VerifyBatch, VerifyItem, decode, encode
    from cosine.workers.coordinator import Coordinator
    from cosine.workers.verifier import VerifierWorker

    async def scenario():
        client = await fresh(server)
        verifier = VerifierWorker(Config(), server)
        verifier.redis, verifier.fingerprint = client, "fp"
        coordinator = Coordinator(Config(), server, instance="c-live")
        coordinator.redis = client
        await coordinator._beat(KEYS.live("coordinator", "c-live"), 60_000)
        for instance in ("c-live", "c-dead"):
            await client.sadd(KEYS.coordinator_streams, instance)
            await bus.ensure_group(client, KEYS.verified_at(instance), coordinator.group)

        async def failed_round(request_id: str, reply_to: str) -> None:
            item = VerifyItem(request_id, 2, [1, 2], Candidate(request_id, 2, [], [], [], [], []), SamplingParams(), "fp")
            await verifier.reject(KEYS.verify, (b"5-0", encode(VerifyBatch(f"b-{request_id}", [item], reply_to))), "kept failing")

        def request_ids(entries) -> list[str]:
            return [i.request_id for _, f in entries for i in decode(f, VerifiedBatch).items]

        await failed_round("to-live", "c-live")
        await failed_round("to-dead", "c-dead")
        await failed_round("to-gone", "c-gone")  # its stream is gone already
        await failed_round("to-nobody", "")
        assert request_ids(await client.xrange(KEYS.verified_at("c-live"))) == ["to-live"]
        assert request_ids(await client.xrange(KEYS.verified_at("c-dead"))) == ["to-dead"]
        assert request_ids(await client.xrange(KEYS.verified)) == ["to-gone", "to-nobody"]
        assert not await client.exists(KEYS.verified_at("c-gone"))

        await coordinator._move_gone_coordinator_streams()  # c-dead has no roster entry
        assert request_ids(await client.xrange(KEYS.verified)) == ["to-gone", "to-nobody", "to-dead"]
        assert not await client.exists(KEYS.verified_at("c-dead"))
        assert await client.smembers(KEYS.coordinator_streams) == {b"c-live"}
        assert request_ids(await client.xrange(KEYS.verified_at("c-live"))) == ["to-live"]
        await client.aclose()

    run(scenario())


def test_a_frozen_server_times_out_a_call_and_a_pipeline_and_a_thawed_one_answers_again():
    """The client's time-out bounds each wait for the server (not each reply of a pipeline):
    a call, and a pipeline, to a frozen server raise ``TimeoutError`` after it; once the server
    runs again the same client answers."""
    import os
    import signal

    from redis.exceptions import TimeoutError as RedisTimeoutError

    embedded = EmbeddedRedis(persistence=False)
    url = embedded.start()

    async def scenario():
        client = bus.connect(url, timeout_s=1.0)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(20):
                pipe.set(f"k{i}", i)
                pipe.get(f"k{i}")
            assert (await pipe.execute())[1::2] == [str(i).encode() for i in range(20)]
        os.kill(embedded.pid, signal.SIGSTOP)
        try:
            for call in (lambda: client.get("k1"), lambda: client.pipeline(transaction=False).get("k1").get("k2").execute()):
                began = time.monotonic()
                with pytest.raises(RedisTimeoutError):
                    await call()
                assert 0.9 < time.monotonic() - began < 5
        finally:
            os.kill(embedded.pid, signal.SIGCONT)
        assert await client.get("k3") == b"3"
        await client.aclose()

    try:
        run(scenario())
    finally:
        embedded.stop()
