"""The coordinator worker: its streams, its tick and what it holds; the stages are mixed in
(``batching``: candidates -> verification batches; ``applying``: verified results -> state,
output, next round; ``sweeps``: deadlines, gone workers and targets, liveness, trimming).
"""

from __future__ import annotations

import time
from collections import Counter

from cosine.core.rounds import RequestState
from cosine.deploy import machine_cores, plan_deployment
from cosine.policy.batching import BatchPolicy
from cosine.policy.control import SpeculationControl
from cosine.policy.routing import routing_policy
from cosine.policy.window import WindowPolicy
from cosine.wire import Candidate, VerifiedBatch, decode
from cosine.wire.state import state_from_fields

from ..base import Entry, StageWorker
from ..models import load_tokenizer_and_limits
from ..roster import LiveRoster
from .applying import Applying
from .batching import Batching, SentBatch
from .forming import Verifiers, Waiting
from .records import Records
from .sweeps import Sweeps

CONTROL_LOG_S = 30.0  # how often the cost model's state is logged (INFO)
SWEEP_S = 1.0  # how often gone workers' own streams are looked for


class Coordinator(Batching, Applying, Sweeps, StageWorker):
    role = "coordinator"
    read_count = 64

    def __init__(self, config, redis_url: str, instance: str | None = None) -> None:
        super().__init__(config, redis_url, instance)
        self.rosters = LiveRoster(self)
        spec = config.speculation
        self.control = SpeculationControl(enabled=spec.load_control and spec.max_window > 0, multi_step=spec.multi_step,
                                          drafters_share_compute=not plan_deployment(config, machine_cores()).own_compute)
        self.records = Records()  # request -> what this coordinator remembers of it between rounds
        self.sent_batches: dict[str, SentBatch] = {}  # batch id -> what the cost model needs of it, until its result is back
        # Rounds' wall times and tokens, drafted or not (what speculation earns at this load):
        # added to the stats hash with each verified batch.
        self.round_times: Counter[str] = Counter()
        self.active = 1  # active requests, as of the last batch decision
        self.flushed_this_read = False  # the pool was just decided on (one load read less per read)
        self.verifiers = Verifiers(affinity=config.pipeline.affinity)  # the live verifiers (rosters, queues)
        self.drafter_ids: set[str] = set()  # live drafter instances
        self.warm_drafters: set[str] = set()  # live drafter instances whose drafts this coordinator has pooled
        self.drafter_expert: dict[str, str] = {}  # live drafter instance -> its expert (from the roster)
        self.drafter_queued: dict[str, tuple[int, int]] = {}  # live drafter instance -> jobs of its own stream (waiting unread, in hand), last refresh

    def input_streams(self) -> list[str]:
        # Its own results first: batches it formed, which it applies with what it remembers of them.
        return [self.keys.verified_at(self.instance), self.keys.verified, self.keys.candidates]

    def own_streams(self) -> list[str]:
        return [self.keys.verified_at(self.instance)]

    def registrations(self, pipe) -> None:
        pipe.sadd(self.keys.coordinator_streams, self.instance)

    def hand_back_to(self, stream: str) -> str:
        return self.keys.verified if stream == self.keys.verified_at(self.instance) else stream

    async def setup(self) -> None:
        self.tokenizer, _, _ = await self.off_loop(load_tokenizer_and_limits, self.config)
        spec = self.config.speculation
        self.window_policy = WindowPolicy(spec.window, spec.min_window, spec.max_window, spec.adaptive_window)
        self.routing_policy = routing_policy(self.config)
        self.expert_of = {d.name: d.expert for d in self.config.drafters}
        self.batch_policy = BatchPolicy(spec.max_batch, max_wait_s=self.config.pipeline.batch_wait_ms / 1000)
        self.pool: list[Waiting] = []
        self.live_experts: set[str] = set()
        self.fingerprints: set[str] = set()  # every target fingerprint seen live
        self.live_fingerprints: set[str] = set()  # those of live verifiers now
        self.target_gone_since: dict[str, float] = {}  # fingerprint -> when its last verifier was gone (monotonic)
        self.last_refresh = self.last_trim = self.last_control_log = self.last_sweep = 0.0

    @property
    def feature_experts(self) -> set[str]:
        """Experts served by feature drafters: their requests' rounds ship the target's states."""
        return {d.expert for d in self.config.drafters if d.kind == "feature"}

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        if stream == self.keys.candidates:
            candidates = [(entry_id, decode(fields, Candidate)) for entry_id, fields in entries]
            states, load = await self._known_states_and_load([(c.request_id, c.round) for _, c in candidates])  # one round trip for all
            for (entry_id, candidate), state in zip(candidates, states):
                await self._pool_candidate(entry_id, candidate, state)
            await self._flush(load=load)
        else:
            for entry_id, fields in entries:
                await self._apply_verified(entry_id, decode(fields, VerifiedBatch), stream)
        self.flushed_this_read = True  # the tick after this read need not decide again

    async def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_refresh > 0.25:
            self.last_refresh = now
            await self._refresh_liveness()
            limit = now - self.config.pipeline.drafter_deadline_ms / 1000
            self.records.expire_drafting(limit)  # rounds that never came back here
            await self.guarded(self._fallback_overdue_rounds)
            if now - self.last_sweep > SWEEP_S:
                self.last_sweep = now
                await self.guarded(self._move_gone_verifier_streams)
                await self.guarded(self._move_gone_drafter_streams)
                await self.guarded(self._move_gone_coordinator_streams)
                await self.guarded(self._end_rounds_of_gone_targets)
            await self.guarded(self._expire_deadlines)
        if self.control.enabled and now - self.last_control_log > CONTROL_LOG_S:
            self.last_control_log = now
            self.log.info("load control: %s", self.control.describe())
        if now - self.last_trim > self.config.pipeline.trim_interval_s:
            self.last_trim = now
            await self.guarded(self._trim)
        if not self.flushed_this_read:  # a wait ran out, or rounds were applied: decide again
            await self._flush()
        self.flushed_this_read = False

    async def drain(self) -> None:
        """Hand the pool on at once: every pooled candidate goes into a batch now."""
        if self.control.enabled:
            self.log.info("load control at exit: %s", self.control.describe())
        if self.pool:
            self.log.info("draining: sending %d pooled candidates to verification", len(self.pool))
            await self.retrying(self._flush, True)

    def held(self) -> dict[str, list[bytes]]:
        return {self.keys.candidates: [w.entry_id for w in self.pool if not w.local]}

    def let_go(self, stream: str, entry_ids: set[bytes]) -> None:
        self.pool = [w for w in self.pool if w.entry_id not in entry_ids]  # another coordinator batches them

    def block_ms(self) -> int:
        if not self.pool:
            return self.config.pipeline.block_ms
        waited = time.monotonic() - self.pool[0].arrived
        return max(1, min(self.config.pipeline.block_ms, int((self.batch_policy.max_wait_s - waited) * 1000) + 1))

    async def _states(self, request_ids: list[str]) -> list[RequestState | None]:
        """Several requests' states in one round trip."""
        return (await self._read_states(request_ids, with_load=False))[0]

    async def _states_and_load(self, request_ids: list[str]) -> tuple[list[RequestState | None], tuple[int, int]]:
        """Several requests' states and the load (``_load``) in one round trip: what a batch
        decision after them needs."""
        return await self._read_states(request_ids, with_load=True)  # type: ignore[return-value]  # a load when asked for

    def _known_states(self, rounds: list[tuple[str, int]]) -> list[RequestState | None]:
        """Each (request, round)'s state as this coordinator's last apply left it, where that
        was at that round (``RequestRecord.state``), else None."""
        states: list[RequestState | None] = []
        for request_id, round_ in rounds:
            record = self.records.get(request_id)
            known = record.state if record is not None else None
            states.append(known if known is not None and known.round == round_ else None)
        return states

    async def _known_states_and_load(self, rounds: list[tuple[str, int]]) -> tuple[list[RequestState | None], tuple[int, int]]:
        """``_states_and_load`` for (request, round) pairs: where this coordinator's last apply
        left a request at that round, its state as applied (``RequestRecord.state``: the apply's
        compare-and-set checks it still is the request's); the others read, with the load, in
        one round trip. A request's hash is then read once, not on each of its rounds."""
        states = self._known_states(rounds)
        missing = [i for i, state in enumerate(states) if state is None]
        read, load = await self._states_and_load([rounds[i][0] for i in missing])
        for i, state in zip(missing, read):
            states[i] = state
        return states, load

    async def _read_states(self, request_ids: list[str], with_load: bool) -> tuple[list[RequestState | None], tuple[int, int] | None]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in request_ids:
                pipe.hgetall(self.keys.request(request_id))
            streams = self._queue_load(pipe) if with_load else []
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies[: len(request_ids)]:
            if isinstance(reply, Exception):
                raise reply
        states = [state_from_fields(fields) if fields else None for fields in replies[: len(request_ids)]]
        return states, self._parse_load(streams, replies[len(request_ids):]) if with_load else None

    async def _state(self, request_id: str) -> RequestState | None:
        return (await self._states([request_id]))[0]

