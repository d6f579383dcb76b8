"""Every stream and key name, derived from one namespace prefix, the tenant and the request id.

A request's id inside the pipeline carries its tenant: the client's id as is for the ``default``
tenant (today's key names: ``cosine:requests``, ``cosine:out:{id}``), ``{tenant}id`` for any
other (``cosine:t:{tenant}:requests``, ``cosine:t:{tenant}:out:{id}``). Braces never occur in a
client's id, so no id of one tenant can name another tenant's keys.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

DEFAULT_TENANT = "default"
# The pipeline's roles, in the order a request meets them.
ROLES = ("router", "drafter", "fusion", "coordinator", "verifier")
TENANT_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def check_tenant_name(name: str) -> str:
    """``name`` if it can name a tenant (1-32 of a-z, 0-9, '_', '-'), else ValueError."""
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name {name!r}: 1-32 characters of a-z, 0-9, '_' and '-', starting with a letter or digit")
    return name


def qualify(tenant: str, client_id: str) -> str:
    """The pipeline's id of a tenant's request."""
    return client_id if tenant == DEFAULT_TENANT else f"{{{tenant}}}{client_id}"


def split_id(request_id: str) -> tuple[str, str]:
    """(tenant, the client's id) of a pipeline request id."""
    if request_id.startswith("{") and (end := request_id.find("}")) > 0:
        return request_id[1:end], request_id[end + 1:]
    return DEFAULT_TENANT, request_id


@dataclass(frozen=True, slots=True)
class Keys:
    """All stream and key names, under one namespace prefix (default ``cosine:``)."""

    prefix: str = "cosine:"

    # client-facing streams
    def tenant_prefix(self, tenant: str = DEFAULT_TENANT) -> str:
        """The prefix of a tenant's client-facing keys (a client user's ACL patterns)."""
        return self.prefix if tenant == DEFAULT_TENANT else f"{self.prefix}t:{tenant}:"

    def _scoped(self, request_id: str) -> tuple[str, str]:
        tenant, client_id = split_id(request_id)
        return self.tenant_prefix(tenant), client_id

    @property
    def requests(self) -> str:
        return f"{self.prefix}requests"

    @property
    def cancel(self) -> str:
        return f"{self.prefix}cancel"

    def requests_of(self, tenant: str) -> str:
        return f"{self.tenant_prefix(tenant)}requests"

    def cancel_of(self, tenant: str) -> str:
        return f"{self.tenant_prefix(tenant)}cancel"

    def out(self, request_id: str) -> str:
        prefix, client_id = self._scoped(request_id)
        return f"{prefix}out:{client_id}"

    @property
    def tenants(self) -> str:
        """hash: tenant name -> its bounds (JSON), written by ``cosine tenant``; the ``default``
        tenant is not in it (it always exists)."""
        return f"{self.prefix}tenants"

    def tenant_active(self, tenant: str) -> str:
        """zset: a tenant's requests admitted and not finished (waiting or started) -> deadline."""
        return f"{self.prefix}tenant:{tenant}:active"

    def tenant_waiting(self, tenant: str) -> str:
        """zset: a tenant's requests waiting to start -> when they arrived, in µs (its own queue: the
        starts are shared among tenants, first come first within one)."""
        return f"{self.prefix}tenant:{tenant}:waiting"

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

    @property
    def verify_pattern(self) -> str:
        """Every verify stream of a target or an instance (ACL patterns)."""
        return f"{self.prefix}verify:*"

    def verify_at(self, instance: str) -> str:
        """Verification batches for one verifier instance: rounds of requests whose caches it
        holds (cache affinity). Moved to the shared streams when the instance is gone."""
        return f"{self.prefix}verify:at:{instance}"

    @property
    def verifier_streams(self) -> str:
        """set: verifier instances that have a ``verify_at`` stream (for the sweep of gone ones)."""
        return f"{self.prefix}verifier-streams"

    @property
    def cost_pattern(self) -> str:
        """Every target's cost profile (ACL patterns)."""
        return f"{self.prefix}cost:*"

    def cost(self, fingerprint: str) -> str:
        """hash: a verifier's start-up profile of its verification cost (ms = a + b B + c T)."""
        return f"{self.prefix}cost:{_target_digest(fingerprint)}"

    @property
    def verified(self) -> str:
        return f"{self.prefix}verified"

    def verified_at(self, instance: str) -> str:
        """Verified results of the batches one coordinator instance formed: it applies them
        with what it remembers of their rounds (its pool, cost model, round clocks). Moved to
        ``verified`` when the instance is gone."""
        return f"{self.prefix}verified:at:{instance}"

    @property
    def verified_pattern(self) -> str:
        """Every coordinator's own verified stream (ACL patterns)."""
        return f"{self.prefix}verified:at:*"

    @property
    def coordinator_streams(self) -> str:
        """set: coordinator instances that have a ``verified_at`` stream (for the sweep of gone ones)."""
        return f"{self.prefix}coordinator-streams"

    @property
    def dead(self) -> str:
        return f"{self.prefix}dead"

    # state
    def request(self, request_id: str) -> str:
        prefix, client_id = self._scoped(request_id)
        return f"{prefix}req:{client_id}"

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
        prefix, client_id = self._scoped(request_id)
        return f"{prefix}feat:{client_id}"

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

    def stream_registries(self) -> tuple[str, str, str, str, str, str]:
        """Where the streams made at run time are named: experts and target fingerprints (sets),
        verifiers with own streams (set), drafters with own streams and tenants (hashes),
        coordinators with own streams (set). Read them (SMEMBERS, SMEMBERS, SMEMBERS, HKEYS,
        HKEYS, SMEMBERS) for ``streams``."""
        return (self.experts, self.fingerprints, self.verifier_streams, self.drafter_streams, self.tenants, self.coordinator_streams)

    def streams(self, experts=(), fingerprints=(), verifiers=(), drafters=(), tenants=(), coordinators=()) -> list[str]:
        """Every stream of the pipeline, given the members of ``stream_registries`` (str or
        bytes): the fixed ones, each expert's and target's queue, each worker's own stream and
        each tenant's request and cancel streams. The one list the status view, the gateway's
        metrics and the coordinator's trimming read."""
        text = lambda values: sorted(v.decode() if isinstance(v, bytes) else v for v in values)  # noqa: E731
        streams = [self.requests, self.cancel, self.drafts, self.candidates, self.verify, self.verified, self.dead]
        streams += [self.draft(e) for e in text(experts)]
        streams += [self.verify_for(f) for f in text(fingerprints)]
        streams += [self.verify_at(i) for i in text(verifiers)]
        streams += [self.draft_at(i) for i in text(drafters)]
        streams += [self.verified_at(i) for i in text(coordinators)]
        for tenant in text(tenants):
            streams += [self.requests_of(tenant), self.cancel_of(tenant)]
        return streams

    def group(self, role: str) -> str:
        return f"{self.prefix}{role}"


def _target_digest(fingerprint: str) -> str:
    """A short, key-safe name for a target fingerprint."""
    return hashlib.blake2b(fingerprint.encode(), digest_size=6).hexdigest()
