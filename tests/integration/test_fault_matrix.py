"""The fault matrix: for each role, and for the Redis server, the faults a pipeline meets in
production besides a clean SIGKILL, one after another while 100+ requests are in flight.

Cells, in order: for each role (two workers of each run, started as a user starts them) a
SIGKILL of one worker (replaced at once, as the supervisor would); a SIGSTOP of one for 20 s,
then SIGCONT; one worker replaced by one whose whole process's wall clock runs 10 s off (ahead
and behind in turn), for a while, then replaced back (the replacements also drain their
predecessors with SIGTERM). Garbage: an undecodable entry on every internal stream, and a
result of another schema version for a request's current round (its round is verified again).
For the Redis server (AOF, fsync always): SIGKILL and a restart from its AOF; SIGSTOP for 20 s;
a graceful restart.

The load: a closed loop of ``IN_FLIGHT`` requests from two tenants (the default one and
``acme``), half greedy, half seeded sampled, ``MAX_TOKENS`` tokens each, on a test-only target
whose greedy choice is never a near tie (``harness.make_chain_model``): every greedy output is
checked exactly against the target's own greedy decoding. Outside the Redis cells every request
must end ``stop`` or ``length``; in the Redis cells every error final is listed with its cause.
No request may be lost or answered twice (one final, the streamed pieces join to it); nothing
is left pending at the end, and the garbage cell's entries are all that is dead-lettered.

The matrix (fault x role -> requests, errors, duplicates, worst stall) is printed (``-s``) and
written to ``bench/results/fault-matrix-latest.json``; docs/benchmarks.md shows it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import msgpack
import pytest
import redis

from cosine.core.protocol import eos_token_ids, prompt_token_ids
from cosine.embedded import EmbeddedRedis
from cosine.tenants import TenantBounds, add_tenant
from cosine.wire import SCHEMA_VERSION, Keys
from cosine.wire.keys import qualify
from tests.conftest import cache_dir
from tests.integration.harness import ROOT, Pipeline, greedy_chain, make_chain_model, skewed, write_config

pytestmark = [pytest.mark.slow, pytest.mark.model]

ROLES = ("router", "coordinator", "fusion", "drafter", "verifier")
PER_ROLE = 2
IN_FLIGHT = 104
MAX_TOKENS = 32
SAMPLED_SHARE = 0.5
TENANTS = ("default", "acme")
STOP_S = 20.0
SKEW_S = 10.0
SKEWED_FOR_S = 8.0
# Shorter than the defaults so that the run fits CI; the report gives each stall against them.
PIPELINE = {"claim_idle_ms": 4000, "heartbeat_ms": 500, "block_ms": 500, "drafter_deadline_ms": 1000}
SETTLE_S = PIPELINE["claim_idle_ms"] / 1000 + 2.0  # after a fault is lifted: what it held is taken over meanwhile
SEED = 20261206
RESULT_PATH = ROOT / "bench" / "results" / "fault-matrix-latest.json"
KEYS = Keys()
TEXTS = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())


@dataclass
class Sent:
    request_id: str
    tenant: str
    prompt_index: int
    greedy: bool
    submitted_at: float
    arrivals: list[float] = field(default_factory=list)
    entries: list[dict] = field(default_factory=list)
    cursor: bytes = b"0-0"

    @property
    def done(self) -> bool:
        return bool(self.entries) and self.entries[-1]["type"] == "final"

    @property
    def stream(self) -> str:
        return KEYS.out(qualify(self.tenant, self.request_id))


class Load(threading.Thread):
    """Keeps ``IN_FLIGHT`` requests in flight and reads their outputs, through every outage."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.rng = random.Random(SEED)
        self.sent: list[Sent] = []
        self.open: dict[str, Sent] = {}
        self.submitting = True
        self.stopped = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        began = time.monotonic()
        while not self.stopped.is_set():
            try:
                self._top_up(began)
                self._read(began)
            except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError) as error:
                self.errors.append(f"{time.monotonic() - began:.1f}s {type(error).__name__}")
                time.sleep(0.2)

    def _top_up(self, began: float) -> None:
        while self.submitting and len(self.open) < IN_FLIGHT:
            n = len(self.sent)
            tenant, index, greedy = TENANTS[n % 2], self.rng.randrange(len(TEXTS)), self.rng.random() >= SAMPLED_SHARE
            fields = {"id": f"m{n}", "prompt": TEXTS[index], "max_tokens": str(MAX_TOKENS)}
            if not greedy:
                fields.update(temperature="0.8", top_p="0.95", seed=str(self.rng.randrange(2**31)))
            self.client.xadd(KEYS.requests_of(tenant), fields)
            request = Sent(fields["id"], tenant, index, greedy, time.monotonic() - began)
            self.sent.append(request)
            self.open[request.request_id] = request

    def _read(self, began: float) -> None:
        if not self.open:
            time.sleep(0.1)
            return
        requests = list(self.open.values())
        reply = self.client.xread({r.stream: r.cursor for r in requests}, block=200)
        now = time.monotonic() - began
        by_stream = {r.stream: r for r in requests}
        for stream, items in reply or []:
            request = by_stream[stream.decode()]
            for entry_id, fields in items:
                request.cursor = entry_id
                request.arrivals.append(now)
                request.entries.append({k.decode(): v.decode() for k, v in fields.items()})
            if request.done:
                del self.open[request.request_id]


@dataclass
class Cell:
    fault: str
    target: str
    began: float = 0.0
    ended: float = 0.0
    detail: str = ""


class Cluster:
    """Two workers of every role as separate processes; replaced as a supervisor would."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.workers: dict[str, list] = {role: [] for role in ROLES}

    def start(self, role: str, env: dict | None = None):
        process = self.pipeline.start(role, *(["--expert", "general"] if role == "drafter" else []), env=env)
        self.workers[role].append(process)
        return process

    def replace(self, role: str, victim, sig: int, env: dict | None = None):
        victim.send_signal(sig)
        victim.wait(60)
        self.workers[role].remove(victim)
        process = self.start(role, env)
        self.pipeline.wait_live(role, PER_ROLE, timeout=120)
        return process


def inject_garbage(client: redis.Redis, load: Load) -> int:
    """An undecodable entry on every internal stream, and a result of a future schema version
    for an open request's current round; returns how many entries were written."""
    streams = [KEYS.drafts, KEYS.candidates, KEYS.verify, KEYS.verified, KEYS.draft("general")]
    for stream in streams:
        client.xadd(stream, {"m": b"\xc1 not msgpack"})
    for request in list(load.open.values()):
        request_id = qualify(request.tenant, request.request_id)
        round_ = client.hget(KEYS.request(request_id), "round")
        if round_ is not None:
            item = {"request_id": request_id, "round": int(round_), "accepted_tokens": [], "next_token": 5, "draft_tokens": 0}
            body = {"batch_id": "garbage", "verifier": "nobody", "items": [item], "batch_size": 1, "forward_ms": 1.0}
            client.xadd(KEYS.verified, {"m": msgpack.packb({"v": SCHEMA_VERSION + 1, "kind": "verified_batch", "body": body})})
            return len(streams) + 1
    return len(streams)


def run_cell(cell: Cell, cluster: Cluster, server: EmbeddedRedis, clock, load: Load) -> None:
    cell.began = clock()
    if cell.fault == "garbage":
        cell.detail = f"{inject_garbage(load.client, load)} entries"
    elif cell.target == "redis":
        if cell.fault == "SIGKILL":
            server.kill()
            time.sleep(2.0)
            server.restart()
        elif cell.fault == "SIGSTOP":
            os.kill(server.pid, signal.SIGSTOP)
            time.sleep(STOP_S)
            os.kill(server.pid, signal.SIGCONT)
        else:  # a graceful restart: the AOF is replayed
            server.restart()
        for role in ROLES:
            cluster.pipeline.wait_live(role, PER_ROLE, timeout=120)
    else:
        victim = cluster.workers[cell.target][0]
        if cell.fault == "SIGKILL":
            cluster.replace(cell.target, victim, signal.SIGKILL)
        elif cell.fault == "SIGSTOP":
            victim.send_signal(signal.SIGSTOP)
            time.sleep(STOP_S)
            victim.send_signal(signal.SIGCONT)
            cluster.workers[cell.target].append(cluster.workers[cell.target].pop(0))  # the next cell takes the other
        else:
            skew = SKEW_S if sum(map(ord, cell.target)) % 2 else -SKEW_S
            cell.detail = f"clock {skew:+g} s"
            odd = cluster.replace(cell.target, victim, signal.SIGTERM, skewed(skew))
            time.sleep(SKEWED_FOR_S)
            cluster.replace(cell.target, odd, signal.SIGTERM)
    time.sleep(SETTLE_S)
    cell.ended = clock()


def pending_entries(client: redis.Redis) -> dict[str, int]:
    pending = {}
    for key in client.scan_iter(match="cosine:*", _type="stream", count=1000):
        for group in client.xinfo_groups(key):
            if group["pending"]:
                pending[f"{key.decode()} [{group['name'].decode()}]"] = int(group["pending"])
    return pending


def test_the_fault_matrix(tmp_path, demo_target):
    tokenizer = demo_target.tokenizer
    model = make_chain_model(tmp_path / "chain", tokenizer)
    eos = eos_token_ids(tokenizer, model.config)
    references = [greedy_chain(model, prompt_token_ids(tokenizer, prompt=text), MAX_TOKENS, eos) for text in TEXTS]
    server = EmbeddedRedis(tmp_path / "valkey", fsync="always")
    url = server.start()
    config = write_config(tmp_path / "config.toml", cache_dir=cache_dir(), target=str(tmp_path / "chain"),
                          drafters=[{"name": "lookup", "kind": "prompt-lookup", "expert": "general"}], pipeline=PIPELINE)
    pipeline = Pipeline(url, config)
    cluster = Cluster(pipeline)
    load = Load(url)
    try:
        admin = redis.Redis.from_url(url)
        add_tenant(admin, "cosine:", "acme", TenantBounds())
        for role in ROLES:
            for _ in range(PER_ROLE):
                cluster.start(role)
        for role in ROLES:
            pipeline.wait_live(role, PER_ROLE, timeout=180)
        began = time.monotonic()
        load.start()
        clock = lambda: time.monotonic() - began  # noqa: E731
        time.sleep(5.0)  # the load is on
        cells = [Cell(fault, role) for role in ROLES for fault in ("SIGKILL", "SIGSTOP", "skewed clock")]
        cells += [Cell("garbage", "every stage")]
        cells += [Cell(fault, "redis") for fault in ("SIGKILL", "SIGSTOP", "restart")]
        for cell in cells:
            run_cell(cell, cluster, server, clock, load)
            print(f"[matrix {cell.ended:6.1f}s] {cell.fault} {cell.target} {cell.detail}: {cell.ended - cell.began:.1f} s, "
                  f"{len(load.sent)} sent, {len(load.open)} open", flush=True)
        load.submitting = False
        deadline = time.monotonic() + 180
        while load.open and time.monotonic() < deadline:
            time.sleep(0.5)
        load.stopped.set()
        load.join(10)
        failures, matrix = check(load.sent, cells, references, eos)
        time.sleep(2.0)
        pending = pending_entries(admin)
        dead = admin.xlen("cosine:dead") if admin.exists("cosine:dead") else 0
        report = {"requests": len(load.sent), "in_flight": IN_FLIGHT, "max_tokens": MAX_TOKENS, "pipeline": PIPELINE,
                  "stop_s": STOP_S, "skew_s": SKEW_S, "cells": matrix, "pending_after": pending, "dead_lettered": dead,
                  "client_errors": load.errors, "never_finished": sorted(load.open)}
        RESULT_PATH.write_text(json.dumps(report, indent=1) + "\n")
        print_matrix(report)
        assert not load.open, f"{len(load.open)} requests never finished: {sorted(load.open)[:10]}\n{pipeline.log_tails()}"
        assert not failures, "\n".join(failures[:30])
        assert not pending, pending
        garbage = int(next(cell.detail.split()[0] for cell in cells if cell.fault == "garbage"))
        assert dead == garbage, admin.xrange("cosine:dead", count=10)
    finally:
        load.stopped.set()
        pipeline.stop()
        server.stop()


def check(sent: list[Sent], cells: list[Cell], references: list[list[int]], eos) -> tuple[list[str], list[dict]]:
    """Per request: one final, streamed pieces that join to it, greedy outputs as the reference;
    error finals only in the Redis cells. Per cell: its requests (in flight during it), errors,
    duplicates, the worst stall (the longest wait of a request for its next entry, among the
    waits that ended during the cell: a cell lasts until the takeover of what its fault held)."""
    failures, rows = [], []
    spans = [(cell, [r for r in sent if r.submitted_at < cell.ended and (r.arrivals[-1] if r.done else float("inf")) > cell.began]) for cell in cells]
    redis_cells = {id(cell) for cell in cells if cell.target == "redis"}
    in_redis_cell = {r.request_id for cell, requests in spans if id(cell) in redis_cells for r in requests}
    duplicated = set()
    for request in sent:
        if not request.done:
            continue
        finals = [e for e in request.entries if e["type"] == "final"]
        final = finals[-1]
        pieces = [e for e in request.entries if e["type"] == "tokens"]
        ids = json.loads(final.get("token_ids") or "[]")
        if len(finals) != 1 or [t for e in pieces for t in json.loads(e["token_ids"])] != ids or "".join(e["text"] for e in pieces) != final["text"]:
            duplicated.add(request.request_id)
            failures.append(f"{request.request_id}: {len(finals)} finals; streamed pieces do not join to the final")
        if final["finish_reason"] not in ("stop", "length"):
            if request.request_id not in in_redis_cell:
                failures.append(f"{request.request_id}: {final['finish_reason']} {final.get('error_code')}: {final.get('error')}")
            continue
        if request.greedy:
            expected = references[request.prompt_index]
            if ids != expected[: len(ids)] or not (len(ids) == MAX_TOKENS or ids[-1:] and ids[-1] in eos):
                failures.append(f"{request.request_id} (greedy, prompt {request.prompt_index}): {ids} != reference {expected}")
    for cell, requests in spans:
        errors = [r for r in requests if r.done and r.entries[-1]["finish_reason"] not in ("stop", "length")]
        stalls = [b - a for r in requests for a, b in zip([r.submitted_at, *r.arrivals], r.arrivals) if cell.began <= b < cell.ended]
        rows.append({
            "fault": cell.fault, "target": cell.target, "detail": cell.detail, "seconds": round(cell.ended - cell.began, 1),
            "requests": len(requests), "errors": len(errors),
            "error_causes": sorted({f"{r.entries[-1].get('error_code')}: {r.entries[-1].get('error')}" for r in errors}),
            "duplicates": sum(1 for r in requests if r.request_id in duplicated),
            "worst_stall_s": round(max(stalls, default=0.0), 1),
        })
    return failures, rows


def print_matrix(report: dict) -> None:
    print(f"\nfault matrix: {report['requests']} requests, {report['in_flight']} in flight, max_tokens {report['max_tokens']}, "
          f"claim_idle_ms {report['pipeline']['claim_idle_ms']}")
    print(f"{'fault':<14}{'target':<13}{'requests':>9}{'errors':>8}{'dups':>6}{'worst stall':>13}")
    for row in report["cells"]:
        print(f"{row['fault']:<14}{row['target']:<13}{row['requests']:>9}{row['errors']:>8}{row['duplicates']:>6}{row['worst_stall_s']:>12.1f}s"
              + (f"  {row['error_causes']}" if row["error_causes"] else ""))
    print(f"pending after: {report['pending_after'] or 'none'}; dead-lettered: {report['dead_lettered']}", flush=True)
