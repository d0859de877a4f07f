"""
The hub: every map's pins and subscribers, and the fan-out tick.

Accepting a move only records the pin's latest state and marks it dirty.
A tick per map (scheduled only while something is dirty) turns the dirty
pins into one update per distinct view, encodes it once and hands the same
bytes to every subscriber of that view. A subscriber whose transport is
congested is skipped and remembers which pins it missed; when it drains it
gets one catch-up update with their latest states. A big map ticks a little
less often and sends to its whole-world subscribers in cohorts that tick in
turn (`MapState.interval`, `MapState._fit_cohorts`): fewer frames per pin
state, and no client waits for a whole ten-thousand-client broadcast.

The hub knows nothing of WebSocket, SockJS or Redis: transports give it a
`Subscriber` and call the methods of the `Member` they get back.

`MapState` is assembled from one module per concern: membership.py (joins,
departures, pins), views.py (views and the spatial indexes), ticks.py (the
tick and sending), flow.py (slow consumers), cohorts.py (a big map's
world in shares), clusters.py (clustered views and their aggregates). This module keeps the names transports and tests import.
"""

from __future__ import annotations

import secrets
from typing import Callable, Iterable, Iterator, Optional, Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from . import people
from .cohorts import Cohort
from .mapcore import MapCore
from .members import Frame, MapFull, Member, Subscriber
from .membership import Membership
from .pins import DEVICES, Pin
from .views import ViewGroup
from ..wire import View

__all__ = ["DEVICES", "Cohort", "Frame", "Hub", "MapFull", "MapState", "MapWatcher", "Member",
           "Pin", "Stats", "Subscriber", "ViewGroup"]


class MapWatcher(Protocol):
    """What the hub tells a backplane about the maps it serves."""

    def map_in_use(self, map_name: str) -> None: ...

    def map_out_of_use(self, map_name: str) -> None: ...



class Stats:
    """Plain counters; metrics read them when scraped, so counting is cheap."""

    def __init__(self) -> None:
        self.connections_opened = 0
        self.connections_closed = 0
        self.moves_accepted = 0
        self.rejected: dict[str, int] = {}
        self.frames_sent = 0
        self.bytes_sent = 0
        self.ticks = 0
        self.slow_skips = 0
        self.slow_closes = 0
        # Messages for one member (errors) not written because it was paused.
        self.dropped_while_paused = 0

    def reject(self, code: str) -> None:
        self.rejected[code] = self.rejected.get(code, 0) + 1



class MapState(Membership):
    """
    The pins and subscribers of one map: MapCore's state and sending, with
    cohorts, clustered views, views, slow consumers, the tick and
    membership layered on it.
    """


class Hub:
    """All maps of this process."""

    log = Logger()

    def __init__(self, clock: IReactorTime, *, tick_interval: float = 0.1,
                 big_map: int = 800, cohort_min: int = 3000, cohort_size: int = 2500,
                 cohort_stretch: float = 2.0,
                 cluster_size: int = 4, cluster_interval: float = 1.0,
                 cluster_flush_ticks: int = 1,
                 slow_timeout: float = 30.0, max_missed: int = 20_000,
                 max_members: int = 50_000, max_maps: int = 10_000,
                 tick_observer: Callable[[float], None] = lambda seconds: None,
                 new_id: Callable[[], str] = lambda: secrets.token_urlsafe(12)) -> None:
        self.clock = clock
        self.tick_interval = tick_interval
        # A map with at least `big_map` clients ticks 1.3 times less often;
        # one with at least `cohort_min` world subscribers sends to them in
        # cohorts of about `cohort_size`, each every `cohort_stretch` ticks
        # (MapState.interval, MapState._fit_cohorts).
        self.big_map = big_map
        self.cohort_min = cohort_min
        self.cohort_size = cohort_size
        self.cohort_stretch = cohort_stretch
        # Clustered views (clusters.py): a cell with more than `cluster_size`
        # pins is one cluster; cells are decided at most every
        # `cluster_interval` seconds.
        self.cluster_size = cluster_size
        self.cluster_interval = cluster_interval
        # On a map of `big_map` clients or more, a clustered view's group may
        # be sent at most every `cluster_flush_ticks` ticks (its changes wait,
        # merged, in between). Every tick by default: sending every other
        # tick saved 5 to 13 % of the frames (bench/bigmap_hub.py) but made a
        # change wait up to 200 ms, leaving no margin to the 250 ms p99 of big
        # maps once the server is half busy.
        self.cluster_flush_ticks = cluster_flush_ticks
        self.slow_timeout = slow_timeout
        self.max_missed = max_missed
        self.max_members = max_members
        self.max_maps = max_maps
        self.tick_observer = tick_observer
        self.new_id = new_id
        # Set by a backplane: called once per map tick with this node's
        # changed pins and departed pin ids, to share them with other nodes.
        self.publisher: Optional[Callable[[str, list[Pin], list[str]], None]] = None
        # Set by a backplane: told when a map gets its first local client and
        # loses its last, so a node serves only the maps it needs.
        self.watcher: Optional[MapWatcher] = None
        self.maps: dict[str, MapState] = {}
        self.stats = Stats()
        self._serial = 0

    def next_serial(self) -> int:
        """A number that only grows: orders pin births and pauses."""
        self._serial += 1
        return self._serial

    def map(self, map_name: str, *, limited: bool = True) -> MapState:
        """The state of a map, made on demand (up to `max_maps` if `limited`)."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            if limited and len(self.maps) >= self.max_maps:
                raise MapFull("too many maps")
            map_state = self.maps[map_name] = MapState(self, map_name)
        return map_state

    def can_join(self, map_name: str) -> bool:
        """Whether a new connection (or device) would be admitted to this map now."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            return len(self.maps) < self.max_maps
        return len(map_state.members) + map_state.device_pins < self.max_members

    def close_map(self, map_name: str, code: int, reason: str) -> None:
        """Close every connection of a map (it expired, say)."""
        map_state = self.maps.get(map_name)
        if map_state is not None:
            for member in list(map_state.members.values()):
                member.subscriber.close(code, reason)

    def expire_pins(self, max_age: float) -> int:
        """Remove pins whose last fix is older than `max_age` seconds."""
        bound = int((self.clock.seconds() - max_age) * 1000)
        return sum(m.expire_pins(bound) for m in list(self.maps.values()))

    def join(self, map_name: str, subscriber: Subscriber,
             view: Optional[View] = None) -> Member:
        """Add a connection to a map; it is sent its welcome (for `view` if given) at once."""
        return self.map(map_name).join(subscriber, view)

    def apply_remote(self, map_name: str, origin: str, states: Iterable[dict],
                     gone: Iterable[str] = ()) -> None:
        """
        Pins owned by node `origin`: each state is a dict with the PIN keys
        plus `version`; older versions than the one held are ignored.
        """
        # Not limited: another node admitted these pins, and dropping them
        # here would leave this node's clients with a different map.
        self.map(map_name, limited=False).apply_remote(origin, states, gone)

    def drop_origin(self, origin: str) -> int:
        """A node died or was cut off: its pins leave every map."""
        return sum(m.drop_origin(origin) for m in list(self.maps.values()))

    def drop_others(self, map_name: str) -> int:
        """This node stopped serving a map: every pin it does not own goes."""
        map_state = self.maps.get(map_name)
        return 0 if map_state is None else map_state.drop_others()

    def local_pins(self) -> Iterator[tuple[str, Pin]]:
        """This node's own pins, to publish again after a reconnect."""
        for map_state in self.maps.values():
            for pin in map_state.pins.values():
                if pin.origin is None:
                    yield map_state.name, pin

    def forget(self, map_state: MapCore) -> None:
        """
        An empty map costs nothing: drop it (it is made again on demand).
        Only once its last tick ran, or its last departures would never be
        published.
        """
        if self.maps.get(map_state.name) is map_state and map_state.settled():
            del self.maps[map_state.name]

    def pins(self, map_name: str) -> list[dict]:
        map_state = self.maps.get(map_name)
        if map_state is None:
            return []
        return [pin.as_dict() for pin in map_state.pins.values()]

    def people(self, map_name: str, text: str, point: Optional[tuple[float, float]],
               limit: int) -> tuple[int, list[dict]]:
        """The map's pin count, and the pins a people search finds (people.search)."""
        map_state = self.maps.get(map_name)
        if map_state is None:
            return 0, []
        return len(map_state.pins), people.search(map_state.pins, map_state.names,
                                                  map_state.pin_grid, text, point, limit)

    def members(self) -> Iterator[Member]:
        for map_state in list(self.maps.values()):
            yield from list(map_state.members.values())

    def connection_count(self) -> int:
        return sum(len(m.members) for m in self.maps.values())
