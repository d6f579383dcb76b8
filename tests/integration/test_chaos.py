"""Chaos: 200+ mixed requests through ``cosine serve`` (two processes of every role, embedded
Redis) while a seeded sequence of SIGKILLs hits workers that hold work — verifiers during their
forward pass, coordinators between applying a round and acknowledging it — and the embedded
Redis server is killed and restarted by the supervisor.

Nothing may be lost: one final entry per request (``stop`` or ``length``), greedy outputs equal
transformers' greedy decoding, the streamed pieces join to the final text and ids, nothing is
dead-lettered or left pending, and every killed worker was restarted and counted.

The report (what each victim held, the worst delay a kill caused, against ``claim_idle_ms``) is
printed (``-s``) and written to ``bench/results/chaos-latest.json``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import redis

from cosine.config import DEMO_TARGET_FILE, load_config
from tests.conftest import cache_dir
from tests.integration.harness import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.model]

NS = "cosine:"
ROLES = ("router", "drafter", "fusion", "coordinator", "verifier")
PER_ROLE = 2
SEED = int(os.environ.get("COSINE_CHAOS_SEED", "20250611"))
MIN_REQUESTS = 200
MAX_REQUESTS = 480  # kills still to come keep the load on, up to this many requests
IN_FLIGHT = 12
MAX_TOKENS = (8, 16)
SAMPLED_SHARE = 0.5
# The kill plan: coordinators and verifiers are aimed at their fault points, the others at a
# moment when they hold an entry; the Redis server is killed once, somewhere in the middle.
AIMED_KILLS = {"coordinator": 4, "verifier": 4}
OTHER_KILLS = 4
MIN_HOLDING, MIN_FORWARD, MIN_AFTER_APPLY = 8, 2, 2
AFTER_APPLY_SLEEP_S = 0.3
MIN_VICTIM_AGE_S = 12.0  # never a worker still loading, nor a quick exit for the supervisor's backoff
GAP_S = (3.0, 8.0)  # pause between two kills
SEEK_S = 25.0  # how long to wait for the aimed moment before settling for less
FAST_POLL_S = 0.03
SLOW_POLL_S = 0.2
RUN_LIMIT_S = 11 * 60
FINAL_DRAIN_S = 240.0
RESULT_PATH = ROOT / "bench" / "results" / "chaos-latest.json"
INSTANCE_PID = re.compile(r"-(\d+)-[0-9a-f]+$")
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


# ---- the served pipeline -----------------------------------------------------------------------


class Served:
    """``cosine serve`` as a subprocess, with a private cache directory (so a private serve.url)
    holding links to the real model files, default pipeline settings and the test fault point."""

    def __init__(self, tmp_path: Path) -> None:
        self.cache = tmp_path / "cache"
        self.cache.mkdir()
        for name in ("models", "converted"):
            if (cache_dir() / name).is_dir():
                (self.cache / name).symlink_to(cache_dir() / name)
        self.config_path = tmp_path / "config.toml"
        # No [pipeline] section: claim_idle_ms, max_deliveries and trimming are the defaults.
        self.config_path.write_text(
            f'[model]\ntarget = "{cache_dir() / "models" / DEMO_TARGET_FILE}"\ncache_dir = "{self.cache}"\nthreads = 1\n'
            '[[drafters]]\nname = "prompt-lookup"\nkind = "prompt-lookup"\nmax_ngram = 3\nexpert = "general"\n'
        )
        self.config = load_config(self.config_path, environ={})
        self.log_path = tmp_path / "serve.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")}
        env.update(PYTHONUNBUFFERED="1", COSINE_TEST_FAULTS=f"coordinator.after_apply=sleep:{AFTER_APPLY_SLEEP_S}")
        command = [sys.executable, "-m", "cosine.cli", "serve", "--config", str(self.config_path),
                   "--replicas", str(PER_ROLE), "--verifiers", str(PER_ROLE), "--drafters", str(PER_ROLE),
                   "--data-dir", str(tmp_path / "valkey"), "-v"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_running(self, what: str) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"cosine serve exited with {self.process.returncode} ({what}):\n{self.log()[-4000:]}")

    def url(self, timeout: float = 60.0) -> str:
        """The administrator's URL (the test reads rosters, pending entries and outputs)."""
        path = self.cache / "serve-admin.url"
        deadline = time.monotonic() + timeout
        while not (path.is_file() and path.read_text().strip()):
            self.check_running("waiting for serve-admin.url")
            assert time.monotonic() < deadline, f"no serve-admin.url within {timeout} s:\n{self.log()[-4000:]}"
            time.sleep(0.2)
        return path.read_text().strip()

    def children(self) -> dict[int, str]:
        """pid -> role ('valkey' for the server) of serve's children."""
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        children = {}
        for pid in map(int, found.stdout.split()):
            role = child_role(cmdline(pid))
            if role:
                children[pid] = role
        return children

    def stop(self) -> None:
        server = next((pid for pid, role in self.children().items() if role == "valkey"), None) if self.process.poll() is None else None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if server is not None and "valkey-server" in cmdline(server):  # no parent-death signal
            os.kill(server, signal.SIGKILL)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def child_role(argv: list[str]) -> str:
    if any("valkey-server" in arg for arg in argv[:1]):
        return "valkey"
    if "worker" in argv and argv.index("worker") + 1 < len(argv):
        role = argv[argv.index("worker") + 1]
        return role if role in ROLES else ""
    return ""


def process_age_s(pid: int) -> float:
    try:
        start_ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return 0.0
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def wait_dead(pid: int, timeout: float = 2.0) -> None:
    """Until ``pid`` is gone or a zombie: a SIGKILLed process runs no more code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.002)
    raise AssertionError(f"pid {pid} still running {timeout} s after SIGKILL")


def is_verify_stream(stream: str) -> bool:
    return stream == f"{NS}verify" or stream.startswith(f"{NS}verify:")


def is_verified_stream(stream: str) -> bool:
    """The shared result stream, or a coordinator's own (results of the batches it formed)."""
    return stream == f"{NS}verified" or stream.startswith(f"{NS}verified:at:")


def instance_pid(instance: str) -> int | None:
    match = INSTANCE_PID.search(instance)
    return int(match.group(1)) if match else None


# ---- requests ------------------------------------------------------------------------------------


@dataclass
class Request:
    request_id: str
    prompt_index: int
    max_tokens: int
    temperature: float
    seed: int | None
    # Seconds into the run (client clock) of the submission and of each output entry's first
    # sighting: output entry IDs are round numbers, not times.
    submitted_at: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    last_id: bytes = b"0-0"
    done: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def fields(self, texts: list[str]) -> dict[str, str]:
        fields = {"id": self.request_id, "messages": json.dumps([{"role": "user", "content": texts[self.prompt_index]}]),
                  "max_tokens": str(self.max_tokens), "temperature": str(self.temperature)}
        if not self.greedy:
            fields.update(top_p="0.95", seed=str(self.seed))
        return fields


def make_requests(rng: random.Random, prompts: int) -> list[Request]:
    requests = []
    for index in range(MAX_REQUESTS):
        sampled = rng.random() < SAMPLED_SHARE
        requests.append(Request(f"chaos-{SEED}-{index}", index % prompts, rng.randint(*MAX_TOKENS),
                                0.8 if sampled else 0.0, rng.randrange(2**31) if sampled else None))
    return requests


# ---- what a worker holds -----------------------------------------------------------------------------


@dataclass
class Kill:
    """One worker SIGKILL. ``pending_seen`` / the phase seen are what the kill was aimed by;
    ``pending`` and ``phase`` are read once the victim is dead (its consumer can no longer
    acknowledge, and nobody reclaims before claim_idle_ms): what it really held."""

    index: int
    at_s: float
    role: str
    pid: int
    aimed_at: str  # after_apply | forward | holding
    phase: str
    phase_age_s: float | None
    pending: dict[str, int]
    pending_seen: dict[str, int]
    in_flight: int
    waited_s: float

    @property
    def holding(self) -> bool:
        return sum(self.pending.values()) > 0

    @property
    def in_forward(self) -> bool:
        return self.role == "verifier" and (self.phase == "forward" or any(is_verify_stream(s) and n for s, n in self.pending.items()))

    @property
    def in_after_apply(self) -> bool:
        """Between applying a round and acknowledging it: the result entry is still pending."""
        return self.role == "coordinator" and self.phase == "after_apply" and any(n for s, n in self.pending.items() if is_verified_stream(s))


class Observer:
    """Cheap views of the server for aiming kills: which consumer holds what, fault phases."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.pairs: list[tuple[str, str]] = []
        self.pairs_at = 0.0
        self.live: dict[str, set[int]] = {}
        self.live_at = 0.0

    def stream_groups(self, max_age_s: float = 2.0) -> list[tuple[str, str]]:
        if time.monotonic() - self.pairs_at > max_age_s:
            streams = [k.decode() for k in self.client.scan_iter(match=f"{NS}*", _type="stream", count=1000)]
            streams = sorted(s for s in streams if not s.startswith(f"{NS}out:"))
            pipe = self.client.pipeline(transaction=False)
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = pipe.execute(raise_on_error=False)
            self.pairs = [(s, g["name"].decode()) for s, groups in zip(streams, replies) if isinstance(groups, list) for g in groups]
            self.pairs_at = time.monotonic()
        return self.pairs

    def holdings(self) -> dict[int, dict[str, int]]:
        """pid -> {stream: entries pending on that worker's consumer}."""
        pairs = self.stream_groups()
        pipe = self.client.pipeline(transaction=False)
        for stream, group in pairs:
            pipe.xinfo_consumers(stream, group)
        held: dict[int, dict[str, int]] = {}
        for (stream, _), consumers in zip(pairs, pipe.execute(raise_on_error=False)):
            if not isinstance(consumers, list):
                continue
            for consumer in consumers:
                pid = instance_pid(consumer["name"].decode())
                if pid is not None and consumer["pending"]:
                    held.setdefault(pid, {})[stream] = held.get(pid, {}).get(stream, 0) + int(consumer["pending"])
        return held

    def phases(self) -> dict[int, tuple[str, float]]:
        """pid -> (fault phase, its epoch time), from the test-only hash."""
        phases = {}
        for instance, value in self.client.hgetall(f"{NS}test:phase").items():
            pid = instance_pid(instance.decode())
            phase, _, stamp = value.decode().partition(" ")
            if pid is not None:
                phases[pid] = (phase, float(stamp or 0))
        return phases

    def live_pids(self, role: str, max_age_s: float = 0.0) -> set[int]:
        if max_age_s == 0 or time.monotonic() - self.live_at > max_age_s:
            live: dict[str, set[int]] = {r: set() for r in ROLES}
            for key in self.client.scan_iter(match=f"{NS}live:*", count=1000):
                _, _, key_role, instance = key.decode().split(":", 3)
                if key_role in live and (pid := instance_pid(instance)) is not None:
                    live[key_role].add(pid)
            self.live, self.live_at = live, time.monotonic()
        return self.live[role]

    def pending_by_stream(self) -> dict[str, int]:
        pairs = self.stream_groups(max_age_s=0)
        pipe = self.client.pipeline(transaction=False)
        for stream, group in pairs:
            pipe.xpending(stream, group)
        return {f"{s} [{g}]": int(r["pending"]) for (s, g), r in zip(pairs, pipe.execute(raise_on_error=False)) if isinstance(r, dict)}

    def restarts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(f"{NS}restarts").items()}


# ---- the chaos run ---------------------------------------------------------------------------------------


@dataclass
class ChaosRun:
    serve: Served
    client: redis.Redis
    requests: list[Request]
    texts: list[str]
    rng: random.Random
    plan: list[str]
    observer: Observer = field(init=False)
    kills: list[Kill] = field(default_factory=list)
    redis_kill: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    submitted: int = 0
    began: float = 0.0
    last_submit: float = 0.0
    children: dict[int, str] = field(default_factory=dict)
    children_at: float = 0.0

    def __post_init__(self) -> None:
        self.observer = Observer(self.client)

    def elapsed(self) -> float:
        return time.monotonic() - self.began

    def in_flight(self) -> list[Request]:
        return [r for r in self.requests[: self.submitted] if not r.done]

    def run(self) -> None:
        """Load and kills until the plan is done and every request has finished (or a limit)."""
        self.began = time.monotonic()
        next_action = self.began + 5.0 + self.rng.uniform(*GAP_S)  # let the load build up first
        seek_began: float | None = None
        next_bookkeeping = 0.0
        while True:
            now = time.monotonic()
            if now >= next_bookkeeping:
                self.serve.check_running("during the chaos run")
                self._collect_outputs()
                self._top_up()
                next_bookkeeping = now + SLOW_POLL_S
            if not self.plan and not self.in_flight() and self.submitted >= MIN_REQUESTS:
                return
            if now - self.began > RUN_LIMIT_S or (not self.plan and now - self.last_submit > FINAL_DRAIN_S):
                self.problems.append(f"stopped waiting after {self.elapsed():.0f} s: {len(self.in_flight())} requests unfinished "
                                     f"({[r.request_id for r in self.in_flight()][:10]}), plan left {self.plan}")
                return
            if self.plan and now >= next_action:
                seek_began = seek_began or now
                done = self._redis_kill(now - seek_began) if self.plan[0] == "redis" else self._try_kill(self.plan[0], now - seek_began)
                if done:
                    self.plan.pop(0)
                    seek_began, next_action = None, time.monotonic() + self.rng.uniform(*GAP_S)
                    continue
            time.sleep(FAST_POLL_S if seek_began else SLOW_POLL_S)

    # ---- load ----

    def _top_up(self) -> None:
        wanted = bool(self.plan) or self.submitted < MIN_REQUESTS
        flying = len(self.in_flight())
        while wanted and self.submitted < len(self.requests) and flying < IN_FLIGHT:
            request = self.requests[self.submitted]
            self.client.xadd(f"{NS}requests", request.fields(self.texts))
            request.submitted_at = self.elapsed()
            self.submitted, flying, self.last_submit = self.submitted + 1, flying + 1, time.monotonic()

    def _collect_outputs(self) -> None:
        """One non-blocking XREAD over the in-flight requests' output streams: when each entry
        was first seen (to SLOW_POLL_S), and which requests are done."""
        flying = {f"{NS}out:{r.request_id}".encode(): r for r in self.in_flight()}
        if not flying:
            return
        reply = self.client.xread({key: r.last_id for key, r in flying.items()})
        seen_at = self.elapsed()
        for key, entries in reply.items() if isinstance(reply, dict) else reply or []:
            request = flying[key]
            for entry_id, fields in entries:
                request.last_id = entry_id
                request.arrivals.append(seen_at)
                request.done = request.done or fields.get(b"type") == b"final"

    # ---- worker kills ----

    def _children(self) -> dict[int, str]:
        if time.monotonic() - self.children_at > 0.5:  # pgrep forks: not at every fast poll
            self.children, self.children_at = self.serve.children(), time.monotonic()
        return self.children

    def _killable(self, role: str) -> list[int]:
        live = self.observer.live_pids(role, max_age_s=0.5)
        return [pid for pid, r in self._children().items() if r == role and pid in live and process_age_s(pid) >= MIN_VICTIM_AGE_S]

    def _try_kill(self, role: str, seeking_s: float) -> bool:
        candidates = self._killable(role)
        if not candidates:
            if seeking_s > 180:
                self.problems.append(f"kill #{len(self.kills) + 1}: no killable {role} (live, up {MIN_VICTIM_AGE_S} s) for 180 s")
                return True
            return False
        held, phases = self.observer.holdings(), self.observer.phases()
        aim = {"coordinator": "after_apply", "verifier": "forward"}.get(role, "holding")

        def in_phase(pid: int) -> bool:
            phase, stamp = phases.get(pid, ("", 0.0))
            if aim == "after_apply":  # still inside its sleep, with a margin for the kill itself
                return phase == "after_apply" and time.time() - stamp < AFTER_APPLY_SLEEP_S * 0.6
            if aim == "forward":
                return phase == "forward" or any(is_verify_stream(s) for s in held.get(pid, {}))
            return bool(held.get(pid))

        chosen = [pid for pid in candidates if in_phase(pid)]
        if not chosen and seeking_s > SEEK_S:  # settle for a worker holding anything
            chosen = [pid for pid in candidates if held.get(pid)]
        if not chosen and seeking_s > SEEK_S + 10:  # then for any moment
            chosen = candidates
        if not chosen:
            return False
        victim = self.rng.choice(chosen)
        if child_role(cmdline(victim)) != role:  # gone since the last pgrep: look again
            self.children_at = 0.0
            return False
        os.kill(victim, signal.SIGKILL)
        killed_at, at_s = time.time(), round(self.elapsed(), 2)
        wait_dead(victim)
        phase, stamp = self.observer.phases().get(victim, ("", 0.0))
        kill = Kill(len(self.kills) + 1, at_s, role, victim, aim, phase, round(killed_at - stamp, 3) if stamp else None,
                    self.observer.holdings().get(victim, {}), held.get(victim, {}), len(self.in_flight()), round(seeking_s, 2))
        self.kills.append(kill)
        self.children_at = 0.0
        print(f"[chaos {kill.at_s:7.1f}s] kill #{kill.index} {role} pid {victim} (aimed at {aim}, waited {kill.waited_s:.1f} s): "
              f"phase {phase or '-'} (since {kill.phase_age_s} s), held at death {kill.pending or 'nothing'} "
              f"(seen before: {kill.pending_seen or 'nothing'}), {kill.in_flight} requests in flight", flush=True)
        return True

    # ---- the Redis server ----

    def _settled(self) -> bool:
        """Every killed worker restarted and counted, two live per role: a server kill now
        cannot lose a restart count."""
        if sum(self.observer.restarts().values()) != len(self.kills):
            return False
        return all(len(self.observer.live_pids(role, max_age_s=0.5)) == PER_ROLE for role in ROLES)

    def _redis_kill(self, seeking_s: float) -> bool:
        if not self._settled():
            if seeking_s > 120:
                self.problems.append(f"before the Redis kill: restarts {self.observer.restarts()} never matched {len(self.kills)} kills "
                                     f"with {PER_ROLE} live workers per role; killing the server anyway")
            else:
                return False
        server = next((pid for pid, role in self.serve.children().items() if role == "valkey"), None)
        assert server is not None, "no valkey-server child of serve"
        pending = {k: v for k, v in self.observer.pending_by_stream().items() if v}
        in_flight = len(self.in_flight())
        os.kill(server, signal.SIGKILL)
        killed_at, at_s = time.monotonic(), round(self.elapsed(), 2)
        while True:
            self.serve.check_running("restarting the embedded server")
            assert time.monotonic() - killed_at < 60, f"the embedded server was not restarted within 60 s:\n{self.serve.log()[-3000:]}"
            restarted = next((pid for pid, role in self.serve.children().items() if role == "valkey" and pid != server), None)
            if restarted is not None:
                try:
                    self.client.ping()
                    break
                except CONNECTION_ERRORS:
                    pass
            time.sleep(0.1)
        self.redis_kill = {"at_s": at_s, "old_pid": server, "new_pid": restarted, "down_s": round(time.monotonic() - killed_at, 2),
                           "pending_at_kill": pending, "in_flight": in_flight}
        self.children_at = 0.0
        print(f"[chaos {at_s:7.1f}s] SIGKILL valkey-server pid {server}: pending {pending or 'none'}, {in_flight} requests in flight; "
              f"back as pid {restarted} after {self.redis_kill['down_s']} s", flush=True)
        return True


def kill_plan(rng: random.Random) -> list[str]:
    others = ["router", "drafter", "fusion"]
    plan = [role for role, count in AIMED_KILLS.items() for _ in range(count)]
    plan += (others * OTHER_KILLS)[:OTHER_KILLS]
    rng.shuffle(plan)
    plan.insert(rng.randint(len(plan) // 3, 2 * len(plan) // 3), "redis")
    return plan


# ---- after the run ------------------------------------------------------------------------------------


def wait_until(predicate, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


def check_outputs(client: redis.Redis, requests: list[Request], references: list[list[int]], claim_idle_ms: int) -> tuple[list[str], dict]:
    """Per-request checks; returns the failures and the timing figures."""
    failures: list[str] = []
    latencies, gaps, reasons = [], [], {}
    for request in requests:
        entries = [(i, {k.decode(): v.decode() for k, v in f.items()}) for i, f in client.xrange(f"{NS}out:{request.request_id}")]
        finals = [e for _, e in entries if e["type"] == "final"]
        if len(finals) != 1 or entries[-1][1]["type"] != "final":
            failures.append(f"{request.request_id}: {len(finals)} final entries (last entry type {entries[-1][1]['type'] if entries else None})")
            continue
        final = finals[0]
        reasons[final["finish_reason"]] = reasons.get(final["finish_reason"], 0) + 1
        if final["finish_reason"] not in ("stop", "length"):
            failures.append(f"{request.request_id}: finish_reason {final['finish_reason']}: {final.get('error_code')} {final.get('error')}")
            continue
        token_ids = json.loads(final["token_ids"])
        pieces = [e for _, e in entries if e["type"] == "tokens"]
        if "".join(e["text"] for e in pieces) != final["text"]:
            failures.append(f"{request.request_id}: streamed text {''.join(e['text'] for e in pieces)!r} != final {final['text']!r}")
        streamed_ids = [t for e in pieces for t in json.loads(e["token_ids"])]
        if streamed_ids != token_ids:
            failures.append(f"{request.request_id}: streamed ids {streamed_ids} != final {token_ids}")
        if final["finish_reason"] == "length" and len(token_ids) != request.max_tokens:
            failures.append(f"{request.request_id}: length finish after {len(token_ids)} of {request.max_tokens} tokens")
        if request.greedy:
            expected = references[request.prompt_index][: request.max_tokens]
            if token_ids != expected[: len(token_ids)] or not (len(token_ids) == len(expected) or token_ids[-1:] == [2]):
                failures.append(f"{request.request_id} (greedy, prompt {request.prompt_index}): {token_ids} != reference {expected}")
        if request.arrivals:
            stamps = [request.submitted_at, *request.arrivals]
            latencies.append((stamps[-1] - stamps[0], request.request_id))
            gaps.append((max(b - a for a, b in zip(stamps, stamps[1:])), request.request_id))
    figures: dict = {"finish_reasons": reasons, "timing_resolution_s": SLOW_POLL_S}
    if latencies:
        ordered = sorted(seconds for seconds, _ in latencies)
        worst_latency, worst_gap = max(latencies), max(gaps)
        median_s = statistics.median(ordered)
        figures.update(
            latency_median_s=round(median_s, 2),
            latency_p95_s=round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            latency_max_s=round(worst_latency[0], 2), latency_max_request=worst_latency[1],
            worst_delay_vs_median_s=round(worst_latency[0] - median_s, 2),
            worst_gap_s=round(worst_gap[0], 2), worst_gap_request=worst_gap[1],
            worst_gap_timeline_s=next([round(r.submitted_at, 2), *(round(t, 2) for t in r.arrivals)] for r in requests if r.request_id == worst_gap[1]),
            requests_over_claim_idle=sum(1 for seconds in ordered if seconds * 1000 > claim_idle_ms),
        )
    return failures, figures


def stall_after(at_s: float, requests: list[Request]) -> tuple[float, int]:
    """The longest wait for a next output entry that spanned the moment ``at_s``, and how many
    requests were waiting then: the delay a kill at that moment caused (or overlapped)."""
    longest, waiting = 0.0, 0
    for request in requests:
        stamps = [request.submitted_at, *request.arrivals]
        spans = [b - a for a, b in zip(stamps, stamps[1:]) if a <= at_s < b]
        if spans:
            longest, waiting = max(longest, spans[0]), waiting + 1
    return round(longest, 2), waiting


def bench_stamp() -> dict:
    try:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import stamp  # bench/common.py: commit, CPU, library versions, load

        return stamp()
    except Exception as error:  # the report matters more than its stamp
        return {"stamp_error": f"{type(error).__name__}: {error}"}
    finally:
        sys.path.remove(str(ROOT / "bench"))


# ---- the test ---------------------------------------------------------------------------------------------


def test_chaos_kills_lose_nothing(tmp_path, greedy_references):
    texts = json.loads((ROOT / "tests" / "data" / "chat_prompts.json").read_text())
    assert len(texts) == len(greedy_references)
    rng = random.Random(SEED)
    requests = make_requests(rng, len(texts))
    plan = kill_plan(rng)
    began = time.monotonic()
    serve = Served(tmp_path)
    claim_idle_ms = serve.config.pipeline.claim_idle_ms
    try:
        client = redis.Redis.from_url(serve.url(), socket_timeout=10, socket_connect_timeout=5)
        observer = Observer(client)
        assert wait_until(lambda: serve.check_running("starting") or all(len(observer.live_pids(r)) == PER_ROLE for r in ROLES), 240), \
            f"not every role live twice within 240 s:\n{serve.log()[-4000:]}"
        started_s = time.monotonic() - began
        dead_before = client.xlen(f"{NS}dead")
        print(f"\n[chaos] serve up in {started_s:.1f} s; seed {SEED}; plan {plan}; claim_idle_ms {claim_idle_ms}", flush=True)

        chaos = ChaosRun(serve, client, requests, texts, rng, plan)
        cpu_before = time.process_time()
        chaos.run()
        chaos_cpu_s = time.process_time() - cpu_before
        run_s = chaos.elapsed()
        done = requests[: chaos.submitted]
        print(f"[chaos] {len(done)} requests submitted, {sum(r.done for r in done)} finished in {run_s:.1f} s of chaos", flush=True)

        failures: list[str] = list(chaos.problems)
        worker_kills = len(chaos.kills)
        settled = wait_until(lambda: sum(observer.restarts().values()) >= worker_kills
                             and all(len(observer.live_pids(r)) == PER_ROLE for r in ROLES), 120)
        restarts = observer.restarts()
        live = {role: len(observer.live_pids(role)) for role in ROLES}
        if not settled or sum(restarts.values()) != worker_kills:
            failures.append(f"restarts {restarts} (sum {sum(restarts.values())}) != {worker_kills} worker kills; live {live}")
        killed_per_role = {role: sum(1 for k in chaos.kills if k.role == role) for role in ROLES}
        if {r: n for r, n in restarts.items() if n} != {r: n for r, n in killed_per_role.items() if n}:
            failures.append(f"restarts per role {restarts} != kills per role {killed_per_role}")

        drained = wait_until(lambda: not any(observer.pending_by_stream().values()), 60)
        pending = {k: v for k, v in observer.pending_by_stream().items() if v}
        if not drained:
            failures.append(f"entries still pending 60 s after the last final: {pending}")
        dead = client.xrange(f"{NS}dead")[dead_before:]
        for entry_id, fields in dead:
            failures.append(f"dead-lettered {entry_id.decode()}: {fields.get(b'stage')} {fields.get(b'stream')} {fields.get(b'reason')}")

        output_failures, figures = check_outputs(client, done, greedy_references, claim_idle_ms)
        failures += output_failures
        lost = sum(1 for r in done if not r.done)
        holding = sum(1 for k in chaos.kills if k.holding)
        forward = sum(1 for k in chaos.kills if k.in_forward)
        after_apply = sum(1 for k in chaos.kills if k.in_after_apply)
        if worker_kills < AIMED_KILLS["coordinator"] + AIMED_KILLS["verifier"] + OTHER_KILLS or not chaos.redis_kill:
            failures.append(f"only {worker_kills} worker kills (redis kill: {bool(chaos.redis_kill)})")
        if holding < MIN_HOLDING or forward < MIN_FORWARD or after_apply < MIN_AFTER_APPLY:
            failures.append(f"kills holding an entry {holding} (>= {MIN_HOLDING}), verifiers in forward {forward} (>= {MIN_FORWARD}), "
                            f"coordinators after apply {after_apply} (>= {MIN_AFTER_APPLY})")
        log_text = serve.log()
        report = {
            "stamp": bench_stamp(),
            "seed": SEED,
            "claim_idle_ms": claim_idle_ms,
            "max_deliveries": serve.config.pipeline.max_deliveries,
            "after_apply_sleep_s": AFTER_APPLY_SLEEP_S,
            "serve_start_s": round(started_s, 1),
            "chaos_s": round(run_s, 1),
            "test_process_cpu_s": round(chaos_cpu_s, 1),  # the test's own overhead during the chaos run
            "requests": len(done),
            "greedy": sum(1 for r in done if r.greedy),
            "sampled": sum(1 for r in done if not r.greedy),
            "requests_lost": lost,
            "kills_survived": worker_kills + (1 if chaos.redis_kill else 0),
            "worker_kills": worker_kills,
            "kills_holding_an_entry": holding,
            "verifier_kills_in_forward": forward,
            "coordinator_kills_after_apply": after_apply,
            "kills": [asdict(k) | {"holding": k.holding, "longest_gap_spanning_s": stall_after(k.at_s, done)[0], "requests_waiting": stall_after(k.at_s, done)[1]}
                      for k in chaos.kills],
            "redis_kill": chaos.redis_kill | ({"longest_gap_spanning_s": stall_after(chaos.redis_kill["at_s"], done)[0]} if chaos.redis_kill else {}),
            "restarts": restarts,
            "dead_lettered": len(dead),
            "pending_left": pending,
            "reclaimed": int(client.hget(f"{NS}stats", "reclaimed") or 0),
            "serve_log_tracebacks": log_text.count("Traceback"),
            **figures,
            "worst_gap_over_claim_idle": round(figures.get("worst_gap_s", 0) * 1000 / claim_idle_ms, 2),
            "worst_gap_spanning_a_kill_s": max([stall_after(k.at_s, done)[0] for k in chaos.kills] + [0.0]),
            "failures": failures[:50],
        }
        RESULT_PATH.parent.mkdir(parents=True, exist_ok=True)
        RESULT_PATH.write_text(json.dumps(report, indent=2) + "\n")
        print_report(report)
        assert lost == 0
        assert not failures, "\n".join(failures[:50])
    finally:
        serve.stop()
    print(f"[chaos] total {time.monotonic() - began:.1f} s; serve log {serve.log_path}")


def print_report(report: dict) -> None:
    print("\n==== chaos report ====")
    print(f"requests {report['requests']} ({report['greedy']} greedy, {report['sampled']} sampled), lost {report['requests_lost']}, "
          f"finish reasons {report.get('finish_reasons')}")
    print(f"kills survived {report['kills_survived']}: {report['worker_kills']} workers + the Redis server; "
          f"holding an entry {report['kills_holding_an_entry']}, verifiers in forward {report['verifier_kills_in_forward']}, "
          f"coordinators after apply {report['coordinator_kills_after_apply']}")
    for kill in report["kills"]:
        print(f"  #{kill['index']:2d} {kill['at_s']:7.1f}s {kill['role']:11s} pid {kill['pid']:6d} phase {kill['phase'] or '-':11s} "
              f"held {kill['pending'] or 'nothing'}; longest output gap spanning it {kill['longest_gap_spanning_s']} s "
              f"({kill['requests_waiting']} requests waiting then)")
    redis_kill = report["redis_kill"]
    if redis_kill:
        print(f"  redis {redis_kill['at_s']:7.1f}s down {redis_kill['down_s']} s, pending then {redis_kill['pending_at_kill'] or 'none'}; "
              f"longest output gap spanning it {redis_kill['longest_gap_spanning_s']} s")
    print(f"restarts {report['restarts']}; entries reclaimed {report['reclaimed']}; dead-lettered {report['dead_lettered']}; "
          f"pending left {report['pending_left'] or 'none'}")
    print(f"latency median {report.get('latency_median_s')} s, p95 {report.get('latency_p95_s')} s, max {report.get('latency_max_s')} s "
          f"({report.get('latency_max_request')}); worst delay vs median {report.get('worst_delay_vs_median_s')} s")
    print(f"worst gap between a request's entries {report.get('worst_gap_s')} s ({report.get('worst_gap_request')}) = "
          f"{report['worst_gap_over_claim_idle']} x claim_idle_ms ({report['claim_idle_ms']} ms); "
          f"requests over claim_idle_ms: {report.get('requests_over_claim_idle')}; worst gap spanning a worker kill {report['worst_gap_spanning_a_kill_s']} s "
          f"(times to {report['timing_resolution_s']} s)")
    print(f"serve start {report['serve_start_s']} s, chaos {report['chaos_s']} s (test process CPU {report['test_process_cpu_s']} s); tracebacks in the serve log {report['serve_log_tracebacks']}")
    for failure in report["failures"]:
        print(f"FAIL {failure}")
    print(f"(written to {RESULT_PATH})")
