"""Redis plumbing shared by every stage: connections, consumer groups and the server-side
functions that make a stage's effects atomic.

Atomicity rules (design.md, "exactly-once effects on an at-least-once bus"):
- a stage writes its output and acknowledges its input in one MULTI (``write_and_ack``);
- admitting or refusing a request, applying a round, flagging a cancellation and fusing drafts
  are Lua functions: the check (id unused; the round number still the expected one; the
  round's drafts not yet fused) and every write happen in one step, so a duplicate delivery or
  a second worker of the same role changes nothing. The argument layouts are built only here.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from urllib.parse import urlparse

import msgpack
import redis.asyncio as aioredis
from redis._parsers.hiredis import _AsyncHiredisParser
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cosine.config import redacted_url
from cosine.wire import Keys
from cosine.wire.context import check_stored, resolve
from cosine.wire.keys import qualify, split_id

log = logging.getLogger(__name__)


# The function library's Lua source, shipped with the package (``cosine/functions.lua``).
_LUA_BODY = (resources.files("cosine") / "functions.lua").read_text(encoding="utf-8")


# The functions, under names that carry the library's version (a digest of its code): function
# names are global across libraries, so two versions load side by side during a rolling upgrade,
# and a worker only ever calls the code it was written against.
FUNCTIONS = ("admit", "start_waiting", "refuse", "apply_round", "cancel", "send", "move_stream", "hand_back", "fuse_add", "fuse_one", "fuse_take", "fuse_emit", "fuse_next")
LIBRARY_VERSION = hashlib.sha256(_LUA_BODY.encode()).hexdigest()[:12]
LIBRARY = f"cosine_{LIBRARY_VERSION}"
_LIBRARY_CODE = f"#!lua name={LIBRARY}\n{_LUA_BODY}\n" + "".join(f"redis.register_function('{LIBRARY}_{n}', {n})\n" for n in FUNCTIONS)


def function_name(name: str) -> str:
    """The server-side name of one of the library's functions, in this version."""
    return f"{LIBRARY}_{name}"


class LibraryMissing(RuntimeError):
    """This version's function library is not on the server: an administrator loads it."""

    def __init__(self) -> None:
        super().__init__(f"the server has no function library {LIBRARY} (this version of CoSine's): load it once as an "
                         "administrator with `cosine setup --redis-url ADMIN_URL` (`cosine serve` does it on its embedded server)")


ROSTER_FORGET_MS = 60_000  # a roster entry expired this long is removed


@dataclass(frozen=True, slots=True)
class Liveness:
    """A worker's liveness value (its roster entry and its ``live`` key): the server time of its
    last heartbeat and its ``name=value`` fields (a drafter's expert and name; a verifier's
    target fingerprint, caches and K/V pool). Written (``text``) and read (``parse``) here only."""

    beat_s: float
    fields: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return " ".join([f"{self.beat_s:.3f}", *(f"{name}={value}" for name, value in self.fields.items())])

    @classmethod
    def parse(cls, value: str) -> Liveness:
        beat, *parts = value.split()
        try:
            beat_s = float(beat)
        except ValueError:
            beat_s = 0.0
        return cls(beat_s, dict(part.partition("=")[::2] for part in parts if "=" in part))

    def number(self, name: str) -> int:
        """An integer field (0 when absent or malformed)."""
        try:
            return int(self.fields.get(name) or 0)
        except ValueError:
            return 0

    @property
    def expert(self) -> str:
        return self.fields.get("expert", "")

    @property
    def drafter(self) -> str:
        return self.fields.get("drafter", "")

    @property
    def fingerprint(self) -> str:
        return self.fields.get("fingerprint", "")


def split_roster(entries: Mapping[bytes, bytes], now_ms: float) -> tuple[dict[str, Liveness], list[bytes]]:
    """A role's roster hash (instance -> "{expires ms} {liveness value}") -> (the live
    workers, instance -> liveness; the instances expired long enough to remove)."""
    live, gone = {}, []
    for instance, entry in entries.items():
        expires, _, value = entry.decode().partition(" ")
        try:
            expired_for = now_ms - float(expires)
        except ValueError:
            expired_for = ROSTER_FORGET_MS
        if expired_for < 0:
            live[instance.decode()] = Liveness.parse(value or "0")
        elif expired_for >= ROSTER_FORGET_MS:
            gone.append(instance)
    return live, gone


def redis_url_from_env(url: str | None) -> str | None:
    return url or os.environ.get("COSINE_REDIS_URL") or None


def connect(url: str, timeout_s: float = 30.0, connection_class=None) -> aioredis.Redis:
    """An asyncio client for ``redis://`` or ``rediss://`` URLs (password in the URL); a call
    with no answer for ``timeout_s`` (a frozen or unreachable server) raises ``TimeoutError``.
    ``connection_class``: another ``redis.asyncio`` connection class for plain TCP (an emulated
    network)."""
    scheme = urlparse(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, got {redacted_url(url)!r}")
    base = connection_class if connection_class and scheme == "redis" else _CONNECTIONS[scheme]
    # Workers' time-out must outlast their longest blocking read (pipeline.block_ms <= 20 s).
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=min(30, timeout_s), socket_timeout=timeout_s,
                                   socket_connect_timeout=min(10, timeout_s), connection_class=_waits_timed(base))


_CONNECTIONS = {"redis": Connection, "rediss": SSLConnection, "unix": UnixDomainSocketConnection}


class _WaitTimedParser(_AsyncHiredisParser):
    """hiredis replies where each wait for the socket is timed (``wait_s``), not each reply:
    redis-py arms a timer for every reply it reads, which cost a pipeline of 20 replies about
    40% of its client CPU; the replies of one pipeline mostly come in one read."""

    wait_s: float | None = None

    async def read_from_socket(self):
        if not self.wait_s:
            return await super().read_from_socket()
        try:
            async with asyncio.timeout(self.wait_s):
                return await super().read_from_socket()
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout reading from the server: no data for {self.wait_s:g} s") from None


class _WaitsTimed:
    """Mixed into a connection class: its socket time-out bounds each wait for the socket
    (``_WaitTimedParser``) instead of each reply; a write keeps redis-py's own."""

    def set_parser(self, parser_class) -> None:
        super().set_parser(_WaitTimedParser if parser_class is _AsyncHiredisParser else parser_class)
        if isinstance(self._parser, _WaitTimedParser):
            self._parser.wait_s = self.socket_timeout

    async def read_response(self, disable_decoding: bool = False, timeout: float | None = None, **kwargs):
        if timeout is None and isinstance(self._parser, _WaitTimedParser) and self._parser.wait_s:
            timeout = math.inf  # no timer for the reply: the parser times its waits for the socket
        return await super().read_response(disable_decoding, timeout, **kwargs)


@functools.cache
def _waits_timed(base: type) -> type:
    return type(f"WaitsTimed{base.__name__}", (_WaitsTimed, base), {})


def setup_library(url: str) -> list[str]:
    """``cosine setup``: load (or replace) this version's function library with an administrator's
    URL (``cosine serve`` does it on its embedded server; no worker, gateway or client user may);
    returns the CoSine libraries now on the server (other versions stay for their workers)."""
    import redis as sync_redis

    with sync_redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10) as client:
        client.function_load(_LIBRARY_CODE, replace=True)
        return sorted(name for entry in client.function_list() if (name := _library_name(entry)).startswith("cosine_"))


def library_loaded_sync(url: str) -> bool:
    import redis as sync_redis

    with sync_redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=10) as client:
        return _lists_library(client.function_list(library=LIBRARY))


async def library_loaded(client: aioredis.Redis) -> bool:
    """Whether this version's function library is on the server."""
    return _lists_library(await client.function_list(library=LIBRARY))


def _lists_library(entries) -> bool:
    return any(_library_name(entry) == LIBRARY for entry in entries)


async def require_library(client: aioredis.Redis) -> None:
    """Raise ``LibraryMissing`` unless this version's function library is on the server."""
    if not await library_loaded(client):
        raise LibraryMissing()


def _library_name(entry) -> str:
    if isinstance(entry, dict):
        name = entry.get(b"library_name", entry.get("library_name", b""))
    else:  # RESP2: a flat list of field, value
        fields = dict(zip(entry[::2], entry[1::2]))
        name = fields.get(b"library_name", fields.get("library_name", b""))
    return name.decode() if isinstance(name, bytes) else str(name)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


async def committed_tokens(client: aioredis.Redis, keys: Keys, request_ids: Sequence[str]) -> list[list[int] | None]:
    """Several requests' committed tokens (prompt + output) from their hashes, in one round
    trip; None for a request that is gone."""
    async with client.pipeline(transaction=False) as pipe:
        for request_id in request_ids:
            pipe.hmget(keys.request(request_id), "prompt_ids", "output_ids")
        replies = await pipe.execute()
    return [None if prompt is None or output is None else [*msgpack.unpackb(prompt), *msgpack.unpackb(output)] for prompt, output in replies]


def read_stream_registries(pipe, keys: Keys) -> int:
    """Queue on ``pipe`` (synchronous or asyncio) the reads of ``Keys.stream_registries`` whose
    replies, in order, are ``Keys.streams``' arguments; returns how many replies they make.
    Hashes are read whole (HKEYS is not every user's command: the gateway's is HGETALL)."""
    experts, fingerprints, verifiers, drafters, tenants, coordinators = keys.stream_registries()
    for name in (experts, fingerprints, verifiers):
        pipe.smembers(name)
    for name in (drafters, tenants):
        pipe.hgetall(name)
    pipe.smembers(coordinators)
    return 6


async def whole_contexts(client: aioredis.Redis, keys: Keys, held: Mapping[str, list[int]], refs: Sequence) -> list[list[int] | None]:
    """Whole contexts of jobs or items that reference theirs (``context_start``,
    ``context_digest``, ``context``): the prefix from what a worker ``held`` of each request,
    else from the request's hash (one round trip for all); None where the request has moved on
    since (a stale round) or is gone."""
    contexts = [resolve(held.get(r.request_id), r.context_start, r.context_digest, r.context) for r in refs]
    missing = [i for i, context in enumerate(contexts) if context is None]
    if missing:
        stored = await committed_tokens(client, keys, [refs[i].request_id for i in missing])
        for i, tokens in zip(missing, stored):
            contexts[i] = None if tokens is None else check_stored(tokens, refs[i].context_start, refs[i].context)
        log.debug("%d of %d contexts read from Redis", len(missing), len(refs))
    return contexts


async def write_and_ack(
    client: aioredis.Redis,
    outputs: Iterable[tuple[str | tuple[str, str], dict]],
    stream: str,
    group: str,
    entry_ids: Sequence[bytes | str],
) -> None:
    """XADD every output and XACK the inputs in one transaction. An output's stream may be
    a pair (a worker's own stream, the shared one): ``send``."""
    async with client.pipeline(transaction=True) as pipe:
        for out_stream, fields in outputs:
            if isinstance(out_stream, tuple):
                send(pipe, *out_stream, fields)
            else:
                pipe.xadd(out_stream, fields)
        if entry_ids:
            pipe.xack(stream, group, *entry_ids)
        await pipe.execute()


def trim_floor(groups: Sequence[tuple[bytes | str, bytes | str | None]]) -> bytes | None:
    """The lowest stream ID still needed, from each group's (last-delivered ID, oldest pending
    ID or None): below last-delivered everything is acknowledged except what is pending, above
    it is unread. None when the stream has no group (nothing is known to be safe to trim)."""
    floor = None
    for last_delivered, oldest_pending in groups:
        group_floor = _next_id(last_delivered)
        if oldest_pending is not None:
            group_floor = min(group_floor, stream_id(oldest_pending))
        floor = group_floor if floor is None else min(floor, group_floor)
    return None if floor is None else f"{floor[0]}-{floor[1]}".encode()


def stream_id(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry ID as (milliseconds, sequence), for comparisons."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _next_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, seq = stream_id(entry_id)
    return ms, seq + 1


def _flat(mapping: Mapping) -> list:
    return [item for pair in mapping.items() for item in pair]


async def _fcall(client: aioredis.Redis, name: str, keys: Sequence[str], args: Sequence) -> object:
    reply = await client.fcall(function_name(name), len(keys), *keys, *args)
    return reply.decode() if isinstance(reply, bytes) else reply


async def admit_request(
    client: aioredis.Redis, keys: Keys, *, group: str, entry_id: bytes | str, request_id: str, deadline_ms: int, ttl_s: int,
    fields: Mapping, job_streams: Sequence[str], payload: bytes, refusal: Mapping,
    max_requests: int = 0, token_budget: int = 0, tokens: int = 0, max_waiting: int = 0, busy: Mapping | None = None,
    tenant_max: int = 0, tenant_busy: Mapping | None = None,
) -> str:
    """Create the request (state, first job, liveness and deadline entries) and ack its entry on
    its tenant's request stream (the tenant is in ``request_id``: ``cosine.wire.keys.qualify``).

    Admission: with ``max_requests`` requests started, or when the K/V rows they reserve plus
    this one's ``tokens`` pass ``token_budget`` (0: no bound; a request alone always goes in),
    or while others wait, the request waits if fewer than ``max_waiting`` do (its state and
    deadline written, its first job sent by ``start_waiting``), else it is refused with
    ``busy`` as its one final on ``out:{id}``.

    A tenant with ``tenant_max`` requests admitted (0: no bound) is refused with ``tenant_busy``
    as the final.

    Returns ``created``, ``waiting``, ``busy``, ``tenant_busy``, ``duplicate`` (this entry already
    created it) or ``in_use`` (another entry holds the id: ``refusal`` went to ``out:{entry id}``).
    """
    entry = _text(entry_id)
    busy, tenant_busy = busy or {}, tenant_busy or {}
    tenant = split_id(request_id)[0]
    key_list = [keys.request(request_id), keys.requests_of(tenant), keys.rounds, keys.deadlines, keys.out(qualify(tenant, entry)), keys.reserved,
                keys.out(request_id), keys.waiting, keys.tenant_active(tenant), keys.tenant_waiting(tenant), *job_streams]
    args = [group, entry, request_id, deadline_ms, ttl_s, len(fields), *_flat(fields), payload, len(refusal), *_flat(refusal),
            max_requests, token_budget, tokens, max_waiting, tenant_max, len(busy), *_flat(busy), len(tenant_busy), *_flat(tenant_busy)]
    return await _fcall(client, "admit", key_list, args)


async def start_waiting(
    client: aioredis.Redis, keys: Keys, *, request_id: str, job_streams: Sequence[str], payload: bytes,
    max_requests: int = 0, token_budget: int = 0, tokens: int = 0,
) -> str:
    """Send a waiting request's first job if it is the first waiting and the admission bounds
    (as ``admit_request``'s) allow: ``created``, ``busy``, ``later`` (others wait before it),
    ``gone`` (it ended while waiting) or ``expired`` (past its deadline: never started, left for
    the coordinator's deadline sweep to end)."""
    key_list = [keys.request(request_id), keys.rounds, keys.deadlines, keys.waiting, keys.reserved, keys.tenant_waiting(split_id(request_id)[0]),
                *job_streams]
    return await _fcall(client, "start_waiting", key_list, [request_id, max_requests, token_budget, tokens, payload])


async def refuse_request(client: aioredis.Redis, keys: Keys, *, group: str, entry_id: bytes | str, request_id: str, ttl_s: int, entry: Mapping) -> str:
    """A bad request's one error final on ``out:{id}`` (or ``out:{entry id}`` if the id is in use)."""
    return (await refuse_requests(client, keys, group=group, refusals=[(entry_id, request_id)], ttl_s=ttl_s, entry=entry))[0]


async def refuse_requests(
    client: aioredis.Redis, keys: Keys, *, group: str, refusals: Sequence[tuple[bytes | str, str]], ttl_s: int, entry: Mapping,
) -> list[str]:
    """``refuse_request`` for several (entry id, request id) pairs with the same final entry, in
    one atomic call (a burst past the admission bound is refused a read at a time); outcomes in
    order. Every request of one call is one tenant's (read from its request stream)."""
    if not refusals:
        return []
    tenant = split_id(refusals[0][1])[0]
    key_list, entry_ids = [keys.requests_of(tenant)], []
    for entry_id, request_id in refusals:
        entry_text = _text(entry_id)
        key_list += [keys.request(request_id), keys.out(request_id), keys.out(qualify(tenant, entry_text))]
        entry_ids.append(entry_text)
    replies = await _fcall(client, "refuse", key_list, [group, ttl_s, len(entry), *_flat(entry), *entry_ids])
    return [r.decode() if isinstance(r, bytes) else r for r in replies]



def apply_round_call(
    keys: Keys, *, request_id: str, expected_round: int, fields: Mapping,
    out_entries: Sequence[Mapping], job_streams: Sequence[str | tuple[str, str]] = (), payload: bytes = b"", ttl_s: int = 0,
    features: bytes = b"", features_start: int = 0, feature_rows: int = 0,
) -> tuple[list[str], list]:
    """The keys and arguments of one round's ``cosine_apply_round`` (see ``apply_round``). A job
    stream is a shared stream, or (a worker's own stream, the shared stream the job goes to
    when that worker's stream is gone). A payload with no job streams only records the next
    round's issue in the ``rounds`` set (the caller pools that round itself)."""
    pairs = [(stream, stream) if isinstance(stream, str) else stream for stream in job_streams]
    args: list = [str(expected_round), len(fields), *_flat(fields), len(out_entries)]
    for entry in out_entries:
        args += [len(entry), *_flat(entry)]
    args += [payload, ttl_s, request_id, features, features_start, feature_rows]
    tenant = split_id(request_id)[0]
    key_list = [keys.request(request_id), keys.out(request_id), keys.rounds, keys.deadlines, keys.features(request_id), keys.waiting,
                keys.tenant_active(tenant), keys.tenant_waiting(tenant), *(own for own, _ in pairs), *(shared for _, shared in pairs)]
    return key_list, args


async def apply_round(client: aioredis.Redis, keys: Keys, **call) -> str:
    """Apply a round with compare-and-set on its number: ``applied``, ``stale``, ``missing`` or
    ``cancelled`` (a cancellation is pending and this update does not finish the request).
    ``features``: ``feature_rows`` rows of the target's hidden states from position
    ``features_start`` on, stored in the request's features key with the round."""
    return (await apply_rounds(client, [apply_round_call(keys, **call)]))[0]


async def apply_rounds(client: aioredis.Redis, calls: Sequence[tuple[list[str], list]]) -> list[str]:
    """Several requests' rounds in one round trip: each call is its own atomic function call
    (compare-and-set on its request's round), so one request's outcome never depends on
    another's; outcomes in order."""
    return await fcalls(client, [("apply_round", key_list, args) for key_list, args in calls]) if calls else []


async def apply_rounds_and(client: aioredis.Redis, calls: Sequence[tuple[list[str], list]], queue) -> tuple[list[str], list]:
    """``apply_rounds`` with more commands in the same round trip: ``queue(pipe)`` queues them
    after the calls; their replies (errors returned, not raised) come back after the outcomes."""
    async with client.pipeline(transaction=False) as pipe:
        for key_list, args in calls:
            pipe.fcall(function_name("apply_round"), len(key_list), *key_list, *args)
        queue(pipe)
        replies = await pipe.execute(raise_on_error=False)
    outcomes = replies[: len(calls)]
    for reply in outcomes:
        if isinstance(reply, Exception):
            raise reply
    return [r.decode() if isinstance(r, bytes) else r for r in outcomes], replies[len(calls):]


def send(pipe, own: str, shared: str, fields: Mapping) -> None:
    """Queue on ``pipe`` an entry for a worker's ``own`` stream: written there while that stream
    exists, else to ``shared`` (its worker is gone and the stream was moved: an entry written
    to a stream nobody reads would strand its requests)."""
    pipe.fcall(function_name("send"), 2, own, shared, *_flat(fields))


async def move_stream(client: aioredis.Redis, own: str, shared: str, registry: str, *, group: str, instance: str, registry_type: str) -> int | None:
    """A gone worker's ``own`` stream, in one atomic step: what its ``group`` has not finished
    goes to ``shared``, the stream is deleted and ``instance`` leaves ``registry`` (a set or a
    hash, ``registry_type``). The number of entries moved, None when there was no stream."""
    moved = await _fcall(client, "move_stream", [own, shared, registry], [group, instance, registry_type])
    return None if int(moved) < 0 else int(moved)


async def hand_back(client: aioredis.Redis, stream: str, to: str, *, group: str, consumer: str, entry_ids: Sequence[bytes]) -> int:
    """Entries ``consumer`` read from ``stream`` and will not handle (it is draining) go back
    at once: acknowledged there and added again at the end of ``to``, in one atomic call."""
    return int(await _fcall(client, "hand_back", [stream, to], [group, consumer, *entry_ids]))


async def flag_cancel(client: aioredis.Redis, keys: Keys, request_id: str, *, ttl_s: int = 0, final: Mapping | None = None) -> str:
    """``flagged``, ``finished``, ``missing``; with ``final`` (and ``ttl_s``) a request not
    created yet is ended before it starts instead (``early``: its tombstone and ``final``)."""
    if final is None:
        return await _fcall(client, "cancel", [keys.request(request_id)], [])
    return await _fcall(client, "cancel", [keys.request(request_id), keys.out(request_id)], [ttl_s, len(final), *_flat(final)])


def fuse_add_call(
    keys: Keys, *, group: str, entry_id: bytes, hash_key: str, expert: str, payload: bytes,
    expected: int, deadline_ms: int, ttl_ms: int, retake_ms: int,
) -> tuple[str, list[str], list]:
    """Store one draft of a round and ack it (its reply: the payloads of every draft once the set
    is complete, else none)."""
    return "fuse_add", [hash_key, keys.drafts, keys.fusing], [group, entry_id, expert, payload, expected, deadline_ms, hash_key, ttl_ms, retake_ms]


def fuse_one_call(keys: Keys, *, group: str, entry_id: bytes, hash_key: str, payload: bytes, done_ttl_ms: int) -> tuple[str, list[str], list]:
    """A round's only draft: acknowledged and its candidate (``payload``) written (its reply:
    'emitted', or 'duplicate' when the round was fused already)."""
    return "fuse_one", [hash_key, keys.drafts, keys.candidates], [group, entry_id, payload, done_ttl_ms]


async def fcalls(client: aioredis.Redis, calls: Sequence[tuple[str, list[str], list]]) -> list:
    """Function calls (``*_call``'s) in one round trip, their replies in order."""
    if len(calls) == 1:
        name, key_list, args = calls[0]
        return [await _fcall(client, name, key_list, args)]
    async with client.pipeline(transaction=False) as pipe:
        for name, key_list, args in calls:
            pipe.fcall(function_name(name), len(key_list), *key_list, *args)
        replies = await pipe.execute()
    return [r.decode() if isinstance(r, bytes) else r for r in replies]


async def fuse_add(client: aioredis.Redis, keys: Keys, **call) -> list[bytes]:
    """``fuse_add_call``, alone."""
    return list((await fcalls(client, [fuse_add_call(keys, **call)]))[0])


async def fuse_take(client: aioredis.Redis, keys: Keys, hash_key: str, retake_ms: int) -> list[bytes]:
    return list(await _fcall(client, "fuse_take", [hash_key, keys.fusing], [hash_key, retake_ms]))


async def fuse_emit(client: aioredis.Redis, keys: Keys, hash_key: str, payload: bytes, done_ttl_ms: int) -> str:
    return await _fcall(client, "fuse_emit", [hash_key, keys.fusing, keys.candidates], [hash_key, payload, done_ttl_ms])


async def fuse_next(
    client: aioredis.Redis, keys: Keys, *, hash_key: str, levels_key: str, step: int, level: bytes, job_streams: Sequence[str], job: bytes,
    done_ttl_ms: int, levels_ttl_ms: int,
) -> str:
    """Step mode: close one step (its drafts kept as a level of the round) and send the next."""
    return await _fcall(client, "fuse_next", [hash_key, keys.fusing, levels_key, *job_streams], [hash_key, done_ttl_ms, step, level, levels_ttl_ms, job])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

