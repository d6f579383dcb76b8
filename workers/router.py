"""Router: validates client requests, tokenizes them, picks experts, opens round 0.

Reads every tenant's ``requests`` (flat string fields from any Redis client) and ``cancel``
streams: the default tenant's and those of the registry (``cosine.tenants``), read again every
``tenants.refresh_ms``. A request's id in the pipeline carries its tenant. Admitting writes
the request state, its deadline and the first draft job, and acknowledges the entry, in one Lua
call; so does refusing (the one ``error`` final). Where an answer goes:

- the request's id is readable and free: ``out:{id}`` (its output, or its one error final);
- the id is in use by another request: the refusal goes to ``out:{entry ID}`` (the ID ``XADD``
  returned), never to the other request's stream;
- the ``id`` field is unreadable (not UTF-8, too long, spaces or braces), or missing while
  ``pipeline.require_id`` (the default) asks for one: ``out:{entry ID}``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from cosine import bus
from cosine.core.protocol import (
    MAX_ID_LENGTH,
    ClientRequest,
    RequestError,
    RequestLimits,
    eos_token_ids,
    refusal_entry,
    request_id_of,
    text_fields,
)
from cosine.core.rounds import ACTIVE, RequestState, fail
from cosine.policy.fairness import start_order
from cosine.policy.routing import RequestRouting, choose_experts, routing_policy
from cosine.policy.window import capped_window
from cosine.tenants import Limits, TenantBounds, limits
from cosine.wire import DraftJob, encode
from cosine.wire.convert import empty_candidate
from cosine.wire.keys import DEFAULT_TENANT, qualify, split_id
from cosine.wire.state import round_fields, state_from_fields, state_to_fields

from .base import Entry, StageWorker
from .models import expert_classifier, load_tokenizer_and_limits
from .roster import LiveRoster

WAITING_POLL_MS = 10


@dataclass(frozen=True, slots=True)
class _Stream:
    tenant: str
    cancel: bool


class Router(StageWorker):
    role = "router"
    read_count = 256  # a burst past the admission bound is refused a read at a time

    waiting = False  # requests were waiting at the last look (pipeline.max_waiting)
    tenant_limits: dict[str, Limits] = {}
    tenants_read = -1e9  # when the registry was last read (monotonic)

    def __init__(self, config, redis_url: str, instance: str | None = None) -> None:
        super().__init__(config, redis_url, instance)
        self.rosters = LiveRoster(self)
        self.request_limits = RequestLimits.of(config)  # the bounds and defaults of a request's fields

    def input_streams(self) -> list[str]:
        return list(self._streams())

    def hand_back_to(self, stream: str) -> None:
        return None  # admission is quick, and a request's entry ID is its id where it gave none

    def _streams(self) -> dict[str, _Stream]:
        streams = {}
        for tenant in self.tenant_limits or (DEFAULT_TENANT,):
            streams[self.keys.requests_of(tenant)] = _Stream(tenant, False)
            streams[self.keys.cancel_of(tenant)] = _Stream(tenant, True)
        return streams

    async def _prepare_server(self) -> None:
        await self._read_tenants()  # a removed tenant's streams are not made again
        await super()._prepare_server()

    async def _after_data_loss(self) -> None:
        before = set(self.tenant_limits)
        await self._read_tenants()
        if gone := before - set(self.tenant_limits):  # `cosine tenant remove` deleted its streams: no data loss
            self.log.info("tenant %s removed: its streams are no longer read", ", ".join(sorted(gone)))
            return
        await super()._after_data_loss()

    async def _read_tenants(self) -> None:
        """The tenants from the registry, their bounds, and a group on each new one's streams."""
        registry = {name.decode(): TenantBounds.from_json(value) for name, value in (await self.redis.hgetall(self.keys.tenants)).items()}
        names = [DEFAULT_TENANT, *sorted(n for n in registry if n != DEFAULT_TENANT)]
        known = set(self.tenant_limits)
        self.tenant_limits = {
            name: limits(registry.get(name, TenantBounds()), self.config.tenants, self.config.pipeline.max_requests, len(names)) for name in names
        }
        self.tenants_read = time.monotonic()
        for name in names:
            if name not in known and known:
                self.log.info("tenant %s: reading its streams", name)
                for stream in (self.keys.requests_of(name), self.keys.cancel_of(name)):
                    await bus.ensure_group(self.redis, stream, self.group)

    async def setup(self) -> None:
        self.tokenizer, self.context_limit, self.model_config = await self.off_loop(load_tokenizer_and_limits, self.config)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model_config)
        self.experts = sorted({d.expert for d in self.config.drafters})
        self.routing_policy = routing_policy(self.config)
        self.classifier = await self.off_loop(expert_classifier, self.config, len(self.tokenizer)) if self.config.router.online else None

    def _limits(self, tenant: str) -> Limits:
        return self.tenant_limits.get(tenant) or limits(TenantBounds(), self.config.tenants, self.config.pipeline.max_requests, 1)

    def _source(self, stream: str) -> _Stream:
        """Whose stream, and which: the tenants known now, else the name's (a tenant removed
        since the read)."""
        if (known := self._streams().get(stream)) is not None:
            return known
        tenant, _, kind = stream.removeprefix(f"{self.keys.prefix}t:").partition(":")
        return _Stream(tenant, kind == "cancel")

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        source = self._source(stream)
        if source.cancel:
            for entry_id, fields in entries:
                await self._cancel(source.tenant, stream, entry_id, fields)
            return
        # Past the request bound (the server's or the tenant's), or once an admission of this
        # read was refused for memory, the rest are refused without tokenizing (a burst is
        # answered in milliseconds); the admission call checks again, atomically, for what gets
        # this far.
        tenant = source.tenant
        bound, room = self.config.pipeline.max_requests, self.config.pipeline.max_waiting
        tenant_bound = self._limits(tenant).max_requests
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.deadlines)
            pipe.zcard(self.keys.waiting)
            pipe.zcard(self.keys.tenant_active(tenant))
            in_deadlines, queued, admitted = await pipe.execute()
        started = in_deadlines - queued
        full = bool(bound) and started >= bound and queued >= room
        tenant_full = bool(tenant_bound) and admitted >= tenant_bound
        turned_away, tenant_turned_away = [], []
        for entry_id, fields in entries:
            request_id = qualify(tenant, request_id_of(fields, entry_id))
            if tenant_full:
                tenant_turned_away.append((entry_id, request_id))
                continue
            if full:
                turned_away.append((entry_id, request_id))
                continue
            outcome = await self._admit(tenant, entry_id, fields)
            started += outcome == "created"
            queued += outcome == "waiting"
            admitted += outcome in ("created", "waiting")
            full = outcome == "busy" or (bool(bound) and started >= bound and queued >= room)
            tenant_full = outcome == "tenant_busy" or (bool(tenant_bound) and admitted >= tenant_bound)
        await self._turn_away(turned_away, self._busy_reason())
        await self._turn_away(tenant_turned_away, self._tenant_busy_reason(tenant))

    async def _turn_away(self, refusals: list[tuple[bytes, str]], reason: str) -> None:
        """Refuse one tenant's requests as busy, in one round trip."""
        if not refusals:
            return
        outcomes = await bus.refuse_requests(self.redis, self.keys, group=self.group, refusals=refusals,
                                             ttl_s=self.config.pipeline.output_ttl_s, entry=refusal_entry(reason, "busy"))
        self.tally.count("requests", sum(o in ("refused", "in_use") for o in outcomes), finish_reason="error", error_code="busy",
                         tenant=split_id(refusals[0][1])[0])
        self.log.info("%d requests refused (busy): %s", len(refusals), dict(Counter(outcomes)))

    def _busy_reason(self) -> str:
        pipeline = self.config.pipeline
        waiting = f", {pipeline.max_waiting} waiting" if pipeline.max_waiting else ""
        return f"the server is at capacity ({pipeline.max_requests} requests or its K/V memory{waiting}); retry later, with a new id"

    def _tenant_busy_reason(self, tenant: str) -> str:
        return f"this tenant has {self._limits(tenant).max_requests} requests in the server, its bound; retry later, with a new id"

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """An entry the router failed on (a bug, not the client's input): one internal error final."""
        source = self._source(stream)
        if not source.cancel:
            entry_id, raw = entry
            await self._refuse(entry_id, qualify(source.tenant, request_id_of(raw, entry_id)), reason, "internal")

    async def _admit(self, tenant: str, entry_id: bytes, raw: dict[bytes, bytes]) -> str:
        """Admit or refuse one client entry of ``tenant``; returns the outcome (``created``,
        ``waiting``, ``busy``, ``tenant_busy``, ``refused``, ``duplicate``, ``in_use``)."""
        client_id = request_id_of(raw, entry_id)
        request_id = qualify(tenant, client_id)
        try:
            if client_id == entry_id.decode() and b"id" in raw:
                raise RequestError(f"'id' must be 1-{MAX_ID_LENGTH} UTF-8 characters without spaces or braces", "id")
            if b"id" not in raw and self.config.pipeline.require_id:
                raise RequestError("'id' is required: give each request a random one (a UUID4, say); whoever knows it can read "
                                   "the output, and an entry ID can be guessed", "id")
            state = self._build_state(request_id, text_fields(raw))
        except RequestError as error:
            return await self._refuse(entry_id, request_id, str(error), error.code, error.param)
        streams, payload = await self._first_job(state)
        pipeline = self.config.pipeline
        outcome = await bus.admit_request(
            self.redis, self.keys, group=self.group, entry_id=entry_id, request_id=state.request_id,
            deadline_ms=state.deadline_ms, ttl_s=pipeline.output_ttl_s, fields=state_to_fields(state),
            job_streams=streams, payload=payload,
            refusal=refusal_entry(f"request id {client_id!r} is already in use", "invalid", "id"),
            max_requests=pipeline.max_requests, token_budget=await self.rosters.verifier_kv_rows() if pipeline.admission_kv else 0,
            tokens=len(state.prompt_ids) + state.max_tokens, max_waiting=pipeline.max_waiting, busy=refusal_entry(self._busy_reason(), "busy"),
            tenant_max=self._limits(tenant).max_requests, tenant_busy=refusal_entry(self._tenant_busy_reason(tenant), "busy"),
        )
        self.waiting |= outcome == "waiting"
        if outcome in ("created", "waiting"):
            self.tally.count("prompt_tokens", len(state.prompt_ids), tenant=tenant)
        elif outcome in ("busy", "tenant_busy", "in_use"):
            self.tally.request_ended("error", "invalid" if outcome == "in_use" else "busy", tenant=tenant)
        self.log.info("request %s: %s (%d prompt tokens, experts %s)", state.request_id, outcome, len(state.prompt_ids), state.experts)
        return outcome

    async def _first_job(self, state: RequestState) -> tuple[list[str], bytes]:
        """The streams and payload of a request's round 0."""
        live = await self.rosters.drafter_experts()
        experts = [e for e in state.experts if e in live]  # fusion waits only for experts that can answer
        # Under load control the first round goes straight to verification: the verifier reads
        # the prompt anyway, drafters would too (a prefill each) before anything is known of the
        # request's acceptance; the coordinator decides from the next round on.
        speculation = self.config.speculation
        if experts and state.window > 0 and not speculation.load_control:
            job = DraftJob(state.request_id, 0, state.context, state.window, state.sampling, experts, self.clock.now_ms(), domain=state.domain,
                           step_mode=speculation.mode == "step")
            return [self.keys.draft(e) for e in experts], encode(job)[b"m"]
        # no drafter alive for these experts, window 0, or load control: start without drafts
        return [self.keys.candidates], encode(empty_candidate(state))[b"m"]

    async def tick(self) -> None:
        if time.monotonic() - self.tenants_read >= self.config.tenants.refresh_ms / 1000:
            await self._read_tenants()
            await self._shed_backlogs()
        # Also with max_waiting = 0 here: requests may wait from before a change of the config,
        # or from another router's.
        await self._start_waiting()

    async def _shed_backlogs(self) -> None:
        """A tenant's request stream past its bounds (unread entries, bytes): its oldest unread
        entries are refused (busy, without tokenizing) until it is back under them. One round
        trip for every tenant's figures; only a tenant past a bound costs more."""
        tenants = list(self.tenant_limits)
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.xinfo_groups(self.keys.requests_of(tenant))
                pipe.memory_usage(self.keys.requests_of(tenant))
            replies = await pipe.execute(raise_on_error=False)
        for index, tenant in enumerate(tenants):
            groups, used = replies[2 * index], replies[2 * index + 1]
            if isinstance(groups, Exception):
                continue
            lag = next((g.get("lag") or 0 for g in groups if g["name"].decode() == self.group), 0)
            bound = self._limits(tenant)
            excess = max(lag - bound.max_unread if bound.max_unread else 0,
                         lag if bound.max_stream_bytes and isinstance(used, int) and used > bound.max_stream_bytes else 0)
            if excess > 0:
                await self._shed(tenant, excess, lag, used)

    async def _shed(self, tenant: str, count: int, lag: int, used: int) -> None:
        stream = self.keys.requests_of(tenant)
        replies = await self.redis.xreadgroup(self.group, self.instance, {stream: ">"}, count=count)
        entries = replies[0][1] if replies else []
        refusals = [(entry_id, qualify(tenant, request_id_of(fields, entry_id))) for entry_id, fields in entries]
        bound = self._limits(tenant)
        await self._turn_away(refusals, f"this tenant's request stream holds {lag} unread requests ({used} bytes), past its bound "
                                        f"({bound.max_unread} requests, {bound.max_stream_bytes} bytes); retry later, with a new id")
        self.log.warning("tenant %s: %d unread requests (%s bytes) past its bounds: %d refused", tenant, lag, used, len(refusals))

    def block_ms(self) -> int:
        # Requests waiting: look again soon (a slot frees when any request ends, and nothing
        # the router reads says so).
        return min(super().block_ms(), WAITING_POLL_MS) if self.waiting else super().block_ms()

    async def _start_waiting(self) -> None:
        """Start waiting requests while the admission bounds allow: the starts shared among the
        tenants with requests waiting (``cosine.policy.fairness``), first come first within one."""
        pipeline = self.config.pipeline
        tenants = list(self.tenant_limits or (DEFAULT_TENANT,))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self.keys.waiting)
            pipe.zcard(self.keys.deadlines)
            for tenant in tenants:
                pipe.zrange(self.keys.tenant_waiting(tenant), 0, 15, withscores=True)
                pipe.zcard(self.keys.tenant_active(tenant))
                pipe.zcard(self.keys.tenant_waiting(tenant))
            queued, in_deadlines, *per_tenant = await pipe.execute()
        self.waiting = bool(queued)
        if not queued or (pipeline.max_requests and in_deadlines - queued >= pipeline.max_requests):
            return  # nobody waits, or every slot is taken (the start call checks again, exactly)
        waiting = {t: [(m.decode(), score) for m, score in per_tenant[3 * i]] for i, t in enumerate(tenants)}
        started = {t: per_tenant[3 * i + 1] - per_tenant[3 * i + 2] for i, t in enumerate(tenants)}
        budget = await self.rosters.verifier_kv_rows() if pipeline.admission_kv else 0
        for request_id in start_order(waiting, started, 16):
            fields = await self.redis.hgetall(self.keys.request(request_id))
            state = state_from_fields(fields) if fields else None
            if state is None or state.status != ACTIVE:  # ended while waiting; the call drops it
                streams, payload = [], b""
            else:
                streams, payload = await self._first_job(state)
            outcome = await bus.start_waiting(
                self.redis, self.keys, request_id=request_id, job_streams=streams, payload=payload,
                max_requests=pipeline.max_requests, token_budget=budget,
                tokens=len(state.prompt_ids) + state.max_tokens if state else 0,
            )
            if outcome == "created":
                self.log.info("request %s: started after waiting %d ms", request_id, self.clock.now_ms() - state.created_ms)
            elif outcome in ("busy", "later"):
                break

    def _build_state(self, request_id: str, fields: dict[str, str]) -> RequestState:
        request = ClientRequest.from_fields(fields, self.request_limits)
        prompt_ids = request.token_ids(self.tokenizer)
        if len(prompt_ids) + request.max_tokens > self.context_limit:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.max_tokens}) exceeds the context limit ({self.context_limit})",
                "messages" if "messages" in fields else "prompt",
            )
        pinned = request.expert
        if pinned is not None and pinned not in self.experts:
            raise RequestError(f"unknown expert {pinned!r}; valid experts: {', '.join(self.experts)}", "expert")
        text = fields.get("prompt") or fields.get("messages") or ""
        router = self.config.router
        routing = None
        if router.online and self.experts:
            # Every expert is a candidate (keyword matches and the defaults first); the cold-start
            # classifier orders them and the request's scores take over from its first round.
            candidates = choose_experts(text, pinned, router.default_experts, router.keywords, self.experts, len(self.experts))
            candidates += [e for e in self.experts if e not in candidates and pinned is None]
            prior = self.classifier.probabilities(prompt_ids) if self.classifier else {}
            online = RequestRouting.start(candidates, prior, self.routing_policy, pinned)
            experts = online.choose(self.routing_policy)
            routing = online.to_dict()
        else:
            experts = choose_experts(text, pinned, router.default_experts, router.keywords, self.experts, router.max_experts)
        now_ms = self.clock.now_ms()
        return RequestState(
            request_id=request_id,
            prompt_ids=prompt_ids,
            sampling=request.sampling,
            max_tokens=request.max_tokens,
            stop=request.stop,
            eos_ids=tuple(sorted(self.eos_ids)),
            experts=experts,
            routing=routing,
            window=capped_window(self.config.speculation.window, request.max_window),
            max_window=request.max_window,
            created_ms=now_ms,
            deadline_ms=now_ms + int(request.deadline_s * 1000),
            logprobs=request.logprobs,
        )

    async def _refuse(self, entry_id: bytes, request_id: str, reason: str, code: str, param: str = "") -> str:
        outcome = await bus.refuse_request(
            self.redis, self.keys, group=self.group, entry_id=entry_id, request_id=request_id,
            ttl_s=self.config.pipeline.output_ttl_s, entry=refusal_entry(reason, code, param),
        )
        if outcome in ("refused", "in_use"):
            self.tally.request_ended("error", code, tenant=split_id(request_id)[0])
        # The reason goes to the client only: it may quote what the client sent (a message's
        # role, a field's value), and logs hold no prompt or output text.
        self.log.info("request %s refused (%s, %s%s)", request_id, code, outcome, f", param {param}" if param else "")
        return outcome

    async def _cancel(self, tenant: str, stream: str, entry_id: bytes, raw: dict[bytes, bytes]) -> None:
        """Flag the request (the next round application ends it), then try to end it at once.
        Only ``tenant``'s own: the id is qualified with the tenant of the cancel stream (an id
        that no request could have, with braces say, is ignored)."""
        client_id = request_id_of(raw, entry_id)
        request_id = qualify(tenant, client_id) if b"id" in raw and client_id != entry_id.decode() else ""
        outcome = ""
        if request_id:
            final = refusal_entry("cancelled by client before it started", "cancelled", finish_reason="cancelled")
            outcome = await bus.flag_cancel(self.redis, self.keys, request_id, ttl_s=self.config.pipeline.output_ttl_s, final=final)
        if outcome == "early":  # the cancel overtook its request: that one will never start
            self.tally.request_ended("cancelled", "cancelled", tenant=tenant)
            self.log.info("request %s cancelled before it started", request_id)
        if outcome == "flagged":
            for _ in range(5):  # a round applied in between makes the attempt stale: read again
                fields = await self.redis.hgetall(self.keys.request(request_id))
                state = state_from_fields(fields) if fields else None
                if state is None or state.status != ACTIVE:
                    break
                update = fail(state, self.tokenizer, "cancelled by client", "cancelled", "cancelled")
                outcome = await bus.apply_round(self.redis, self.keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
                                                out_entries=update.out_entries, ttl_s=self.config.pipeline.output_ttl_s)
                if outcome == "applied":
                    self.tally.request_ended("cancelled", "cancelled", state.created_ms, self.clock.now_ms(), tenant=tenant)
                if outcome != "stale":
                    break
            self.log.info("request %s cancelled", request_id)
        await self.redis.xack(stream, self.group, entry_id)
