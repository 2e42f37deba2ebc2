"""The Lua scripts of the Redis backend. Each touches one key, a channel's
stream, so on a Redis Cluster each runs in one slot."""

from __future__ import annotations

__all__ = ["PUBLISH", "SNAPSHOT"]

# Publish one event. KEYS: the stream (also the shard channel). ARGV: maxlen,
# token, retry flag, announce flag, replicas needed online (0: no check),
# then field/value pairs. With fewer replicas online than needed (a master
# just promoted), nothing is written. The entry id is
# <epoch>-<offset>: the epoch of the newest entry, or the server's time for a
# new history. On a retry, an entry carrying the same token among the
# retained ones means the first attempt went through: nothing is added, and
# that entry is announced again (readers skip what they have). With the
# announce flag, the script SPUBLISHes the entry and returns its id; without,
# it returns the id and the message, for the caller to SPUBLISH once enough
# replicas hold the entry. The message is the JSON array [id, time, token,
# field, value, ...].
PUBLISH = """
local function done(id, f)
  local msg = {id, '', ''}
  for j = 1, #f, 2 do
    if f[j] == 'w' then
      msg[2] = f[j + 1]
    elseif f[j] == 't' then
      msg[3] = f[j + 1]
    else
      msg[#msg + 1] = f[j]
      msg[#msg + 1] = f[j + 1]
    end
  end
  msg = cjson.encode(msg)
  if ARGV[4] == '1' then
    redis.call('SPUBLISH', KEYS[1], msg)
    return id
  end
  return {id, msg}
end
local need = tonumber(ARGV[5])
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
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if ARGV[3] == '1' and top then
  local recent = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
  for i = 1, #recent do
    local f = recent[i][2]
    for j = 1, #f, 2 do
      if f[j] == 't' and f[j + 1] == ARGV[2] then return done(recent[i][1], f) end
    end
  end
end
local tm = redis.call('TIME')
local ms = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
local now = string.format('%.0f', tonumber(tm[1]) * 1000000 + tonumber(tm[2]))
local id
if top then
  id = string.match(top[1], '^(%d+)-') .. '-*'
else
  id = string.format('%.0f', ms) .. '-1'
end
local fields = {'t', ARGV[2], 'w', now}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], id, unpack(fields))
return done(id, fields)
"""


# A channel's history after a position. KEYS: the stream. ARGV: epoch,
# offset ('' for the newest entry only). Returns the newest id, the oldest
# id, and the entries after <epoch>-<offset> (all of them if the epoch is
# not the history's).
SNAPSHOT = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if not top then return {} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
local out = {top[1], first[1]}
if ARGV[2] == '' then return out end
local epoch = string.match(top[1], '^(%d+)-')
local start = '-'
if ARGV[1] == epoch then start = '(' .. epoch .. '-' .. ARGV[2] end
out[3] = redis.call('XRANGE', KEYS[1], start, '+')
return out
"""
