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

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from urllib.parse import urlparse

import msgpack
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from cosine.config import redacted_url
from cosine.wire import Keys
from cosine.wire.keys import qualify, split_id
from cosine.wire.state import round_fields

log = logging.getLogger(__name__)


# Request state lives in one hash per request; the `rounds` sorted set scores each active request
# by when its current round was issued (the coordinator's liveness sweep reads it). `round` is the compare-and-set guard: a round's
# result is applied only while the state still says that round, and applying it bumps it.
_LUA_BODY = r"""

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Microseconds: the order of arrivals within one millisecond too (a queue's order).
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Reads `count` field/value pairs from args starting at index i; returns them and the next index.
local function take_pairs(args, i, count)
  local pairs = {}
  for j = 1, 2 * count do pairs[j] = args[i]; i = i + 1 end
  return pairs, i
end

-- Whether stream entry ID a comes after b.
local function id_after(a, b)
  local a_ms, a_seq = string.match(a, '(%d+)-(%d+)')
  local b_ms, b_seq = string.match(b, '(%d+)-(%d+)')
  a_ms, a_seq, b_ms, b_seq = tonumber(a_ms), tonumber(a_seq), tonumber(b_ms), tonumber(b_seq)
  return a_ms > b_ms or (a_ms == b_ms and a_seq > b_seq)
end

-- An output entry with an explicit ID, skipped when the stream already holds that ID or a later
-- one (a replay after the server lost its last writes writes the same IDs again).
local function add_out(out, id, entry)
  local top = redis.call('XREVRANGE', out, '+', '-', 'COUNT', 1)[1]
  if top and not id_after(id, top[1]) then return end
  redis.call('XADD', out, id, unpack(entry))
end

-- An entry for a worker's own stream goes there only while that stream exists (NOMKSTREAM): a
-- stream moved away with its worker gone is never made again by a writer (nobody would read
-- it), and the entry goes to the shared stream instead. `own == shared`: the shared stream.
local function add_entry(own, shared, fields)
  if own == shared or not redis.call('XADD', own, 'NOMKSTREAM', '*', unpack(fields)) then
    redis.call('XADD', shared, '*', unpack(fields))
  end
end

-- KEYS: a worker's own stream, its shared stream.  ARGV: the entry's field/value pairs.
local function send(keys, args)
  add_entry(keys[1], keys[2], args)
  return 'sent'
end

-- KEYS: a gone worker's own stream, the shared stream its entries go to, the registry of own
-- streams.  ARGV: the workers' group, the instance, the registry's type ('set' or 'hash').
-- In one step: the entries its group has not finished (pending, or not delivered yet) added to
-- the shared stream, the stream deleted, the instance unregistered. A kill or an error can
-- leave no half-moved stream. Returns the number moved, -1 when there was no stream.
local function move_stream(keys, args)
  local moved = -1
  if redis.call('EXISTS', keys[1]) == 1 then
    moved = 0
    local last, pending = '0-0', {}
    for _, info in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
      local group = {}
      for k = 1, #info, 2 do group[info[k]] = info[k + 1] end
      if group['name'] == args[1] then
        last = group['last-delivered-id']
        for _, p in ipairs(redis.call('XPENDING', keys[1], args[1], '-', '+', 1000000)) do pending[p[1]] = true end
      end
    end
    for _, entry in ipairs(redis.call('XRANGE', keys[1], '-', '+')) do
      if pending[entry[1]] or id_after(entry[1], last) then
        redis.call('XADD', keys[2], '*', unpack(entry[2]))
        moved = moved + 1
      end
    end
    redis.call('DEL', keys[1])
  end
  if args[3] == 'set' then redis.call('SREM', keys[3], args[2]) else redis.call('HDEL', keys[3], args[2]) end
  return moved
end

-- A draining worker's entries, read and not started: each of them still pending for this
-- consumer is acknowledged on keys[1] and added again at the end of keys[2] (the same stream, or
-- the shared one of an own stream), a fresh entry any worker of the group reads at once, with
-- no delivery counted. ARGV: group, consumer, entry ids. Returns how many were handed back.
local function hand_back(keys, args)
  local n = 0
  for k = 3, #args do
    if #redis.call('XPENDING', keys[1], args[1], args[k], args[k], 1, args[2]) == 1 then
      local entry = redis.call('XRANGE', keys[1], args[k], args[k])[1]
      redis.call('XACK', keys[1], args[1], args[k])
      if entry then
        redis.call('XADD', keys[2], '*', unpack(entry[2]))
        n = n + 1
      end
    end
  end
  return n
end

-- An id already taken by another entry: the refusal goes to out:{entry id}, never to the
-- original request's stream. Returns 'duplicate' for a redelivery of the entry that took it.
local function refuse_in_use(req, out_entry, entry_id, ttl, entry)
  if redis.call('HGET', req, 'source') == entry_id then return 'duplicate' end
  if redis.call('EXISTS', out_entry) == 0 and out_entry ~= '' then
    redis.call('XADD', out_entry, '0-1', unpack(entry))
    redis.call('EXPIRE', out_entry, ttl)
  end
  return 'in_use'
end

-- Whether starting one more request reserving `tokens` K/V rows would go past the bounds:
-- 'requests' (max_requests requests started: those in `deadlines` but not `waiting`), 'tokens'
-- (the reserved rows of the started ones plus these over `budget`; a request alone is always let
-- in, it fails alone if it cannot fit), or false. Reservations of requests no longer in
-- `deadlines` are dropped here, as they are met (waiting ones reserve nothing yet).
local function admission_full(deadlines, waiting, reserved, max_requests, budget, tokens)
  local started = redis.call('ZCARD', deadlines) - redis.call('ZCARD', waiting)
  if max_requests > 0 and started >= max_requests then return 'requests' end
  if budget > 0 then
    local held, sum = redis.call('HGETALL', reserved), 0
    for j = 1, #held, 2 do
      if redis.call('ZSCORE', deadlines, held[j]) then
        sum = sum + tonumber(held[j + 1])
      else
        redis.call('HDEL', reserved, held[j])
      end
    end
    if sum > 0 and sum + tokens > budget then return 'tokens' end
  end
  return false
end

-- A refused request's one error final on out:{id}, and a finished tombstone that keeps the id
-- taken for the TTL (a redelivery writes nothing twice).
local function tombstone(req, out, entry_id, ttl, entry)
  redis.call('HSET', req, 'source', entry_id, 'status', 'finished', 'round', '-1')
  redis.call('EXPIRE', req, ttl)
  add_out(out, '0-1', entry)
  redis.call('EXPIRE', out, ttl)
end

-- KEYS: req, requests stream, rounds zset, deadlines zset, out:{entry id}, reserved hash,
--       out:{id}, waiting zset, the tenant's active zset, the tenant's waiting zset, job streams...
-- ARGV: group, entry id, request id, deadline ms, ttl, n_fields, pairs..., job payload,
--       n_refusal, refusal pairs (used when the id is in use), max_requests, token budget,
--       tokens reserved, max_waiting, the tenant's max active (0: none), n_busy, busy pairs
--       (used when admission is full), n, pairs of the refusal when the tenant is at its bound
-- Past the bounds, or behind requests already waiting (first come, first started), a request
-- waits if fewer than max_waiting do: its state and deadline are written, not its first job
-- ('waiting'; `start_waiting` starts it); else it is refused with `busy`. A tenant with its
-- bound of requests admitted (waiting or started) is refused at once ('tenant_busy').
local function admit(keys, args)
  local req = keys[1]
  local n = tonumber(args[6])
  local fields, i = take_pairs(args, 7, n)
  local payload = args[i]
  local refusal, j = take_pairs(args, i + 2, tonumber(args[i + 1]))
  local max_requests, budget, tokens = tonumber(args[j]), tonumber(args[j + 1]), tonumber(args[j + 2])
  local max_waiting, tenant_max = tonumber(args[j + 3]), tonumber(args[j + 4])
  local busy, k = take_pairs(args, j + 6, tonumber(args[j + 5]))
  local tenant_busy = take_pairs(args, k + 1, tonumber(args[k]))
  local outcome = 'created'
  local queued = redis.call('ZCARD', keys[8])
  local deadline = tonumber(args[4])
  fields[#fields + 1] = 'source'; fields[#fields + 1] = args[2]
  if redis.call('EXISTS', req) == 1 then
    outcome = refuse_in_use(req, keys[5], args[2], tonumber(args[5]), refusal)
  elseif tenant_max > 0 and redis.call('ZCARD', keys[9]) >= tenant_max then
    tombstone(req, keys[7], args[2], tonumber(args[5]), tenant_busy)
    outcome = 'tenant_busy'
  elseif (queued > 0 and max_waiting > 0) or admission_full(keys[4], keys[8], keys[6], max_requests, budget, tokens) then
    if queued < max_waiting then
      redis.call('HSET', req, unpack(fields))
      redis.call('ZADD', keys[4], deadline, args[3])
      redis.call('ZADD', keys[8], now_ms(), args[3])
      redis.call('ZADD', keys[9], deadline, args[3])
      redis.call('ZADD', keys[10], now_us(), args[3])
      outcome = 'waiting'
    else
      tombstone(req, keys[7], args[2], tonumber(args[5]), busy)
      outcome = 'busy'
    end
  else
    redis.call('HSET', req, unpack(fields))
    for k = 11, #keys do redis.call('XADD', keys[k], '*', 'm', payload) end
    redis.call('ZADD', keys[3], now_ms(), args[3])
    redis.call('ZADD', keys[4], deadline, args[3])
    redis.call('ZADD', keys[9], deadline, args[3])
    if budget > 0 then redis.call('HSET', keys[6], args[3], tokens) end
  end
  redis.call('XACK', keys[2], args[1], args[2])
  return outcome
end

-- Starts a waiting request (its first job) when it is the first waiting of its tenant and the
-- bounds allow (which tenant's goes first is the router's choice: the starts are shared).
-- KEYS: req, rounds zset, deadlines zset, waiting zset, reserved hash, the tenant's waiting
-- zset, job streams...
-- ARGV: request id, max_requests, token budget, tokens reserved, job payload.
-- Returns 'created', 'busy' (still full), 'later' (not its tenant's first waiting), 'gone' (it
-- ended while waiting: cancelled, or past its deadline) or 'expired' (its deadline has passed
-- and the deadline sweep has not ended it yet: it never starts, and does not hold back those
-- after it).
local function start_waiting(keys, args)
  local id = args[1]
  if not redis.call('ZSCORE', keys[4], id) then
    redis.call('ZREM', keys[6], id)
    return 'gone'
  end
  local deadline = redis.call('ZSCORE', keys[3], id)
  if redis.call('HGET', keys[1], 'status') ~= 'active' or not deadline then
    redis.call('ZREM', keys[4], id)
    redis.call('ZREM', keys[6], id)
    return 'gone'
  end
  local now = now_ms()
  if tonumber(deadline) <= now then return 'expired' end
  for _, head in ipairs(redis.call('ZRANGE', keys[6], 0, -1)) do
    if head == id then break end
    local due = redis.call('ZSCORE', keys[3], head)
    if due and tonumber(due) > now then return 'later' end
  end
  local budget, tokens = tonumber(args[3]), tonumber(args[4])
  -- It counts among the waiting, not the started, while the bounds are checked.
  if admission_full(keys[3], keys[4], keys[5], tonumber(args[2]), budget, tokens) then return 'busy' end
  redis.call('ZREM', keys[4], id)
  redis.call('ZREM', keys[6], id)
  for k = 7, #keys do redis.call('XADD', keys[k], '*', 'm', args[5]) end
  redis.call('ZADD', keys[2], now_ms(), id)
  if budget > 0 then redis.call('HSET', keys[5], id, tokens) end
  return 'created'
end

-- Requests refused at admission (bad input, or busy), the same final entry for each: it goes to
-- out:{id}, and a finished tombstone keeps the id taken for the TTL, so a redelivery writes
-- nothing twice; the entries are acknowledged together.
-- KEYS: requests stream, then per request: req, out:{id}, out:{entry id}.
-- ARGV: group, ttl, n, pairs..., then the requests' entry ids.  Returns the outcomes in order.
local function refuse(keys, args)
  local ttl = tonumber(args[2])
  local entry, i = take_pairs(args, 4, tonumber(args[3]))
  local outcomes, acked = {}, {}
  for k = 2, #keys, 3 do
    local req, entry_id = keys[k], args[i]
    if redis.call('EXISTS', req) == 1 then
      outcomes[#outcomes + 1] = refuse_in_use(req, keys[k + 2], entry_id, ttl, entry)
    else
      tombstone(req, keys[k + 1], entry_id, ttl, entry)
      outcomes[#outcomes + 1] = 'refused'
    end
    acked[#acked + 1] = entry_id
    i = i + 1
  end
  if #acked > 0 then redis.call('XACK', keys[1], args[1], unpack(acked)) end
  return outcomes
end

-- KEYS: req, out stream, rounds zset, deadlines zset, features string, waiting zset, the
-- tenant's active zset, the tenant's waiting zset, job streams (n), the shared stream of each
-- (n: a job for a worker's own stream goes as `add_entry`).
-- ARGV: expected round, n_fields, pairs..., n_out, per out entry: n_pairs, pairs...; job
-- payload ("" for none), ttl once finished (0 = still active), request id; feature rows' bytes
-- ("" for none), the position of their first row, their count. The features string holds rows
-- 0..feat_n-1 (feat_n in the request hash): rows from feat_n on are appended, rows from an
-- earlier position replace what follows it, and a gap empties it (the next round ships all).
-- Output entries get IDs {new round}-{k}: deterministic, so a replayed round never repeats text.
-- A finished request keeps a small tombstone until the TTL (status, counters), not its tokens.
local function apply_round(keys, args)
  local req = keys[1]
  local current = redis.call('HGET', req, 'round')
  if not current then return 'missing' end
  if current ~= args[1] or redis.call('HGET', req, 'status') ~= 'active' then return 'stale' end
  local n = tonumber(args[2])
  local fields, i = take_pairs(args, 3, n)
  local n_out = tonumber(args[i]); i = i + 1
  local entries = {}
  for k = 1, n_out do
    entries[k], i = take_pairs(args, i + 1, tonumber(args[i]))
  end
  local payload, ttl, request_id = args[i], tonumber(args[i + 1]), args[i + 2]
  local feats, fstart, frows = args[i + 3], tonumber(args[i + 4]), tonumber(args[i + 5])
  if ttl == 0 and redis.call('HGET', req, 'cancel') then return 'cancelled' end
  if n > 0 then redis.call('HSET', req, unpack(fields)) end
  local round = tonumber(args[1]) + 1
  for k = 1, n_out do add_out(keys[2], round .. '-' .. (k - 1), entries[k]) end
  if ttl == 0 and feats ~= '' and frows > 0 then
    local have = tonumber(redis.call('HGET', req, 'feat_n') or '0')
    if have == fstart then
      redis.call('APPEND', keys[5], feats)
    elseif have > fstart and fstart == 0 then
      redis.call('SET', keys[5], feats)
    elseif have > fstart then
      local width = string.len(feats) / frows
      redis.call('SET', keys[5], redis.call('GETRANGE', keys[5], 0, fstart * width - 1) .. feats)
    end
    if have >= fstart then
      redis.call('HSET', req, 'feat_n', tostring(fstart + frows))
    else
      redis.call('DEL', keys[5])
      redis.call('HSET', req, 'feat_n', '0')
    end
  end
  if payload ~= '' then
    local jobs = (#keys - 8) / 2
    for k = 9, 8 + jobs do add_entry(keys[k], keys[k + jobs], {'m', payload}) end
  end
  if ttl > 0 then
    redis.call('ZREM', keys[3], request_id)
    redis.call('ZREM', keys[4], request_id)
    redis.call('ZREM', keys[6], request_id)
    redis.call('ZREM', keys[7], request_id)
    redis.call('ZREM', keys[8], request_id)
    redis.call('DEL', keys[5])
    redis.call('HDEL', req, 'prompt_ids', 'output_ids', 'feat_n')
    redis.call('EXPIRE', keys[2], ttl)
    redis.call('EXPIRE', req, ttl)
  elseif payload ~= '' then
    redis.call('ZADD', keys[3], now_ms(), request_id)
  end
  return 'applied'
end

-- KEYS: req, out:{id}.  ARGV: ttl, n, final pairs.  Flags an active request for cancellation;
-- the next round application ends it. A request not created yet (its cancel overtook it: two
-- routers, a backlog) gets its tombstone and cancelled final now, so it never starts: its entry
-- is then refused as an id in use.
local function cancel(keys, args)
  local status = redis.call('HGET', keys[1], 'status')
  if not status then
    if #keys < 2 then return 'missing' end
    tombstone(keys[1], keys[2], 'cancel', tonumber(args[1]), take_pairs(args, 3, tonumber(args[2])))
    return 'early'
  end
  if status ~= 'active' then return 'finished' end
  redis.call('HSET', keys[1], 'cancel', '1')
  return 'flagged'
end

local function draft_payloads(hash)
  local all = redis.call('HGETALL', hash)
  local payloads = {}
  for j = 1, #all, 2 do
    if string.sub(all[j], 1, 2) == 'd:' then payloads[#payloads + 1] = all[j + 1] end
  end
  return payloads
end

-- Fusion state lives in Redis, so any fusion worker can complete a round's tree.
-- KEYS: fuse hash, drafts stream, fusing zset.  ARGV: group, entry id, expert, payload,
-- expected experts, deadline ms, member, ttl ms, retake-after ms (absolute: a taker that dies
-- before emitting leaves the round to the next fusion worker's sweep).
-- Returns the payloads when this draft completes the set, else an empty list.
local function fuse_add(keys, args)
  local hash = keys[1]
  redis.call('XACK', keys[2], args[1], args[2])
  if redis.call('HEXISTS', hash, '#done') == 1 then return {} end
  redis.call('HSETNX', hash, 'd:' .. args[3], args[4])
  redis.call('PEXPIRE', hash, tonumber(args[8]))
  redis.call('ZADD', keys[3], 'NX', tonumber(args[6]), args[7])
  local fields = redis.call('HKEYS', hash)
  local drafts = 0
  for _, name in ipairs(fields) do
    if string.sub(name, 1, 2) == 'd:' then drafts = drafts + 1 end
  end
  if drafts < tonumber(args[5]) or redis.call('HEXISTS', hash, '#taken') == 1 then return {} end
  redis.call('HSET', hash, '#taken', args[9])
  redis.call('ZADD', keys[3], tonumber(args[9]), args[7])
  return draft_payloads(hash)
end

-- Takes a round's drafts for fusing (after its deadline, or a taker that died).
-- KEYS: fuse hash, fusing zset.  ARGV: member, retake-after ms (absolute).
local function fuse_take(keys, args)
  if redis.call('EXISTS', keys[1]) == 0 or redis.call('HEXISTS', keys[1], '#done') == 1 then
    redis.call('ZREM', keys[2], args[1])
    return {}
  end
  redis.call('HSET', keys[1], '#taken', args[2])
  redis.call('ZADD', keys[2], tonumber(args[2]), args[1])
  return draft_payloads(keys[1])
end

-- Marks a round's (or a step's) fuse hash done and off the fusing set; false if it already was.
local function mark_fused(hash, fusing, member, done_ttl)
  if redis.call('HEXISTS', hash, '#done') == 1 then return false end
  redis.call('DEL', hash)
  redis.call('HSET', hash, '#done', '1')
  redis.call('PEXPIRE', hash, done_ttl)
  redis.call('ZREM', fusing, member)
  return true
end

-- KEYS: fuse hash, fusing zset, candidates stream.  ARGV: member, candidate payload, ttl ms of
-- the done marker (late redeliveries of the round's drafts are dropped while it lives).
local function fuse_emit(keys, args)
  if not mark_fused(keys[1], keys[2], args[1], tonumber(args[3])) then return 'duplicate' end
  redis.call('XADD', keys[3], '*', 'm', args[2])
  return 'emitted'
end

-- Step mode: one step of a round is fused; its drafts join the round's levels and the next
-- step's jobs go out, in one step (a duplicate completion changes nothing).
-- KEYS: step hash, fusing zset, levels hash, job streams...  ARGV: member, done ttl ms, step,
-- level payload, levels ttl ms, job payload.
local function fuse_next(keys, args)
  if not mark_fused(keys[1], keys[2], args[1], tonumber(args[2])) then return 'duplicate' end
  redis.call('HSET', keys[3], args[3], args[4])
  redis.call('PEXPIRE', keys[3], tonumber(args[5]))
  for i = 4, #keys do
    redis.call('XADD', keys[i], '*', 'm', args[6])
  end
  return 'next'
end

"""


# The functions, under names that carry the library's version (a digest of its code): function
# names are global across libraries, so two versions load side by side during a rolling upgrade,
# and a worker only ever calls the code it was written against.
FUNCTIONS = ("admit", "start_waiting", "refuse", "apply_round", "cancel", "send", "move_stream", "hand_back", "fuse_add", "fuse_take", "fuse_emit", "fuse_next")
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


def split_roster(entries: Mapping[bytes, bytes], now_ms: float) -> tuple[dict[str, str], list[bytes]]:
    """A role's roster hash (instance -> "{expires ms} {liveness value}") -> (the live
    workers, instance -> liveness value; the instances expired long enough to remove)."""
    live, gone = {}, []
    for instance, entry in entries.items():
        expires, _, value = entry.decode().partition(" ")
        try:
            expired_for = now_ms - float(expires)
        except ValueError:
            expired_for = ROSTER_FORGET_MS
        if expired_for < 0:
            live[instance.decode()] = value
        elif expired_for >= ROSTER_FORGET_MS:
            gone.append(instance)
    return live, gone


def redis_url_from_env(url: str | None) -> str | None:
    return url or os.environ.get("COSINE_REDIS_URL") or None


def connect(url: str, timeout_s: float = 30.0) -> aioredis.Redis:
    """An asyncio client for ``redis://`` or ``rediss://`` URLs (password in the URL); a call
    with no answer for ``timeout_s`` (a frozen or unreachable server) raises ``TimeoutError``."""
    scheme = urlparse(url).scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"redis URL must start with redis://, rediss:// or unix://, got {redacted_url(url)!r}")
    # Workers' time-out must outlast their longest blocking read (pipeline.block_ms <= 20 s).
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=min(30, timeout_s), socket_timeout=timeout_s,
                                   socket_connect_timeout=min(10, timeout_s))


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


def finish_call(keys: Keys, state, update, ttl_s: int) -> tuple[list[str], list]:
    """``apply_rounds``' call for a finishing update (``state.fail`` or a last round) of the
    request in ``state``: its final entry, the tombstone and the TTL."""
    return apply_round_call(keys, request_id=state.request_id, expected_round=state.round, fields=round_fields(update.state),
                            out_entries=update.out_entries, ttl_s=ttl_s)


async def finish_request(client: aioredis.Redis, keys: Keys, state, update, ttl_s: int) -> str:
    """Apply a finishing update (``state.fail`` or a last round) to the request in ``state``:
    its final entry, the tombstone and the TTL. Outcomes as ``apply_round``."""
    return (await apply_rounds(client, [finish_call(keys, state, update, ttl_s)]))[0]


def apply_round_call(
    keys: Keys, *, request_id: str, expected_round: int, fields: Mapping,
    out_entries: Sequence[Mapping], job_streams: Sequence[str | tuple[str, str]] = (), payload: bytes = b"", ttl_s: int = 0,
    features: bytes = b"", features_start: int = 0, feature_rows: int = 0,
) -> tuple[list[str], list]:
    """The keys and arguments of one round's ``cosine_apply_round`` (see ``apply_round``). A job
    stream is a shared stream, or (a worker's own stream, the shared stream the job goes to
    when that worker's stream is gone)."""
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
    if not calls:
        return []
    if len(calls) == 1:
        key_list, args = calls[0]
        return [await _fcall(client, "apply_round", key_list, args)]
    async with client.pipeline(transaction=False) as pipe:
        for key_list, args in calls:
            pipe.fcall(function_name("apply_round"), len(key_list), *key_list, *args)
        replies = await pipe.execute()
    return [r.decode() if isinstance(r, bytes) else r for r in replies]


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


async def fuse_add(
    client: aioredis.Redis, keys: Keys, *, group: str, entry_id: bytes, hash_key: str, expert: str, payload: bytes,
    expected: int, deadline_ms: int, ttl_ms: int, retake_ms: int,
) -> list[bytes]:
    """Store one draft of a round and ack it; the payloads of every draft once the set is complete."""
    args = [group, entry_id, expert, payload, expected, deadline_ms, hash_key, ttl_ms, retake_ms]
    return list(await _fcall(client, "fuse_add", [hash_key, keys.drafts, keys.fusing], args))


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

