"""The gateway's HTTP app: routes, API keys, health, readiness and metrics; submitting and
cancelling requests."""

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
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosine import openai_api as api
from cosine.bus import Liveness, connect, read_stream_registries, split_roster
from cosine.config import DEMO_TARGET_FILE, Config
from cosine.core.protocol import RequestLimits
from cosine.metrics import render
from cosine.wire import Keys
from cosine.wire.keys import DEFAULT_TENANT, ROLES, check_tenant_name

from .answer import Call, CallResponse
from .reader import REDIS_TIMEOUT_S, OutputReader, redis_failure

log = logging.getLogger("cosine.gateway")


READY_ROLES = ("router", "coordinator", "verifier")


FINGERPRINT_TTL_S = 5.0


METRICS_TTL_S = 1.0  # /metrics reads Redis at most this often


KEYS_FILE_CHECK_S = 1.0  # the API keys file is looked at this often


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
        self.request_limits = RequestLimits.of(config)
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
        parsed = api.checked(parse(body, self.settings.served_model_names), kind, self.request_limits)
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

    async def live(self, role: str) -> dict[str, Liveness]:
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


def _floats(hash_: dict[bytes, bytes]) -> dict[str, float]:
    values = {}
    for key, value in hash_.items():
        try:
            values[key.decode()] = float(value)
        except ValueError:
            continue
    return values
