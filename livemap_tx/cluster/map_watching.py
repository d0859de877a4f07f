"""
Which maps a node serves, and getting in sync with each: the part of the
backplane that starts and stops watching a map (listening to its channel,
asking the nodes serving it for their pins, loading its devices) and tells
the requests waiting for it once the map's pins are whole.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Optional

import orjson
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ..hub import Hub
from .links import Link, MapUnavailable

if TYPE_CHECKING:
    from ..phones.devices import Devices

# How long a map stays watched after the last thing that needed it.
LINGER = 3.0
# How long a request's need of a map lasts (until a WebSocket upgrade's
# client has joined, while an API answer is written; a connected client
# holds the map by itself); a phone app's report keeps its map for
# `DEVICE_LEASE`, so that its next report (and OwnTracks' Friends) finds
# the map in sync.
REQUEST_LEASE = 2.0
DEVICE_LEASE = 600.0
# Devices' messages kept while a map's devices load (beyond: load again).
MAX_HELD_DEVICE_MESSAGES = 100_000



class MapWatch:
    """A map this node watches: whether it is in sync, who needs it, until when."""

    __slots__ = ("name", "synced", "waiters", "awaiting", "answered", "devices_loaded",
                 "timer", "lease_until", "linger", "generation", "device_messages",
                 "reload")

    def __init__(self, name: str) -> None:
        self.name = name
        self.synced = False
        self.waiters: list[defer.Deferred] = []
        # Nodes that must answer before the map is in sync (None: unknown yet).
        self.awaiting: Optional[int] = None
        self.answered: set[str] = set()
        self.devices_loaded = False
        self.timer: Optional[IDelayedCall] = None
        self.lease_until = -math.inf
        self.linger: Optional[IDelayedCall] = None
        # Counts syncs: an answer of an older sync never completes a newer one.
        self.generation = 0
        # While the map's devices are loaded from the store: the devices'
        # messages (`dev`, `devgone`) that arrived meanwhile, applied after
        # the store's answer, in order. The store may answer after them (it
        # may be on a slower server): a deletion or a move it did not see
        # must not be undone by it.
        self.device_messages: Optional[list[tuple[str, dict]]] = None
        # Too many arrived meanwhile: load again once this load is done.
        self.reload = False



class MapWatching:
    """The backplane's maps: watched while something on this node needs them."""

    log: Logger
    hub: Hub
    link: Link
    clock: IReactorTime
    node: str
    devices: Optional[Devices]
    device_keys: Any
    stats: Any
    linger: float
    map_sync_timeout: float
    watches: dict[str, MapWatch]
    have: set[tuple[str, str]]
    asked: set[tuple[str, str]]
    replacing: dict[tuple[str, str], set[str]]

    # Of the other parts of the backplane.
    _send_map_full: Callable[..., None]
    refusal: Callable[[], Optional[str]]
    _states: Callable[[list], list[dict]]

    def watch(self, map_name: str, lease: float = REQUEST_LEASE) -> defer.Deferred:
        """
        Serve `map_name` for at least `lease` seconds; fires once this node
        holds the other nodes' pins of it (or after `map_sync_timeout`), with
        how ("complete", "already", "timed out", ...). Fails with
        MapUnavailable if this node refuses to serve, or the map's Redis
        server is down (while another is up: with none, this node serves
        its own clients, as a single node would).
        """
        problem = self.refusal()
        if problem is None and self.link.linked and not self.link.map_linked(map_name):
            problem = (f"the Redis server of this map ({self.link.server_name(map_name)}) "
                       f"is down; try again in a moment")
        if problem is not None:
            return defer.fail(MapUnavailable(problem))
        watch = self._watch(map_name)
        watch.lease_until = max(watch.lease_until, self.clock.seconds() + lease)
        self._release_later(watch, lease)
        if watch.synced:
            return defer.succeed("already")
        waiter: defer.Deferred = defer.Deferred()
        watch.waiters.append(waiter)
        return waiter

    def map_in_use(self, map_name: str) -> None:
        """`Hub.watcher`: a map got its first client on this node."""
        watch = self._watch(map_name)
        if watch.linger is not None and watch.linger.active():
            watch.linger.cancel()
        watch.linger = None

    def map_out_of_use(self, map_name: str) -> None:
        """`Hub.watcher`: a map's last client on this node left."""
        watch = self.watches.get(map_name)
        if watch is not None:
            self._release_later(watch, 0.0)

    def _watch(self, map_name: str) -> MapWatch:
        watch = self.watches.get(map_name)
        if watch is None:
            watch = self.watches[map_name] = MapWatch(map_name)
            self._start_sync(watch)
        return watch

    def _release_later(self, watch: MapWatch, after: float) -> None:
        delay = after + self.linger
        if watch.linger is not None and watch.linger.active():
            if watch.linger.getTime() >= self.clock.seconds() + delay:
                return
            watch.linger.cancel()
        watch.linger = self.clock.callLater(delay, self._maybe_release, watch)

    def _maybe_release(self, watch: MapWatch) -> None:
        watch.linger = None
        if self.watches.get(watch.name) is not watch:
            return
        map_state = self.hub.maps.get(watch.name)
        now = self.clock.seconds()
        if (map_state is not None and map_state.members) or watch.lease_until > now:
            if watch.lease_until > now:
                self._release_later(watch, watch.lease_until - now)
            return
        self._unwatch(watch)

    def _unwatch(self, watch: MapWatch) -> None:
        """Nothing here needs the map: stop listening, drop what others hold of it."""
        del self.watches[watch.name]
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        self._map_synced(watch, watch.generation, "unwatched")
        self.link.unwatch_map(watch.name)
        self.have = {pair for pair in self.have if pair[1] != watch.name}
        self.asked = {pair for pair in self.asked if pair[1] != watch.name}
        for pair in [pair for pair in self.replacing if pair[1] == watch.name]:
            del self.replacing[pair]
        self.hub.drop_others(watch.name)
        self.stats.maps_unwatched += 1

    def _start_sync(self, watch: MapWatch) -> None:
        watch.generation += 1
        watch.synced = False
        watch.awaiting = None
        watch.answered = set()
        watch.devices_loaded = self.devices is None
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        generation = watch.generation
        watch.timer = self.clock.callLater(self.map_sync_timeout, self._map_synced, watch,
                                           generation, "timed out")
        self.stats.map_syncs += 1
        self.link.watch_map(watch.name).addCallbacks(
            lambda _: self._listening(watch, generation),
            lambda failure: self._map_synced(watch, generation, "not linked"))

    def _listening(self, watch: MapWatch, generation: int) -> None:
        if watch.generation != generation or self.watches.get(watch.name) is not watch:
            return
        # Our own pins of it to everyone (they may have missed our deltas),
        # and a request for theirs, answered by every node it reached: a
        # node that starts listening later was not asked, and sends its
        # pins by itself.
        self._send_map_full(watch.name, None)
        self.link.ask_map(watch.name, orjson.dumps(
            {"t": "mhello", "n": self.node, "m": watch.name})).addCallbacks(
            lambda reached: self._asked(watch, generation, reached),
            lambda failure: self._map_synced(watch, generation, "not linked"))
        if self.devices is not None:
            if watch.device_messages is None:
                watch.device_messages = []
            defer.Deferred.fromCoroutine(self._load_devices(watch, generation)).addErrback(
                self._devices_failed, watch, generation)

    def device_message(self, map_name: str, kind: str, message: dict) -> None:
        """A device's fix or deletion on a watched map: applied, or kept until its load is done."""
        watch = self.watches.get(map_name)
        if watch is not None and watch.device_messages is not None:
            if len(watch.device_messages) < MAX_HELD_DEVICE_MESSAGES:
                watch.device_messages.append((kind, message))
            else:
                # Load again afterwards (the store will then have these).
                watch.device_messages.clear()
                watch.reload = True
            return
        self._apply_device_message(map_name, kind, message)

    def _apply_device_message(self, map_name: str, kind: str, message: dict) -> None:
        assert self.devices is not None
        if kind == "dev":
            self.devices.apply(map_name, self._states(message["p"]))
        else:
            self.devices.remote_gone(map_name, list(message["i"]), list(message["k"]))

    def _devices_done(self, watch: MapWatch) -> None:
        """The load is applied: now what arrived meanwhile, in order."""
        held, watch.device_messages = watch.device_messages or [], None
        for kind, message in held:
            try:
                self._apply_device_message(watch.name, kind, message)
            except (KeyError, TypeError, ValueError, AttributeError):
                self.stats.bad_messages += 1
        if watch.reload and self.watches.get(watch.name) is watch:
            watch.reload = False
            self._start_sync(watch)

    def _asked(self, watch: MapWatch, generation: int, reached: int) -> None:
        if watch.generation != generation or self.watches.get(watch.name) is not watch:
            return
        watch.awaiting = max(0, reached - 1)
        self._check_synced(watch)

    async def _load_devices(self, watch: MapWatch, generation: int) -> None:
        assert self.devices is not None
        values = await self.device_keys.load_fixes(watch.name, self.clock.seconds() * 1000)
        if watch.generation != generation or self.watches.get(watch.name) is not watch:
            return
        entries = []
        for value in values:
            try:
                decoded = orjson.loads(value)
                [state] = self._states([decoded["e"]])
                entries.append(state)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                self.stats.bad_messages += 1
        self.devices.replace_map(watch.name, entries)
        watch.devices_loaded = True
        self._devices_done(watch)
        self._check_synced(watch)

    def _devices_failed(self, failure: Any, watch: MapWatch, generation: int) -> None:
        self.log.warn("could not load the devices of a map: {error}",
                      error=failure.getErrorMessage())
        if watch.generation == generation:
            watch.devices_loaded = True
            self._devices_done(watch)
            self._check_synced(watch)

    def _check_synced(self, watch: MapWatch) -> None:
        if (not watch.synced and watch.devices_loaded and watch.awaiting is not None
                and len(watch.answered) >= watch.awaiting):
            self._map_synced(watch, watch.generation, "complete")

    def _map_synced(self, watch: MapWatch, generation: int, how: str) -> None:
        if watch.generation != generation or watch.synced:
            return
        watch.synced = True
        if watch.timer is not None and watch.timer.active():
            watch.timer.cancel()
        watch.timer = None
        waiters, watch.waiters = watch.waiters, []
        for waiter in waiters:
            waiter.callback(how)
