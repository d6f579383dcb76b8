"""The HTTP gateway: an OpenAI-compatible API that is one more Redis client of the pipeline.

Each HTTP request becomes a ``requests`` entry with a random id (``chatcmpl-…`` / ``cmpl-…``,
128 random bits: the capability to read its output; never in use, so its answer always comes on
``out:{id}``), read by an ``OutputReader`` that reads many requests' streams at once. Any number
of gateways can run beside the workers: a gateway keeps nothing but its Redis connections.

- ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI's request and response
  shapes (``cosine.openai_api``), ``stream: true`` as server-sent events.
- ``GET /v1/models``, ``GET /health`` (the gateway and its Redis), ``GET /ready`` (a router, a
  coordinator and a verifier live; drafters are optional), ``GET /metrics`` (Prometheus: the
  whole pipeline's counters, kept in Redis by the workers, ``cosine.metrics``).
- A client that disconnects cancels its request (``XADD cancel``), streaming or not.
- Optional API keys (``Authorization: Bearer …``, compared in constant time) on ``/v1/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cosine import openai_api as api
from cosine.bus import connect, read_stream_registries, split_roster
from cosine.config import DEMO_TARGET_FILE, Config
from cosine.metrics import render
from cosine.wire import Keys
from cosine.wire.keys import DEFAULT_TENANT, ROLES, check_tenant_name, qualify

log = logging.getLogger("cosine.gateway")

READY_ROLES = ("router", "coordinator", "verifier")
FINGERPRINT_TTL_S = 5.0
METRICS_TTL_S = 1.0  # /metrics reads Redis at most this often
KEYS_FILE_CHECK_S = 1.0  # the API keys file is looked at this often
# A Redis call with no answer this long fails (a frozen or unreachable server): the request gets
# 504 instead of hanging. Longer than the output readers' blocking reads (1 s).
REDIS_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    served_model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()  # keys of the default tenant
    cors_origins: tuple[str, ...] = ()
    # No output at all for this long: the pipeline is not answering (504). Every request has a
    # deadline in the pipeline, so this only guards against a pipeline that is down.
    answer_timeout_s: float = 660.0
    # X-Cosine-Timing on completions: arrived, submitted, first output (epoch ms), so a benchmark
    # can tell the gateway's time from its client's and the pipeline's.
    timing_header: bool = False
    # /metrics answers only with one of these (Authorization: Bearer ...); none: open to all.
    metrics_keys: tuple[str, ...] = ()
    # A file of `KEY` (the default tenant) or `KEY TENANT` lines, read again when it changes.
    api_keys_file: Path | None = None


def default_model_name(config: Config) -> str:
    """The name ``/v1/models`` lists when none is given: the target's file or folder name."""
    target = config.model.target
    if not target or Path(target).name == DEMO_TARGET_FILE:
        return "SmolLM2-135M-Instruct"
    return Path(target).stem if Path(target).suffix == ".gguf" else Path(target.rstrip("/")).name


def read_api_keys(path: Path | None, keys: Sequence[str] = ()) -> dict[str, str]:
    """API key -> tenant: keys given on the command line (the default tenant's) and the lines of
    a file, ``KEY`` or ``KEY TENANT`` (blank lines and ``#`` comments skipped). ValueError names
    the line of a bad one."""
    found = {k: DEFAULT_TENANT for k in keys if k}
    if path is not None:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) > 2:
                raise ValueError(f"{path}:{number}: expected `KEY` or `KEY TENANT`")
            try:
                found[words[0]] = check_tenant_name(words[1]) if len(words) == 2 else DEFAULT_TENANT
            except ValueError as error:
                raise ValueError(f"{path}:{number}: {error}") from None
    return found


def _encoded(keys: dict[str, str]) -> list[tuple[bytes, str]]:
    """(key bytes, tenant) pairs, as ``Gateway._authorize`` compares them."""
    return [(key.encode(), tenant) for key, tenant in keys.items()]


class Gateway:
    def __init__(self, config: Config, redis_url: str, settings: GatewaySettings) -> None:
        self.config = config
        self.keys = Keys(config.redis.namespace)
        self.settings = settings
        self.redis_url = redis_url
        self.redis = connect(redis_url, REDIS_TIMEOUT_S)
        self.readers: list[OutputReader] = []
        self._fingerprint = ("", 0.0)
        self._api_keys = _encoded(read_api_keys(settings.api_keys_file, settings.api_keys))
        self._keys_file_seen = (self._keys_file_stamp(), time.monotonic())
        self._metrics_keys = [(k.encode(), "") for k in settings.metrics_keys]
        self._scrape_lock = asyncio.Lock()
        self._scraped: tuple[bytes, float] = (b"", -METRICS_TTL_S)
        self._streams: list[str] | None = None
        # A body can hold a prompt of pipeline.max_prompt_chars characters, JSON-escaped (up to
        # 6 bytes each), and the rest of the request.
        self.max_body_bytes = 6 * config.pipeline.max_prompt_chars + 65_536

    # ---- app -----------------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        middleware = []
        if self.settings.cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=list(self.settings.cors_origins), allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type"]))
        return Starlette(routes=routes, middleware=middleware, lifespan=self._lifespan,
                         exception_handlers={api.ApiError: self._error_response})

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette):
        yield
        for reader in self.readers:
            await reader.close()
        await self.redis.aclose()

    async def _error_response(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, api.ApiError)
        return JSONResponse(error.body(), status_code=error.status)

    def _keys_file_stamp(self) -> tuple[int, int] | None:
        path = self.settings.api_keys_file
        try:
            status = path.stat() if path is not None else None
        except OSError:
            return None
        return (status.st_mtime_ns, status.st_size) if status else None

    def _reload_keys(self) -> None:
        """The keys file again when it changed (looked at once a second at most); a file that
        cannot be read or parsed keeps the keys in force (logged)."""
        stamp, looked = self._keys_file_seen
        if self.settings.api_keys_file is None or time.monotonic() - looked < KEYS_FILE_CHECK_S:
            return
        now = self._keys_file_stamp()
        self._keys_file_seen = (now, time.monotonic())
        if now == stamp:
            return
        try:
            keys = read_api_keys(self.settings.api_keys_file, self.settings.api_keys)
        except (OSError, ValueError) as error:
            log.error("API keys file not reloaded (%s); the keys in force stay", error)
            return
        self._api_keys = _encoded(keys)
        log.info("API keys file reloaded: %d keys, %d tenants", len(keys), len(set(keys.values())))

    def _authorize(self, request: Request, keys: list[tuple[bytes, str]] | None = None) -> str:
        """The tenant of the request's API key (the default tenant when no key is required);
        401 for a missing or unknown one."""
        if keys is None:
            self._reload_keys()
            keys = self._api_keys
        if not keys:
            return DEFAULT_TENANT
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode()
        # Every key is compared, in constant time, whatever matched before.
        tenant = None
        for key, owner in keys:
            if hmac.compare_digest(given_bytes, key):
                tenant = owner
        if scheme.lower() != "bearer" or tenant is None:
            raise api.ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", None, "invalid_api_key")
        return tenant

    # ---- endpoints -----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, "completion")

    async def _completion(self, request: Request, kind: str) -> Response:
        arrived = time.time()
        tenant = self._authorize(request)
        limit = self.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise api.ApiError(413, f"the request body is larger than {limit} bytes", None, "body_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError):
            raise api.ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None
        except RecursionError:
            raise api.ApiError(400, "the request body's JSON is nested too deeply", None, "invalid_json") from None
        parse = api.chat_fields if kind == "chat" else api.completion_fields
        parsed = parse(body, self.settings.served_model_names)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        request_id = prefix + uuid.uuid4().hex
        try:
            fingerprint = await self.fingerprint()
        except RedisError as error:
            raise redis_failure(error) from None
        call = Call(self, kind, request_id, parsed, int(time.time()), fingerprint, arrived, tenant=tenant)
        return CallResponse(call, request_id)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "cosine"} for name in self.settings.served_model_names]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.redis.ping(), 2.0)
        except Exception as error:
            return JSONResponse({"status": "unhealthy", "redis": f"{type(error).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            live = {role: len(await self.live(role)) for role in (*READY_ROLES, "drafter")}
        except Exception as error:
            return JSONResponse({"status": "not ready", "redis": f"{type(error).__name__}"}, status_code=503)
        missing = [role for role in READY_ROLES if not live[role]]
        status = 503 if missing else 200
        return JSONResponse({"status": "not ready" if missing else "ready", "workers": live, "missing": missing}, status_code=status)

    async def metrics(self, request: Request) -> Response:
        """Prometheus exposition of the whole pipeline's metrics (any gateway reports the same),
        read from Redis at most once a second however often it is scraped."""
        self._authorize(request, self._metrics_keys)
        async with self._scrape_lock:  # concurrent scrapes wait for one read
            body, at = self._scraped
            if time.monotonic() - at >= METRICS_TTL_S:
                body = await self.scrape()
                self._scraped = (body, time.monotonic())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def scrape(self) -> bytes:
        """One round trip: the counters, rosters and the stream groups of the streams the last
        read found (a stream made since is in the next one; the first read finds them first)."""
        keys = self.keys
        if self._streams is None:
            async with self.redis.pipeline(transaction=False) as pipe:
                read_stream_registries(pipe, keys)
                self._streams = keys.streams(*await pipe.execute())
        streams = self._streams
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in (keys.metrics, keys.stats, keys.restarts):
                pipe.hgetall(name)
            registries = read_stream_registries(pipe, keys)
            pipe.zcard(keys.deadlines)
            pipe.zcard(keys.waiting)
            for role in ROLES:
                pipe.hgetall(keys.roster(role))
            pipe.time()  # roster expiry is the server's time
            for stream in streams:
                pipe.xinfo_groups(stream)
            everything = await pipe.execute(raise_on_error=False)
        fixed, replies = everything[: 6 + registries + len(ROLES)], everything[6 + registries + len(ROLES) :]
        for reply in fixed:
            if isinstance(reply, Exception):
                raise reply
        stored, stats, restarts = fixed[:3]
        in_deadlines, waiting, *rosters, server_time = fixed[3 + registries :]
        self._streams = keys.streams(*fixed[3 : 3 + registries])
        groups = {}
        for stream, reply in zip(streams, replies):
            if isinstance(reply, Exception):
                continue  # a stream not created yet
            groups[stream.removeprefix(keys.prefix)] = [{"group": g["name"].decode().removeprefix(keys.prefix), "pending": g.get("pending"),
                                                         "lag": g.get("lag")} for g in reply]
        now_ms = server_time[0] * 1000 + server_time[1] / 1000
        live = {role: len(split_roster(roster, now_ms)[0]) for role, roster in zip(ROLES, rosters)}
        return render(_floats(stored), _floats(stats), {k.decode(): int(v) for k, v in restarts.items()}, groups, live,
                      int(in_deadlines) - int(waiting), int(waiting))

    # ---- pipeline ------------------------------------------------------------------------------

    async def live(self, role: str) -> dict[str, str]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.keys.roster(role))
            pipe.time()  # roster expiry is the server's time
            roster, (seconds, micros) = await pipe.execute()
        return split_roster(roster, seconds * 1000 + micros / 1000)[0]

    async def fingerprint(self) -> str:
        """``system_fingerprint``: a digest of the live target's fingerprint (cached briefly)."""
        value, at = self._fingerprint
        if time.monotonic() - at > FINGERPRINT_TTL_S:
            members = sorted(m.decode() for m in await self.redis.smembers(self.keys.fingerprints))
            value = "fp_" + hashlib.sha256(members[0].encode()).hexdigest()[:10] if members else ""
            self._fingerprint = (value, time.monotonic())
        return value

    def reader(self) -> OutputReader:
        """The output reader a new request is read by: the least loaded, or a new one when
        every reader has ``OutputReader.MAX_STREAMS`` streams."""
        for idle in [r for r in self.readers[1:] if not r.owners]:  # after a burst: keep one
            self.readers.remove(idle)
            asyncio.get_running_loop().create_task(idle.close())
        reader = min(self.readers, key=lambda r: len(r.owners), default=None)
        if reader is None or len(reader.owners) >= OutputReader.MAX_STREAMS:
            reader = OutputReader(self.redis_url, self.keys, self.settings.answer_timeout_s)
            self.readers.append(reader)
        return reader

    async def submit(self, request_id: str, fields: dict[str, str], reader: OutputReader, tenant: str = DEFAULT_TENANT) -> None:
        """The request's entry on its tenant's stream, and a wake-up for its reader, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self.keys.requests_of(tenant), {"id": request_id, **fields})
            reader.wake(pipe)
            await pipe.execute()

    async def cancel(self, request_id: str, tenant: str = DEFAULT_TENANT) -> None:
        await self.redis.xadd(self.keys.cancel_of(tenant), {"id": request_id})


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


def _floats(hash_: dict[bytes, bytes]) -> dict[str, float]:
    values = {}
    for key, value in hash_.items():
        try:
            values[key.decode()] = float(value)
        except ValueError:
            continue
    return values


@dataclass
class Call:
    """One HTTP request's trip through the pipeline."""

    gateway: Gateway
    kind: str
    request_id: str
    parsed: api.ParsedRequest
    created: int
    fingerprint: str
    arrived: float = 0.0  # time.time() when the gateway took the request
    submitted: float = 0.0  # ... when its entry was in Redis
    tenant: str = DEFAULT_TENANT  # its API key's

    def chunk(self, **kwargs) -> dict:
        return api.chunk(self.kind, self.request_id, self.created, self.parsed.model, self.fingerprint,
                         include_usage=self.parsed.include_usage, **kwargs)


class CallResponse(Response):
    """Submits the request and answers it, as one JSON body or as server-sent events. A task
    watches the connection meanwhile: when the client goes away it cancels the answering (and
    the request is cancelled in the pipeline)."""

    def __init__(self, call: Call, request_id: str) -> None:
        self.call = call
        self.status_code = 200
        self.background = None
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, gateway = self.call, self.call.gateway
        task, gone = asyncio.current_task(), asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    task.cancel()
                    return

        reader = gateway.reader()
        stream = gateway.keys.out(qualify(call.tenant, call.request_id))
        listener = reader.register(stream)
        watcher = asyncio.create_task(watch())
        finished = False
        try:
            try:
                await gateway.submit(call.request_id, call.parsed.fields, reader, call.tenant)
            except RedisError as error:  # a frozen or unreachable server: an answer now, not a hang
                failure = redis_failure(error)
                await self._send_json(send, failure.status, failure.body())
                return
            call.submitted = time.time()
            answer = self._stream if call.parsed.stream else self._whole
            finished = await answer(listener, send)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server is stopping
            task.uncancel()
        except OSError:  # the client went away while we wrote
            pass
        finally:
            watcher.cancel()
            reader.unregister(stream)
            if gone.is_set() and task.cancelling():
                task.uncancel()  # a disconnect that came as we finished
            if not finished:  # nobody will read it: stop the work
                with contextlib.suppress(Exception):
                    await asyncio.shield(gateway.cancel(call.request_id, call.tenant))
                log.info("request %s: client gone, cancelled", call.request_id)

    def _headers(self, content_type: str) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type.encode()), (b"x-request-id", self.request_id.encode())]
        call = self.call
        if call.gateway.settings.timing_header:  # sent with the first output (streaming) or the answer
            marks = f"arrived={call.arrived * 1000:.1f}, submitted={call.submitted * 1000:.1f}, first={time.time() * 1000:.1f}"
            headers.append((b"x-cosine-timing", marks.encode()))
        return headers

    async def _whole(self, listener: Listener, send: Send) -> bool:
        call = self.call
        logprobs: list[dict] | None = [] if call.parsed.logprobs >= 0 else None
        while True:
            try:
                entry = await listener.next()
            except TimeoutError:
                error = api.ApiError(504, "the pipeline gave no answer in time (is a verifier running?)", None, "timeout")
                await self._send_json(send, error.status, error.body())
                return False
            if entry.get("type") == "final":
                break
            if logprobs is not None:
                logprobs.extend(api.entry_logprobs(entry))
        if entry.get("finish_reason") in ("error", "cancelled"):
            error = api.error_from_final(entry, call.kind)
            await self._send_json(send, error.status, error.body())
            return True
        body = api.completion_object(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, entry, logprobs)
        await self._send_json(send, 200, body)
        return True

    async def _send_json(self, send: Send, status: int, body: dict) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status, "headers": [*self._headers("application/json"),
                                                                                  (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _stream(self, listener: Listener, send: Send) -> bool:
        """Server-sent events: errors before the first output entry are plain HTTP errors;
        after it, an error is an event. Returns whether the request reached its final."""
        call = self.call
        content = api.ContentChunks(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, call.parsed.include_usage)
        with_logprobs, offset = call.parsed.logprobs >= 0, 0
        started = False

        async def event(data) -> None:
            await send({"type": "http.response.body", "body": api.sse(data), "more_body": True})

        while True:
            try:
                entry = await listener.next()
            except TimeoutError:
                error = api.ApiError(504, "the pipeline gave no answer in time (is a verifier running?)", None, "timeout")
                if not started:
                    await self._send_json(send, error.status, error.body())
                    return False
                await event(error.body())
                await event("[DONE]")
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return False  # not finished: the request is cancelled
            final = entry.get("type") == "final"
            failed = final and entry.get("finish_reason") in ("error", "cancelled")
            if not started:
                if failed:
                    error = api.error_from_final(entry, call.kind)
                    await self._send_json(send, error.status, error.body())
                    return True
                headers = [*self._headers("text/event-stream"), (b"cache-control", b"no-cache")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                started = True
                if call.kind == "chat":
                    await event(call.chunk(role=True, text=""))
            if failed:
                await event(api.error_from_final(entry, call.kind).body())
                break
            if final:
                pass  # its text is the whole completion, already sent
            elif with_logprobs:  # a chunk per entry with tokens, even while their text is held back
                tokens = api.entry_logprobs(entry)
                if tokens or entry.get("text"):
                    await event(call.chunk(text=entry.get("text", ""), logprobs=tokens, offset=offset))
                    offset += sum(len(t["token"]) for t in tokens)
            elif entry.get("text"):
                await send({"type": "http.response.body", "body": content.event(entry["text"]), "more_body": True})
            if final:
                await event(call.chunk(text=None if call.kind == "chat" else "", finish=api.finish_reason(entry)))
                if call.parsed.include_usage:
                    await event(api.usage_chunk(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, entry))
                break
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True
