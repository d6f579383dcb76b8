"""SIGKILL each role while it holds a pending entry: every request still finishes with the
reference tokens, the entries were reclaimed, and nothing is left pending."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import cache_dir
from tests.integration.harness import ROOT, Pipeline, final_of, read_output, submit, write_config

pytestmark = [pytest.mark.model, pytest.mark.slow]
ROLES = ("router", "drafter", "fusion", "coordinator", "verifier")
INPUTS = {
    "router": ["cosine:requests"],
    "drafter": ["cosine:draft:general"],
    "fusion": ["cosine:drafts"],
    "coordinator": ["cosine:candidates", "cosine:verified"],
    "verifier": ["cosine:verify"],
}
ALL_STREAMS = ["cosine:requests", "cosine:draft:general", "cosine:drafts", "cosine:candidates", "cosine:verify", "cosine:verified"]
MAX_TOKENS = 12


def pending_for(client, streams: list[str], pid: int) -> int:
    total = 0
    for stream in streams:
        if not client.exists(stream):
            continue
        for group in client.xinfo_groups(stream):
            for consumer in client.xinfo_consumers(stream, group["name"]):
                if f"-{pid}-" in consumer["name"].decode():
                    total += consumer["pending"]
    return total


def pending_total(client) -> int:
    streams = ALL_STREAMS + [key.decode() for key in client.keys("cosine:verified:at:*")]  # coordinators' own result streams
    return sum(int(g["pending"]) for s in streams if client.exists(s) for g in client.xinfo_groups(s))


def start_role(pipeline: Pipeline, role: str):
    return pipeline.start(role, "--expert", "general") if role == "drafter" else pipeline.start(role)


@pytest.fixture()
def server():
    from cosine.embedded import EmbeddedRedis

    embedded = EmbeddedRedis()
    yield embedded.start()
    embedded.stop()


@pytest.mark.parametrize("role", ROLES)
def test_killed_worker_loses_nothing(role, server, tmp_path, demo_target, greedy_references):
    drafters = [{"name": "early-exit-2", "kind": "early-exit", "layers": 2, "expert": "general"}]
    # A long BLOCK keeps a stopped worker's read open on the server, so entries submitted just
    # after SIGSTOP are delivered to it and sit pending there, as in a crash mid-round. Fusion
    # blocks for a quarter of its deadline at most (to sweep late rounds), so its deadline is
    # long here: with one drafter every round is complete at once and never waits for it.
    pipeline_options = {"block_ms": 5000, "fusion_deadline_ms": 20_000}
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=demo_target.source, drafters=drafters, pipeline=pipeline_options)
    pipeline = Pipeline(server, config)
    try:
        victim = None
        for other in ROLES:
            process = start_role(pipeline, other)
            victim = process if other == role else victim
        for other in ROLES:
            pipeline.wait_live(other, 1)
        client = pipeline.client()
        time.sleep(1.0)  # every worker is idle in its blocking read
        texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
        ids: list[str] = []
        deadline = time.monotonic() + 120
        while True:
            # Stopped between two reads (in a tick), the victim has no read open and is delivered
            # nothing: let it run back into its read and stop it again, with one more request.
            victim.send_signal(signal.SIGSTOP)
            first = len(ids)
            count = 4 if not ids else 1
            ids += [submit(client, id=f"f{i}", messages=json.dumps([{"role": "user", "content": texts[i % len(texts)]}]), max_tokens=MAX_TOKENS) for i in range(first, first + count)]
            attempt_ends = time.monotonic() + 20
            while not pending_for(client, INPUTS[role], victim.pid) and time.monotonic() < attempt_ends:
                time.sleep(0.05)
            if pending_for(client, INPUTS[role], victim.pid):
                break
            assert time.monotonic() < deadline, f"the stopped {role} never held a pending entry\n{pipeline.log_tails()}"
            victim.send_signal(signal.SIGCONT)
            time.sleep(1.5)
        pipeline.kill(victim)
        start_role(pipeline, role)
        for index, request_id in enumerate(ids):
            final = final_of(read_output(client, request_id, timeout=240))
            tokens = json.loads(final["token_ids"])
            reference = greedy_references[index % len(texts)]
            assert tokens == reference[: len(tokens)] and len(tokens) == MAX_TOKENS, (final, reference[:MAX_TOKENS])
            outputs = client.xrange(f"cosine:out:{request_id}")
            assert sum(1 for _, f in outputs if f[b"type"] == b"final") == 1
        assert int(client.hget("cosine:stats", "reclaimed") or 0) >= 1
        deadline = time.monotonic() + 30
        while pending_total(client):
            assert time.monotonic() < deadline, "entries left pending"
            time.sleep(0.2)
    finally:
        pipeline.stop()
