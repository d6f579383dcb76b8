"""Soak test: does ``cosine serve`` keep its memory flat over many requests?

Starts ``cosine serve`` (embedded valkey-server, one process per stage, prompt-lookup drafter)
as a subprocess with ``pipeline.output_ttl_s`` below the run's length, so finished requests'
streams and state expire during the run, then keeps a fixed number of requests in flight from a
plain asyncio Redis client (XADD on ``cosine:requests``, XREAD BLOCK on ``cosine:out:{id}``):

- ``short``: most requests, chat ``messages`` (some raw ``prompt``) from bench/prompts.jsonl;
- ``long``: a few prompts of 1,000 tokens up to 75% of the target's context, repeated text;
- ``cancel``: ``XADD cosine:cancel`` after the first ``tokens`` entry; should end ``cancelled``;
- ``abandon``: the client stops reading after the first ``tokens`` entry and never reads again;
  with a short ``deadline_s`` and a long ``max_tokens`` they must end with
  ``error_code=deadline`` (an observer checks each stream before it expires);

half greedy, half sampled (temperature 0.8), small ``max_tokens``. Every few seconds it samples
the RSS of every process of the serve tree (serve, valkey-server, each worker) and the server's
``INFO memory`` ``used_memory``, against the number of requests completed. After the load it
waits until the last request's output TTL has passed and checks that no request state is left.

Reported: every sample, peaks per process, the least-squares slope of each series over the
second half of the load (% of its mean per 100 requests; "flat": under 1%), requests by finish
reason, and warnings and errors from the serve log. Files: bench/results/<name>-latest.json,
bench/results/<name>-latest.png (RSS and used_memory against requests completed) and the serve
log, bench/results/<name>-serve-latest.log. SIGINT or SIGTERM stops the load and writes what was
measured as <name>-interrupted-*; while the run lasts, the serve log and a checkpoint of the
samples are in its scratch directory (printed at the start), so even a killed run leaves them.

    python bench/soak.py                      # 1,000 requests, 8 in flight
    python bench/soak.py --requests 60        # a quick check of the harness
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import redis.asyncio as aioredis
from common import RESULTS_DIR, OtherCpu, add_model_options, load_prompts, stamp, write_result

from cosine.config import load_config
from cosine.serve import die_with_parent
from cosine.workers.models import load_tokenizer_and_limits

CONFIG = """
[model]
target = "{target}"
cache_dir = "{cache_dir}"
threads = {threads}
[pipeline]
output_ttl_s = {ttl_s}
[router]
default_experts = ["general"]
max_experts = 1
[[drafters]]
name = "prompt-lookup"
kind = "prompt-lookup"
expert = "general"
"""
NAMESPACE = "cosine:"
ROLES = {"router", "coordinator", "fusion", "verifier", "drafter"}
FLAT_PCT_PER_100 = 1.0  # a series is "flat" when its second-half slope is under this
LONG_SHARE, CANCEL_SHARE, ABANDON_SHARE = 0.05, 0.05, 0.02
LONG_MIN_TOKENS, LONG_MAX_SHARE = 1_000, 0.75  # long prompts: 1,000 tokens .. 75% of the context
ABANDON_MAX_TOKENS = 4_000  # cannot finish before its deadline: it must end by the deadline
CANCEL_MAX_TOKENS = 256  # still running when the cancel arrives
STALL_S = 600.0  # a request with no output entry for this long: counted as a client time-out
FILLER = (
    "Section {n}. The lighthouse keeper wrote in the log that the wind had turned to the north-east "
    "during the night, that the lamp had been trimmed twice, and that a fishing boat had passed the "
    "point at dawn with its nets still aboard. The tide was high at noon and the fog cleared by evening. "
)
LONG_QUESTION = "\n\nIn one sentence, what does the log above describe?"
COUNTING_PROMPT = ", ".join(str(n) for n in range(1, 41)) + ","


# ---- the request mix -------------------------------------------------------------------------


@dataclass
class Planned:
    request_id: str
    kind: str  # short | long | cancel | abandon
    fields: dict[str, str]
    deadline_s: float


@dataclass
class Outcome:
    request_id: str
    kind: str
    submitted_s: float
    ended_s: float = 0.0
    first_token_s: float | None = None
    status: str = ""  # final | abandoned | client-timeout
    final: dict[str, str] = field(default_factory=dict)


def plan_requests(count: int, tokenizer, context_limit: int, seed: int, run_tag: str) -> list[Planned]:
    rng = random.Random(seed)
    kinds = ["long"] * max(1, round(count * LONG_SHARE)) + ["cancel"] * max(1, round(count * CANCEL_SHARE))
    kinds += ["abandon"] * max(1, round(count * ABANDON_SHARE))
    kinds += ["short"] * max(0, count - len(kinds))
    rng.shuffle(kinds)
    chats = [item["messages"] for item in load_prompts()]
    long_limit = int(context_limit * LONG_MAX_SHARE)
    plans = []
    for index, kind in enumerate(kinds[:count]):
        request_id = f"soak-{run_tag}-{index}"
        fields, deadline_s = _request_fields(kind, rng, chats, tokenizer, long_limit), 300.0
        if kind == "abandon":
            deadline_s = 20.0
        fields.update(id=request_id, deadline_s=str(deadline_s))
        plans.append(Planned(request_id, kind, fields, deadline_s))
    return plans


def _request_fields(kind: str, rng: random.Random, chats: list, tokenizer, long_limit: int) -> dict[str, str]:
    if kind == "abandon":  # counting never stops on its own: greedy, raw completion
        return {"prompt": COUNTING_PROMPT, "max_tokens": str(ABANDON_MAX_TOKENS), "temperature": "0"}
    if kind == "long":
        messages = long_messages(tokenizer, rng.randint(LONG_MIN_TOKENS, long_limit))
        fields = {"messages": json.dumps(messages)}
    elif rng.random() < 0.2:
        fields = {"prompt": rng.choice(chats)[-1]["content"] + "\n\nAnswer:"}
    else:
        fields = {"messages": json.dumps(rng.choice(chats))}
    fields["max_tokens"] = str(CANCEL_MAX_TOKENS if kind == "cancel" else rng.randint(8, 24))
    if rng.random() < 0.5:
        fields.update(temperature="0")
    else:
        fields.update(temperature="0.8", top_p="0.95", seed=str(rng.randrange(2**31)))
    return fields


def chat_length(tokenizer, messages: list[dict[str, str]]) -> int:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return len(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def long_messages(tokenizer, target_tokens: int) -> list[dict[str, str]]:
    """A chat prompt of repeated sections, as close to ``target_tokens`` as whole sections allow
    (never above it)."""

    def build(sections: int) -> list[dict[str, str]]:
        text = "".join(FILLER.format(n=n + 1) for n in range(sections))
        return [{"role": "user", "content": text + LONG_QUESTION}]

    per_section = chat_length(tokenizer, build(11)) - chat_length(tokenizer, build(10))
    sections = max(1, (target_tokens - chat_length(tokenizer, build(0))) // per_section)
    while sections > 1 and chat_length(tokenizer, build(sections)) > target_tokens:
        sections -= 1
    return build(sections)


# ---- the serve process -----------------------------------------------------------------------


class Serve:
    """``cosine serve -v`` as a subprocess, its stdout and stderr in ``log_path``."""

    def __init__(self, config_path: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.config_path, self.log_path, self.extra_args = config_path, log_path, list(extra_args or [])
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.seen_pids: set[int] = set()

    def start(self, timeout_s: float = 300.0) -> str:
        # The config file is authoritative: no COSINE_* variable (a COSINE_REDIS_URL would
        # replace the embedded server) leaks in from the caller's environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("COSINE_")}
        command = [sys.executable, "-m", "cosine.cli", "serve", "--config", str(self.config_path), "-v", *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            banner = re.search(r"cosine serving on (\S+) .*the administrator's in (.+?)\); Ctrl-C", self.log_text())
            if banner:
                self.url = Path(banner.group(2)).read_text().strip()
                return self.url
            if self.process.poll() is not None:
                raise RuntimeError(f"cosine serve exited with code {self.process.returncode} before serving:\n{self.log_tail()}")
            time.sleep(0.2)
        raise TimeoutError(f"cosine serve printed no 'cosine serving on' line in {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def tree(self) -> list[psutil.Process]:
        """serve and every process under it (workers, valkey-server)."""
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in processes)
        return processes

    def stop(self, grace_s: float = 90.0) -> dict:
        """SIGTERM (workers drain, then the embedded server stops); what happened."""
        self.tree()
        began = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
            code = f"killed after {grace_s:.0f} s without exiting (was {code})"
        time.sleep(1.0)  # let orphans that got the parent-death signal go
        left = [p.pid for p in _alive(self.seen_pids - {self.process.pid})]
        for pid in left:  # processes this run started, by id
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        return {"exit_code": code, "stop_s": round(time.monotonic() - began, 1), "processes_left_running": left}


def _alive(pids) -> list[psutil.Process]:
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def role_of(process: psutil.Process, serve_pid: int) -> str:
    if process.pid == serve_pid:
        return "serve"
    try:
        name, command = process.name(), process.cmdline()
    except psutil.Error:
        return f"pid{process.pid}"
    if "valkey" in name or any("valkey-server" in part for part in command[:1]):
        return "valkey-server"
    if "worker" in command:
        args = command[command.index("worker") + 1:]
        role = args[0] if args else "worker"
        if role == "drafter" and "--drafter" in args:
            role += ":" + args[args.index("--drafter") + 1]
        return role
    return f"{name}:{process.pid}"


# ---- sampling --------------------------------------------------------------------------------


class Sampler:
    """RSS of every process of the serve tree and the server's memory, every ``every_s``."""

    def __init__(self, serve: Serve, client: aioredis.Redis, every_s: float, checkpoint: Path | None = None) -> None:
        self.serve, self.client, self.every_s, self.checkpoint = serve, client, every_s, checkpoint
        self.samples: list[dict] = []
        self.began = time.monotonic()
        self.progress = {"completed": 0, "submitted": 0, "in_flight": 0, "phase": "warm"}
        self.cpu_s: dict[int, float] = {}  # pid -> cumulative user + system seconds, last seen
        self.cpu_first: dict[int, float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.sample()
            except Exception as error:  # a failed sample must not end the soak; it is recorded
                self.samples.append({"t_s": round(time.monotonic() - self.began, 1), "error": repr(error)})
            await asyncio.sleep(self.every_s)

    async def sample(self) -> dict:
        record = {"t_s": round(time.monotonic() - self.began, 1), **self.progress, **self._processes()}
        record.update(await self._server())
        self.samples.append(record)
        if self.checkpoint is not None and len(self.samples) % 6 == 1:
            self._write_checkpoint()
        return record

    def _write_checkpoint(self) -> None:
        """The samples so far, so that a run killed outright still leaves its memory curve."""
        partial = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        partial.write_text(json.dumps({"progress": self.progress, "samples": self.samples}), encoding="utf-8")
        partial.replace(self.checkpoint)

    def _processes(self) -> dict:
        rss, pids, serve_pid = {}, {}, self.serve.process.pid
        for process in self.serve.tree():
            try:
                memory, times = process.memory_info(), process.cpu_times()
            except psutil.Error:
                continue
            role = role_of(process, serve_pid)
            if role in rss:  # two processes of one role (a restart overlapping): keep both
                role = f"{role}:{process.pid}"
            rss[role], pids[role] = round(memory.rss / 2**20, 2), process.pid
            self.cpu_s[process.pid] = times.user + times.system
            self.cpu_first.setdefault(process.pid, times.user + times.system)
        return {"rss_mib": rss, "pids": pids}

    async def _server(self) -> dict:
        memory = await self.client.info("memory")
        keys: Counter = Counter()
        streams = []
        async for key in self.client.scan_iter(count=1000):
            kind = key[len(NAMESPACE):].split(":", 1)[0] if key.startswith(NAMESPACE) else "other"
            keys[kind] += 1
            if kind not in ("out", "req", "live", "fuse") and await self.client.type(key) == "stream":
                streams.append(key)
        lengths = {key: await self.client.xlen(key) for key in sorted(streams)}
        return {
            "used_memory_mib": round(memory["used_memory"] / 2**20, 3),
            "used_memory_rss_mib": round(memory["used_memory_rss"] / 2**20, 3),
            "keys": dict(sorted(keys.items())),
            "stream_lengths": lengths,
        }

    def tree_cpu_s(self) -> float:
        return sum(self.cpu_s[pid] - self.cpu_first[pid] for pid in self.cpu_s)


# ---- the load --------------------------------------------------------------------------------


class Load:
    """``concurrency`` clients, each taking the next planned request when its last one ends."""

    def __init__(self, client: aioredis.Redis, plans: list[Planned], concurrency: int, sampler: Sampler) -> None:
        self.client, self.plans, self.concurrency, self.sampler = client, plans, concurrency, sampler
        self.outcomes: dict[str, Outcome] = {}
        self.audits: list[asyncio.Task] = []
        self.began = time.monotonic()

    async def run(self) -> None:
        queue: asyncio.Queue[Planned] = asyncio.Queue()
        for plan in self.plans:
            queue.put_nowait(plan)
        await asyncio.gather(*(self._client_loop(queue) for _ in range(self.concurrency)))

    async def _client_loop(self, queue: asyncio.Queue) -> None:
        while not queue.empty():
            plan = queue.get_nowait()
            progress = self.sampler.progress
            progress["submitted"] += 1
            progress["in_flight"] += 1
            outcome = await self._one(plan)
            self.outcomes[plan.request_id] = outcome
            progress["in_flight"] -= 1
            progress["completed"] += 1
            if progress["completed"] % 50 == 0 or progress["completed"] == len(self.plans):
                self._report_progress()

    async def _one(self, plan: Planned) -> Outcome:
        out_key = f"{NAMESPACE}out:{plan.request_id}"
        outcome = Outcome(plan.request_id, plan.kind, self._now())
        await self.client.xadd(f"{NAMESPACE}requests", plan.fields)
        cursor, last_progress = "0-0", time.monotonic()
        while time.monotonic() - last_progress < STALL_S:
            reply = await self.client.xread({out_key: cursor}, block=2_000)
            for _, entries in reply or []:
                last_progress = time.monotonic()
                for entry_id, fields in entries:
                    cursor = entry_id
                    if fields.get("type") == "final":
                        outcome.status, outcome.final, outcome.ended_s = "final", fields, self._now()
                        return outcome
                    if outcome.first_token_s is None:
                        outcome.first_token_s = self._now()
                        if plan.kind == "cancel":
                            await self.client.xadd(f"{NAMESPACE}cancel", {"id": plan.request_id})
                        elif plan.kind == "abandon":  # this client never reads the stream again
                            outcome.status, outcome.ended_s = "abandoned", self._now()
                            self.audits.append(asyncio.create_task(self._audit(plan, outcome)))
                            return outcome
        outcome.status, outcome.ended_s = "client-timeout", self._now()
        return outcome

    async def _audit(self, plan: Planned, outcome: Outcome) -> None:
        """An observer (not the abandoning client) reads the final entry after the deadline and
        before the stream can expire."""
        await asyncio.sleep(max(0.0, outcome.submitted_s + plan.deadline_s + 5 - self._now()))
        give_up = self._now() + 40
        while self._now() < give_up:
            entries = await self.client.xrevrange(f"{NAMESPACE}out:{plan.request_id}", count=1)
            if entries and entries[0][1].get("type") == "final":
                outcome.final = entries[0][1]
                outcome.final.setdefault("observed_s", str(round(self._now(), 1)))
                return
            await asyncio.sleep(2)

    def _now(self) -> float:
        return round(time.monotonic() - self.began, 3)

    def _report_progress(self) -> None:
        last = self.sampler.samples[-1] if self.sampler.samples else {}
        rss = last.get("rss_mib", {})
        print(f"[{self._now():7.0f} s] {self.sampler.progress['completed']:5d}/{len(self.plans)} done; "
              f"RSS MiB: {', '.join(f'{k} {v:.0f}' for k, v in sorted(rss.items()))}; "
              f"used_memory {last.get('used_memory_mib', float('nan')):.1f} MiB", flush=True)


# ---- analysis --------------------------------------------------------------------------------


def series(samples: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(requests completed, value) per series: RSS of each process, the server's memory."""
    out: dict[str, list[tuple[int, float]]] = {}
    for sample in samples:
        if "error" in sample:
            continue
        for role, rss in sample["rss_mib"].items():
            out.setdefault(f"rss:{role}", []).append((sample["completed"], rss))
        for name in ("used_memory_mib", "used_memory_rss_mib"):
            out.setdefault(name, []).append((sample["completed"], sample[name]))
        out.setdefault("keys_total", []).append((sample["completed"], sum(sample["keys"].values())))
    return out


def slope_per_100(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """Least-squares slope of value on requests completed, per 100 requests: in the series'
    units and as % of its mean."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 3 or len(set(xs)) < 2 or statistics.fmean(ys) == 0:
        return None
    slope = statistics.linear_regression(xs, ys).slope * 100
    return slope, 100 * slope / statistics.fmean(ys)


def flatness(samples: list[dict], total: int) -> dict:
    """Slopes over the load's second half (samples with at least total/2 requests completed)."""
    loaded = [s for s in samples if s.get("phase") == "load" and "error" not in s]
    second = [s for s in loaded if s["completed"] >= total / 2]
    result = {}
    for name, points in series(second).items():
        slope = slope_per_100(points)
        gated = name.startswith("rss:") or name == "used_memory_mib"  # the pass/fail series
        result[name] = {
            "slope_pct_per_100_requests": None if slope is None else round(slope[1], 3),
            "slope_per_100_requests": None if slope is None else round(slope[0], 4),  # MiB (keys_total: keys)
            "first": points[0][1], "last": points[-1][1], "samples": len(points),
            "flat": None if slope is None or not gated else slope[1] < FLAT_PCT_PER_100,
        }
    return result


def peaks(samples: list[dict]) -> dict:
    result: dict[str, float] = {}
    for name, points in series(samples).items():
        if name != "keys_total":
            result[name] = max(value for _, value in points)
    return result


def server_memory(samples: list[dict]) -> dict:
    """The server's used_memory when the load started, when it ended and after the output TTL:
    request streams and state live ``output_ttl_s``, so during the load used_memory follows the
    completion rate; what is left once they expired is what the server kept."""
    valid = [s for s in samples if "error" not in s]
    load = [s for s in valid if s.get("phase") == "load"]
    after = [s for s in valid if s.get("phase") == "expiry"]
    if not load:
        return {}
    start, end, last = load[0]["used_memory_mib"], load[-1]["used_memory_mib"], (after or load)[-1]["used_memory_mib"]
    return {"at_load_start_mib": start, "at_load_end_mib": end, "after_expiry_mib": last, "retained_mib": round(last - start, 3),
            "live_request_keys_at_load_end": sum(v for k, v in load[-1]["keys"].items() if k in ("out", "req", "fuse"))}


def restarts_seen(samples: list[dict]) -> dict[str, int]:
    """PID changes per role across the samples (a worker that exited and was restarted)."""
    pids: dict[str, set[int]] = {}
    for sample in samples:
        for role, pid in sample.get("pids", {}).items():
            pids.setdefault(role.split(":")[0] if role.split(":")[-1].isdigit() else role, set()).add(pid)
    return {role: len(found) - 1 for role, found in pids.items() if len(found) > 1}


def tally(outcomes: list[Outcome]) -> dict:
    by_reason: Counter = Counter()
    by_kind: dict[str, Counter] = {}
    for outcome in outcomes:
        reason = outcome.final.get("finish_reason", outcome.status if outcome.status != "final" else "?")
        if outcome.final.get("error_code"):
            reason += f"/{outcome.final['error_code']}"
        if outcome.status == "abandoned" and not outcome.final:
            reason = "abandoned/no final seen"
        by_reason[reason] += 1
        by_kind.setdefault(outcome.kind, Counter())[reason] += 1
    return {"by_finish_reason": dict(by_reason.most_common()), "by_kind": {k: dict(v.most_common()) for k, v in sorted(by_kind.items())}}


def checks(outcomes: list[Outcome], final_sample: dict, waited_for_expiry: bool) -> dict:
    abandoned = [o for o in outcomes if o.kind == "abandon"]
    cancelled = [o for o in outcomes if o.kind == "cancel"]
    others = [o for o in outcomes if o.kind in ("short", "long")]
    leftover = {k: v for k, v in final_sample.get("keys", {}).items() if k in ("out", "req", "fuse")}
    return {
        "abandoned_ended_by_deadline": f"{sum(o.final.get('error_code') == 'deadline' for o in abandoned)}/{len(abandoned)}",
        "cancelled_ended_cancelled": f"{sum(o.final.get('finish_reason') == 'cancelled' for o in cancelled)}/{len(cancelled)}",
        "short_and_long_ended_stop_or_length": f"{sum(o.final.get('finish_reason') in ('stop', 'length') for o in others)}/{len(others)}",
        "client_timeouts": sum(o.status == "client-timeout" for o in outcomes),
        "request_keys_left_after_ttl": leftover,
        "expired": not any(leftover.values()) if waited_for_expiry else None,
    }


LOG_PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) ([\w.]+): (.*)|^(Traceback|error: .*)")


def log_problems(text: str, examples: int = 12) -> dict:
    """WARNING/ERROR lines of the serve log by level and logger, with a few distinct examples
    (request ids and numbers blanked so repeats group together)."""
    counts: Counter = Counter()
    seen: dict[str, str] = {}
    for line in text.splitlines():
        match = LOG_PROBLEM.search(line)
        if not match:
            continue
        key = f"{match.group(1)} {match.group(2)}" if match.group(1) else match.group(4).split(":")[0]
        counts[key] += 1
        shape = re.sub(r"\d+", "N", f"{key}: {match.group(3) or match.group(4)}")
        if shape not in seen and len(seen) < examples:
            seen[shape] = line[:400]
    return {"counts": dict(counts.most_common()), "examples": list(seen.values())}


def plot(samples: list[dict], total: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series([s for s in samples if s.get("phase") == "load"])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    for name, points in sorted(data.items()):
        if name.startswith("rss:"):
            top.plot([p[0] for p in points], [p[1] for p in points], label=name[4:])
    top.set_ylabel("RSS (MiB)")
    top.set_yscale("log")
    top.legend(fontsize=8, loc="center right")
    top.set_title(f"cosine serve soak: {total} requests")
    for name in ("used_memory_mib", "used_memory_rss_mib"):
        points = data.get(name, [])
        bottom.plot([p[0] for p in points], [p[1] for p in points], label=name.replace("_mib", ""))
    after = [s for s in samples if s.get("phase") == "expiry" and "error" not in s]
    if after:  # every request's streams and state expired: what the server kept
        bottom.plot([total], [after[-1]["used_memory_mib"]], "o", color="C0", label="used_memory after the output TTL")
    bottom.axvline(total / 2, color="grey", linestyle=":", label="slope window starts")
    top.axvline(total / 2, color="grey", linestyle=":")
    bottom.set_ylabel("valkey memory (MiB)")
    bottom.set_xlabel("requests completed")
    bottom.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---- main ------------------------------------------------------------------------------------


async def wait_until_live(client: aioredis.Redis, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        roles = {key.split(":")[2] async for key in client.scan_iter(match=f"{NAMESPACE}live:*")}
        if ROLES <= roles:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not every stage came up in {timeout_s:.0f} s")


async def until_interrupted(work) -> bool:
    """Run ``work`` until it ends (True) or SIGINT / SIGTERM arrives (False, ``work`` cancelled)."""
    loop, stop = asyncio.get_running_loop(), asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task, stopper = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if task.done():
        stopper.cancel()
        task.result()  # an error in the load is an error of the run
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False


async def soak(args: argparse.Namespace, serve: Serve, plans: list[Planned]) -> dict:
    # redis-py's default socket_timeout (5 s in 8.x) would cut a blocking XREAD short on a busy
    # machine: reads block 2 s, the socket waits 30.
    client = aioredis.Redis.from_url(serve.url, decode_responses=True, max_connections=args.concurrency + 8,
                                     socket_timeout=30, socket_connect_timeout=10)
    sampler = Sampler(serve, client, args.sample_s, serve.log_path.with_name("checkpoint.json"))
    try:
        await wait_until_live(client)
        sampling = asyncio.create_task(sampler.run())
        warm = Planned("soak-warm", "short", {"id": "soak-warm", "prompt": "The capital of France is", "max_tokens": "4"}, 60)
        await Load(client, [], 1, sampler)._one(warm)
        sampler.progress["phase"] = "load"
        await sampler.sample()
        load = Load(client, plans, args.concurrency, sampler)
        other = OtherCpu()
        interrupted = not await until_interrupted(load.run())
        load_s = time.monotonic() - load.began
        await sampler.sample()
        sampler.progress["phase"] = "expiry"
        if interrupted:
            print("interrupted: summarising what was measured", flush=True)
            for audit in load.audits:
                audit.cancel()
        else:
            await asyncio.gather(*load.audits)
            last_end = max(o.ended_s for o in load.outcomes.values())
            wait_s = max(0.0, last_end + args.ttl_s + 15 - (time.monotonic() - load.began))
            print(f"load done in {load_s:.0f} s; waiting {wait_s:.0f} s for the output TTL ({args.ttl_s} s) to pass", flush=True)
            await asyncio.sleep(wait_s)
        final_sample = await sampler.sample()
        sampling.cancel()
        wall = time.monotonic() - load.began
        other_share = other.share()
        if other_share is not None:  # OtherCpu counts the serve tree as "other": take it out
            other_share = round(max(0.0, other_share - sampler.tree_cpu_s() / (wall * (os.cpu_count() or 1))), 3)
        stats = await client.hgetall(f"{NAMESPACE}stats")
        restarts = await client.hgetall(f"{NAMESPACE}restarts")
        dead = await client.xlen(f"{NAMESPACE}dead")
        return {"load_s": load_s, "interrupted": interrupted, "outcomes": list(load.outcomes.values()), "samples": sampler.samples, "final_sample": final_sample,
                "other_cpu_share": other_share, "stats": stats, "restarts_counted": restarts, "dead_letters": dead}
    finally:
        await client.aclose()


def write_config(scratch: Path, args: argparse.Namespace) -> Path:
    """A config in a scratch directory whose cache_dir links to the real model files, so serve
    writes its serve.url there and not over the one in the user's cache."""
    real_cache = Path(args.cache_dir).expanduser()
    cache = scratch / "cache"
    cache.mkdir()
    for name in ("models", "converted"):
        if (real_cache / name).exists():
            (cache / name).symlink_to(real_cache / name)
    path = scratch / "soak.toml"
    path.write_text(CONFIG.format(target=Path(args.target).expanduser(), cache_dir=cache, threads=args.threads, ttl_s=args.ttl_s))
    return path


def summarise(args, run: dict, plans: list[Planned], stop: dict, problems: dict, duration_s: float) -> dict:
    outcomes = run["outcomes"]
    slopes = flatness(run["samples"], len(outcomes))  # an interrupted run: the second half of what it did
    gated = {k: v["flat"] for k, v in slopes.items() if v["flat"] is not None}
    prompt_tokens = sorted(int(o.final.get("prompt_tokens", 0)) for o in outcomes if o.final)
    finished = [o for o in outcomes if o.status == "final" and o.kind in ("short", "long")]
    return {
        "interrupted": run["interrupted"],
        "requests_planned": len(plans),
        "requests_done": len(outcomes),
        "duration_s": round(duration_s, 1),
        "load_s": round(run["load_s"], 1),
        "requests": tally(outcomes),
        "prompt_tokens": {"max": prompt_tokens[-1] if prompt_tokens else None, "median": statistics.median(prompt_tokens) if prompt_tokens else None,
                          "over_1000": sum(t > 1000 for t in prompt_tokens)},
        "generated_tokens": sum(int(o.final.get("generated_tokens", 0)) for o in outcomes),
        "median_latency_s": round(statistics.median(o.ended_s - o.submitted_s for o in finished), 2) if finished else None,
        "peaks_mib": peaks(run["samples"]),
        "server_memory": server_memory(run["samples"]),
        "slopes": slopes,
        "flat": all(gated.values()) if gated else None,
        "not_flat": sorted(k for k, v in gated.items() if not v),
        "checks": checks(outcomes, run["final_sample"], waited_for_expiry=not run["interrupted"]),
        "worker_restarts": {"pid_changes": restarts_seen(run["samples"]), "counted_by_serve": run["restarts_counted"]},
        "dead_letters": run["dead_letters"],
        "serve_stop": stop,
        "serve_log_problems": problems,
        "other_cpu_share": run["other_cpu_share"],
    }


def print_summary(summary: dict) -> None:
    print(f"\nsoak: {summary['load_s']:.0f} s of load, {summary['duration_s']:.0f} s in all")
    print("requests by finish reason:", ", ".join(f"{k} {v}" for k, v in summary["requests"]["by_finish_reason"].items()))
    for kind, reasons in summary["requests"]["by_kind"].items():
        print(f"  {kind:8s}", ", ".join(f"{k} {v}" for k, v in reasons.items()))
    print("checks:", json.dumps(summary["checks"]))
    print(f"{'series (MiB)':28s} {'peak':>9s} {'2nd half: first':>15s} {'last':>9s} {'slope/100 req':>14s} {'%/100 req':>10s}  flat")
    for name, slope in summary["slopes"].items():
        peak = summary["peaks_mib"].get(name)
        value, pct = slope["slope_per_100_requests"], slope["slope_pct_per_100_requests"]
        print(f"{name:28s} {peak if peak is not None else '':>9} {slope['first']:>15} {slope['last']:>9} "
              f"{'' if value is None else f'{value:+.3f}':>14s} {'' if pct is None else f'{pct:+.3f}':>10s}  "
              f"{'' if slope['flat'] is None else slope['flat']}")
    print(f"flat (every RSS and used_memory under {FLAT_PCT_PER_100}%/100 requests): {summary['flat']}"
          + (f"; not flat: {', '.join(summary['not_flat'])}" if summary["not_flat"] else ""))
    memory = summary["server_memory"]
    if memory:
        print(f"server used_memory: {memory['at_load_start_mib']} MiB at the start of the load, {memory['at_load_end_mib']} at its end "
              f"({memory['live_request_keys_at_load_end']} request keys alive), {memory['after_expiry_mib']} after the TTL "
              f"(retained {memory['retained_mib']:+} MiB)")
    print("worker restarts:", summary["worker_restarts"], "dead letters:", summary["dead_letters"])
    print("serve stop:", summary["serve_stop"])
    print("serve log WARNING/ERROR lines:", summary["serve_log_problems"]["counts"] or "none")
    for line in summary["serve_log_problems"]["examples"]:
        print("   ", line)
    if summary["other_cpu_share"] is not None:
        print(f"other processes (not this run's) used {summary['other_cpu_share']:.0%} of the CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8, help="requests kept in flight (default: %(default)s)")
    parser.add_argument("--ttl-s", type=int, default=60, help="pipeline.output_ttl_s, below the run's length (default: %(default)s)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="soak", help="result name: bench/results/<name>-latest.json (default: %(default)s)")
    args = parser.parse_args()
    began = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="cosine-soak-"))
    config_path = write_config(scratch, args)
    tokenizer, context_limit, _ = load_tokenizer_and_limits(load_config(config_path, environ={}))
    plans = plan_requests(args.requests, tokenizer, context_limit, args.seed, time.strftime("%H%M%S"))
    # The serve log and a checkpoint of the samples stay in the scratch directory while the run
    # lasts (a run killed outright leaves them there); the log is copied to the results at the end.
    serve = Serve(config_path, scratch / "serve.log")
    serve.start()
    print(f"cosine serve pid {serve.process.pid}; log and checkpoint in {scratch}; {len(plans)} requests, {args.concurrency} in flight", flush=True)
    try:
        run = asyncio.run(soak(args, serve, plans))
    finally:
        stop = serve.stop()
    summary = summarise(args, run, plans, stop, log_problems(serve.log_text()), time.monotonic() - began)
    result = {"stamp": stamp(), "args": vars(args), "config": config_path.read_text(), "context_limit": context_limit,
              "summary": summary, "server_stats": run["stats"], "samples": run["samples"],
              "requests": [{**asdict(o), "final": {k: v for k, v in o.final.items() if k not in ("text", "token_ids")}} for o in run["outcomes"]]}
    name = f"{args.name}-interrupted" if run["interrupted"] else args.name  # a partial run never replaces <name>-latest
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}-serve-latest.log").write_text(serve.log_text(), encoding="utf-8")
    plot(run["samples"], len(run["outcomes"]), RESULTS_DIR / f"{name}-latest.png")
    print_summary(summary)
    print(f"wrote {write_result(name, result)}, {RESULTS_DIR / f'{name}-latest.png'} and {RESULTS_DIR / f'{name}-serve-latest.log'}")


if __name__ == "__main__":
    main()
