"""The one worker lifecycle every stage shares.

startup (connect, install the Lua library, create groups, load models, warm up) -> main loop
(blocking XREADGROUP; handle -> write -> XACK atomically) -> shutdown (first SIGTERM/SIGINT
drains: stop reading, finish the entries in hand; a second one exits at once).

Beside the main loop run: a heartbeat (a liveness key with a TTL), a reclaimer (XAUTOCLAIM of
entries idle on dead consumers; entries delivered too often go to the dead-letter stream), and,
around long forward passes, claim renewal so only the dead's work is ever reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cosine.bus import connect, ensure_group, load_functions
from cosine.config import Config
from cosine.state import RequestState, RoundUpdate
from cosine.wire import PAYLOAD_FIELD, Keys, WireError

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]


class StageWorker:
    role: str = "worker"
    read_count: int = 16

    def __init__(self, config: Config, redis_url: str, instance: str | None = None) -> None:
        self.config = config
        self.redis_url = redis_url
        self.keys = Keys(config.redis.namespace)
        self.instance = instance or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.group = self.keys.group(self.role)
        self.redis = None
        self.stopping = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-model")
        self.log = logging.LoggerAdapter(log, {"stage": self.role})

    # ---- what a stage defines ----------------------------------------------------------------

    def input_streams(self) -> list[str]:
        raise NotImplementedError

    async def setup(self) -> None:
        """Load models and warm up (runs after the Redis connection is ready)."""

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        """Process entries of one stream; write outputs and XACK them atomically."""
        raise NotImplementedError

    async def tick(self) -> None:
        """Called about every block_ms, also when idle (deadlines, batching)."""

    def block_ms(self) -> int:
        """How long the next XREADGROUP may block (a stage with a deadline sooner says so)."""
        return self.config.pipeline.block_ms

    def liveness_extra(self) -> str:
        return ""

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """An entry could not be handled: tell whoever waits on it (before it is dead-lettered)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, burst: bool = False) -> None:
        self._install_signal_handlers()
        self.redis = connect(self.redis_url)
        try:
            await load_functions(self.redis)
            for stream in self.input_streams():
                await ensure_group(self.redis, stream, self.group)
            await self.setup()
            tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._reclaimer())]
            self.log.info("%s %s ready on %s", self.role, self.instance, ", ".join(self.input_streams()))
            try:
                await self._main_loop(burst)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.redis.delete(self.keys.live(self.role, self.instance)), 2.0)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), 2.0)
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _main_loop(self, burst: bool) -> None:
        streams = {stream: ">" for stream in self.input_streams()}
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                read = asyncio.ensure_future(
                    self.redis.xreadgroup(self.group, self.instance, streams, count=self.read_count, block=self.block_ms())
                )
                # A drain must not wait for a blocking read (or for a server that is gone).
                await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await read
                    return
                try:
                    replies = read.result()
                except (RedisConnectionError, RedisTimeoutError) as error:
                    self.log.warning("redis connection lost (%s); retrying", error)
                    await asyncio.sleep(0.5)
                    continue
                await self._dispatch(replies)
                if burst and not replies and await self._idle():
                    return
        finally:
            stop.cancel()

    async def _dispatch(self, replies) -> None:
        for stream, entries in replies or []:
            await self._handle_safely(stream.decode() if isinstance(stream, bytes) else stream, entries)
        await self.tick()

    async def _idle(self) -> bool:
        return True

    async def _handle_safely(self, stream: str, entries: list[Entry]) -> None:
        good: list[Entry] = []
        for entry_id, fields in entries:
            if not fields:  # trimmed away or deleted while pending
                await self.redis.xack(stream, self.group, entry_id)
                continue
            good.append((entry_id, fields))
        if not good:
            return
        try:
            await self.handle(stream, good)
        except (RedisConnectionError, asyncio.CancelledError):
            raise
        except Exception as error:
            # One bad entry in a batch: handle them one by one so the good ones go through.
            if len(good) > 1:
                for entry in good:
                    await self._handle_safely(stream, [entry])
                return
            if not isinstance(error, WireError):
                self.log.exception("failed to handle %s %s", stream, good[0][0])
            reason = str(error) if isinstance(error, WireError) else f"internal error: {type(error).__name__}: {error}"
            await self.reject(stream, good[0], reason)
            await self.dead_letter(stream, good[0], reason)

    async def dead_letter(self, stream: str, entry: Entry, reason: str) -> None:
        entry_id, fields = entry
        self.log.warning("dead-lettering %s %s: %s", stream, entry_id, reason)
        raw = fields.get(PAYLOAD_FIELD)
        record = {
            "stream": stream,
            "entry_id": entry_id,
            "stage": self.role,
            "reason": reason[:2000],
            "fields": repr(fields)[:4000] if raw is None else raw[:65536],
        }
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead, record, maxlen=10_000, approximate=True)
            pipe.xack(stream, self.group, entry_id)
            pipe.hincrby(self.keys.stats, "dead_lettered", 1)
            await pipe.execute()

    # ---- helpers for stages ----------------------------------------------------------------

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a model call on the worker's thread so the event loop (heartbeats) keeps going."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.asynccontextmanager
    async def renewing(self, stream: str, entry_ids: Sequence[bytes]):
        """Keep claiming our own entries during a long call, so nobody reclaims live work."""

        async def renew() -> None:
            interval = self.config.pipeline.claim_idle_ms / 3000
            while True:
                await asyncio.sleep(interval)
                await self.redis.xclaim(stream, self.group, self.instance, 0, list(entry_ids), justid=True)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def live_drafter_experts(self, max_age_s: float = 0.25) -> set[str]:
        """Experts with at least one live drafter (cached briefly)."""
        now = time.monotonic()
        cached = getattr(self, "_live_experts", None)
        if cached is not None and now - cached[0] < max_age_s:
            return cached[1]
        experts: set[str] = set()
        async for key in self.redis.scan_iter(match=self.keys.live_pattern("drafter"), count=500):
            value = await self.redis.get(key)
            if value:
                experts.update(p.split("=", 1)[1] for p in value.decode().split() if p.startswith("expert="))
        self._live_experts = (now, experts)
        return experts

    # ---- background tasks ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        period = self.config.pipeline.heartbeat_ms
        key = self.keys.live(self.role, self.instance)
        while True:
            with contextlib.suppress(RedisConnectionError):
                await self.redis.set(key, f"{time.time():.3f} {self.liveness_extra()}", px=3 * period)
            await asyncio.sleep(period / 1000)

    async def _reclaimer(self) -> None:
        idle = self.config.pipeline.claim_idle_ms
        while True:
            await asyncio.sleep(max(0.2, idle / 4000))
            for stream in self.input_streams():
                with contextlib.suppress(RedisConnectionError):
                    await self._reclaim(stream, idle)

    async def _reclaim(self, stream: str, idle_ms: int) -> None:
        reply = await self.redis.xautoclaim(stream, self.group, self.instance, idle_ms, "0-0", count=64)
        claimed = reply[1]
        if not claimed:
            return
        await self.redis.hincrby(self.keys.stats, "reclaimed", len(claimed))
        self.log.info("reclaimed %d entries of %s", len(claimed), stream)
        live, dead = await self._split_by_deliveries(stream, claimed)
        for entry in dead:
            await self.dead_letter(stream, entry, f"delivered more than {self.config.pipeline.max_deliveries} times")
        if live:
            await self._handle_safely(stream, live)

    async def _split_by_deliveries(self, stream: str, entries: list[Entry]) -> tuple[list[Entry], list[Entry]]:
        live, dead = [], []
        limit = self.config.pipeline.max_deliveries
        for entry_id, fields in entries:
            info = await self.redis.xpending_range(stream, self.group, min=entry_id, max=entry_id, count=1)
            times = info[0]["times_delivered"] if info else 1
            (dead if times > limit else live).append((entry_id, fields or {}))
        return live, dead

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if self.stopping.is_set():
                self.log.warning("second signal: exiting now")
                os._exit(1)
            self.log.info("draining: finishing the entries in hand")
            self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)


def run_worker(worker: StageWorker, *, burst: bool = False) -> None:
    try:
        import uvloop

        uvloop.run(worker.run(burst=burst))
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on Windows
        asyncio.run(worker.run(burst=burst))


async def apply_update(redis, keys: Keys, state: RequestState, update: RoundUpdate, next_job: tuple[list[str], bytes] | None, ttl: int) -> str:
    """Apply a round's update with the compare-and-set Lua function; returns its outcome."""
    fields = update.state.to_fields()
    args: list = [str(state.round), len(fields)]
    for name, value in fields.items():
        args += [name, value]
    args.append(len(update.out_entries))
    for entry in update.out_entries:
        args.append(len(entry))
        for name, value in entry.items():
            args += [name, value]
    streams, payload = next_job if next_job else ([], b"")
    args += [payload, ttl if update.finished else 0, state.request_id]
    key_list = [keys.request(state.request_id), keys.out(state.request_id), keys.rounds, *streams]
    return (await redis.fcall("cosine_apply_round", len(key_list), *key_list, *args)).decode()
