"""
Devices: phone apps that report in the background (OwnTracks, Traccar
Client and OsmAnd, Overland, GPSLogger) as pins on a map.

A device is made for a map through the API and given a token, its only
credential. Its reports (`Fix`es, parsed from each app's own format by
apps.py) move one pin that belongs to the device, not to a node: its
`origin` is `hub.DEVICES`, its version is the fix's own time, so any node
may apply any report and a fix older than the one shown never wins, however
the reports are spread over nodes and however late a queued fix arrives.
The pin has no connection: it stays until `--expire` after its last fix,
until the device is deleted or its map expires.

Where devices are kept is a `DeviceStore`: `LocalDevices` (one process; on
disk too with sqlite_store's `DiskDevices`), or the backplane (Redis,
shared by every node of a cluster). A cluster's store is asked on every
request, since another node may have deleted the device; and every node
remembers deletions (`deleted`), so it never writes a deleted device back
nor shows a late fix of it. Only a token's SHA-256 is kept anywhere: a
store, a log or a dump never holds a token.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import zlib
from dataclasses import dataclass, replace
from typing import Optional, Protocol, Sequence

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .. import wire
from ..admission import AddressRate
from ..hub import DEVICES, Hub
from ..maps import MapDirectory
from ..privacy import coarsen

SOURCES = ("owntracks", "osmand", "overland")
# 24 random bytes: 192 bits, 32 characters.
TOKEN_BYTES = 24
# A fix further than this in the device's future is skipped (and counted).
MAX_FUTURE = 300.0
# A device that reports nothing for this long is forgotten.
DEVICE_IDLE = 30 * 24 * 3600.0
DEFAULT_MAX_DEVICES = 100_000
# Devices one client address may make: a burst (--device-burst: a venue's
# audience behind one NAT address sets up its phones at once), then one per
# period.
CREATE_BURST = 120
CREATE_PERIOD = 30.0
# Client addresses whose creations are counted (least recently seen go first).
MAX_CREATORS = 10_000


def token_hash(token: str) -> str:
    """What is kept of a token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def looks_like_token(value: str) -> bool:
    return len(value) == 32 and wire.is_map_name(value)


@dataclass(frozen=True)
class Fix:
    """One position report of a device, in livemap's units."""

    lat: float
    lng: float
    # The device's time of the fix, ms since the epoch.
    ts: int
    source: str
    accuracy: Optional[float] = None
    heading: Optional[float] = None
    battery: Optional[int] = None
    # OwnTracks' two-character tracker id, as the device sent it.
    tid: Optional[str] = None


def fix_version(fix: Fix) -> int:
    """
    Orders fixes by the device's time; equal times are ordered by content,
    so that every node picks the same one.
    """
    content = f"{fix.lat!r},{fix.lng!r},{fix.heading!r},{fix.accuracy!r},{fix.battery!r}"
    return fix.ts * 65536 + (zlib.crc32(content.encode()) & 0xFFFF)


@dataclass(eq=False)
class Device:
    token_hash: str
    id: str
    map: str
    name: Optional[str]
    # When the map expires (the clock's seconds), if it does.
    expires: Optional[float] = None
    # The report rate limit of this node for the device (a token bucket).
    tokens: float = 0.0
    updated: float = -math.inf
    # The newest fix that came too soon, applied when the bucket allows.
    held: Optional[Fix] = None
    release: Optional[IDelayedCall] = None

    def record(self) -> dict:
        return {"m": self.map, "i": self.id, "n": self.name,
                "x": None if self.expires is None else round(self.expires * 1000)}

    @classmethod
    def from_record(cls, token_hash: str, record: dict) -> Device:
        expires = record.get("x")
        return cls(token_hash, record["i"], record["m"], record.get("n"),
                   None if expires is None else expires / 1000)


class DeviceError(Exception):
    """A device request that cannot be done; `status` is the HTTP answer."""

    status = 400

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownDevice(DeviceError):
    status = 404


class NoSuchMap(DeviceError):
    status = 404


class Refused(DeviceError):
    status = 403


class TooFast(DeviceError):
    status = 429


class Full(DeviceError):
    status = 503


class Unavailable(DeviceError):
    status = 503


class DeviceStore(Protocol):
    """Where devices and their latest fixes are kept (times in ms since the epoch)."""

    def add_device(self, token_hash: str, record: dict, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        """Fires "added" or "full" (`cap` devices live); fails if unreachable."""

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        """Fires the device's record, or None."""

    def remove_device(self, token_hash: str, map_name: str, pin_id: str) -> defer.Deferred:
        """Fires whether it existed; a cluster's other nodes drop its pin."""

    def save_fix(self, token_hash: str, map_name: str, version: int, entry: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        """
        Keep `entry` (`[version, PIN]`) as the device's latest fix unless it
        holds a newer one, and keep the device until `expires_ms`. Fires
        "saved" (the other nodes of a cluster are told), "older" or "unknown".
        """


class LocalDevices:
    """The store of one process: dictionaries (the same answers, at once, in `add` etc.)."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[dict, float]] = {}
        self.versions: dict[str, int] = {}

    def add(self, token_hash: str, record: dict, expires_ms: float, *,
            cap: int, now_ms: float) -> str:
        self._prune(now_ms)
        if len(self.records) >= cap:
            return "full"
        self.records[token_hash] = (record, expires_ms)
        return "added"

    def remove(self, token_hash: str) -> bool:
        self.versions.pop(token_hash, None)
        return self.records.pop(token_hash, None) is not None

    def save(self, token_hash: str, version: int, now_ms: float, expires_ms: float) -> str:
        found = self.records.get(token_hash)
        if found is None or found[1] <= now_ms:
            return "unknown"
        if version <= self.versions.get(token_hash, -1):
            return "older"
        self.versions[token_hash] = version
        self.records[token_hash] = (found[0], expires_ms)
        return "saved"

    def add_device(self, token_hash: str, record: dict, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        return defer.succeed(self.add(token_hash, record, expires_ms, cap=cap, now_ms=now_ms))

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        found = self.records.get(token_hash)
        if found is None or found[1] <= now_ms:
            return defer.succeed(None)
        return defer.succeed(found[0])

    def remove_device(self, token_hash: str, map_name: str, pin_id: str) -> defer.Deferred:
        return defer.succeed(self.remove(token_hash))

    def save_fix(self, token_hash: str, map_name: str, version: int, entry: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        return defer.succeed(self.save(token_hash, version, now_ms, expires_ms))

    def forget_map(self, map_name: str) -> None:
        for key in [key for key, (record, _) in self.records.items() if record["m"] == map_name]:
            del self.records[key]
            self.versions.pop(key, None)

    def _prune(self, now_ms: float) -> None:
        for key in [key for key, (_, expires) in self.records.items() if expires <= now_ms]:
            del self.records[key]
            self.versions.pop(key, None)


class Devices:
    """The devices of this node: made, found, fed and deleted."""

    log = Logger()

    def __init__(self, hub: Hub, maps: MapDirectory, clock: IReactorTime, *,
                 rate: float = 10.0, precision: float = 0.0, expire: float = 3600.0,
                 max_devices: int = DEFAULT_MAX_DEVICES, create_burst: int = CREATE_BURST,
                 store: Optional[DeviceStore] = None) -> None:
        self.hub = hub
        self.maps = maps
        self.clock = clock
        self.rate = rate
        self.precision = precision
        self.expire = expire
        self.max_devices = max_devices
        # The store of this process alone (memory, or memory and disk), or a
        # cluster's, shared with other nodes (the backplane sets `store`).
        self.local = store if isinstance(store, LocalDevices) else LocalDevices()
        self.store: DeviceStore = store or self.local
        # Devices this node has met, by token hash (bounded, like the maps).
        self.known: dict[str, Device] = {}
        self.max_known = max_devices
        # Devices deleted (through any node), by token hash: their pin id,
        # map and until when they are remembered (their records are gone by
        # then); bounded like `known`.
        self.deleted: dict[str, tuple[str, str, float]] = {}
        self.deleted_pins: set[str] = set()
        # Creations per client address.
        self.creators = AddressRate(clock, create_burst, CREATE_PERIOD, MAX_CREATORS)
        self.create_burst = create_burst
        # held: reports that came too soon (the newest is applied later);
        # skipped: fixes that cannot be used (from the future, an unusable
        # point of a batch); both answered as taken, so the apps drop them.
        self.stats = {"created": 0, "deleted": 0, "reports": 0, "refused": 0, "held": 0,
                      "skipped": 0}

    # Making and finding

    async def create(self, map_name: str, name: Optional[str], address: str) -> tuple[str, Device]:
        """A new device on `map_name`: its token (shown once) and itself."""
        self._check_creator(address)
        try:
            exists = await self.maps.resolve(map_name)
        except Exception:
            raise Unavailable("this server cannot look this map up right now") from None
        if not exists:
            raise NoSuchMap("no map has this name")
        if not self.hub.can_join(map_name):
            raise Full("map full")
        now = self.clock.seconds()
        token = new_token()
        expires = self.maps.expiry(map_name)
        device = Device(token_hash(token), self.hub.new_id(), map_name, name, expires)
        try:
            outcome = await self.store.add_device(
                device.token_hash, device.record(), self._keep_until(device, now) * 1000,
                cap=self.max_devices, now_ms=now * 1000)
        except Exception:
            raise Unavailable("the cluster's device store (Redis) cannot be reached now; "
                              "try again shortly") from None
        if outcome != "added":
            raise Full("too many devices")
        self._remember(device)
        self.stats["created"] += 1
        self.log.info("device {device} made", device=device.id)
        return token, device

    async def find(self, token: str) -> Device:
        """
        The device of a token, or UnknownDevice. A cluster's store is asked
        every time (another node may have deleted the device a moment ago);
        only this process's own store is answered from what it has met.
        """
        if not looks_like_token(token):
            raise UnknownDevice("unknown device")
        key = token_hash(token)
        if key in self.deleted:
            raise UnknownDevice("unknown device")
        held = self.known.get(key)
        now = self.clock.seconds()
        if (held is not None and self.store is self.local
                and (held.expires is None or held.expires > now)):
            return held
        try:
            record = await self.store.find_device(key, now * 1000)
        except Exception:
            raise Unavailable("the cluster's device store (Redis) cannot be reached now") from None
        if record is None or key in self.deleted:
            self.known.pop(key, None)
            raise UnknownDevice("unknown device")
        device = Device.from_record(key, record)
        if not await self._map_lives(device.map):
            raise UnknownDevice("unknown device")
        held = self.known.get(key)
        if held is not None and held.record() == device.record():
            device = held  # it keeps its rate limit
        if key in self.deleted:  # deleted while the store was asked
            raise UnknownDevice("unknown device")
        return self._remember(device)

    async def delete(self, token: str) -> None:
        """The device goes, and its pin from every viewer; its token is refused after."""
        device = await self.find(token)
        try:
            await self.store.remove_device(device.token_hash, device.map, device.id)
        except Exception:
            raise Unavailable("the cluster's device store (Redis) cannot be reached now") from None
        self.forget_deleted(device.token_hash, device.id, device.map)
        self.hub.apply_remote(device.map, DEVICES, (), [device.id])
        self.stats["deleted"] += 1
        self.log.info("device {device} deleted", device=device.id)

    def forget_deleted(self, key: str, pin_id: str, map_name: str) -> None:
        """
        A deleted device: dropped from what this node knows, and remembered
        as deleted, so that this node never writes it back to a store that
        lost its data, nor shows a fix of it that arrives late.
        """
        device = self.known.pop(key, None)
        if device is not None and device.release is not None and device.release.active():
            device.release.cancel()  # its held fix goes with it
        self.deleted.pop(key, None)
        self.deleted[key] = (pin_id, map_name, self.clock.seconds() + DEVICE_IDLE)
        self.deleted_pins.add(pin_id)
        now = self.clock.seconds()
        while self.deleted:
            oldest = next(iter(self.deleted))
            gone_pin, _, until = self.deleted[oldest]
            if len(self.deleted) <= self.max_known and until > now:
                break
            del self.deleted[oldest]
            self.deleted_pins.discard(gone_pin)

    # Reports

    async def report(self, device: Device, fix: Fix) -> str:
        """
        Apply a fix: "moved", "older" (a newer one is shown), "expired"
        (older than --expire: it would vanish at once), "held" (it came
        sooner than --rate allows: the newest such fix is applied as soon as
        the rate does) or "future" (more than MAX_FUTURE ahead: skipped).
        Never refused for its timing: the apps drop or retry a refused
        report (docs/protocol.md), and none of that helps.
        """
        now = self.clock.seconds()
        if fix.ts > (now + MAX_FUTURE) * 1000:
            self.stats["skipped"] += 1
            return "future"
        if not self._take_token(device, now):
            self._hold(device, fix, now)
            return "held"
        self.stats["reports"] += 1
        if fix.ts < (now - self.expire) * 1000:
            return "expired"
        # A fix from a little ahead (a phone's clock runs fast) counts as of
        # now: by its own time it would hide the device's next fixes, the
        # true newer ones, until that time came.
        fix = replace(fix, ts=min(fix.ts, int(now * 1000)))
        version = fix_version(fix)
        state = self.state(device, fix, now)
        entry = b"[%d,%s]" % (version, orjson.dumps(state))
        try:
            outcome = await self.store.save_fix(device.token_hash, device.map, version, entry,
                                                now * 1000, self._keep_until(device, now) * 1000)
        except Exception:
            raise Unavailable("the cluster's device store (Redis) cannot be reached now") from None
        if outcome == "unknown":
            self.known.pop(device.token_hash, None)
            raise UnknownDevice("unknown device")
        if outcome == "older":
            return "older"
        self.apply(device.map, [dict(state, version=version)])
        return "moved"

    def state(self, device: Device, fix: Fix, now: float) -> dict:
        """The pin of a fix, as the protocol shows it (coarsened, no later than now)."""
        lat, lng, accuracy = fix.lat, fix.lng, fix.accuracy
        if self.precision > 0:
            lat, lng = coarsen(lat, lng, self.precision)
            accuracy = self.precision if accuracy is None else max(accuracy, self.precision)
        return {"id": device.id, "lat": lat, "lng": lng, "heading": fix.heading,
                "accuracy": accuracy, "name": device.name, "seq": None,
                "ts": min(fix.ts, int(now * 1000)), "source": fix.source,
                "battery": fix.battery}

    def apply(self, map_name: str, states: list[dict], gone: Sequence[str] = ()) -> None:
        """
        Device pins (states with a `version`) onto the hub; older ones change
        nothing. Also for a map this node has not heard of (its first
        client may come later); never for a map known to have expired.
        """
        now = self.clock.seconds()
        bound = (now - self.expire) * 1000
        fresh = [state for state in states
                 if state["ts"] >= bound and state["id"] not in self.deleted_pins]
        if (fresh or gone) and not self.maps.is_expired(map_name):
            self.hub.apply_remote(map_name, DEVICES, fresh, gone)

    # The cluster's side (the backplane calls these)

    def remote_gone(self, map_name: str, pin_ids: list[str], token_hashes: list[str]) -> None:
        """Devices deleted through another node (told to every node of the cluster)."""
        for key, pin_id in zip(token_hashes, pin_ids):
            self.forget_deleted(key, pin_id, map_name)
        if map_name in self.hub.maps:
            self.hub.apply_remote(map_name, DEVICES, (), pin_ids)

    def replace_map(self, map_name: str, states: list[dict]) -> None:
        """
        The store's fixes of a map, when this node starts serving it (again):
        they replace the device pins it held (a device deleted meanwhile
        loses its pin).
        """
        seen = {state["id"] for state in states}
        map_state = self.hub.maps.get(map_name)
        if map_state is not None:
            stale = [pin.id for pin in map_state.pins.values()
                     if pin.origin == DEVICES and pin.id not in seen]
            if stale:
                self.hub.apply_remote(map_name, DEVICES, (), stale)
        self.apply(map_name, states)

    def forget_map(self, map_name: str) -> None:
        """The map expired: its devices and their pins go (the store's entries expire too)."""
        for key in [key for key, device in self.known.items() if device.map == map_name]:
            del self.known[key]
        self.local.forget_map(map_name)
        map_state = self.hub.maps.get(map_name)
        if map_state is not None:
            pins = [pin.id for pin in map_state.pins.values() if pin.origin == DEVICES]
            if pins:
                self.hub.apply_remote(map_name, DEVICES, (), pins)

    def deleted_records(self) -> list[tuple[str, str, float]]:
        """The deletions this node remembers (hash, map, until ms), to write back with them."""
        now = self.clock.seconds()
        return [(key, map_name, until * 1000)
                for key, (_, map_name, until) in self.deleted.items() if until > now]

    def known_records(self) -> list[tuple[str, dict, float]]:
        """What this node knows, to write back to a store that lost it."""
        now = self.clock.seconds()
        return [(device.token_hash, device.record(), self._keep_until(device, now) * 1000)
                for device in self.known.values()]

    # Limits

    def _check_creator(self, address: str) -> None:
        if self.creators.take(address) > 0:
            self.stats["refused"] += 1
            raise TooFast(f"at most {self.create_burst} devices at once from one address, "
                          f"then one every {CREATE_PERIOD:g} s")

    def _take_token(self, device: Device, now: float) -> bool:
        capacity = max(1.0, self.rate)
        device.tokens = min(capacity, device.tokens + (now - device.updated) * self.rate)
        device.updated = now
        if device.tokens < 1.0:
            return False
        device.tokens -= 1.0
        return True

    def _hold(self, device: Device, fix: Fix, now: float) -> None:
        """Keep the newest fix that came too soon, and apply it when the rate allows."""
        self.stats["held"] += 1
        if device.held is None or fix.ts >= device.held.ts:
            device.held = fix
        if device.release is None:
            wait = (1.0 - device.tokens) / self.rate
            device.release = self.clock.callLater(max(wait, 0.0), self._release, device)

    def _release(self, device: Device) -> None:
        device.release = None
        fix, device.held = device.held, None
        if fix is None:
            return
        applied = defer.Deferred.fromCoroutine(self.report(device, fix))
        applied.addErrback(self._release_failed, device)

    def _release_failed(self, failure: Failure, device: Device) -> None:
        if not failure.check(DeviceError):  # deleted meanwhile, or the store is away: as a report
            self.log.failure("a held fix of device {device} was not applied", failure,
                             device=device.id)

    def _keep_until(self, device: Device, now: float) -> float:
        until = now + DEVICE_IDLE
        return until if device.expires is None else min(until, device.expires)

    def _remember(self, device: Device) -> Device:
        self.known.pop(device.token_hash, None)
        self.known[device.token_hash] = device
        while len(self.known) > self.max_known:
            del self.known[next(iter(self.known))]
        return device

    async def _map_lives(self, map_name: str) -> bool:
        try:
            return bool(await self.maps.resolve(map_name))
        except Exception:
            raise Unavailable("this server cannot look this map up right now") from None


__all__ = ["Device", "DeviceError", "DeviceStore", "Devices", "Fix", "Full", "LocalDevices",
           "NoSuchMap", "Refused", "SOURCES", "TooFast", "Unavailable", "UnknownDevice",
           "fix_version", "looks_like_token", "new_token", "token_hash"]
