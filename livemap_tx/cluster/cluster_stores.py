"""
The cluster's stores as the backplane offers them: it is the `MapStore` of
the node's `MapDirectory` (private maps, maps.py) and the `DeviceStore` of
its `Devices` (phones/devices.py), both kept through the link (Redis), and it
writes back what this node knows when the store lost its data.
"""

from __future__ import annotations

import math
import secrets
from typing import TYPE_CHECKING, Any, Callable, Optional

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .device_store import fix_value
from ..hub import DEVICES, Hub
from .links import Link
from ..maps import MapDirectory

if TYPE_CHECKING:
    from ..phones.devices import Devices


class ClusterStores:
    """The backplane's private maps and devices, shared by every node."""

    log: Logger
    hub: Hub
    link: Link
    clock: IReactorTime
    node: str
    directory: Optional[MapDirectory] = None
    devices: Optional[Devices] = None
    device_keys: Any = None
    _device_epoch: Optional[str]

    _publish: Callable[..., None]

    # The private maps: the directory's MapStore

    def share_maps(self, directory: MapDirectory) -> None:
        """Keep `directory`'s private maps in the link's store, for every node."""
        self.directory = directory
        directory.store = self

    def add_map(self, name: str, expires: Optional[float], *, cap: int,
                forget_before: float) -> defer.Deferred:
        """`MapStore.add_map`: in the link's store, then told to every node."""
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))
        expires_ms = math.inf if expires is None else round(expires * 1000)

        def added(outcome: str) -> Any:
            if outcome != "added":
                return outcome

            def replicated(_: Any) -> str:
                self._publish(b'{"t":"map","n":%s,"m":%s,"x":%s}' % (
                    orjson.dumps(self.node), orjson.dumps(name),
                    b"null" if expires is None else b"%d" % expires_ms))
                return outcome
            # Its link is handed out only once a replica has it too.
            return self.link.replicate().addCallback(replicated)
        return self.link.add_map(name, expires_ms, cap=cap,
                                 forget_before_ms=round(forget_before * 1000)).addCallback(added)

    def find_map(self, name: str) -> defer.Deferred:
        """`MapStore.find_map`: the expiry in the clock's seconds, or None."""
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))
        return self.link.find_map(name).addCallback(
            lambda expires_ms: None if expires_ms is None else expires_ms / 1000)

    def _restore_maps(self) -> None:
        # Redis may have restarted empty: write back what this node knows
        # (ZADD NX: nothing that is there is changed).
        if self.directory is None:
            return
        maps = [(name, math.inf if expires is None else round(expires * 1000))
                for name, expires in self.directory.entries()]
        if maps:
            self.link.restore_maps(maps).addErrback(
                lambda failure: self.log.warn("could not restore {count} private maps: {error}",
                                              count=len(maps), error=failure.getErrorMessage()))

    def _learn_map(self, message: dict) -> None:
        name, expires_ms = message["m"], message["x"]
        if not isinstance(name, str) or not (
                expires_ms is None or (isinstance(expires_ms, (int, float))
                                       and not isinstance(expires_ms, bool))):
            raise ValueError("bad map message")
        if self.directory is not None:
            self.directory.learn(name, None if expires_ms is None else expires_ms / 1000)

    # The devices: the DeviceStore of the node's Devices

    def share_devices(self, devices: Devices) -> None:
        """Keep `devices` in the link's store, for every node (device_store.py)."""
        self.devices = devices
        self.device_keys = self.link.device_keys()
        devices.store = self

    def add_device(self, token_hash: str, record: dict, expires_ms: float, *,
                   cap: int, now_ms: float) -> defer.Deferred:
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))
        # A 201 only once a replica has the device too (a failover keeps it).
        return self.device_keys.add_device(token_hash, orjson.dumps(record), expires_ms,
                                           cap=cap, now_ms=now_ms).addCallback(
            lambda outcome: self.link.replicate().addCallback(lambda _: outcome)
            if outcome == "added" else outcome)

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))
        return self.device_keys.find_device(token_hash, now_ms).addCallback(
            lambda found: None if found is None else orjson.loads(found))

    def remove_device(self, token_hash: str, map_name: str, pin_id: str) -> defer.Deferred:
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))

        def removed(existed: bool) -> defer.Deferred:
            # To every node, not only those serving the map: each forgets
            # the token at once, and never writes it back to the store.
            self._publish(b'{"t":"devgone","n":%s,"m":%s,"i":%s,"k":%s}' % (
                orjson.dumps(self.node), orjson.dumps(map_name), orjson.dumps([pin_id]),
                orjson.dumps([token_hash])))
            # Acknowledged once a replica has the deletion too.
            return self.link.replicate().addCallback(lambda _: existed)
        return self.device_keys.remove_device(token_hash, map_name).addCallback(removed)

    def save_fix(self, token_hash: str, map_name: str, version: int, entry: bytes,
                 now_ms: float, expires_ms: float) -> defer.Deferred:
        if not self.link.store_linked:
            return defer.fail(ConnectionError(f"{self.link.server_name()} is down"))
        name = orjson.dumps(map_name)

        def saved(outcome: str) -> str:
            if outcome == "saved":
                self.link.publish_map(map_name, b'{"t":"dev","n":%s,"m":%s,"p":[%s]}' % (
                    orjson.dumps(self.node), name, entry))
            return outcome
        return self.device_keys.save_fix(token_hash, map_name, version, fix_value(name, entry),
                                         now_ms, expires_ms).addCallback(saved)

    async def _check_device_epoch(self) -> None:
        """If the store lost its data (a new epoch), write back what this node knows."""
        assert self.devices is not None
        epoch = await self.device_keys.epoch(secrets.token_hex(8))
        if self._device_epoch is not None and epoch != self._device_epoch:
            await self._restore_devices()
        self._device_epoch = epoch

    async def _restore_devices(self) -> None:
        assert self.devices is not None
        records = self.devices.known_records()
        self.log.info("node {node}: the device store is new; writing back {count} devices",
                      node=self.node, count=len(records))
        await self.device_keys.restore(
            ((key, orjson.dumps(record), until) for key, record, until in records),
            self.devices.deleted_records())
        by_id = {record["i"]: (key, until) for key, record, until in records}
        now_ms = self.clock.seconds() * 1000
        for map_state in list(self.hub.maps.values()):
            name = orjson.dumps(map_state.name)
            for pin in list(map_state.pins.values()):
                found = by_id.get(pin.id)
                if pin.origin == DEVICES and found is not None:
                    entry = b"[%d,%s]" % (pin.version, pin.json())
                    await self.device_keys.save_fix(found[0], map_state.name, pin.version,
                                                    fix_value(name, entry), now_ms, found[1])
