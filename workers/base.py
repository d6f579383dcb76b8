"""The one worker lifecycle every stage shares.

startup (connect, install the Lua library, create groups, load models, warm up) -> main loop
(blocking XREADGROUP; handle -> write -> XACK atomically) -> drain (first SIGTERM/SIGINT: stop
reading, finish the entries in hand, hand back what is held) -> shutdown; a second signal exits
at once.

Beside the main loop run: a heartbeat (a liveness key with a TTL), a reclaimer (XAUTOCLAIM of
entries idle on dead consumers; entries delivered too often go to the dead-letter stream), and,
around long forward passes, claim renewal so only the dead's work is ever reclaimed.

Nothing but SIGKILL ends a worker once it is up: every handler, tick and background task is
guarded. A Redis error is never blamed on an entry: the call is retried with backoff (the
client reconnects by itself), and a server that lost its functions or groups (restarted without
persistence) gets them again. Only an entry that fails on its own is rejected and dead-lettered.
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
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.exceptions import RedisError

from cosine import bus, faults
from cosine.bus import (
    LibraryMissing,
    Liveness,
    connect,
    ensure_group,
    require_library,
)
from cosine.clock import ServerClock
from cosine.config import Config
from cosine.metrics import Tally
from cosine.wire import PAYLOAD_FIELD, Keys, WireError

log = logging.getLogger(__name__)

Entry = tuple[bytes, dict[bytes, bytes]]

# Server states that pass (a restart, a full memory, a replica promoted, a long script): retried
# for as long as they last. Any other Redis error is retried a bounded number of times.
_TRANSIENT_PREFIXES = ("OOM", "READONLY", "BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "NOGROUP", "NOSCRIPT", "ERR Function not found")
BOUNDED_ATTEMPTS = 6
MAX_BACKOFF_S = 5.0


class StartupError(RuntimeError):
    """The worker could not start (bad config, missing model): restarting it will not help."""


def is_transient(error: RedisError) -> bool:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(error, (RedisConnectionError, RedisTimeoutError)):
        return True
    return str(error).startswith(_TRANSIENT_PREFIXES)


def _raise_if_cancelling() -> None:
    """A cancellation that a library turned into another error is still a cancellation."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()


def _needs_setup_again(error: RedisError) -> bool:
    text = str(error)
    return "NOGROUP" in text or "Function not found" in text or "NOSCRIPT" in text




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
        # Every torch call of a worker runs on this one thread (off_loop), the model's loading
        # included: a second thread running torch ops gets its own OpenMP team, the process then
        # has more OpenMP threads than cores, libgomp stops spinning between parallel regions and
        # both go slow (a round's time nearly doubles).
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{self.role}-model")
        # One logger per stage (cosine.workers.router, ...): every line names the stage it came from.
        self.log = logging.getLogger(f"{__name__.rsplit('.', 1)[0]}.{self.role}")
        self._in_hand: dict[str, list[bytes]] = {}  # read, not yet handled (renewed, never reclaimed)
        self.tally = Tally()  # metrics counted here, written beside the read after the one that counted them
        self._tally_writing: asyncio.Future | None = None
        self.clock = ServerClock()  # the server's time: every time compared with another process's

    # ---- what a stage defines ----------------------------------------------------------------

    def input_streams(self) -> list[str]:
        raise NotImplementedError

    def own_streams(self) -> list[str]:
        """Input streams of this worker alone (cache affinity): made once it is registered."""
        return []

    async def setup(self) -> None:
        """Load models and warm up (runs after the Redis connection is ready)."""

    async def on_connect(self) -> None:
        """Announce what this worker serves (runs at start and after the server lost its data)."""

    async def handle(self, stream: str, entries: list[Entry]) -> None:
        """Process entries of one stream; write outputs and XACK them atomically.

        Must be idempotent: after a Redis error it is called again with the same entries.
        """
        raise NotImplementedError

    async def tick(self) -> None:
        """Called about every block_ms, also when idle (deadlines, batching)."""

    async def drain(self) -> None:
        """On SIGTERM, after the last read: hand back what is held in memory."""

    def let_go(self, stream: str, entry_ids: set[bytes]) -> None:
        """Held entries that are no longer this worker's (taken over while it was frozen): drop them."""

    def hand_back_to(self, stream: str) -> str | None:
        """Where a draining worker gives back the entries of ``stream`` it read and did not
        start: the end of the same stream (an own stream's: the shared one), for any worker of
        the role; None: this worker handles them before it exits (quick, or entry IDs matter)."""
        return stream

    def held(self) -> dict[str, list[bytes]]:
        """Entries read and acknowledged later (pooled): their claims are renewed, never reclaimed."""
        return {}

    def block_ms(self) -> int:
        """How long the next XREADGROUP may block (a stage with a deadline sooner says so)."""
        return self.config.pipeline.block_ms

    def liveness_fields(self) -> dict[str, str]:
        """What the worker's liveness value says besides its heartbeat (``bus.Liveness``)."""
        return {}

    def registrations(self, pipe) -> None:
        """Commands that register this worker's own streams, sent with every heartbeat after the
        roster entry: a coordinator that took the worker for gone while it was only slow (it
        moved the stream and dropped the entry) finds it registered again a beat later, and the
        worker makes its stream again when its next read finds it gone."""

    def connection_class(self):
        """The Redis connection class of this worker's client (None: redis-py's own)."""
        return None

    async def reject(self, stream: str, entry: Entry, reason: str) -> None:
        """An entry could not be handled: tell whoever waits on it (before it is dead-lettered)."""

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, burst: bool = False, signals: bool = True) -> None:
        """The worker's life; ``signals=False`` where a host process handles SIGTERM for the
        several workers it runs (and sets their ``stopping``)."""
        if signals:
            self._install_signal_handlers()
        self.redis = connect(self.redis_url, connection_class=self.connection_class())
        try:
            try:
                await self.retrying(self._prepare_server, forever=True)
            except LibraryMissing as error:
                raise StartupError(f"{self.role} could not start: {error}") from error
            try:
                await self.setup()
            except Exception as error:
                raise StartupError(f"{self.role} could not start: {type(error).__name__}: {error}") from error
            await self.retrying(self.on_connect, forever=True)
            await self.retrying(self._make_own_streams, forever=True)
            tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._reclaimer())]
            self.log.info("%s %s ready on %s", self.role, self.instance, ", ".join(self.input_streams()))
            try:
                await self._main_loop(burst)
                await self.guarded(self._hand_back_unstarted)
                await self.guarded(self.drain)
                if self._tally_writing is not None:
                    await asyncio.wait({self._tally_writing}, timeout=2.0)
                await self.guarded(self.write_tally)
            finally:
                for task in tasks:
                    task.cancel()
                # Bounded: a cancellation that the Redis client swallowed (it can turn into a
                # time-out that is retried) must not keep the worker from exiting.
                _, running = await asyncio.wait(tasks, timeout=5.0)
                if running:
                    self.log.warning("%d background tasks did not stop; exiting without them", len(running))
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.redis.delete(self.keys.live(self.role, self.instance)), 2.0)
                    await asyncio.wait_for(self.redis.hdel(self.keys.roster(self.role), self.instance), 2.0)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.redis.aclose(), 2.0)
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def _prepare_server(self) -> None:
        await require_library(self.redis)
        await self.clock.sync(self.redis)
        own = self.own_streams()
        for stream in self.input_streams():
            if stream not in own:
                await ensure_group(self.redis, stream, self.group)

    async def _make_own_streams(self) -> None:
        """In the roster and the registry first, then the own streams: such a stream exists only
        while its worker is registered, and a coordinator moves the registered streams of workers
        that are not live (one made by a worker that died unregistered would never be read;
        one made before the roster entry would be taken for a gone worker's)."""
        if own := self.own_streams():
            await self._beat(self.keys.live(self.role, self.instance), 3 * self.config.pipeline.heartbeat_ms)
            for stream in own:
                await ensure_group(self.redis, stream, self.group)

    async def _main_loop(self, burst: bool) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        backoff = 0.1
        try:
            while not self.stopping.is_set():
                streams = {stream: ">" for stream in self.input_streams()}
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
                except Exception as error:  # the server is gone, restarting, or lost our groups
                    self.log.warning("reading %s failed (%s: %s); retrying in %.1fs", self.role, type(error).__name__, error, backoff)
                    if isinstance(error, RedisError) and _needs_setup_again(error):
                        await self.guarded(self._after_data_loss)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    await self.guarded(self.tick)
                    continue
                backoff = 0.1
                await self.guarded(self._dispatch, replies)
                await self.guarded(self.tick)
                # Metrics go out beside the next read, not before it (a round trip after each
                # read sat on every round's path); one write at a time, the counts of the reads
                # meanwhile go with the next.
                if self.tally and (self._tally_writing is None or self._tally_writing.done()):
                    self._tally_writing = asyncio.ensure_future(self.guarded(self.write_tally))
                if burst and not replies and await self._idle():
                    return
        finally:
            stop.cancel()

    async def _hand_back_unstarted(self) -> None:
        """Draining: the entries still pending for this worker and not held on purpose (a read
        that the drain cut short, whose entries the server had delivered all the same) go back
        for another worker to take now, instead of after ``claim_idle_ms`` with a delivery
        counted; a role that gives nothing back handles them first."""
        held = self.held()
        for stream in self.input_streams():
            reply = await self.redis.xreadgroup(self.group, self.instance, {stream: "0"}, count=10_000)
            keep = set(held.get(stream, []))
            entries = [(entry_id, fields) for _, items in reply or [] for entry_id, fields in items if entry_id not in keep]
            if not entries:
                continue
            to = self.hand_back_to(stream)
            if to is None:
                await self._handle_safely(stream, entries)
            else:
                given = await self.retrying(bus.hand_back, self.redis, stream, to, group=self.group, consumer=self.instance, entry_ids=[e for e, _ in entries])
                self.log.info("draining: gave back %d unstarted entries of %s", given, stream)

    async def _dispatch(self, replies) -> None:
        # One read returns up to read_count entries *per stream*: those still waiting their turn
        # are renewed like held ones, so a long handle of one stream's entries does not let
        # anybody (our own reclaimer included) take the others.
        self._in_hand = {(s.decode() if isinstance(s, bytes) else s): [e for e, _ in entries] for s, entries in replies or []}
        try:
            for stream, entries in replies or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                await self._handle_safely(name, entries)
                self._in_hand.pop(name, None)
        finally:
            self._in_hand = {}

    async def _idle(self) -> bool:
        return True

    async def _handle_safely(self, stream: str, entries: list[Entry]) -> None:
        good: list[Entry] = []
        for entry_id, fields in entries:
            if not fields:  # trimmed away or deleted while pending
                await self.retrying(self.redis.xack, stream, self.group, entry_id)
                continue
            good.append((entry_id, fields))
        if not good:
            return
        try:
            await self.retrying(self.handle, stream, good)
        except asyncio.CancelledError:
            raise
        except RedisError as error:
            # Not the entries' fault: they stay pending and are handled again when reclaimed.
            self.log.warning("left %d entries of %s pending after Redis errors: %s", len(good), stream, error)
        except Exception as error:
            # One bad entry in a batch: handle them one by one so the good ones go through.
            if len(good) > 1:
                for entry in good:
                    await self._handle_safely(stream, [entry])
                return
            if not isinstance(error, WireError):
                self.log.exception("failed to handle %s %s", stream, good[0][0])
            reason = str(error) if isinstance(error, WireError) else f"internal error: {type(error).__name__}: {error}"
            await self.guarded(self.reject, stream, good[0], reason)
            await self.guarded(self.dead_letter, stream, good[0], reason)

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

        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self.keys.dead, record, maxlen=10_000, approximate=True)
                pipe.xack(stream, self.group, entry_id)
                pipe.hincrby(self.keys.stats, "dead_lettered", 1)
                await pipe.execute()

        await self.retrying(write)

    # ---- helpers for stages ----------------------------------------------------------------

    async def retrying(self, fn: Callable[..., Awaitable[Any]], *args: Any, forever: bool = False, **kwargs: Any) -> Any:
        """``await fn(*args)``, retried with backoff on Redis errors.

        Transient server states (connection lost, OOM, READONLY, BUSY, ...) are retried while
        they last (``forever``, or until a drain, after a few more tries); any other Redis error
        a bounded number of times. Other exceptions pass through at once.
        """
        delay, attempt = 0.1, 0
        while True:
            try:
                return await fn(*args, **kwargs)
            except RedisError as error:
                _raise_if_cancelling()
                attempt += 1
                give_up = attempt >= BOUNDED_ATTEMPTS and (not is_transient(error) or (self.stopping.is_set() and not forever))
                if give_up:
                    raise
                log_at = logging.WARNING if attempt in (1, 3) or attempt % 20 == 0 else logging.DEBUG
                self.log.log(log_at, "redis error in %s (%s: %s); retry %d in %.1fs", getattr(fn, "__name__", fn), type(error).__name__, error, attempt, delay)
                if _needs_setup_again(error):
                    await self.guarded(self._after_data_loss)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    async def guarded(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        """``await fn(*args)``; any exception is logged, never raised (a task or tick must not die)."""
        try:
            return await fn(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except RedisError as error:
            _raise_if_cancelling()
            self.log.warning("%s: redis error (%s: %s)", getattr(fn, "__name__", fn), type(error).__name__, error)
        except Exception:
            _raise_if_cancelling()
            self.log.exception("%s failed", getattr(fn, "__name__", fn))
        return None

    async def write_tally(self) -> None:
        """The metrics counted since the last write, one ``HINCRBYFLOAT`` each, in one round trip."""
        if not self.tally:
            return
        fields = self.tally.fields()
        self.tally.clear()  # a failed write loses these counts, never counts them twice
        async with self.redis.pipeline(transaction=False) as pipe:
            for field, value in fields.items():
                pipe.hincrbyfloat(self.keys.metrics, field, value)
            await pipe.execute()

    async def _after_data_loss(self) -> None:
        self.log.warning("the server lost functions or groups (restarted without persistence?): making the groups again")
        try:
            await self._prepare_server()
        except LibraryMissing as error:  # wait for an administrator: the next read tries again
            self.log.error("%s", error)
            return
        await self.on_connect()
        await self._make_own_streams()

    async def off_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a model call on the worker's thread so the event loop (heartbeats) keeps going."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.asynccontextmanager
    async def renewing(self, stream: str, entry_ids: Sequence[bytes]):
        """Keep claiming our own entries during a long call, so nobody reclaims live work.

        The renewal stops on an event, not by cancellation: a cancellation that lands inside a
        Redis call can come back as a Redis error, and a renewal that outlived its call once
        held a verifier's batch forever.
        """
        done = asyncio.Event()

        async def renew() -> None:
            interval = self.config.pipeline.claim_idle_ms / 3000
            while not done.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(done.wait(), interval)
                if not done.is_set():
                    await self.guarded(self._renew, stream, entry_ids)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            done.set()
            with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
                await asyncio.wait_for(task, 10)

    async def mark_phase(self, phase: str) -> None:
        """Test-only: record the fault point this worker is in, for a chaos test's kill log."""
        if faults.enabled():
            await self.guarded(self.redis.hset, self.keys.test_phase, self.instance, f"{phase} {time.time():.3f}")

    # ---- background tasks ---------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        period = self.config.pipeline.heartbeat_ms
        key = self.keys.live(self.role, self.instance)
        while True:
            await self.guarded(self._beat, key, 3 * period)
            _raise_if_cancelling()  # a cancellation the call swallowed still ends the loop
            await asyncio.sleep(period / 1000)

    async def _beat(self, key: str, ttl_ms: int) -> None:
        now = self.clock.now()
        value = Liveness(now, self.liveness_fields()).text()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.time()  # the clock's offset, measured again with each beat
            pipe.set(key, value, px=ttl_ms)  # for `cosine status` and the supervisor
            pipe.hset(self.keys.roster(self.role), self.instance, f"{now * 1000 + ttl_ms:.0f} {value}")
            self.registrations(pipe)
            sent = time.time()
            replies = await pipe.execute()
        self.clock.observe(sent, time.time(), replies[0])

    async def _reclaimer(self) -> None:
        idle = self.config.pipeline.claim_idle_ms
        while True:
            await asyncio.sleep(max(0.2, idle / 4000))
            await self.guarded(self._renew_held)
            for stream in self.input_streams():
                await self.guarded(self._reclaim, stream, idle)
            _raise_if_cancelling()  # a cancellation the calls swallowed still ends the loop

    def _not_to_reclaim(self) -> dict[str, set[bytes]]:
        """Entries this worker holds or has read and not yet handled."""
        mine: dict[str, set[bytes]] = {}
        for source in (self.held(), self._in_hand):
            for stream, entry_ids in source.items():
                mine.setdefault(stream, set()).update(entry_ids)
        return mine

    async def _renew_held(self) -> None:
        held = self.held()
        for stream, entry_ids in self._not_to_reclaim().items():
            if entry_ids:
                lost = (await self._renew(stream, entry_ids)).intersection(held.get(stream, ()))
                if lost:
                    self.log.warning("%d entries of %s were taken over by another worker (this one was frozen?): letting go", len(lost), stream)
                    self.let_go(stream, lost)

    async def _renew(self, stream: str, entry_ids: Collection[bytes]) -> set[bytes]:
        """Claim our entries again (their idle time starts over), only those still ours: a worker
        that was frozen past ``claim_idle_ms`` finds some taken over (or finished) by another
        and must not take them back. Returns the ones no longer ours."""
        pending = {p["message_id"] for p in await self.redis.xpending_range(stream, self.group, "-", "+", 100_000, consumername=self.instance)}
        mine = [entry_id for entry_id in entry_ids if entry_id in pending]
        if mine:
            await self.redis.xclaim(stream, self.group, self.instance, 0, mine, justid=True)
        return set(entry_ids) - set(mine)

    async def _reclaim(self, stream: str, idle_ms: int) -> None:
        reply = await self.redis.xautoclaim(stream, self.group, self.instance, idle_ms, "0-0", count=64)
        # XAUTOCLAIM also returns our own idle entries: those we hold in memory are not work to redo.
        held = self._not_to_reclaim().get(stream, set())
        claimed = [(entry_id, fields) for entry_id, fields in reply[1] if entry_id not in held]
        if not claimed:
            return
        await self.redis.hincrby(self.keys.stats, "reclaimed", len(claimed))
        self.log.info("reclaimed %d entries of %s", len(claimed), stream)
        live, dead = await self._split_by_deliveries(stream, claimed)
        for entry in dead:
            reason = f"delivered more than {self.config.pipeline.max_deliveries} times"
            await self.guarded(self.reject, stream, entry, reason)
            await self.dead_letter(stream, entry, reason)
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
        install_drain_handlers([self.stopping], self.log)


def install_drain_handlers(stopping: list[asyncio.Event], log: logging.Logger) -> None:
    """SIGINT/SIGTERM set every ``stopping`` event (the workers drain); a second signal, once all
    are set, exits the process at once."""
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if all(event.is_set() for event in stopping):
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("draining: finishing the entries in hand")
        for event in stopping:
            event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)


def run_worker(worker: StageWorker, *, burst: bool = False) -> None:
    try:
        import uvloop

        uvloop.run(worker.run(burst=burst))
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on Windows
        asyncio.run(worker.run(burst=burst))
