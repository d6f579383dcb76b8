"""A small client for the CoSine protocol, sync and async (any Redis client can do the same).

    from cosine.client import Client
    with Client("redis://127.0.0.1:6379") as client:
        for piece in client.stream(messages=[{"role": "user", "content": "Hi"}], max_tokens=32):
            print(piece.text, end="")
        final = client.generate(prompt="The capital of France is", max_tokens=8)
        print(final.text, final.finish_reason, final.token_ids)   # a cosine.core.protocol.Final

A request that gets no answer within ``timeout`` seconds raises ``TimeoutError`` with a hint
(no live verifier is the usual cause). A Redis server that does not answer a call for
``REDIS_TIMEOUT_S`` (frozen, or unreachable) does not hang the client: reads go on trying until
``timeout``, which then raises ``TimeoutError`` naming the server; a submit or cancel raises
``redis.TimeoutError`` / ``redis.ConnectionError`` at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from cosine.core.protocol import Final, Tokens, parse_entry
from cosine.wire import Keys
from cosine.wire.keys import DEFAULT_TENANT, check_tenant_name, qualify


@dataclass(frozen=True, slots=True)
class Piece:
    """One output entry: ``type`` is ``tokens`` or ``final``."""

    type: str
    text: str
    token_ids: list[int]
    fields: dict[str, str] = field(default_factory=dict)
    entry: Tokens | Final | None = None  # the entry, typed (``cosine.core.protocol``)

    @property
    def finish_reason(self) -> str | None:
        return self.entry.finish_reason if isinstance(self.entry, Final) else None

    @property
    def final(self) -> Final:
        """A final entry, typed (``cosine.core.protocol.Final``)."""
        if not isinstance(self.entry, Final):
            raise ValueError(f"a {self.type} entry, not a final one")
        return self.entry

    @property
    def logprobs(self) -> list[dict]:
        """A tokens entry's log-probabilities (asked for with ``logprobs=N``), one per token id:
        ``{"id", "token", "bytes", "logprob", "top_logprobs": [...]}``."""
        return (self.entry.logprobs or []) if isinstance(self.entry, Tokens) else []


def request_fields(prompt=None, messages=None, request_id=None, **params) -> dict[str, str]:
    fields = {"id": request_id or uuid.uuid4().hex}
    if prompt is not None:
        fields["prompt"] = prompt
    if messages is not None:
        fields["messages"] = messages if isinstance(messages, str) else json.dumps(messages)
    for name, value in params.items():
        if value is None:
            continue
        fields[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return fields


def _piece(fields: dict[bytes, bytes]) -> Piece:
    text = {k.decode(): v.decode() for k, v in fields.items()}
    entry = parse_entry(text)
    return Piece(text["type"], entry.text, entry.token_ids, text, entry)


def _entries(reply, cursors: dict[str, str]) -> list[Piece]:
    """Every piece of an XREAD reply, advancing each stream's cursor past what was read."""
    pieces = []
    for stream, entries in reply or []:
        for entry_id, fields in entries:
            cursors[stream.decode() if isinstance(stream, bytes) else stream] = entry_id
            pieces.append(_piece(fields))
    return pieces


def _cursors(keys: Keys, tenant: str, request_id: str, entry_id: str | None) -> dict[str, str]:
    """The streams an answer can come on: ``out:{id}``, and ``out:{entry ID}`` where a refusal
    of an id already in use goes (never to the other request's stream), the tenant's."""
    streams = [keys.out(qualify(tenant, request_id))]
    if entry_id and entry_id != request_id:
        streams.append(keys.out(qualify(tenant, entry_id)))
    return {stream: "0-0" for stream in streams}


REDIS_TIMEOUT_S = 2.0  # a Redis call with no answer this long fails: longer than a read's block (1 s)


def _block_ms(remaining_s: float) -> int:
    return max(1, int(min(remaining_s, 1.0) * 1000))


def _timeout_error(request_id: str, timeout: float, unanswered: bool = False) -> TimeoutError:
    if unanswered:
        return TimeoutError(f"no output for request {request_id} within {timeout:.0f}s: the Redis server did not answer (frozen or unreachable?)")
    return TimeoutError(
        f"no output for request {request_id} within {timeout:.0f}s: is a CoSine server running "
        "(`cosine serve`), with live router, coordinator and verifier workers? (`cosine status`)"
    )


_TIMEOUTS = {"socket_timeout": REDIS_TIMEOUT_S, "socket_connect_timeout": REDIS_TIMEOUT_S, "health_check_interval": 10}


class Client:
    def __init__(self, url: str, namespace: str = "cosine:", timeout: float = 120.0, tenant: str = DEFAULT_TENANT) -> None:
        self.redis = redis.Redis.from_url(url, **_TIMEOUTS)
        self.entry_ids: dict[str, str] = {}  # request id -> its XADD entry ID
        self.keys = Keys(namespace)
        self.timeout = timeout
        self.tenant = check_tenant_name(tenant)  # the tenant whose user ``url`` names

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.redis.close()

    def submit(self, prompt=None, messages=None, request_id=None, **params) -> str:
        fields = request_fields(prompt, messages, request_id, **params)
        self.entry_ids[fields["id"]] = self.redis.xadd(self.keys.requests_of(self.tenant), fields).decode()
        return fields["id"]

    def cancel(self, request_id: str) -> None:
        self.redis.xadd(self.keys.cancel_of(self.tenant), {"id": request_id})

    def read(self, request_id: str, timeout: float | None = None) -> Iterator[Piece]:
        timeout = self.timeout if timeout is None else timeout
        cursors, deadline = _cursors(self.keys, self.tenant, request_id, self.entry_ids.pop(request_id, None)), time.monotonic() + timeout
        unanswered = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout_error(request_id, timeout, unanswered)
            try:
                reply, unanswered = self.redis.xread(cursors, block=_block_ms(remaining)), False
            except (redis.TimeoutError, redis.ConnectionError):
                unanswered = True
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            for piece in _entries(reply, cursors):
                yield piece
                if piece.type == "final":
                    return
            if reply:
                deadline = time.monotonic() + timeout  # progress: the time-out counts from the last entry

    def stream(self, prompt=None, messages=None, request_id=None, **params) -> Iterator[Piece]:
        yield from self.read(self.submit(prompt, messages, request_id, **params))

    def generate(self, prompt=None, messages=None, request_id=None, **params) -> Final:
        for piece in self.stream(prompt, messages, request_id, **params):
            if piece.type == "final":
                return piece.final
        raise RuntimeError("output stream ended without a final entry")


class AsyncClient:
    def __init__(self, url: str, namespace: str = "cosine:", timeout: float = 120.0, tenant: str = DEFAULT_TENANT) -> None:
        self.redis = aioredis.Redis.from_url(url, **_TIMEOUTS)
        self.entry_ids: dict[str, str] = {}  # request id -> its XADD entry ID
        self.keys = Keys(namespace)
        self.timeout = timeout
        self.tenant = check_tenant_name(tenant)  # the tenant whose user ``url`` names

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.redis.aclose()

    async def submit(self, prompt=None, messages=None, request_id=None, **params) -> str:
        fields = request_fields(prompt, messages, request_id, **params)
        self.entry_ids[fields["id"]] = (await self.redis.xadd(self.keys.requests_of(self.tenant), fields)).decode()
        return fields["id"]

    async def cancel(self, request_id: str) -> None:
        await self.redis.xadd(self.keys.cancel_of(self.tenant), {"id": request_id})

    async def read(self, request_id: str, timeout: float | None = None) -> AsyncIterator[Piece]:
        timeout = self.timeout if timeout is None else timeout
        cursors, deadline = _cursors(self.keys, self.tenant, request_id, self.entry_ids.pop(request_id, None)), time.monotonic() + timeout
        unanswered = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout_error(request_id, timeout, unanswered)
            try:
                reply, unanswered = await self.redis.xread(cursors, block=_block_ms(remaining)), False
            except (redis.TimeoutError, redis.ConnectionError):
                unanswered = True
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
                continue
            for piece in _entries(reply, cursors):
                yield piece
                if piece.type == "final":
                    return
            if reply:
                deadline = time.monotonic() + timeout

    async def generate(self, prompt=None, messages=None, request_id=None, **params) -> Final:
        request_id = await self.submit(prompt, messages, request_id, **params)
        async for piece in self.read(request_id):
            if piece.type == "final":
                return piece.final
        raise RuntimeError("output stream ended without a final entry")
