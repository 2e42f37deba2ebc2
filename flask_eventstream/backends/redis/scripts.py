"""The Lua scripts of the Redis backend. Each runs atomically on the server.

Keys: ``PREFIX + channel`` for a channel's stream, ``PREFIX + "~meta"`` for
the hash that holds the server-wide counter (``last``) and the id of the
first event published through it (``epoch``).
"""

from __future__ import annotations

__all__ = ["COUNTER", "PUBLISH", "SNAPSHOT"]

# The server's clock in milliseconds, as ``now``.
_CLOCK = """
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
"""

#: Publish one event. KEYS: stream, meta. ARGV: maxlen, token, retry flag,
#: replicas needed, then field/value pairs. The id continues the server-wide
#: counter (or this stream's newest entry, and starts a new epoch, if the
#: counter was lost). On a retry, an entry of the last minute carrying the
#: same token means the first attempt went through: its id is returned and
#: nothing is added. With fewer replicas online than needed (a master just
#: promoted), nothing is written.
PUBLISH = (
    """
local need = tonumber(ARGV[4])
if need > 0 then
  local online = 0
  for _ in string.gmatch(redis.call('INFO', 'replication'), 'state=online') do
    online = online + 1
  end
  if online < need then
    return redis.error_reply(string.format(
      'NOREPLICAS %d of %d replicas online', online, need))
  end
end
"""
    + _CLOCK
    + """
if ARGV[3] == '1' then
  local recent = redis.call('XRANGE', KEYS[1], string.format('%.0f', now - 60000), '+')
  for i = #recent, 1, -1 do
    local f = recent[i][2]
    for j = 1, #f, 2 do
      if f[j] == 't' and f[j + 1] == ARGV[2] then return recent[i][1] end
    end
  end
end
local ms, seq = now, 0
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
local prev = ''
if top then prev = top[1] end
local last = redis.call('HGET', KEYS[2], 'last')
for _, after in ipairs({last or '', prev}) do
  if after ~= '' then
    local ams, aseq = string.match(after, '^(%d+)-(%d+)$')
    ams, aseq = tonumber(ams), tonumber(aseq)
    if ms < ams or (ms == ams and seq <= aseq) then ms, seq = ams, aseq + 1 end
  end
end
local id = string.format('%.0f-%.0f', ms, seq)
if not last then redis.call('HSET', KEYS[2], 'epoch', id) end
redis.call('HSET', KEYS[2], 'last', id)
local cmd = {'XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, 't', ARGV[2], 'p', prev}
for i = 5, #ARGV do cmd[#cmd + 1] = ARGV[i] end
redis.call(unpack(cmd))
return id
"""
)

#: A consistent snapshot for registering subscriptions. KEYS: meta, then
#: streams; ARGV: the first id wanted from each stream. Returns the counter,
#: the epoch, the server time in ms, then the entries of each stream.
SNAPSHOT = (
    """
local meta = redis.call('HMGET', KEYS[1], 'last', 'epoch')
"""
    + _CLOCK
    + """
local out = {meta[1], meta[2], string.format('%.0f', now)}
for i = 2, #KEYS do
  out[#out + 1] = redis.call('XRANGE', KEYS[i], ARGV[i - 1], '+')
end
return out
"""
)

#: The newest id published; with none, one just before the server's clock.
#: KEYS: meta.
COUNTER = (
    """
local last = redis.call('HGET', KEYS[1], 'last')
if last then return last end
"""
    + _CLOCK
    + """
return string.format('%.0f-0', now - 1)
"""
)
