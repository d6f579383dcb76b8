"""``cosine status``: queue depths, pending entries, live workers, counters, worker restarts;
``--watch``: the same as a live terminal view (rich) with rates between refreshes."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import redis

from cosine.bus import read_stream_registries, split_roster
from cosine.metrics import ALL, parse_series
from cosine.tenants import tenant_figures
from cosine.wire import Keys
from cosine.wire.keys import ROLES


def read_status(url: str, namespace: str) -> dict:
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10, socket_connect_timeout=5)
    keys = Keys(namespace)
    try:
        pipe = client.pipeline(transaction=False)
        read_stream_registries(pipe, keys)
        streams = keys.streams(*pipe.execute())
        report: dict = {"streams": {}, "workers": {}, "stats": client.hgetall(keys.stats), "restarts": read_restarts(client, keys),
                        "tenants": tenant_figures(client, namespace)}
        for stream in streams:
            if not client.exists(stream):
                continue
            groups = [
                {"group": g["name"], "pending": g["pending"], "lag": g.get("lag"), "consumers": g["consumers"]}
                for g in client.xinfo_groups(stream)
            ]
            report["streams"][stream.removeprefix(namespace)] = {"length": client.xlen(stream), "groups": groups}
        for key in client.scan_iter(match=keys.live_pattern(), count=1000):
            _, role, instance = key.removeprefix(namespace).split(":", 2)
            report["workers"].setdefault(role, []).append(instance)
        return report
    finally:
        client.close()


def read_restarts(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """Worker restarts per role, counted by ``cosine serve`` supervisors."""
    return {role: int(count) for role, count in sorted(client.hgetall(keys.restarts).items())}


# ---- the live view ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """What one refresh of ``cosine status --watch`` reads."""

    at: float
    workers: dict[str, dict[str, str]]  # role -> instance -> liveness value
    restarts: dict[str, int]
    streams: dict[str, dict]  # as read_status's
    metrics: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


def read_snapshot(url: str, namespace: str) -> Snapshot:
    report = read_status(url, namespace)
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    keys = Keys(namespace)
    try:
        seconds, micros = client.time()  # roster expiry is the server's time
        workers = {role: split_roster(client.hgetall(keys.roster(role)), seconds * 1000 + micros / 1000)[0] for role in ROLES}
        metrics = {k.decode(): float(v) for k, v in client.hgetall(keys.metrics).items()}
    finally:
        client.close()
    stats = {}
    for name, value in report["stats"].items():
        try:
            stats[name] = float(value)
        except ValueError:
            continue
    return Snapshot(time.monotonic(), workers, report["restarts"], report["streams"], metrics, stats)


def host_of(instance: str) -> str:
    """Instances are named ``{host}-{pid}-{random}``."""
    parts = instance.rsplit("-", 2)
    return parts[0] if len(parts) == 3 else instance


def _per_drafter(metrics: dict[str, float]) -> dict[str, list[float]]:
    """drafter -> [draft tokens, accepted tokens] (``all``: the fused trees)."""
    found: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for key, value in metrics.items():
        name, labels = parse_series(key)
        if name == "spec_decode_num_draft_tokens":
            found[labels.get("drafter", ALL)][0] += value
        elif name == "spec_decode_num_accepted_tokens":
            found[labels.get("drafter", ALL)][1] += value
    return found


def rates(now: Snapshot, before: Snapshot | None) -> dict[str, float]:
    """Output tokens per second and the verifiers' busy share since ``before``."""
    if before is None or now.at <= before.at:
        return {}
    seconds = now.at - before.at
    tokens = now.metrics.get("generation_tokens|", 0.0) - before.metrics.get("generation_tokens|", 0.0)
    busy = (now.stats.get("verify_forward_us", 0.0) - before.stats.get("verify_forward_us", 0.0)) / 1e6
    verifiers = max(1, len(now.workers.get("verifier", {})))
    return {"tokens_per_s": tokens / seconds, "verifier_busy": busy / seconds / verifiers}


def view(now: Snapshot, before: Snapshot | None = None):
    """The rich renderable of one refresh."""
    from rich.console import Group
    from rich.table import Table

    workers = Table(title="workers", expand=True)
    for column in ("role", "host", "live", "restarts", "detail"):
        workers.add_column(column)
    for role in ROLES:
        by_host: dict[str, list[str]] = defaultdict(list)
        for instance, value in now.workers.get(role, {}).items():
            by_host[host_of(instance)].append(value)
        if not by_host:
            workers.add_row(role, "-", "[red]0[/red]" if role != "drafter" else "0", str(now.restarts.get(role, 0)), "")
        for host, values in sorted(by_host.items()):
            details = sorted({f"{name}={value}" for live in values for name, value in live.fields.items() if name in ("expert", "drafter")})
            workers.add_row(role, host, str(len(values)), str(now.restarts.get(role, 0)), " ".join(details))
    streams = Table(title="streams", expand=True)
    for column in ("stream", "length", "group", "lag", "pending"):
        streams.add_column(column)
    for name, info in now.streams.items():
        for group in info["groups"] or [{"group": "-", "lag": "", "pending": ""}]:
            streams.add_row(name, str(info["length"]), str(group["group"]).rsplit(":", 1)[-1], str(group["lag"]), str(group["pending"]))
    speed = rates(now, before)
    totals = Table(title="throughput and speculation", expand=True)
    for column in ("drafter", "draft tokens", "accepted", "acceptance"):
        totals.add_column(column)
    experts = {}
    for live in now.workers.get("drafter", {}).values():
        if live.drafter:
            experts[live.drafter] = live.expert
    by_expert: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for name, (drafted, accepted) in sorted(_per_drafter(now.metrics).items()):
        share = f"{accepted / drafted:.1%}" if drafted else "-"
        label = name if name == ALL else f"{name} ({experts.get(name, '?')})"
        totals.add_row(label, f"{drafted:.0f}", f"{accepted:.0f}", share)
        if name != ALL and name in experts:
            by_expert[experts[name]][0] += drafted
            by_expert[experts[name]][1] += accepted
    for expert, (drafted, accepted) in sorted(by_expert.items()):
        totals.add_row(f"expert {expert}", f"{drafted:.0f}", f"{accepted:.0f}", f"{accepted / drafted:.1%}" if drafted else "-")
    summary = (f"output tokens/s {speed['tokens_per_s']:.1f}   verifier busy {speed['verifier_busy']:.0%}" if speed
               else "output tokens/s -   verifier busy -   (rates from the second refresh on)")
    return Group(workers, streams, totals, summary)
