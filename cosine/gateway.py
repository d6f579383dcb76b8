"""The HTTP gateway: an OpenAI-compatible API that is one more Redis client of the pipeline.

Each HTTP request becomes a ``requests`` entry with a random id (``chatcmpl-…`` / ``cmpl-…``,
122 random bits: the capability to read its output); the answer is read from ``out:{id}`` (and
``out:{entry ID}``, where a refusal can go). Any number of gateways can run beside the workers:
a gateway keeps nothing but its Redis connections.

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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from cosine import openai_api as api
from cosine.bus import split_roster
from cosine.config import DEMO_TARGET_FILE, Config
from cosine.metrics import render
from cosine.wire import Keys

log = logging.getLogger("cosine.gateway")

READY_ROLES = ("router", "coordinator", "verifier")
ROLES = ("router", "coordinator", "fusion", "verifier", "drafter")
FINGERPRINT_TTL_S = 5.0


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    served_model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    # No output at all for this long: the pipeline is not answering (504). Every request has a
    # deadline in the pipeline, so this only guards against a pipeline that is down.
    answer_timeout_s: float = 660.0


def default_model_name(config: Config) -> str:
    """The name ``/v1/models`` lists when none is given: the target's file or folder name."""
    target = config.model.target
    if not target or Path(target).name == DEMO_TARGET_FILE:
        return "SmolLM2-135M-Instruct"
    return Path(target).stem if Path(target).suffix == ".gguf" else Path(target.rstrip("/")).name


def read_api_keys(path: Path | None, keys: Sequence[str] = ()) -> tuple[str, ...]:
    """Keys given on the command line and in a file (one per line; blank lines and ``#``
    comments skipped)."""
    found = [k for k in keys if k]
    if path is not None:
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                found.append(line)
    return tuple(found)


class Gateway:
    def __init__(self, config: Config, redis_url: str, settings: GatewaySettings) -> None:
        self.config = config
        self.keys = Keys(config.redis.namespace)
        self.settings = settings
        self.redis = aioredis.Redis.from_url(redis_url)
        self._fingerprint = ("", 0.0)
        self._api_keys = [k.encode() for k in settings.api_keys]

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
        await self.redis.aclose()

    async def _error_response(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, api.ApiError)
        return JSONResponse(error.body(), status_code=error.status)

    def _authorize(self, request: Request) -> None:
        if not self._api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        given_bytes = given.strip().encode()
        # Every key is compared, in constant time, whatever matched before.
        matched = False
        for key in self._api_keys:
            matched |= hmac.compare_digest(given_bytes, key)
        if scheme.lower() != "bearer" or not matched:
            raise api.ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)", None, "invalid_api_key")

    # ---- endpoints -----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        return await self._completion(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completion(request, "completion")

    async def _completion(self, request: Request, kind: str) -> Response:
        self._authorize(request)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise api.ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None
        parse = api.chat_fields if kind == "chat" else api.completion_fields
        parsed = parse(body, self.settings.served_model_names)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        request_id = prefix + uuid.uuid4().hex
        call = Call(self, kind, request_id, parsed, int(time.time()), await self.fingerprint())
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
        """Prometheus exposition of the whole pipeline's metrics (any gateway reports the same)."""
        return Response(await self.scrape(), media_type=CONTENT_TYPE_LATEST)

    async def scrape(self) -> bytes:
        keys = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in (keys.metrics, keys.stats, keys.restarts):
                pipe.hgetall(name)
            for name in (keys.experts, keys.fingerprints, keys.verifier_streams):
                pipe.smembers(name)
            pipe.zcard(keys.deadlines)
            pipe.zcard(keys.waiting)
            for role in ROLES:
                pipe.hgetall(keys.roster(role))
            (stored, stats, restarts, experts, fingerprints, instances, in_deadlines, waiting, *rosters) = await pipe.execute()
        streams = [keys.requests, keys.cancel, keys.drafts, keys.candidates, keys.verify, keys.verified, keys.dead]
        streams += [keys.draft(e.decode()) for e in sorted(experts)]
        streams += [keys.verify_for(f.decode()) for f in sorted(fingerprints)]
        streams += [keys.verify_at(i.decode()) for i in sorted(instances)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
        groups = {}
        for stream, reply in zip(streams, replies):
            if isinstance(reply, Exception):
                continue  # a stream not created yet
            groups[stream.removeprefix(keys.prefix)] = [{"group": g["name"].decode().removeprefix(keys.prefix), "pending": g.get("pending"),
                                                         "lag": g.get("lag")} for g in reply]
        now_ms = time.time() * 1000
        live = {role: len(split_roster(roster, now_ms)[0]) for role, roster in zip(ROLES, rosters)}
        return render(_floats(stored), _floats(stats), {k.decode(): int(v) for k, v in restarts.items()}, groups, live,
                      int(in_deadlines) - int(waiting), int(waiting))

    # ---- pipeline ------------------------------------------------------------------------------

    async def live(self, role: str) -> dict[str, str]:
        live, _ = split_roster(await self.redis.hgetall(self.keys.roster(role)), time.time() * 1000)
        return live

    async def fingerprint(self) -> str:
        """``system_fingerprint``: a digest of the live target's fingerprint (cached briefly)."""
        value, at = self._fingerprint
        if time.monotonic() - at > FINGERPRINT_TTL_S:
            members = sorted(m.decode() for m in await self.redis.smembers(self.keys.fingerprints))
            value = "fp_" + hashlib.sha256(members[0].encode()).hexdigest()[:10] if members else ""
            self._fingerprint = (value, time.monotonic())
        return value

    async def submit(self, request_id: str, fields: dict[str, str]) -> str:
        entry_id = await self.redis.xadd(self.keys.requests, {"id": request_id, **fields})
        return entry_id.decode()

    async def cancel(self, request_id: str) -> None:
        await self.redis.xadd(self.keys.cancel, {"id": request_id})

    async def read(self, request_id: str, entry_id: str) -> AsyncIterator[dict[str, str]]:
        """The request's output entries up to its final one (a refusal may come on the entry's
        own stream); ``TimeoutError`` when nothing comes for ``answer_timeout_s``."""
        cursors = {self.keys.out(request_id): "0-0", self.keys.out(entry_id): "0-0"}
        quiet_since = time.monotonic()
        while True:
            reply = await self.redis.xread(cursors, block=1000)
            if not reply:
                if time.monotonic() - quiet_since > self.settings.answer_timeout_s:
                    raise TimeoutError(request_id)
                continue
            quiet_since = time.monotonic()
            for stream, entries in reply:
                for stream_entry_id, raw in entries:
                    cursors[stream.decode()] = stream_entry_id
                    entry = {k.decode(): v.decode() for k, v in raw.items()}
                    yield entry
                    if entry.get("type") == "final":
                        return


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

    def chunk(self, **kwargs) -> dict:
        return api.chunk(self.kind, self.request_id, self.created, self.parsed.model, self.fingerprint,
                         include_usage=self.parsed.include_usage, **kwargs)


class CallResponse(Response):
    """Submits the request and answers it, as one JSON body or as server-sent events, while
    watching for the client to go away (then the request is cancelled)."""

    def __init__(self, call: Call, request_id: str) -> None:
        self.call = call
        self.status_code = 200
        self.background = None
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, gateway = self.call, self.call.gateway
        gone = asyncio.Event()

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return

        watcher = asyncio.create_task(watch())
        finished = False
        try:
            entry_id = await gateway.submit(call.request_id, call.parsed.fields)
            entries = gateway.read(call.request_id, entry_id)
            if call.parsed.stream:
                finished = await self._stream(entries, gone, send)
            else:
                finished = await self._whole(entries, gone, send)
        finally:
            watcher.cancel()
            if not finished:  # the client left (or the gateway is stopping): nobody will read it
                with contextlib.suppress(Exception):
                    await asyncio.shield(gateway.cancel(call.request_id))
                log.info("request %s: client gone, cancelled", call.request_id)

    def _headers(self, content_type: str) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", content_type.encode()), (b"x-request-id", self.request_id.encode())]

    async def _next(self, entries: AsyncIterator[dict[str, str]], gone: asyncio.Event) -> dict[str, str] | None:
        """The next output entry, or None when the client went away first."""
        step = asyncio.ensure_future(anext(entries))
        waiter = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not step.done():
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
            return None
        return step.result()

    async def _whole(self, entries, gone: asyncio.Event, send: Send) -> bool:
        call = self.call
        while True:
            try:
                entry = await self._next(entries, gone)
            except TimeoutError:
                error = api.ApiError(504, "the pipeline gave no answer in time (is a verifier running?)", None, "timeout")
                await self._send_json(send, error.status, error.body())
                return False
            if entry is None:
                return False
            if entry.get("type") == "final":
                break
        if entry.get("finish_reason") in ("error", "cancelled"):
            error = api.error_from_final(entry, call.kind)
            await self._send_json(send, error.status, error.body())
            return True
        body = api.completion_object(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, entry)
        await self._send_json(send, 200, body)
        return True

    async def _send_json(self, send: Send, status: int, body: dict) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status, "headers": [*self._headers("application/json"),
                                                                                  (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _stream(self, entries, gone: asyncio.Event, send: Send) -> bool:
        """Server-sent events: errors before the first output entry are plain HTTP errors;
        after it, an error is an event. Returns whether the request reached its final."""
        call = self.call
        started = False

        async def start() -> None:
            nonlocal started
            headers = [*self._headers("text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            started = True

        async def event(data) -> None:
            await send({"type": "http.response.body", "body": api.sse(data), "more_body": True})

        try:
            while True:
                try:
                    entry = await self._next(entries, gone)
                except TimeoutError:
                    error = api.ApiError(504, "the pipeline gave no answer in time (is a verifier running?)", None, "timeout")
                    if not started:
                        await self._send_json(send, error.status, error.body())
                        return False
                    await event(error.body())
                    break
                if entry is None:
                    return False
                final = entry.get("type") == "final"
                failed = final and entry.get("finish_reason") in ("error", "cancelled")
                if not started:
                    if failed:
                        error = api.error_from_final(entry, call.kind)
                        await self._send_json(send, error.status, error.body())
                        return True
                    await start()
                    if call.kind == "chat":
                        await event(call.chunk(role=True, text=""))
                if failed:
                    await event(api.error_from_final(entry, call.kind).body())
                    break
                if not final and entry.get("text"):  # a final's text is the whole completion, already sent
                    await event(call.chunk(text=entry["text"]))
                if final:
                    await event(call.chunk(text=None if call.kind == "chat" else "", finish=api.finish_reason(entry)))
                    if call.parsed.include_usage:
                        await event(api.usage_chunk(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, entry))
                    break
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        except OSError:  # the client went away while we wrote
            return False
