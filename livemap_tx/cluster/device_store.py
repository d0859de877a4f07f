"""
The devices of a cluster in Redis (and the same in memory, for tests).

Keys, on the link's home server (`{prefix}` is `livemap:v2:{cluster}`, and
`{map}` the SHA-1 of a map's name, as Lua's redis.sha1hex computes it):

- `{prefix}:devices`: sorted set of token hashes, scored by when the device
  is forgotten (epoch ms): its map's expiry, or 30 days after its last fix;
- `{prefix}:device`: hash, token hash -> the device's record (JSON: map, pin
  id, name, map expiry);
- `{prefix}:fixes:{map}`: hash, token hash -> the latest fix of each device
  of the map (JSON `{"m": MAP, "e": [VERSION, PIN]}`), and
  `{prefix}:fixv:{map}` the version alone, compared as a decimal string (a
  Lua number would round it): a node that starts serving a map reads the
  map's fixes and nothing else;
- `{prefix}:epoch`: a random value set by the first node to find it
  missing: a node that sees a new one knows Redis lost its data and writes
  back what it knows;
- `{prefix}:gone`: sorted set of the token hashes of deleted devices,
  scored by when they may be forgotten, written back with the devices by
  the nodes that remember the deletions: a device named there is never
  written back (and is deleted again if a node wrote it back first).

Every change is one Lua script, so that a device deleted on one node can
never be brought back by a fix saved on another. Only token hashes are
kept, never tokens.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import defer

from ..privacy import map_digest

# Forgotten devices pruned per script call (the rest go on the next one).
PRUNE_BATCH = 1000

# KEYS[1] devices, KEYS[2] device; ARGV[1] now (ms), ARGV[2] the key prefix.
_PRUNE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, %d)
for _, h in ipairs(gone) do
  local record = redis.call('HGET', KEYS[2], h)
  if record then
    local map = redis.sha1hex(cjson.decode(record)['m'])
    redis.call('HDEL', ARGV[2] .. ':fixes:' .. map, h)
    redis.call('HDEL', ARGV[2] .. ':fixv:' .. map, h)
  end
  redis.call('ZREM', KEYS[1], h)
  redis.call('HDEL', KEYS[2], h)
end
redis.call('ZREMRANGEBYSCORE', ARGV[2] .. ':gone', '-inf', ARGV[1])
""" % PRUNE_BATCH

# ARGV[3] cap, ARGV[4] forget at, ARGV[5] token hash, ARGV[6] record.
ADD_DEVICE = (_PRUNE + """
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 'full' end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[5], ARGV[6])
return 'added'
""").encode()

FIND_DEVICE = b"""
local forget_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not forget_at or tonumber(forget_at) <= tonumber(ARGV[2]) then return false end
return redis.call('HGET', KEYS[2], ARGV[1])
"""

# KEYS devices, device, fixes:{map}, fixv:{map}.
REMOVE_DEVICE = b"""
local existed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
return existed
"""

# KEYS devices, fixes:{map}, fixv:{map}; ARGV hash, now, version, value, forget at.
SAVE_FIX = b"""
local forget_at = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not forget_at or tonumber(forget_at) <= tonumber(ARGV[2]) then return 'unknown' end
local held = redis.call('HGET', KEYS[3], ARGV[1])
if held and (#held > #ARGV[3] or (#held == #ARGV[3] and held >= ARGV[3])) then
  return 'older'
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[5], ARGV[1])
return 'saved'
"""

PRUNE = (_PRUNE + "return 0\n").encode()

# KEYS devices, device, gone.
RESTORE_DEVICES = b"""
for i = 1, #ARGV, 3 do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) and not redis.call('ZSCORE', KEYS[3], ARGV[i]) then
    redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 0
"""

# KEYS devices, device, gone; ARGV[1] the key prefix, then (hash, map's
# SHA-1, forget at) triples: deleted devices, deleted again.
RESTORE_GONE = b"""
for i = 2, #ARGV, 3 do
  redis.call('ZADD', KEYS[3], ARGV[i + 2], ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
  redis.call('HDEL', ARGV[1] .. ':fixes:' .. ARGV[i + 1], ARGV[i])
  redis.call('HDEL', ARGV[1] .. ':fixv:' .. ARGV[i + 1], ARGV[i])
end
return 0
"""

RESTORE_CHUNK = 500


def fix_value(map_name: bytes, entry: bytes) -> bytes:
    """A stored fix: the map's name (JSON) and `[VERSION, PIN]`."""
    return b'{"m":%s,"e":%s}' % (map_name, entry)


class RedisDeviceKeys:
    """The device store's commands on a RedisLink's home server."""

    def __init__(self, link: Any, prefix: str) -> None:
        self.link = link
        self.prefix = prefix
        self.devices_key = f"{prefix}:devices"
        self.device_key = f"{prefix}:device"
        self.epoch_key = f"{prefix}:epoch"
        self.gone_key = f"{prefix}:gone"

    def _fix_keys(self, map_name: str) -> list[str]:
        digest = map_digest(map_name)
        return [f"{self.prefix}:fixes:{digest}", f"{self.prefix}:fixv:{digest}"]

    def _eval(self, script: bytes, keys: list[str], *args: Any) -> defer.Deferred:
        d = self.link._query("EVAL", script, len(keys), *keys, *args)
        return d.addCallback(lambda out: out.decode() if isinstance(out, bytes) else out)

    def add_device(self, token_hash: str, record: bytes, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        return self._eval(ADD_DEVICE, [self.devices_key, self.device_key], str(int(now_ms)),
                          self.prefix, str(cap), str(int(expires_ms)), token_hash, record)

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        return self.link._query("EVAL", FIND_DEVICE, 2, self.devices_key, self.device_key,
                                token_hash, str(int(now_ms)))

    def remove_device(self, token_hash: str, map_name: str) -> defer.Deferred:
        keys = [self.devices_key, self.device_key, *self._fix_keys(map_name)]
        return self._eval(REMOVE_DEVICE, keys, token_hash).addCallback(lambda n: bool(int(n)))

    def save_fix(self, token_hash: str, map_name: str, version: int, value: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        keys = [self.devices_key, *self._fix_keys(map_name)]
        return self._eval(SAVE_FIX, keys, token_hash, str(int(now_ms)), str(version), value,
                          str(int(expires_ms)))

    async def load_fixes(self, map_name: str, now_ms: float) -> list[bytes]:
        """The latest fix of every live device of a map (forgotten devices pruned first)."""
        await self._eval(PRUNE, [self.devices_key, self.device_key], str(int(now_ms)),
                         self.prefix)
        key = self._fix_keys(map_name)[0]
        values: list[bytes] = []
        cursor = 0
        while True:
            reply = await self.link._query("HSCAN", key, cursor, "COUNT", 1000)
            cursor, flat = int(reply[0]), reply[1]
            values.extend(flat[1::2])
            if cursor == 0:
                return values

    async def epoch(self, candidate: str) -> str:
        """The store's epoch: `candidate` if it had none (it lost its data, or is new)."""
        await self.link._query("SET", self.epoch_key, candidate, "NX")
        found = await self.link._query("GET", self.epoch_key)
        return found.decode() if isinstance(found, bytes) else str(found)

    def restore(self, records: Iterable[tuple[str, bytes, float]],
                gone: Iterable[tuple[str, str, float]] = ()) -> defer.Deferred:
        """
        Write back devices unless present or deleted (after Redis lost
        them), and the deletions this node remembers (hash, map, until ms).
        """
        keys = [self.devices_key, self.device_key, self.gone_key]
        sent = []
        deleted = list(gone)
        for start in range(0, len(deleted), RESTORE_CHUNK):
            args: list[Any] = [self.prefix]
            for token_hash, map_name, until_ms in deleted[start:start + RESTORE_CHUNK]:
                args += [token_hash, map_digest(map_name), str(int(until_ms))]
            sent.append(self.link._query("EVAL", RESTORE_GONE, 3, *keys, *args))
        items = list(records)
        for start in range(0, len(items), RESTORE_CHUNK):
            args = []
            for token_hash, record, expires_ms in items[start:start + RESTORE_CHUNK]:
                args += [token_hash, record, str(int(expires_ms))]
            sent.append(self.link._query("EVAL", RESTORE_DEVICES, 3, *keys, *args))
        return defer.gatherResults(sent, consumeErrors=True)


class MemoryDeviceKeys:
    """The same store on a MemoryBus (one process, for tests), answered in a later turn."""

    def __init__(self, link: Any) -> None:
        self.link = link

    @property
    def bus(self) -> Any:
        return self.link.bus

    def _prune(self, now_ms: float) -> None:
        for key in [k for k, (_, forget_at) in self.bus.devices.items() if forget_at <= now_ms]:
            del self.bus.devices[key]
            self.bus.device_fixes.pop(key, None)
        for key in [k for k, until in self.bus.device_gone.items() if until <= now_ms]:
            del self.bus.device_gone[key]

    def add_device(self, token_hash: str, record: bytes, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        def add() -> str:
            self._prune(now_ms)
            if len(self.bus.devices) >= cap:
                return "full"
            self.bus.devices[token_hash] = (record, expires_ms)
            return "added"
        return self._answer(add)

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        def find() -> Any:
            found = self.bus.devices.get(token_hash)
            return None if found is None or found[1] <= now_ms else found[0]
        return self._answer(find)

    def remove_device(self, token_hash: str, map_name: str) -> defer.Deferred:
        def remove() -> bool:
            self.bus.device_fixes.pop(token_hash, None)
            return self.bus.devices.pop(token_hash, None) is not None
        return self._answer(remove)

    def save_fix(self, token_hash: str, map_name: str, version: int, value: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        def save() -> str:
            found = self.bus.devices.get(token_hash)
            if found is None or found[1] <= now_ms:
                return "unknown"
            held = self.bus.device_fixes.get(token_hash)
            if held is not None and held[1] >= version:
                return "older"
            self.bus.device_fixes[token_hash] = (map_name, version, value)
            self.bus.devices[token_hash] = (found[0], expires_ms)
            return "saved"
        return self._answer(save)

    async def load_fixes(self, map_name: str, now_ms: float) -> list[bytes]:
        def load() -> list[bytes]:
            self._prune(now_ms)
            return [value for name, _, value in self.bus.device_fixes.values()
                    if name == map_name]
        return await self._answer(load)

    async def epoch(self, candidate: str) -> str:
        def epoch() -> str:
            if self.bus.device_epoch is None:
                self.bus.device_epoch = candidate
            return self.bus.device_epoch
        return await self._answer(epoch)

    def restore(self, records: Iterable[tuple[str, bytes, float]],
                gone: Iterable[tuple[str, str, float]] = ()) -> defer.Deferred:
        items, deleted = list(records), list(gone)

        def restore() -> None:
            for token_hash, _, until_ms in deleted:
                self.bus.device_gone[token_hash] = until_ms
                self.bus.devices.pop(token_hash, None)
                self.bus.device_fixes.pop(token_hash, None)
            for token_hash, record, expires_ms in items:
                if token_hash not in self.bus.device_gone:
                    self.bus.devices.setdefault(token_hash, (record, expires_ms))
        return self._answer(restore)

    def _answer(self, compute: Any) -> defer.Deferred:
        # As from Redis: in a later turn, and a failure while not linked.
        return self.link._reply(compute)
