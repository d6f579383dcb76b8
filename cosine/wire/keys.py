"""Every stream and key name, derived from one namespace prefix and the request id."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """All stream and key names, under one namespace prefix (default ``cosine:``)."""

    prefix: str = "cosine:"

    # client-facing streams
    @property
    def requests(self) -> str:
        return f"{self.prefix}requests"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}cancel"

    def out(self, request_id: str) -> str:
        return f"{self.prefix}out:{request_id}"

    # internal streams
    def draft(self, expert: str) -> str:
        return f"{self.prefix}draft:{expert}"

    def draft_at(self, instance: str) -> str:
        """Draft jobs for one drafter instance: rounds of requests it drafted the round before
        (its caches, its draft made ahead). Moved to its expert's stream when it is gone."""
        return f"{self.prefix}draft:at:{instance}"

    @property
    def drafter_streams(self) -> str:
        """hash: drafter instance -> its expert, for instances with a ``draft_at`` stream."""
        return f"{self.prefix}drafter-streams"

    @property
    def drafts(self) -> str:
        return f"{self.prefix}drafts"

    @property
    def candidates(self) -> str:
        return f"{self.prefix}candidates"

    @property
    def verify(self) -> str:
        return f"{self.prefix}verify"

    def verify_for(self, fingerprint: str) -> str:
        """Verification batches of requests pinned to one target fingerprint (after their first
        round): only verifiers of that target read it, so a rolling upgrade errors nothing."""
        return f"{self.prefix}verify:{_target_digest(fingerprint)}"

    def verify_at(self, instance: str) -> str:
        """Verification batches for one verifier instance: rounds of requests whose caches it
        holds (cache affinity). Moved to the shared streams when the instance is gone."""
        return f"{self.prefix}verify:at:{instance}"

    @property
    def verifier_streams(self) -> str:
        """set: verifier instances that have a ``verify_at`` stream (for the sweep of gone ones)."""
        return f"{self.prefix}verifier-streams"

    def cost(self, fingerprint: str) -> str:
        """hash: a verifier's start-up profile of its verification cost (ms = a + b B + c T)."""
        return f"{self.prefix}cost:{_target_digest(fingerprint)}"

    @property
    def verified(self) -> str:
        return f"{self.prefix}verified"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    # state
    def request(self, request_id: str) -> str:
        return f"{self.prefix}req:{request_id}"

    def live(self, role: str, instance: str) -> str:
        return f"{self.prefix}live:{role}:{instance}"

    def live_pattern(self, role: str = "*") -> str:
        return f"{self.prefix}live:{role}:*"

    def roster(self, role: str) -> str:
        """hash: instance -> "expires_ms liveness value": a role's workers read without a SCAN."""
        return f"{self.prefix}roster:{role}"

    @property
    def rounds(self) -> str:
        """zset: request id -> when its round was sent to drafting (the drafter-deadline sweep)."""
        return f"{self.prefix}rounds"

    @property
    def deadlines(self) -> str:
        """zset: request id -> the epoch ms at which it ends with error_code=deadline."""
        return f"{self.prefix}deadlines"

    @property
    def reserved(self) -> str:
        """hash: request id -> K/V rows it reserved at admission (prompt + max_tokens); entries
        of requests no longer in ``deadlines`` are dropped by the next admission."""
        return f"{self.prefix}reserved"

    @property
    def waiting(self) -> str:
        """zset: request id -> when it arrived, for requests admitted to wait (``pipeline.max_waiting``):
        their state and deadline are written, their first round is not sent yet. A member of
        ``deadlines`` too, so the deadline sweep and cancellation end it like any request."""
        return f"{self.prefix}waiting"

    def features(self, request_id: str) -> str:
        """string: the target's hidden states (fp16 rows) at a request's positions 0, 1, ...
        (feature drafters; appended as rounds are applied, deleted when the request ends)."""
        return f"{self.prefix}feat:{request_id}"

    def fuse(self, request_id: str, round_index: int, step: int | None = None) -> str:
        """hash: one round's drafts (step mode: one step's) while fusion waits for every
        cooperating expert."""
        return f"{self.prefix}fuse:{request_id}:{round_index}" + ("" if step is None else f":s{step}")

    def fuse_levels(self, request_id: str, round_index: int) -> str:
        """hash: step mode, one round's fused steps so far (field = step, value = its drafts)."""
        return f"{self.prefix}fuse:{request_id}:{round_index}:levels"

    @property
    def fusing(self) -> str:
        """zset: fuse hash key -> when fusion must emit it (deadline, or retake after a crash)."""
        return f"{self.prefix}fusing"

    @property
    def fingerprints(self) -> str:
        """set: target fingerprints verifiers have announced (their verify streams exist)."""
        return f"{self.prefix}fingerprints"

    @property
    def restarts(self) -> str:
        return f"{self.prefix}restarts"

    @property
    def test_phase(self) -> str:
        """hash: instance -> the fault point it is in (only with COSINE_TEST_FAULTS)."""
        return f"{self.prefix}test:phase"

    def wake(self, reader: str) -> str:
        """stream: wake-ups of one gateway output reader (written with each request it reads)."""
        return f"{self.prefix}wake:{reader}"

    @property
    def metrics(self) -> str:
        """hash: the workers' metrics for Prometheus (``cosine.metrics``)."""
        return f"{self.prefix}metrics"

    @property
    def stats(self) -> str:
        return f"{self.prefix}stats"

    @property
    def experts(self) -> str:
        return f"{self.prefix}experts"

    def group(self, role: str) -> str:
        return f"{self.prefix}{role}"


def _target_digest(fingerprint: str) -> str:
    """A short, key-safe name for a target fingerprint."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=6).hexdigest()
