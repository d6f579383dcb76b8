"""The coordinator's sweeps, liveness and trimming (each run from ``tick``, each guarded).

- a round with no candidate after ``drafter_deadline_ms`` goes on without drafts;
- a request past its deadline ends with ``error_code=deadline``; one pinned to a target no
  live verifier has served for ``target_grace_s`` ends with ``target_gone``;
- a gone verifier's or drafter's own stream is moved to the shared one;
- liveness: the rosters' live drafters and verifiers (``forming.Verifiers``), their targets;
- trimming: each stream below what is still pending or unread.
"""

from __future__ import annotations

import dataclasses
import time

from cosine import bus
from cosine.core.rounds import ACTIVE, fail
from cosine.deploy import UNPROFILED_KINDS
from cosine.policy.control import drafting_prior
from cosine.wire import VerifyBatch, WireError, decode, encode
from cosine.wire.convert import empty_candidate


class Sweeps:
    """Mixed into the ``Coordinator``: what its tick sweeps, refreshes and trims."""

    async def _fallback_overdue_rounds(self) -> None:
        """A round still drafting after the deadline goes on without drafts (window 0), and so
        does one with no result ``verify_retry_ms`` after its batch was written.

        Covers drafters that died or never existed, and whatever a fault lost past them (a
        batch or a result in a stream nobody reads any more, a candidate dropped with a
        coordinator's memory). A late real draft or result for the same round is harmless: the
        first result applied wins the compare-and-set, the other is stale.
        """
        deadline_ms = self.config.pipeline.drafter_deadline_ms
        now_ms = self.clock.now_ms()
        overdue = await self.redis.zrangebyscore(self.keys.rounds, 0, now_ms - deadline_ms, start=0, num=64)
        for raw_id in overdue:
            request_id = raw_id.decode()
            await self.redis.zadd(self.keys.rounds, {request_id: now_ms}, xx=True)  # not again at once
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE:
                await self.redis.zrem(self.keys.rounds, request_id)
                continue
            record = self.records.get(request_id)
            if record is not None and record.clock is not None and record.clock.round == state.round and record.clock.sent:
                self.log.warning("request %s round %d: no result %d ms after its batch was written (lost to a fault?), verifying it again without drafts",
                                 request_id, state.round, self.config.pipeline.verify_retry_ms)
            else:  # drafting still, or sent by another coordinator
                self.log.warning("request %s round %d: no draft after %d ms (or no result of its verification), verifying without drafts",
                                 request_id, state.round, deadline_ms)
            if record is not None:
                record.draft_homes = {}  # its next round goes to any drafter, not back to the late one
            await self.redis.xadd(self.keys.candidates, encode(empty_candidate(state)))

    async def _move_gone_verifier_streams(self) -> None:
        """A verifier that is gone leaves batches in its own stream (unread, or read and not
        acknowledged): they go to the shared stream, for any verifier (one of another target
        hands a batch on to its target's stream). One atomic call, so only one coordinator
        moves it; a verifier that was only slow registers again and makes its stream again (at
        most a batch verified twice: the compare-and-set applies it once)."""
        registered = {m.decode() for m in await self.redis.smembers(self.keys.verifier_streams)}
        if not registered - self.verifiers.live:
            return
        await self._move_gone_streams("verifier", dict.fromkeys(registered, self.keys.verify), self.keys.verify_at, self.keys.verifier_streams,
                                      "set", "batches")

    async def _move_gone_drafter_streams(self) -> None:
        """A drafter that is gone leaves jobs in its own stream (unread, or read and not
        acknowledged): they go to its expert's stream, for any drafter of it. As for verifiers."""
        registered = {i.decode(): e.decode() for i, e in (await self.redis.hgetall(self.keys.drafter_streams)).items()}
        if not set(registered) - self.drafter_ids:
            return
        await self._move_gone_streams("drafter", {i: self.keys.draft(e) for i, e in registered.items()}, self.keys.draft_at,
                                      self.keys.drafter_streams, "hash", "jobs")

    async def _move_gone_coordinator_streams(self) -> None:
        """A coordinator that is gone leaves results of the batches it formed in its own stream:
        they go to the shared verified stream, for any coordinator (which applies them from the
        requests' states, as any result). As for verifiers."""
        registered = {m.decode() for m in await self.redis.smembers(self.keys.coordinator_streams)} - {self.instance}
        if registered:
            await self._move_gone_streams("coordinator", dict.fromkeys(registered, self.keys.verified), self.keys.verified_at,
                                          self.keys.coordinator_streams, "set", "results")

    async def _move_gone_streams(self, role: str, registered: dict[str, str], own, registry: str, registry_type: str, what: str) -> None:
        """Moves the own streams (``own(instance)``) of the ``registered`` workers of ``role``
        that are not live to their shared streams (instance -> shared stream), each in one
        atomic call. The roster is read after the registry, not the cached one: a worker joins
        the roster before the registry, so one that just started is not taken for gone."""
        live = set(await self.rosters.live(role, max_age_s=0.0))
        for instance in sorted(set(registered) - live):
            shared = registered[instance]
            moved = await bus.move_stream(self.redis, own(instance), shared, registry, group=self.keys.group(role), instance=instance,
                                          registry_type=registry_type)
            if moved is not None:
                self.log.warning("%s %s is gone: %d %s of its stream moved to %s", role, instance, moved, what, shared)

    async def _end_rounds_of_gone_targets(self) -> None:
        """Requests pinned to a target fingerprint that no live verifier has served for
        ``pipeline.target_grace_s`` (a retired target after a rolling upgrade) end with
        ``error_code=target_gone`` instead of waiting for their deadline: their batches are taken
        off that target's stream. Within the grace, a verifier of the target that comes back
        serves them. Only while another target is served: with no verifier live at all (a
        restart, an outage) requests wait as before, up to their deadline."""
        now, grace = time.monotonic(), self.config.pipeline.target_grace_s
        if not self.live_fingerprints:
            self.target_gone_since.clear()
            return
        for fingerprint in self.live_fingerprints:
            self.target_gone_since.pop(fingerprint, None)
        for fingerprint in sorted(self.fingerprints - self.live_fingerprints):
            if now - self.target_gone_since.setdefault(fingerprint, now) < grace:
                continue
            stream = self.keys.verify_for(fingerprint)
            for entry_id, fields in await self.redis.xrange(stream, count=64):
                try:
                    items = decode(fields, VerifyBatch).items
                except WireError:
                    items = []
                for item in items:
                    state = await self._state(item.request_id)
                    if state is None or state.status != ACTIVE or state.round != item.round:
                        continue
                    reason = f"no live verifier has served the target this request is pinned to for {grace:g}s (retired?)"
                    outcome = await self._apply(state, fail(state, self.tokenizer, reason, error_code="target_gone"))
                    self.log.warning("request %s: its target %s is gone (%s)", item.request_id, fingerprint[:16], outcome)
                await self.redis.xdel(stream, entry_id)

    async def _expire_deadlines(self) -> None:
        """Requests past their deadline (an abandoned client, a stalled pipeline) end now."""
        now_ms = self.clock.now_ms()
        for raw_id in await self.redis.zrangebyscore(self.keys.deadlines, 0, now_ms, start=0, num=64):
            request_id = raw_id.decode()
            state = await self._state(request_id)
            if state is None or state.status != ACTIVE:
                await self.redis.zrem(self.keys.deadlines, request_id)
                continue
            seconds = (state.deadline_ms - state.created_ms) / 1000
            update = fail(state, self.tokenizer, f"deadline of {seconds:g}s passed", error_code="deadline")
            outcome = await self._apply(state, update)  # stale: a round won the race; next tick
            self.log.info("request %s: deadline passed (%s)", request_id, outcome)

    async def _refresh_liveness(self) -> None:
        self.live_experts = await self.rosters.drafter_experts()
        drafters = await self.rosters.live("drafter")
        self.drafter_ids = set(drafters)
        self.warm_drafters &= self.drafter_ids
        self.drafter_expert = {instance: live.expert for instance, live in drafters.items()}
        self.drafter_queued = await self._drafter_queues() if self.config.pipeline.affinity else {}
        roster = await self.rosters.live("verifier")
        verifiers = list(roster.values())
        self.verifiers = dataclasses.replace(
            self.verifiers, live=frozenset(roster), count=len(verifiers),
            kv_rows={instance: rows for instance, live in roster.items() if (rows := live.number("kv_rows"))},
            kv_block=max((live.number("kv_block") for live in verifiers), default=1) or 1,
        )
        # The drafting prior: the live drafters' start-up profiles (drafting_prior), kept up to
        # date as drafters come and go: the fit regularises toward it.
        profiles = [p for live in drafters.values() if (p := _profile(live.fields.get("draft_ms", ""))) is not None]
        if profiles:
            prior = drafting_prior(profiles, self.control.draft_prior, sum(1 for d in self.config.drafters if d.kind not in UNPROFILED_KINDS))
            if prior != list(self.control.draft.prior):
                self.log.debug("drafting prior from %d drafters' start-up profiles: %.1f ms + %.2f/token + %.2f/token/request", len(profiles), *prior)
                self.control.draft.set_prior(prior)
        found = {live.fingerprint for live in verifiers if live.fingerprint}
        self.fingerprints |= found
        self.live_fingerprints = found
        if found and not self.control.verify.observations:
            profile = await self.redis.hgetall(self.keys.cost(sorted(found)[0]))
            if {b"a", b"b", b"c"} <= set(profile):
                self.control.verify.set_prior([float(profile.get(k, 0.0)) for k in (b"a", b"b", b"c", b"e")])

    async def _drafter_queues(self) -> dict[str, tuple[int, int]]:
        """Jobs waiting unread and in hand on each live drafter's own stream, in one round trip (only
        where an expert has more than one live drafter: with one, its requests have nowhere
        else to go)."""
        experts = list(self.drafter_expert.values())
        instances = sorted(i for i, e in self.drafter_expert.items() if experts.count(e) > 1)
        if not instances:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for instance in instances:
                pipe.xinfo_groups(self.keys.draft_at(instance))
            replies = await pipe.execute(raise_on_error=False)
        group, queued = self.keys.group("drafter"), {}
        for instance, groups in zip(instances, replies):
            if isinstance(groups, Exception):
                continue  # no stream yet: nothing queued
            for info in groups:
                if info["name"].decode() == group:
                    queued[instance] = (int(info.get("lag") or 0), int(info.get("pending") or 0))
        return queued

    # ---- housekeeping --------------------------------------------------------------------

    async def _trim(self) -> None:
        """Trim each stream below its oldest entry still pending or unread by any group."""
        async with self.redis.pipeline(transaction=False) as pipe:
            bus.read_stream_registries(pipe, self.keys)
            streams = self.keys.streams(*await pipe.execute())
        for stream in streams:
            await self.guarded(self._trim_stream, stream)

    async def _trim_stream(self, stream: str) -> None:
        if not await self.redis.exists(stream):
            return
        groups = []
        for group in await self.redis.xinfo_groups(stream):
            oldest_pending = None
            if int(group.get("pending") or 0):
                # May be acknowledged meanwhile: the summary then has no oldest entry (None).
                oldest_pending = (await self.redis.xpending(stream, group["name"]))["min"]
            groups.append((group["last-delivered-id"], oldest_pending))
        floor = bus.trim_floor(groups)
        if floor:
            await self.redis.xtrim(stream, minid=floor, approximate=False)


def _profile(text: str) -> list[float] | None:
    """A drafter's published drafting profile ``d0,d1,d2`` (None when absent or malformed)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        return None
    return values if len(values) == 3 and all(v >= 0 for v in values) else None
