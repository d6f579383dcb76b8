"""Pipeline metrics for Prometheus: counted by the workers where the events happen, kept in
Redis, rendered by any gateway (``GET /metrics``) for the whole pipeline.

Workers gather increments in a ``Tally`` and write them to the hash ``cosine:metrics`` with one
``HINCRBYFLOAT`` each, after the handling that caused them (``StageWorker`` flushes after every
read and tick; the coordinator with a verified batch's acknowledgement). A field is the series'
name and labels (``name|label=value,...``); a histogram keeps one field per bucket (not
cumulative), its sum and its count. ``render`` adds what is read at scrape time (queue depths,
pending entries, live workers, requests active and waiting) and the counters the workers kept
before this module (``cosine:stats``: dead letters, reclaims, the verifiers' busy time;
``cosine:restarts``).

The speculation counters carry vLLM's names (``spec_decode_num_drafts``,
``spec_decode_num_draft_tokens``, ``spec_decode_num_accepted_tokens``,
``spec_decode_num_accepted_tokens_per_pos``) and a ``drafter`` label: a drafter's name for what
its proposals drafted and got accepted (a tree node two drafters proposed counts for both), and
``all`` for the fused tree each round verified.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

PREFIX = "cosine:"
ALL = "all"

HISTOGRAMS = {
    "time_to_first_token_seconds": ("Time from a request's arrival to its first output token.",
                                    (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)),
    "inter_token_latency_seconds": ("Time between a request's output tokens (a round's interval over the tokens it emitted).",
                                    (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)),
    "e2e_request_latency_seconds": ("Time from a request's arrival to its final entry.",
                                    (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 240.0, 480.0, 960.0)),
    "verification_batch_size": ("Requests in each verification batch.", (1, 2, 4, 8, 16, 32, 64, 128, 256)),
}
COUNTERS = {
    "requests": "Requests ended, by tenant, finish reason and error code (refusals included).",
    "prompt_tokens": "Prompt tokens of admitted requests, by tenant.",
    "generation_tokens": "Output tokens emitted, by tenant.",
    "spec_decode_num_drafts": "Verification rounds with drafted tokens.",
    "spec_decode_num_draft_tokens": "Drafted tokens verified.",
    "spec_decode_num_accepted_tokens": "Drafted tokens the target accepted.",
    "spec_decode_num_accepted_tokens_per_pos": "Drafted tokens accepted, by their position in the draft (0: first).",
    "drafts_ahead": "Next rounds a drafter drafted ahead while their round was verified (pipelining), by drafter.",
    "drafts_ahead_used": "Drafts ahead sent as their round's draft (the round's context was the one guessed), by drafter.",
}
# cosine:stats fields -> (counter name, help, scale)
STATS = {
    "dead_lettered": ("dead_letters", "Entries moved to the dead-letter stream.", 1.0),
    "reclaimed": ("reclaims", "Pending entries reclaimed from consumers that stopped answering.", 1.0),
    "verify_forward_us": ("verifier_busy_seconds", "Seconds the verifiers spent in verification forwards (rate: busy share).", 1e-6),
    "verify_batches": ("verification_batches", "Verification batches applied.", 1.0),
}


def series(name: str, labels: Mapping[str, str] | None = None) -> str:
    """A hash field: the series' name and labels."""
    return name + "|" + ",".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def parse_series(field: str) -> tuple[str, dict[str, str]]:
    name, _, rest = field.partition("|")
    labels = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
    return name, labels


def _bound(value: float) -> str:
    return "+Inf" if math.isinf(value) else repr(float(value))


class Tally:
    """Increments gathered in memory until they are written (``fields``, then ``clear``)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = defaultdict(float)

    def __bool__(self) -> bool:
        return bool(self.values)

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        if value:
            self.values[series(name, labels)] += value

    def observe(self, name: str, value: float, weight: int = 1, **labels: str) -> None:
        bounds = HISTOGRAMS[name][1]
        bound = next((b for b in bounds if value <= b), math.inf)
        self.values[series(name + "_bucket", {**labels, "le": _bound(bound)})] += weight
        self.values[series(name + "_sum", labels)] += value * weight
        self.values[series(name + "_count", labels)] += weight

    def request_ended(self, finish_reason: str, error_code: str = "", created_ms: int = 0, now_ms: int = 0, tenant: str = "default") -> None:
        """A request's final entry was written (or its refusal); ``created_ms`` and ``now_ms``
        (the server's clock) give its latency."""
        self.count("requests", finish_reason=finish_reason or "unknown", error_code=error_code or "", tenant=tenant)
        if created_ms > 0 and now_ms > 0:
            self.observe("e2e_request_latency_seconds", max(0, now_ms - created_ms) / 1000)

    def round_applied(self, *, new_tokens: int, first: bool, created_ms: int, since_ms: int | None, now_ms: int,
                      draft_tokens: int, accepted: int, drafters: Mapping[str, tuple[int, int]], tenant: str = "default") -> None:
        """A verified round was applied: ``new_tokens`` emitted (``first``: the request's first),
        ``since_ms`` the epoch ms of its previous output (None: not known here)."""
        self.count("generation_tokens", new_tokens, tenant=tenant)
        if first and new_tokens and created_ms > 0:
            self.observe("time_to_first_token_seconds", max(0, now_ms - created_ms) / 1000)
        elif since_ms is not None and new_tokens:
            self.observe("inter_token_latency_seconds", max(0, now_ms - since_ms) / 1000 / new_tokens, weight=new_tokens)
        if draft_tokens:
            self.count("spec_decode_num_drafts", 1, drafter=ALL)
            self.count("spec_decode_num_draft_tokens", draft_tokens, drafter=ALL)
            self.count("spec_decode_num_accepted_tokens", accepted, drafter=ALL)
            for position in range(accepted):
                self.count("spec_decode_num_accepted_tokens_per_pos", 1, drafter=ALL, position=str(position))
            for name, (drafted, kept) in drafters.items():
                if drafted:
                    self.count("spec_decode_num_drafts", 1, drafter=name)
                    self.count("spec_decode_num_draft_tokens", drafted, drafter=name)
                    self.count("spec_decode_num_accepted_tokens", kept, drafter=name)

    def fields(self) -> dict[str, float]:
        return dict(self.values)

    def clear(self) -> None:
        self.values.clear()


# ---- rendering ------------------------------------------------------------------------------


def _families(stored: Mapping[str, float]) -> Iterable[Metric]:
    grouped: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for field, value in stored.items():
        name, labels = parse_series(field)
        grouped[name].append((labels, value))
    for name, doc in COUNTERS.items():
        rows = grouped.get(name, [])
        label_names = sorted({k for labels, _ in rows for k in labels})
        family = CounterMetricFamily(PREFIX + name, doc, labels=label_names)
        for labels, value in sorted(rows, key=lambda r: sorted(r[0].items())):
            family.add_metric([labels.get(k, "") for k in label_names], value)
        yield family
    for name, (doc, bounds) in HISTOGRAMS.items():
        counts: dict[tuple, dict[str, float]] = defaultdict(dict)
        for labels, value in grouped.get(name + "_bucket", []):
            le = labels.pop("le", "+Inf")
            counts[tuple(sorted(labels.items()))][le] = value
        sums = {tuple(sorted(labels.items())): value for labels, value in grouped.get(name + "_sum", [])}
        label_names = sorted({k for key in counts for k, _ in key})
        family = HistogramMetricFamily(PREFIX + name, doc, labels=label_names)
        for key, per_bucket in sorted(counts.items()):
            cumulative, buckets = 0.0, []
            for bound in (*bounds, math.inf):
                cumulative += per_bucket.get(_bound(bound), 0.0)
                buckets.append((_bound(bound), cumulative))
            family.add_metric([dict(key).get(k, "") for k in label_names], buckets, sums.get(key, 0.0))
        yield family


class _Snapshot:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return iter(self.metrics)


def render(stored: Mapping[str, float], stats: Mapping[str, float], restarts: Mapping[str, int], streams: Mapping[str, list[dict]],
           live: Mapping[str, int], active: int, waiting: int) -> bytes:
    """The exposition text of one scrape. ``streams``: stream name -> its groups' ``{group,
    pending, lag}``; ``live``: role -> live workers."""
    metrics: list[Metric] = list(_families(stored))
    for field, (name, doc, scale) in STATS.items():
        family = CounterMetricFamily(PREFIX + name, doc)
        family.add_metric([], float(stats.get(field, 0)) * scale)
        metrics.append(family)
    family = CounterMetricFamily(PREFIX + "worker_restarts", "Worker processes restarted by cosine serve supervisors.", labels=["role"])
    for role, count in sorted(restarts.items()):
        family.add_metric([role], float(count))
    metrics.append(family)
    lag = GaugeMetricFamily(PREFIX + "queue_depth", "Entries of a stream not yet read by a consumer group.", labels=["stream", "group"])
    pending = GaugeMetricFamily(PREFIX + "pending_entries", "Entries read by a consumer group and not yet acknowledged.", labels=["stream", "group"])
    for stream, groups in sorted(streams.items()):
        for group in groups:
            lag.add_metric([stream, group["group"]], float(group.get("lag") or 0))
            pending.add_metric([stream, group["group"]], float(group.get("pending") or 0))
    metrics += [lag, pending]
    workers = GaugeMetricFamily(PREFIX + "live_workers", "Workers that beat their heart recently, by role.", labels=["role"])
    for role, count in sorted(live.items()):
        workers.add_metric([role], float(count))
    metrics.append(workers)
    running = GaugeMetricFamily(PREFIX + "requests_running", "Requests started and not ended.")
    running.add_metric([], float(active))
    queued = GaugeMetricFamily(PREFIX + "requests_waiting", "Requests admitted to wait for a slot (pipeline.max_waiting).")
    queued.add_metric([], float(waiting))
    metrics += [running, queued]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(metrics))
    return generate_latest(registry)
