"""Presence, revocations and control messages on Redis, shared by every
worker and host.

Presence costs one script call per worker every ``timeout / 3`` seconds,
however many streams the worker serves, plus one per batch of streams
opened or closed. Keys, under the backend's prefix (``~`` cannot appear in
a channel name):

- ``~workers``: a sorted set of worker ids, scored with the time (Redis'
  clock, ms) after which a worker that stopped refreshing counts as dead;
- ``~w:<worker>``: a hash of what that worker counts,
  ``<channel> LF <user>`` → open streams;
- ``~u:<channel>``: a hash of the totals over live workers, user → open
  streams (what :meth:`RedisPresence.users` reads);
- ``~revoked``: a hash, user → when (Unix ms) their grants were revoked;
- ``~control``: a stream of control messages (revoke, disconnect) that every
  worker's reader follows, each announced on the shard channel of the same
  name.

One script does every change (a worker's deltas, its heartbeat, and the
sweep of dead workers) atomically, so the totals always equal the sum of the
live workers' hashes; it returns the users whose total went from 0 to more
(joined) or back to 0 (left). A worker that was swept while alive (it
stalled longer than the timeout) or whose entries Redis lost registers again
under a new id with everything it counts.
"""

from __future__ import annotations

import os
import secrets
import socket
import typing as t

import redis

from ...presence import Changes

__all__ = ["RedisPresence", "Transition"]

#: (channel, user, joined): ``joined`` True for a user's first open stream on
#: the channel over all workers, False for their last one closing.
Transition = tuple[str, str, bool]

#: Dead workers swept per script call, at most.
SWEEP_BATCH = 16
#: Entries of the control stream kept (approximately).
CONTROL_MAXLEN = 1000

# KEYS[1]: the workers' sorted set. ARGV: prefix, worker id, ttl ms (0: do not
# refresh), "1" if the worker must be known already (else it is registered),
# a worker id to drop ("" for none), then channel, user, delta triples.
# Returns {status, sign, channel, user, sign, channel, user, ...}: status
# "ok", or "lost" (the worker was unknown and nothing was changed); sign "+"
# for a join, "-" for a leave.
_PRESENCE = """
local prefix, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local tm = redis.call('TIME')
local now = tonumber(tm[1]) * 1000 + math.floor(tonumber(tm[2]) / 1000)
if ARGV[4] == '1' and not redis.call('ZSCORE', KEYS[1], me) then
  return {'lost'}
end
local before, order = {}, {}
local function bump(channel, user, delta)
  local ukey = prefix .. '~u:' .. channel
  local n = tonumber(redis.call('HGET', ukey, user) or '0')
  local field = channel .. '\\n' .. user
  if before[field] == nil then
    before[field] = n
    order[#order + 1] = {ukey, channel, user, field}
  end
  n = n + delta
  if n > 0 then
    redis.call('HSET', ukey, user, n)
  else
    redis.call('HDEL', ukey, user)
  end
end
local function drop(worker)
  redis.call('ZREM', KEYS[1], worker)
  local wkey = prefix .. '~w:' .. worker
  local fields = redis.call('HGETALL', wkey)
  for i = 1, #fields, 2 do
    local channel, user = string.match(fields[i], '^(.-)\\n(.*)$')
    if channel then bump(channel, user, -tonumber(fields[i + 1])) end
  end
  redis.call('DEL', wkey)
end
if ARGV[5] ~= '' then drop(ARGV[5]) end
local dead = redis.call(
  'ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, SWEEP_BATCH)
for _, worker in ipairs(dead) do
  if worker ~= me then drop(worker) end
end
if ttl > 0 then redis.call('ZADD', KEYS[1], now + ttl, me) end
local wkey = prefix .. '~w:' .. me
for i = 6, #ARGV, 3 do
  local channel, user, delta = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local field = channel .. '\\n' .. user
  local n = redis.call('HINCRBY', wkey, field, delta)
  if n <= 0 then redis.call('HDEL', wkey, field) end
  bump(channel, user, delta)
end
local out = {'ok'}
for _, item in ipairs(order) do
  local was = before[item[4]]
  local now_n = tonumber(redis.call('HGET', item[1], item[3]) or '0')
  if was <= 0 and now_n > 0 then
    out[#out + 1] = '+'; out[#out + 1] = item[2]; out[#out + 1] = item[3]
  elseif was > 0 and now_n <= 0 then
    out[#out + 1] = '-'; out[#out + 1] = item[2]; out[#out + 1] = item[3]
  end
end
return out
""".replace("SWEEP_BATCH", str(SWEEP_BATCH))

# Record a revocation, keeping the latest. KEYS: the revocations hash.
# ARGV: user, Unix ms.
_REVOKE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return redis.call('HGET', KEYS[1], ARGV[1])
"""


def new_worker_id() -> str:
    """An id for one worker's registration: host, pid and a random part (a
    worker registers again under a new one after it was lost)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisPresence:
    """The shared store of one worker. Not thread-safe: the backend calls it
    from one task at a time.

    :param prefix: the prefix of every key.
    :param timeout: seconds after its last heartbeat at which a worker counts
        as dead (``EVENTSTREAM_PRESENCE_TIMEOUT``).
    """

    def __init__(self, prefix: str, timeout: float) -> None:
        self.prefix = prefix
        self.timeout = timeout
        self.workers_key = prefix + "~workers"
        self.revoked_key = prefix + "~revoked"
        self.control_key = prefix + "~control"
        self.worker_id = new_worker_id()
        #: Whether Redis holds exactly what the worker's table held at the
        #: last call; if not, the next call registers again from scratch.
        self.synced = False
        self._scripts: dict[int, tuple[t.Any, t.Any]] = {}

    @property
    def interval(self) -> float:
        """Seconds between heartbeats."""
        return self.timeout / 3

    def _script(self, client: redis.Redis) -> tuple[t.Any, t.Any]:
        scripts = self._scripts.get(id(client))
        if scripts is None:
            scripts = self._scripts[id(client)] = (
                client.register_script(_PRESENCE),
                client.register_script(_REVOKE),
            )
        return scripts

    def _call(
        self,
        client: redis.Redis,
        *,
        must_be_known: bool,
        drop: str = "",
        changes: Changes | None = None,
        refresh: bool = True,
    ) -> list[Transition] | None:
        args: list[str | int] = [
            self.prefix,
            self.worker_id,
            int(self.timeout * 1000) if refresh else 0,
            "1" if must_be_known else "0",
            drop,
        ]
        for (channel, user), delta in (changes or {}).items():
            if delta:
                args += [channel, user, delta]
        reply = self._script(client)[0](
            keys=[self.workers_key], args=args, client=client
        )
        if _text(reply[0]) == "lost":
            return None
        out: list[Transition] = []
        for i in range(1, len(reply), 3):
            sign, channel, user = (_text(x) for x in reply[i : i + 3])
            out.append((channel, user, sign == "+"))
        return out

    def sync(
        self, client: redis.Redis, changes: Changes, snapshot: t.Callable[[], Changes]
    ) -> list[Transition]:
        """Apply ``changes`` (taken from the worker's table) and refresh the
        heartbeat; if the worker was lost (or a call failed before), register
        again under a new id with ``snapshot()`` (everything it counts)
        instead. Sweeps dead workers on the way.

        :raises redis.RedisError, OSError: the outcome is then unknown, and the
            next call registers again.
        """
        try:
            if self.synced:
                result = self._call(client, must_be_known=True, changes=changes)
                if result is not None:
                    return result
            # Lost, or never registered: start over under a new id; the old
            # registration's counts (if any are left) are taken away in the
            # same step, so users who stay do not leave and rejoin.
            self.synced = False
            old, self.worker_id = self.worker_id, new_worker_id()
            result = self._call(
                client, must_be_known=False, drop=old, changes=snapshot()
            )
            assert result is not None
            self.synced = True
            return result
        except BaseException:
            self.synced = False
            raise

    def leave(self, client: redis.Redis) -> list[Transition]:
        """Take this worker's counts away (a clean shutdown)."""
        self.synced = False
        result = self._call(
            client, must_be_known=False, drop=self.worker_id, refresh=False
        )
        return result or []

    def users(self, client: redis.Redis, channel: str) -> dict[str, int]:
        """``{user: open streams}`` on ``channel`` over every live worker."""
        raw = client.hgetall(self.prefix + "~u:" + channel)
        users = {_text(k): int(v) for k, v in raw.items()}
        return {user: n for user, n in users.items() if n > 0}

    def sweep(self, client: redis.Redis) -> list[Transition]:
        """Take away the counts of workers whose heartbeat lapsed."""
        # As a worker that is not registered, refreshing nothing.
        return self._call(client, must_be_known=False, refresh=False) or []

    # -- revocations and control messages --

    def revoke(self, client: redis.Redis, user: str, at_ms: int) -> int:
        """Record that ``user``'s grants issued up to ``at_ms`` are revoked;
        return the time recorded (a later one may be there already)."""
        return int(
            self._script(client)[1](
                keys=[self.revoked_key], args=[user, at_ms], client=client
            )
        )

    def revoked_at(self, client: redis.Redis, user: str) -> int | None:
        raw = client.hget(self.revoked_key, user)
        return int(raw) if raw is not None else None

    def send_control(self, client: redis.Redis, fields: dict[str, str]) -> str:
        """Append a control message for every worker's reader, and announce
        it on the stream's shard channel (the readers subscribed there read
        the stream at once); its id."""
        pipe: t.Any = client.pipeline(transaction=False)
        pipe.xadd(
            self.control_key,
            t.cast(t.Any, fields),
            maxlen=CONTROL_MAXLEN,
            approximate=True,
        )
        pipe.execute_command("SPUBLISH", self.control_key, "1")
        raw, _ = pipe.execute()
        return _text(raw)
