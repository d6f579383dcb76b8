"""The Redis side of the gateway: output readers (many requests' streams in one blocking read)
and what a request Redis did not take is answered with."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cosine import openai_api as api
from cosine.bus import connect
from cosine.wire import Keys

log = logging.getLogger("cosine.gateway")

# A Redis call with no answer this long fails (a frozen or unreachable server): the request gets
# 504 instead of hanging. Longer than the output readers' blocking reads (1 s).
REDIS_TIMEOUT_S = 5.0


class Listener:
    """One request's output entries as its reader finds them; ``next`` raises ``TimeoutError``
    when none came for ``timeout_s`` (counted here, not in the reader: a reader blocked on a
    frozen server must not hold the answer back)."""

    __slots__ = ("heard", "queue", "timeout_s")

    def __init__(self, timeout_s: float) -> None:
        self.queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self.heard = time.monotonic()
        self.timeout_s = timeout_s

    async def next(self) -> dict[str, str]:
        try:
            return await asyncio.wait_for(self.queue.get(), max(0.0, self.heard + self.timeout_s - time.monotonic()))
        except TimeoutError:
            raise TimeoutError("no output from the pipeline in time") from None


class OutputReader:
    """Reads the output streams of many requests with one blocking ``XREAD`` on its own
    connection, and hands each entry to its request. A request that starts wakes the reader
    (an entry on the reader's own wake stream, written with the request), so that its stream is
    in the next read at once. The gateway adds readers as requests grow in number."""

    MAX_STREAMS = 128
    BLOCK_MS = 1000

    def __init__(self, url: str, keys: Keys, timeout_s: float) -> None:
        self.redis = connect(url, REDIS_TIMEOUT_S)
        self.wake_key = keys.wake(uuid.uuid4().hex[:16])
        self.wake_cursor = "0-0"
        self.timeout_s = timeout_s
        self.cursors: dict[str, str] = {}  # output stream -> the last entry ID read
        self.owners: dict[str, Listener] = {}
        self.task: asyncio.Task | None = None

    def register(self, stream: str) -> Listener:
        listener = Listener(self.timeout_s)
        self.cursors[stream], self.owners[stream] = "0-0", listener
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return listener

    def unregister(self, stream: str) -> None:
        self.cursors.pop(stream, None)
        self.owners.pop(stream, None)

    def wake(self, pipe) -> None:
        pipe.xadd(self.wake_key, {"w": "1"}, maxlen=8, approximate=False)
        pipe.pexpire(self.wake_key, 300_000)

    async def _run(self) -> None:
        while self.owners:
            try:
                reply = await self.redis.xread({self.wake_key: self.wake_cursor, **self.cursors}, block=self.BLOCK_MS)
                self._hand_out(reply)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the server restarting or frozen, a permission missing: listeners time out on their own
                log.warning("reading outputs failed (%s: %s); retrying", type(error).__name__, error)
                await asyncio.sleep(0.5)

    def _hand_out(self, reply) -> None:
        now = time.monotonic()
        for raw_stream, entries in reply or []:
            stream = raw_stream.decode()
            if stream == self.wake_key:
                self.wake_cursor = entries[-1][0]
                continue
            listener = self.owners.get(stream)
            if listener is None:
                continue
            self.cursors[stream] = entries[-1][0]
            listener.heard = now
            for _, fields in entries:
                listener.queue.put_nowait({k.decode(errors="replace"): v.decode(errors="replace") for k, v in fields.items()})

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        with contextlib.suppress(Exception):
            await self.redis.delete(self.wake_key)
        await self.redis.aclose()


def redis_failure(error: RedisError) -> api.ApiError:
    """The answer to a request Redis did not take: 504 when it did not answer in time (frozen),
    503 when it could not be reached."""
    frozen = isinstance(error, RedisTimeoutError)
    return api.ApiError(504 if frozen else 503, f"the Redis server did not take the request ({type(error).__name__}: {error})", None,
                        "timeout" if frozen else "unavailable")
