"""Who is live, as the rosters say: for the stages that decide by it (the router admits against
the verifiers' K/V pools and starts drafting only for live experts; the coordinator routes
rounds, moves gone workers' streams and sizes batches). Composed into those stages, not part of
every worker's runtime."""

from __future__ import annotations

import time

from cosine.bus import Liveness, split_roster


class LiveRoster:
    """A role's live workers, read from its roster hash (one read, whatever the keyspace holds)
    and cached briefly; entries long expired are removed on the way. Expiry is the server's
    clock (the worker's ``clock``)."""

    def __init__(self, worker) -> None:
        self.worker = worker  # its redis connection, keys and clock, read at each call
        self.cache: dict[str, tuple[float, dict[str, Liveness]]] = {}

    async def live(self, role: str, max_age_s: float = 0.25) -> dict[str, Liveness]:
        """Instance -> liveness of the role's live workers."""
        now = time.monotonic()
        cached = self.cache.get(role)
        if cached is not None and now - cached[0] < max_age_s:
            return cached[1]
        worker = self.worker
        key = worker.keys.roster(role)
        live, gone = split_roster(await worker.redis.hgetall(key), worker.clock.now_ms())
        if gone:
            await worker.redis.hdel(key, *gone)
        self.cache[role] = (now, live)
        return live

    async def verifier_kv_rows(self) -> int:
        """Rows of the live verifiers' K/V pools together (their roster values' ``kv_rows``)."""
        return sum(live.number("kv_rows") for live in (await self.live("verifier")).values())

    async def drafter_experts(self, max_age_s: float = 0.25) -> set[str]:
        """Experts with at least one live drafter."""
        return {live.expert for live in (await self.live("drafter", max_age_s)).values() if live.expert}
