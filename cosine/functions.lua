-- CoSine's server-side function library (loaded by `cosine setup`, named after a digest of this
-- file: every version of CoSine has its own, and workers of two versions can share a server).
-- Each function makes one stage's effects atomic: the check (an id unused, the round number
-- still the expected one, a round's drafts not fused yet) and every write in one step, so a
-- duplicate delivery or a second worker of a role changes nothing. Argument layouts are built
-- only in cosine/bus.py.
--
-- Request state lives in one hash per request; the `rounds` sorted set scores each active
-- request by when its current round was issued (the coordinator's drafting-deadline sweep reads
-- it). `round` is the compare-and-set guard: a round's result is applied only while the state
-- still says that round, and applying it bumps it.

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

-- A round drafted by one expert: its one draft is the whole set, so the caller fused it
-- already; acknowledged and its candidate written at once (one round trip, no drafts stored),
-- unless the round was fused before (a redelivery).
-- KEYS: fuse hash, drafts stream, candidates stream.  ARGV: group, entry id, candidate
-- payload, ttl ms of the done marker.
local function fuse_one(keys, args)
  redis.call('XACK', keys[2], args[1], args[2])
  if redis.call('HEXISTS', keys[1], '#done') == 1 then return 'duplicate' end
  redis.call('DEL', keys[1])
  redis.call('HSET', keys[1], '#done', '1')
  redis.call('PEXPIRE', keys[1], tonumber(args[4]))
  redis.call('XADD', keys[3], '*', 'm', args[3])
  return 'emitted'
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

