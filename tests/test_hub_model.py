"""
The hub against a plain model of the truth, driven the way the world drives
it: random sequences of joins, moves, names, views, departures, abrupt
losses, clients that stop reading (and are paused by their transport from
inside a write), drains, expiry, other nodes' deltas and node loss, with
time on a `task.Clock`. After every step the model is the judge:

- every member that is not paused, once its map has ticked, shows exactly
  the true pins inside its view, rebuilt from the messages it received;
- no message names a pin twice, no pin's state goes back (hubfakes.Viewer);
- nothing is written to a paused member, and what the hub keeps for it is
  bounded by the pins of the map;
- what the hub published for other nodes, applied in order, equals its
  own pins; maps with nothing left are forgotten;
- a clustered view (extension "clusters"), once its map has ticked and
  run its cluster pass, shows exactly the true pins of its sparse cells
  and one cluster per dense cell of its (widened) box, with the true count
  and a centre within 1/8 cell of the true one, and the map's total;
  clustered members that stop reading are caught up with a snapshot.

The second machine runs two or three hubs linked by backplanes over a bus
whose messages arrive in random interleavings and batches (each sender's
messages in order, as Redis keeps them), with nodes dying and joining, and
checks that every node and every member converges on the truth.

CI runs a bounded number of examples; LIVEMAP_MODEL_EXAMPLES (and
LIVEMAP_MODEL_STEPS) run many more, e.g.
`LIVEMAP_MODEL_EXAMPLES=20000 python -m pytest tests/test_hub_model.py`.
A failing example found that way becomes a plain test in test_hub.py.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Optional

import orjson
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)
from twisted.internet.task import Clock

import hubfakes
from livemap_tx.cluster.backplane import Backplane, MemoryBus, MemoryLink
from livemap_tx.cluster.links import ALL, map_channel, node_channel
from livemap_tx.hub import Hub, MapState, Member
from livemap_tx.wire import Move, View

EXAMPLES = int(os.environ.get("LIVEMAP_MODEL_EXAMPLES", "0"))
STEPS = int(os.environ.get("LIVEMAP_MODEL_STEPS", "0"))


def model_settings(examples: int, steps: int) -> settings:
    return settings(max_examples=EXAMPLES or examples, stateful_step_count=STEPS or steps,
                    deadline=None, suppress_health_check=list(HealthCheck))


MAPS = ("a", "b")
TICK = 0.1
# Few values, so that pins cross box edges, cells (of every level of the
# view index) and the antimeridian often.
LATS = st.sampled_from([-10.0, 0.0, 5.0, 5.004, 9.99, 10.0, 45.0])
LNGS = st.sampled_from([-179.5, -175.0, -10.0, 0.0, 5.0, 5.004, 175.0, 179.5])
BOXES = st.sampled_from([None, (0.0, -20.0, 10.0, 20.0), (170.0, -20.0, -170.0, 20.0),
                         (-180.0, -90.0, 180.0, 90.0), (4.0, 4.0, 6.0, 6.0), (5.0, 5.0, 5.01, 5.01),
                         (-20.0, -20.0, 20.0, 20.0)])
HEADINGS = st.sampled_from([None, 0.0, 90.5, 359.9])
# Zooms of clustered views: cells from a quarter of the world to streets,
# and 18, from which nothing is clustered.
ZOOMS = st.sampled_from([0, 2, 5, 9, 17, 18])
# Cells of more than this many pins are clusters (small: the model's maps are).
CLUSTER_SIZE = 2
CLUSTER_INTERVAL = 1.0
MARKS = st.sampled_from([10, 300, 2000, 64 * 1024])
REMOTE_IDS = {"r0": "n1", "r1": "n1", "r2": "n2", "r3": "n2"}


class Handle:
    """A member with its Viewer, and what the model knows of it."""

    def __init__(self, map_name: str, member: Member, viewer: hubfakes.Viewer) -> None:
        self.map = map_name
        self.member = member
        self.viewer = viewer
        self.view: Optional[tuple] = None
        self.zoom: Optional[int] = None
        self.name: Optional[str] = None
        self.pause_bound = 0

    def __repr__(self) -> str:
        return f"Handle({self.map}, {self.member.id})"


class HubMachine(RuleBasedStateMachine):
    members = Bundle("members")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1000)
        ids = iter(range(10**9))
        self.hub = Hub(self.clock, tick_interval=TICK, slow_timeout=1e9,
                       cluster_size=CLUSTER_SIZE, cluster_interval=CLUSTER_INTERVAL,
                       new_id=lambda: f"p{next(ids)}")
        self.hub.publisher = self._published
        # The truth: map -> pin id -> pin as the protocol shows it.
        self.truth: dict[str, dict[str, dict]] = {name: {} for name in MAPS}
        # What other nodes hold of this hub's pins: its deltas, applied.
        self.mirror: dict[str, dict[str, tuple]] = {name: {} for name in MAPS}
        self.remote_versions: dict[str, int] = {}
        self.remote_last: dict[str, dict] = {}
        self.seq = 0
        self.live: set[Handle] = set()

    # What the hub publishes, as another node would apply it

    def _published(self, map_name: str, pins: list, gone: list[str]) -> None:
        ids = [pin.id for pin in pins]
        assert len(set(ids)) == len(ids) and not set(ids) & set(gone), (ids, gone)
        mirror = self.mirror[map_name]
        for pin in pins:
            mirror[pin.id] = (pin.version, orjson.loads(pin.json()))
        for pin_id in gone:
            mirror.pop(pin_id, None)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    @initialize(cohorts=st.booleans(), flush=st.sampled_from([1, 2, 3]))
    def sizes(self, cohorts: bool, flush: int = 1) -> None:
        """
        Half the runs as a big map: tick stretched, the world sent to in
        cohorts. Clustered groups sent to every tick, or every 2 or 3.
        """
        if cohorts:
            self.hub.big_map, self.hub.cohort_min, self.hub.cohort_size = 2, 4, 2
        self.hub.cluster_flush_ticks = flush
        if flush > 1:
            self.hub.big_map = 2

    # Clients

    @rule(target=members, map_name=st.sampled_from(MAPS), mark=MARKS, stalled=st.booleans(),
          view=st.one_of(st.none(), st.tuples(BOXES, st.one_of(st.none(), ZOOMS))))
    def join(self, map_name: str, mark: int, stalled: bool,
             view: Optional[tuple] = None) -> Handle:
        """A new connection; some ask for a view (clustered or not) in their URL."""
        viewer = hubfakes.Viewer(mark)
        if stalled:
            viewer.stall()
        map_state = self.hub.maps.get(map_name)
        before = 0 if map_state is None else self._owed_bound(map_state)
        member, viewer = self._join(map_name, viewer, None if view is None else View(*view))
        handle = Handle(map_name, member, viewer)
        if view is not None:
            handle.view, handle.zoom = view
        handle.pause_bound = before
        self.live.add(handle)
        assert viewer.id == member.id
        return handle

    def _join(self, map_name: str, viewer: hubfakes.Viewer,
              view: Optional[View] = None) -> tuple[Member, hubfakes.Viewer]:
        member = self.hub.join(map_name, viewer, view)
        viewer.member = member
        if viewer.paused:
            member.pause()
        return member, viewer

    @rule(handle=members, lat=LATS, lng=LNGS, heading=HEADINGS,
          accuracy=st.sampled_from([None, 5.0]))
    def move(self, handle: Handle, lat: float, lng: float, heading: Optional[float],
             accuracy: Optional[float]) -> None:
        if handle not in self.live:
            return
        seq = self.next_seq()
        self._note_pause_bound(handle)
        handle.member.move(Move(lat, lng, heading, accuracy, seq))
        self.truth[handle.map][handle.member.id] = {
            "id": handle.member.id, "lat": lat, "lng": lng, "heading": heading,
            "accuracy": accuracy, "name": handle.name, "seq": seq, "ts": self.now_ms()}

    @rule(handle=members, name=st.sampled_from(["Ada", "Bo", "Cy"]))
    def hello(self, handle: Handle, name: str) -> None:
        if handle not in self.live:
            return
        handle.member.hello(name)
        handle.name = name
        pin = self.truth[handle.map].get(handle.member.id)
        if pin is not None:
            pin["name"] = name

    @rule(handle=members, bbox=BOXES)
    def view(self, handle: Handle, bbox: Optional[tuple]) -> None:
        if handle not in self.live:
            return
        self._note_pause_bound(handle)
        handle.member.set_view(bbox)
        handle.view = bbox
        handle.zoom = None

    @rule(handle=members, bbox=BOXES, zoom=ZOOMS)
    def cluster_view(self, handle: Handle, bbox: Optional[tuple], zoom: int) -> None:
        """A page that says its zoom: dense cells of its box come as clusters."""
        if handle not in self.live:
            return
        self._note_pause_bound(handle)
        handle.member.set_view(bbox, zoom)
        handle.view, handle.zoom = bbox, zoom

    @rule(handle=consumes(members), abrupt=st.booleans())
    def leave(self, handle: Handle, abrupt: bool) -> None:
        """A clean close, or a dropped connection with unread data in its buffer."""
        if handle not in self.live:
            return
        if not abrupt:
            handle.viewer.drain()
        handle.member.leave()
        handle.viewer.closed = (1000, "gone")
        self.live.discard(handle)
        self.truth[handle.map].pop(handle.member.id, None)

    # The network

    @rule(handle=members, action=st.sampled_from(["stall", "drain", "drain_slowly"]))
    def network(self, handle: Handle, action: str) -> None:
        """
        The client stops reading; or reads everything (the transport resumes
        it); or empties its buffer but stays slow, so that the catch-up may
        pause it again from inside the write.
        """
        if handle not in self.live:
            return
        self._note_pause_bound(handle, resuming=action != "stall")
        viewer = handle.viewer
        if action == "stall":
            viewer.stall()
        elif action == "drain":
            viewer.drain()
        elif viewer.paused:
            viewer.buffered = 0
            viewer.paused = False
            handle.member.resume()

    def _note_pause_bound(self, handle: Handle, resuming: bool = False) -> None:
        # What a member paused by the next write may be owed for pins that
        # leave: at most the pins (and departures due) of its map now, the
        # departures its cohort has still to send included (a member that
        # joins in between is owed those too, harmlessly: a `gone` it does
        # not know is ignored).
        map_state = self.hub.maps.get(handle.map)
        if map_state is not None and (resuming or handle.member.paused_at is None):
            handle.pause_bound = self._owed_bound(map_state)

    @staticmethod
    def _owed_bound(map_state: MapState) -> int:
        owed = max((len(cohort.gone) for cohort in map_state.cohorts or ()), default=0)
        return len(map_state.pins) + len(map_state.gone) + owed

    # Time

    @rule(seconds=st.sampled_from([0.0, 0.03, TICK, 0.25, CLUSTER_INTERVAL]))
    def advance(self, seconds: float) -> None:
        for handle in self.live:
            self._note_pause_bound(handle)
        self.clock.advance(seconds)

    @rule(max_age=st.sampled_from([0.05, 0.2, 1.0]))
    def expire(self, max_age: float) -> None:
        bound = int((self.clock.seconds() - max_age) * 1000)
        self.hub.expire_pins(max_age)
        local = {handle.member.id for handle in self.live}
        for pins in self.truth.values():
            for pin_id in [i for i, pin in pins.items() if i in local and pin["ts"] < bound]:
                del pins[pin_id]

    # Other nodes

    @rule(action=st.sampled_from(["state", "state", "stale", "gone", "node_lost"]),
          map_name=st.sampled_from(MAPS), pin_id=st.sampled_from(sorted(REMOTE_IDS)),
          lat=LATS, lng=LNGS)
    def remote(self, action: str, map_name: str, pin_id: str, lat: float, lng: float) -> None:
        """Another node's delta (a state, an old state again, a departure), or its loss."""
        # A remote id lives on one map (the first it was sent on).
        home = self._remote_home(pin_id, map_name)
        origin = REMOTE_IDS[pin_id]
        if action == "state":
            version = self.remote_versions.get(pin_id, 0) + 1
            self.remote_versions[pin_id] = version
            state = {"id": pin_id, "version": version, "lat": lat, "lng": lng,
                     "heading": None, "accuracy": None, "name": "R", "seq": self.next_seq(),
                     "ts": self.now_ms()}
            self.remote_last[pin_id] = dict(state)
            self.hub.apply_remote(home, origin, [dict(state)])
            pin = dict(state)
            del pin["version"]
            self.truth[home][pin_id] = pin
        elif action == "stale":
            # An older state of a pin that is there changes nothing (each
            # node's own order holds, so it cannot follow a departure).
            last = self.remote_last.get(pin_id)
            if last is not None and pin_id in self.truth[home]:
                stale = dict(last, version=last["version"] - 1, lat=-last["lat"])
                self.hub.apply_remote(home, origin, [stale])
        elif action == "gone":
            self.hub.apply_remote(home, origin, [], [pin_id])
            self.truth[home].pop(pin_id, None)
        else:
            self.hub.drop_origin(origin)
            for pins in self.truth.values():
                for lost in [i for i in pins if REMOTE_IDS.get(i) == origin]:
                    del pins[lost]

    def _remote_home(self, pin_id: str, default: str) -> str:
        homes = getattr(self, "_homes", None)
        if homes is None:
            homes = self._homes = {}
        return homes.setdefault(pin_id, default)

    # The judge

    @invariant()
    def hub_holds_the_truth(self) -> None:
        for map_name in MAPS:
            held = {pin["id"]: pin for pin in self.hub.pins(map_name)}
            assert held == self.truth[map_name], (map_name, held, self.truth[map_name])

    @invariant()
    def every_settled_member_sees_the_truth_in_its_view(self) -> None:
        for handle in self.live:
            map_state = self.hub.maps.get(handle.map)
            assert map_state is not None, "a map with a member was forgotten"
            if not map_state.settled() or handle.member.paused_at is not None:
                continue
            if handle.zoom is not None:
                hubfakes.check_clustered(handle.viewer, self.truth[handle.map], handle.view,
                                         handle.zoom, CLUSTER_SIZE)
                continue
            assert handle.viewer.clusters is None
            expected = hubfakes.truth_in(self.truth[handle.map], handle.view)
            seen = handle.viewer.sees()
            assert seen == expected, (handle, handle.view, seen, expected)

    @invariant()
    def paused_members_are_owed_a_bounded_amount(self) -> None:
        for handle in self.live:
            member = handle.member
            assert handle.viewer.paused == (member.paused_at is not None)
            if member.paused_at is None:
                continue
            map_state = self.hub.maps[handle.map]
            assert len(member.missed or ()) <= len(map_state.pins) + len(map_state.gone)
            assert len(member.missed_gone or ()) <= handle.pause_bound, (
                len(member.missed_gone or ()), handle.pause_bound)
            if member.resync:
                assert not member.missed and not member.missed_gone

    @invariant()
    def other_nodes_would_hold_this_nodes_pins(self) -> None:
        local = {handle.member.id for handle in self.live}
        for map_name in MAPS:
            map_state = self.hub.maps.get(map_name)
            if map_state is not None and not map_state.settled():
                continue
            mine = {i: pin for i, pin in self.truth[map_name].items() if i in local}
            mirrored = {i: pin for i, (_, pin) in self.mirror[map_name].items()}
            assert mirrored == mine, (map_name, mirrored, mine)

    @invariant()
    def empty_maps_are_forgotten(self) -> None:
        for map_state in self.hub.maps.values():
            assert map_state.members or map_state.pins or not map_state.settled()

    def teardown(self) -> None:
        for handle in list(self.live):
            handle.viewer.drain()
        self.clock.advance(TICK * 2)
        self.clock.advance(CLUSTER_INTERVAL)
        # A last cluster pass may leave groups waiting a few ticks
        # (cluster_flush_ticks); then nothing more is due.
        for _ in range(10):
            self.clock.advance(TICK)
        for map_state in self.hub.maps.values():
            assert map_state.settled()
        self.every_settled_member_sees_the_truth_in_its_view()
        for handle in list(self.live):
            assert handle.member.paused_at is None


TestHubAgainstTheModel = HubMachine.TestCase
TestHubAgainstTheModel.settings = model_settings(examples=400, steps=60)


# Several hubs through backplanes


class ShuffledBus(MemoryBus):
    """
    The bus with its deliveries in the test's hands: each (sender, receiver,
    server) is a FIFO, as Redis keeps one publisher's order for a subscriber
    on one server; map "a" is on the home, map "b" (and the others) on a
    second server, as with two --redis servers. Which queue delivers next,
    and how many, is the test's choice: what travels through one server
    may overtake what travels through the other.
    """

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.queues: dict[tuple[str, str, str], deque[bytes]] = {}

    @staticmethod
    def server_of(map_name: Optional[str]) -> str:
        return "home" if map_name is None or map_name == MAPS[0] else "maps"

    def pending(self) -> list[tuple[str, str, str]]:
        return sorted(key for key, queue in self.queues.items() if queue)

    def deliver(self, channel: str, message: bytes, sender: str) -> None:
        # The cluster's channel is on the home; a map's on its server.
        server = "home"
        if channel.startswith("map:"):
            server = "maps" if channel != map_channel(MAPS[0]) else "home"
        self.deliver_via(server, channel, message, sender)

    def deliver_via(self, server: str, channel: str, message: bytes, sender: str) -> None:
        self.published += 1
        for node in sorted(self.channels.get(channel, ())):
            link = self.links.get(node)
            if link is not None and link.linked:
                self.queues.setdefault((sender, node, server), deque()).append(message)

    def deliver_from(self, key: tuple[str, str, str], count: int) -> None:
        queue = self.queues[key]
        link = self.links.get(key[1])
        for _ in range(min(count, len(queue))):
            message = queue.popleft()
            if link is not None and link.linked and link.receiver is not None:
                link.receiver.message_received(message)


class ShuffledLink(MemoryLink):
    """Its messages wait in the bus's queues, not in a timer; to one node via the map's server."""

    bus: ShuffledBus

    def publish(self, message: bytes, to: Optional[str] = None,
                map_name: Optional[str] = None) -> bool:
        if not self.linked:
            return False
        if to is None:
            self.bus.deliver_via("home", ALL, message, self.node)
        else:
            self.bus.deliver_via(self.bus.server_of(map_name), node_channel(to), message,
                                 self.node)
        return True


NODE_TTL = 2.0


class Node:
    def __init__(self, name: str, clock: Clock, bus: ShuffledBus) -> None:
        self.name = name
        ids = iter(range(10**9))
        self.hub = Hub(clock, tick_interval=TICK, slow_timeout=1e9,
                       cluster_size=CLUSTER_SIZE, cluster_interval=CLUSTER_INTERVAL,
                       new_id=lambda: f"{name}-p{next(ids)}")
        self.plane = Backplane(self.hub, ShuffledLink(bus, name), clock, node_ttl=NODE_TTL,
                               reply_delay=0.05)
        self.plane.startService()
        self.alive = True

    def __repr__(self) -> str:
        return f"Node({self.name})"


class ClusterMachine(RuleBasedStateMachine):
    members = Bundle("cluster_members")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.clock.advance(1000)
        self.bus = ShuffledBus(self.clock)
        self.nodes: list[Node] = []
        self.truth: dict[str, dict[str, dict]] = {name: {} for name in MAPS}
        self.live: set[Handle] = set()
        self.homes: dict[Handle, Node] = {}
        self.seq = 0
        # Syncs that completed without pins the serving nodes had.
        self.incomplete: list[tuple] = []

    @initialize(count=st.sampled_from([2, 3]))
    def start_nodes(self, count: int) -> None:
        for _ in range(count):
            self._add_node()

    def _add_node(self) -> None:
        node = Node(f"n{len(self.nodes)}", self.clock, self.bus)
        self.nodes.append(node)
        self.clock.advance(0)

    def _alive(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    @rule(target=members, index=st.integers(0, 2), map_name=st.sampled_from(MAPS),
          stalled=st.booleans())
    def join(self, index: int, map_name: str, stalled: bool) -> Handle:
        node = self._alive()[index % len(self._alive())]
        viewer = hubfakes.Viewer(300)
        if stalled:
            viewer.stall()
        member = node.hub.join(map_name, viewer)
        viewer.member = member
        if viewer.paused:
            member.pause()
        handle = Handle(map_name, member, viewer)
        self.live.add(handle)
        self.homes[handle] = node
        return handle

    @rule(handle=members, lat=LATS, lng=LNGS)
    def move(self, handle: Handle, lat: float, lng: float) -> None:
        if handle not in self.live:
            return
        self.seq += 1
        handle.member.move(Move(lat, lng, None, None, self.seq))
        self.truth[handle.map][handle.member.id] = {
            "id": handle.member.id, "lat": lat, "lng": lng, "heading": None,
            "accuracy": None, "name": handle.name, "seq": self.seq,
            "ts": int(self.clock.seconds() * 1000)}

    @rule(handle=members, name=st.sampled_from(["Ada", "Bo"]))
    def hello(self, handle: Handle, name: str) -> None:
        if handle not in self.live:
            return
        handle.member.hello(name)
        handle.name = name
        pin = self.truth[handle.map].get(handle.member.id)
        if pin is not None:
            pin["name"] = name

    @rule(handle=members, bbox=BOXES, zoom=st.one_of(st.none(), ZOOMS))
    def view(self, handle: Handle, bbox: Optional[tuple], zoom: Optional[int]) -> None:
        """A view, clustered (with a zoom) or not."""
        if handle in self.live:
            handle.member.set_view(bbox, zoom)
            handle.view, handle.zoom = bbox, zoom

    @rule(handle=consumes(members))
    def leave(self, handle: Handle) -> None:
        if handle not in self.live:
            return
        handle.member.leave()
        handle.viewer.closed = (1000, "gone")
        self.live.discard(handle)
        self.truth[handle.map].pop(handle.member.id, None)

    @rule(handle=members)
    def stall_or_drain(self, handle: Handle) -> None:
        if handle not in self.live:
            return
        if handle.viewer.reading:
            handle.viewer.stall()
        else:
            handle.viewer.drain()

    @rule(seconds=st.sampled_from([0.0, 0.05, TICK, 0.3]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(pick=st.integers(0, 100), count=st.integers(1, 6))
    def deliver(self, pick: int, count: int) -> None:
        pending = self.bus.pending()
        if pending:
            self.bus.deliver_from(pending[pick % len(pending)], count)

    @rule(index=st.integers(0, 2), map_name=st.sampled_from(MAPS),
          lease=st.sampled_from([0.0, 0.5, 5.0]))
    def request_needs_map(self, index: int, map_name: str, lease: float) -> None:
        """A request (a first welcome, the pins API, an app's report) makes a node serve a map."""
        node = self._alive()[index % len(self._alive())]
        # Once in sync, it holds every pin that a node serving the map had
        # when asked, and still has.
        held_then = {other: {pin_id for pin_id, pin in other.hub.maps[map_name].pins.items()
                             if pin.origin is None}
                     for other in self._alive() if other is not node
                     and map_name in other.plane.watches and other.plane.watches[map_name].synced
                     and map_name in other.hub.maps}

        def synced(how: str) -> None:
            if how != "complete":
                return
            mine = node.hub.maps.get(map_name)
            held = set() if mine is None else set(mine.pins)
            for other, pin_ids in held_then.items():
                if other.alive and map_name in other.hub.maps:
                    missing = pin_ids & set(other.hub.maps[map_name].pins) - held
                    if missing:
                        self.incomplete.append((node, other, map_name, missing))
        node.plane.watch(map_name, lease).addCallback(synced)

    @invariant()
    def a_map_in_sync_holds_what_the_others_serving_it_had(self) -> None:
        assert not self.incomplete, self.incomplete

    @precondition(lambda self: len(self._alive()) > 1)
    @rule(index=st.integers(0, 2))
    def node_dies(self, index: int) -> None:
        """kill -9: no goodbye; the others must drop its pins by themselves."""
        node = self._alive()[index % len(self._alive())]
        node.plane.abandon()
        node.alive = False
        for handle in [h for h in self.live if self.homes[h] is node]:
            self.live.discard(handle)
            self.truth[handle.map].pop(handle.member.id, None)

    @precondition(lambda self: len(self._alive()) < 3 and len(self.nodes) < 5)
    @rule()
    def node_joins(self) -> None:
        self._add_node()

    @invariant()
    def local_pins_are_the_truth(self) -> None:
        for node in self._alive():
            local = {h.member.id for h in self.live if self.homes[h] is node}
            for map_name in MAPS:
                mine = {pin["id"]: pin for pin in node.hub.pins(map_name)
                        if pin["id"] in local}
                expected = {i: p for i, p in self.truth[map_name].items() if i in local}
                assert mine == expected

    def settle(self) -> None:
        """
        Deliver everything, let timers run past the node TTL: all must agree.
        Meanwhile every node is busy on a map only it serves, as nodes are:
        what it publishes there is heard by no other node.
        """
        for handle in self.live:
            handle.viewer.drain()
        busy = [node.hub.join(f"solo-{node.name}", hubfakes.Viewer(300))
                for node in self._alive()]
        for step in range(int(3 * NODE_TTL / TICK)):
            for member in busy:
                member.move(Move(1.0, step % 90, None, None, step + 1))
            while self.bus.pending():
                for pair in self.bus.pending():
                    self.bus.deliver_from(pair, 10**6)
            self.clock.advance(TICK)
        for member in busy:
            member.leave()
        while self.bus.pending():
            for pair in self.bus.pending():
                self.bus.deliver_from(pair, 10**6)
        self.clock.advance(TICK)
        self.clock.advance(TICK)
        # The clustered views' last cluster pass, the bus still delivering
        # (else the nodes would take each other for dead).
        for _ in range(int(CLUSTER_INTERVAL / TICK)):
            while self.bus.pending():
                for pair in self.bus.pending():
                    self.bus.deliver_from(pair, 10**6)
            self.clock.advance(TICK)

    @rule()
    def everyone_converges_when_quiet(self) -> None:
        self.settle()
        for node in self._alive():
            for map_name in MAPS:
                held = {pin["id"]: pin for pin in node.hub.pins(map_name)}
                if map_name in node.plane.watches:
                    # A node that serves a map holds all of it...
                    assert held == self.truth[map_name], (node, map_name, held,
                                                          self.truth[map_name])
                else:
                    # ... and one that does not, nothing of it but its own pins.
                    own = {i: p for i, p in held.items()
                           if node.hub.maps[map_name].pins[i].origin is None}
                    assert held == own, (node, map_name, held)
        for handle in self.live:
            if handle.zoom is not None:
                hubfakes.check_clustered(handle.viewer, self.truth[handle.map], handle.view,
                                         handle.zoom, CLUSTER_SIZE)
                continue
            expected = hubfakes.truth_in(self.truth[handle.map], handle.view)
            assert handle.viewer.sees() == expected, (handle, handle.viewer.sees(), expected)

    def teardown(self) -> None:
        try:
            self.everyone_converges_when_quiet()
        finally:
            for node in self._alive():
                node.plane.abandon()


TestClusterAgainstTheModel = ClusterMachine.TestCase
TestClusterAgainstTheModel.settings = model_settings(examples=150, steps=50)


def test_the_judge_catches_a_view_that_misses_departures(monkeypatch) -> None:
    """The model is not blind: a hub whose views miss departures fails it."""
    from hypothesis.stateful import run_state_machine_as_test

    from livemap_tx.hub import MapState

    fan_out = MapState._fan_out_views
    monkeypatch.setattr(MapState, "_fan_out_views",
                        lambda self, changed, gone, departed: fan_out(self, changed, gone, []))
    try:
        run_state_machine_as_test(HubMachine, settings=settings(
            max_examples=2000, stateful_step_count=40, deadline=None, database=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    except (AssertionError, ExceptionGroup):
        return
    raise AssertionError("the model did not notice views that keep departed pins")


def _the_model_fails(machine: type) -> bool:
    from hypothesis.stateful import run_state_machine_as_test

    try:
        run_state_machine_as_test(machine, settings=settings(
            max_examples=2000, stateful_step_count=40, deadline=None, database=None,
            phases=[Phase.generate], suppress_health_check=list(HealthCheck)))
    except (AssertionError, ExceptionGroup):
        return True
    return False


def test_the_judge_catches_clustered_views_that_miss_departures(monkeypatch) -> None:
    """A hub whose clustered views keep departed pins fails the model."""
    from livemap_tx.hub import MapState

    monkeypatch.setattr(MapState, "_route_departed_clustered",
                        lambda self, pin, before, touched: None)
    assert _the_model_fails(HubMachine)


def test_the_judge_catches_cells_that_never_change_hands(monkeypatch) -> None:
    """A hub whose cluster pass never tells the views fails the model."""
    from livemap_tx.hub import MapState

    monkeypatch.setattr(MapState, "_groups_of_cell", staticmethod(lambda views, level, key: []))
    assert _the_model_fails(HubMachine)


# Examples the machines found, kept as plain tests


class Checked:
    """A HubMachine whose invariants are checked after every step, as Hypothesis does."""

    def __init__(self) -> None:
        self.machine = HubMachine()

    def __getattr__(self, name: str):
        step = getattr(self.machine, name)

        def checked(*args):
            result = step(*args)
            for invariant in ("hub_holds_the_truth", "every_settled_member_sees_the_truth_in_its_view",
                              "paused_members_are_owed_a_bounded_amount",
                              "other_nodes_would_hold_this_nodes_pins", "empty_maps_are_forgotten"):
                getattr(self.machine, invariant)()
            return result
        return checked


def test_found_a_member_paused_at_its_welcome_is_owed_its_cohorts_departures() -> None:
    machine = Checked()
    machine.sizes(True)
    machine.remote("state", "a", "r0", -10.0, -179.5)
    machine.advance(0)
    machine.advance(0.1)
    for _ in range(4):
        machine.join("a", 10, False)
    machine.remote("gone", "a", "r0", -10.0, -179.5)
    machine.advance(0)  # the map's tick: r0's departure now waits for the cohort's
    machine.join("a", 10, True)
    machine.teardown()


def test_found_a_member_joining_while_the_cohorts_split_again_is_written_nothing_first() -> None:
    machine = Checked()
    machine.sizes(True)
    machine.remote("state", "a", "r0", -10.0, -179.5)
    first = machine.join("a", 10, False)
    machine.hello(first, "Ada")
    second = machine.join("a", 10, False)
    machine.move(second, -10.0, -179.5, None, None)
    for _ in range(5):
        machine.join("a", 10, False)
    stalled = machine.join("a", 10, True)  # the eighth: the cohorts split again
    machine.move(stalled, -10.0, -179.5, None, None)
    machine.teardown()
