"""Where a round's time goes through ``cosine serve``, one request at a time.

Every Redis stream entry id starts with the server's clock in milliseconds, so the entries a
request leaves behind (its ``requests`` entry, ``draft:{expert}`` jobs, ``drafts``,
``candidates``, ``verify*`` batches, ``verified`` results) give its timeline without
instrumenting any worker; they are read as they are written (the coordinator trims
acknowledged entries every few seconds). Consecutive events are
paired into hops (e.g. ``verify -> verified``: the verifier's read, forward and write;
``verified -> draft:general``: the coordinator applying a round and asking for the next) and
summed over the requests; the verifier's own forward time comes from its ``verified`` entries.
Rounds are also told apart by kind (``by_kind``): the first (prefill), drafted, window-0 (one
token, nothing drafted) and multi-step (several tokens decoded in one verifier job), each with
its verifier forward, drafting and control-plane time.

Run: ``python bench/hops.py [--config config.toml] [--limit 6]`` (the first prompts of
bench/prompts.jsonl, max_tokens 128, greedy). Millisecond resolution: hops shorter than the
clock's step read as 0 or 1 ms. Results: bench/results/hops-latest.json.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import redis
from common import BENCH_DIR, PROMPTS_FILE, OtherCpu, load_prompts, report_other_cpu, stamp, write_result

from cosine.client import Client
from cosine.config import load_config
from cosine.demo import _wait_for_workers
from cosine.serve import Supervisor
from cosine.wire import Draft, Keys, VerifiedBatch, VerifyBatch, decode


def stream_names(r: redis.Redis, keys: Keys, experts: list[str]) -> dict[str, str]:
    names = {f"draft:{e}": keys.draft(e) for e in experts}
    names |= {"drafts": keys.drafts, "candidates": keys.candidates, "verify": keys.verify, "verified": keys.verified}
    for key in r.scan_iter(match=keys.verify + ":*"):  # the verify_for(fingerprint) streams
        names["verify:pinned"] = key.decode()
    return names


def last_ids(r: redis.Redis, names: dict[str, str]) -> dict[str, str]:
    return {n: (r.xinfo_stream(s)["last-generated-id"].decode() if r.exists(s) else "0-0") for n, s in names.items()}


def tree_depth(parents: list[int]) -> int:
    depth = [0] * len(parents)
    for node, parent in enumerate(parents):  # parents come before their children
        depth[node] = 1 + (depth[parent] if parent >= 0 else 0)
    return max(depth, default=0)


class RoundRecorder(threading.Thread):
    """Reads the ``verify*`` and ``verified`` streams as they are written (plain ``XREAD``, outside
    the consumer groups, so nothing is taken from the workers) and keeps (drafted depth, accepted
    tokens) per verified round: what the verifier really accepted through the pipeline. Reading
    as entries arrive, not afterwards, because the coordinator trims acknowledged entries."""

    def __init__(self, url: str, keys: Keys) -> None:
        super().__init__(daemon=True)
        self.r, self.keys = redis.Redis.from_url(url), keys
        self.depth: dict[tuple[str, int], int] = {}
        self.accepted: dict[tuple[str, int], int] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        def wanted() -> list[str]:  # verify, a pinned verify:{digest} once it exists, verified
            return [stream for name, stream in stream_names(self.r, self.keys, []).items() if name.startswith("verif")]

        positions = last_ids(self.r, {stream: stream for stream in wanted()})
        last_scan = time.monotonic()
        while not self.stop.is_set():
            if time.monotonic() - last_scan > 1.0:  # a pinned verify stream appears after a first round
                for stream in wanted():
                    positions.setdefault(stream, "0-0")
                last_scan = time.monotonic()
            for stream, entries in self.r.xread(positions, block=200) or []:
                stream = stream.decode()
                for entry_id, fields in entries:
                    positions[stream] = entry_id.decode()
                    with self.lock:
                        if stream == self.keys.verified:
                            for item in decode(fields, VerifiedBatch).items:
                                if not item.error:
                                    self.accepted[(item.request_id, item.round)] = len(item.accepted_tokens)
                        else:
                            for item in decode(fields, VerifyBatch).items:
                                self.depth[(item.request_id, item.round)] = tree_depth(list(item.tree.parents))

    def rounds(self, prefix: str = "") -> list[tuple[int, int]]:
        """(drafted depth, accepted tokens) of the recorded rounds of requests whose id starts
        with ``prefix``."""
        with self.lock:
            return [(self.depth[k], a) for k, a in self.accepted.items() if k in self.depth and k[0].startswith(prefix)]


class StreamTap(threading.Thread):
    """Reads the given streams as entries are written (plain ``XREAD`` from their last ids,
    outside the consumer groups) and keeps every entry's (ms, seq, name): the coordinator trims
    acknowledged entries every few seconds, so reading them back after a request loses rounds.
    A pinned ``verify:{digest}`` stream appearing mid-request is picked up on the next scan."""

    def __init__(self, url: str, keys: Keys, names: dict[str, str], positions: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.r, self.keys = redis.Redis.from_url(url), keys
        self.names = {stream: name for name, stream in names.items()}
        self.positions = {names[n]: positions[n] for n in names}
        self.events: list[tuple[int, int, str]] = []
        self.forward_ms: list[float] = []
        # One request at a time, so one item a batch: each verify entry's round kind and each
        # verified entry's forward time, in stream order, pair up into the request's rounds.
        self.kinds: list[tuple[str, int, str]] = []  # (request, round, kind) per verify entry
        self.verified: list[tuple[int, float]] = []  # (ms, forward_ms) per verified entry
        self.draft_ms: dict[tuple[str, int], float] = {}  # per round: its slowest drafter's compute
        self.done = threading.Event()

    def _take(self, block: int | None) -> int:
        got = 0
        for stream, entries in self.r.xread(self.positions, block=block) or []:
            stream = stream.decode()
            name = self.names[stream]
            for entry_id, fields in entries:
                self.positions[stream] = entry_id.decode()
                ms, seq = self.positions[stream].split("-")
                self.events.append((int(ms), int(seq), "verify" if name.startswith("verify") else name))
                if name == "verified":
                    batch = decode(fields, VerifiedBatch)
                    self.forward_ms.append(batch.forward_ms)
                    self.verified.append((int(ms), batch.forward_ms))
                elif name.startswith("verify"):
                    for item in decode(fields, VerifyBatch).items:
                        self.kinds.append((item.request_id, item.round, round_kind(item)))
                elif name == "drafts":
                    draft = decode(fields, Draft)
                    key = (draft.request_id, draft.round)
                    self.draft_ms[key] = max(self.draft_ms.get(key, 0.0), draft.draft_ms)
                got += 1
        return got

    def run(self) -> None:
        last_scan = time.monotonic()
        while not self.done.is_set():
            if time.monotonic() - last_scan > 0.5:
                self._scan()
                last_scan = time.monotonic()
            self._take(block=100)

    def _scan(self) -> None:
        for key in self.r.scan_iter(match=self.keys.verify + ":*"):
            stream = key.decode()
            if stream not in self.names:
                self.names[stream] = "verify:pinned"
                self.positions[stream] = "0-0"

    def finish(self) -> list[tuple[int, int, str]]:
        """Stops tapping and reads what is left; every event, sorted by time. (A request's
        ``out:`` stream is not tapped: its entry ids are round numbers, not times.)"""
        self.done.set()
        self.join()
        self._scan()
        while self._take(block=None):
            pass
        return sorted(self.events)


def round_kind(item) -> str:
    """first (prefill: round 0), multi-step (several tokens decoded in one job), window-0 (one
    token, nothing drafted) or drafted (a draft tree to verify)."""
    if item.round == 0:
        return "first"
    if item.steps > 1:
        return "multi-step"
    return "drafted" if item.tree.tokens else "window-0"


def rounds_by_kind(start_ms: int, tap: StreamTap) -> list[tuple[str, int, float, float]]:
    """A request's rounds as (kind, span ms, verifier forward ms, slowest drafter's ms): a round
    spans from the previous round's result (the request's entry for the first) to its own."""
    rounds, previous = [], start_ms
    for (request, index, kind), (ms, forward) in zip(tap.kinds, tap.verified):
        rounds.append((kind, ms - previous, forward, tap.draft_ms.get((request, index), 0.0)))
        previous = ms
    return rounds


def kind_table(rounds: list[tuple[str, int, float, float]]) -> dict:
    """Per kind of round: its share of rounds and the time of one, split into the verifier's
    forward, drafting on the critical path and the control plane (all the rest: Redis, msgpack,
    Lua, detokenization, waking processes). Millisecond stream clock: a mean over many rounds."""
    table = {}
    for kind in ("first", "drafted", "window-0", "multi-step"):
        mine = [r for r in rounds if r[0] == kind]
        if not mine:
            continue
        span, forward, drafting = (sum(r[i] for r in mine) / len(mine) for i in (1, 2, 3))
        control = span - forward - drafting
        table[kind] = {"rounds": len(mine), "ms_per_round": round(span, 2), "verifier_forward_ms": round(forward, 2),
                       "drafting_ms": round(drafting, 2), "control_plane_ms": round(control, 2),
                       "control_plane_share": round(control / span, 4) if span else None}
    return table


def by_position(rounds: list[tuple[int, int]]) -> dict:
    """Acceptance at each draft position: rounds that accepted >= d tokens / rounds that drafted >= d."""
    deepest = max((d for d, _ in rounds), default=0)
    drafted = [sum(1 for d, _ in rounds if d >= p) for p in range(1, deepest + 1)]
    kept = [sum(1 for d, a in rounds if d >= p and a >= p) for p in range(1, deepest + 1)]
    return {"rounds": len(rounds), "drafted_at": drafted, "accepted_at": kept,
            "acceptance_by_position": [round(k / n, 4) if n else 0.0 for k, n in zip(kept, drafted)],
            "accepted_per_round": round(sum(a for _, a in rounds) / len(rounds), 4) if rounds else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(BENCH_DIR.parent / "config.toml"))
    parser.add_argument("--limit", type=int, default=6, help="first N prompts of bench/prompts.jsonl")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    config = load_config(Path(args.config))
    experts = sorted({d.expert for d in config.drafters})
    supervisor = Supervisor(config, None, Path(args.config), verifiers=1, drafters_per_expert=1, verbose=False)
    url = supervisor.start()
    hops: dict[str, list[int]] = {}
    forward_ms: list[float] = []
    draft_ms: list[float] = []
    typed_rounds: list[tuple[str, int, float, float]] = []
    totals = {"latency_s": 0.0, "rounds": 0, "span_ms": 0}
    try:
        r = redis.Redis.from_url(url)
        _wait_for_workers(r, config.redis.namespace)
        keys = Keys(config.redis.namespace)
        client = Client(url, config.redis.namespace, timeout=300)
        client.generate(prompt="warm up", max_tokens=8)
        other = OtherCpu()
        for item in load_prompts(PROMPTS_FILE, limit=args.limit):
            names = stream_names(r, keys, experts) | {"requests": keys.requests}
            tap = StreamTap(url, keys, names, last_ids(r, names))
            tap.start()
            began = time.perf_counter()
            final = client.generate(messages=item["messages"], max_tokens=args.max_tokens)
            totals["latency_s"] += time.perf_counter() - began
            totals["rounds"] += final.rounds
            events = tap.finish()
            requested = [e[0] for e in events if e[2] == "requests"]
            typed_rounds.extend(rounds_by_kind(requested[0] if requested else events[0][0], tap))
            forward_ms.extend(tap.forward_ms)
            draft_ms.extend(tap.draft_ms.values())
            totals["span_ms"] += events[-1][0] - events[0][0]
            for a, b in zip(events, events[1:]):
                hops.setdefault(f"{a[2]} -> {b[2]}", []).append(b[0] - a[0])
        other_share = other.share()
    finally:
        supervisor.stop()
    rounds = totals["rounds"]
    table = {
        hop: {"count": len(v), "ms_per_round": round(sum(v) / rounds, 2), "mean_ms": round(sum(v) / len(v), 2)}
        for hop, v in sorted(hops.items(), key=lambda kv: -sum(kv[1]))
    }
    per_round = 1000 * totals["latency_s"] / rounds
    forward, drafting = sum(forward_ms) / rounds, sum(draft_ms) / rounds
    result = {
        "args": vars(args), "rounds": rounds, "ms_per_round": round(per_round, 2),
        "verifier_forward_ms_per_round": round(forward, 2),
        # Drafting on a round's critical path: the slowest of its drafters' compute (they draft
        # in parallel); what is left of a round is the control plane (Redis, msgpack, Lua,
        # detokenization, waking processes).
        "drafting_ms_per_round": round(drafting, 2),
        "control_plane_ms_per_round": round(per_round - forward - drafting, 2),
        "control_plane_share": round((per_round - forward - drafting) / per_round, 4),
        "span_ms_per_round": round(totals["span_ms"] / rounds, 2),
        "by_kind": kind_table(typed_rounds), "hops": table,
        "stamp": stamp(), "other_cpu_share": other_share, "config": Path(args.config).read_text(),
    }
    path = write_result("hops", result)
    report_other_cpu(other_share)
    print(json.dumps({k: result[k] for k in ("rounds", "ms_per_round", "span_ms_per_round", "verifier_forward_ms_per_round", "drafting_ms_per_round",
                                        "control_plane_ms_per_round", "control_plane_share", "by_kind", "hops")}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
