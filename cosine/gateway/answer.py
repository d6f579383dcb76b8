"""Answering one HTTP request: submit it, then answer as one JSON body or as server-sent
events; a client that goes away cancels its request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cosine import openai_api as api
from cosine.core.protocol import Final, Tokens, parse_entry
from cosine.wire.keys import DEFAULT_TENANT, qualify

from .reader import Listener, redis_failure

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("cosine.gateway")

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
            entry = _typed(entry)
            if isinstance(entry, Final):
                break
            if logprobs is not None:
                logprobs.extend(entry.logprobs or [])
        if api.failed(entry):
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
            entry = _typed(entry)
            final = isinstance(entry, Final)
            failed = final and api.failed(entry)
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
                tokens = entry.logprobs or []
                if tokens or entry.text:
                    await event(call.chunk(text=entry.text, logprobs=tokens, offset=offset))
                    offset += sum(len(t["token"]) for t in tokens)
            elif entry.text:
                await send({"type": "http.response.body", "body": content.event(entry.text), "more_body": True})
            if final:
                await event(call.chunk(text=None if call.kind == "chat" else "", finish=api.finish_reason(entry)))
                if call.parsed.include_usage:
                    await event(api.usage_chunk(call.kind, call.request_id, call.created, call.parsed.model, call.fingerprint, entry))
                break
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True


def _typed(entry: dict[str, str]) -> Tokens | Final:
    """An output entry, typed; one that cannot be read ends the answer with an internal error
    (the pipeline writes none such: a request's output stream holds only its own entries)."""
    try:
        return parse_entry(entry)
    except ValueError as error:
        return Final("error", error=f"an output entry could not be read: {error}", error_code="internal")
