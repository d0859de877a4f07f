"""The hub's state and fan-out rules, with a fake clock and fake subscribers."""

from __future__ import annotations

import itertools

import orjson
import pytest
from twisted.internet.task import Clock

from livemap_tx.hub import Frame, Hub
from livemap_tx.wire import Move

import hubfakes


class FakeSubscriber:
    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.closed: tuple | None = None

    def send_frame(self, frame: Frame) -> None:
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def take(self) -> list[dict]:
        messages = [orjson.loads(frame.payload) for frame in self.frames]
        self.frames = []
        return messages


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hub(clock) -> Hub:
    ids = (f"id{n}" for n in itertools.count())
    return Hub(clock, tick_interval=0.1, slow_timeout=30.0, new_id=lambda: next(ids))


def join(hub, map_name="m"):
    subscriber = FakeSubscriber()
    member = hub.join(map_name, subscriber)
    return member, subscriber


def move(lat=1.0, lng=2.0, seq=None, heading=None):
    return Move(lat, lng, heading, None, seq)


def test_join_sends_welcome_with_current_pins(hub, clock):
    alice, alice_out = join(hub)
    assert alice_out.take() == [{"type": "welcome", "id": "id0", "pins": []}]
    alice.move(move(seq=1))
    bob, bob_out = join(hub)
    [welcome] = bob_out.take()
    assert welcome["id"] == "id1"
    assert [pin["id"] for pin in welcome["pins"]] == ["id0"]


def test_ids_are_unguessable_by_default(clock):
    hub = Hub(clock)
    ids = {hub.join("m", FakeSubscriber()).id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) >= 16 for i in ids)


def test_moves_coalesce_into_one_update_per_tick(hub, clock):
    alice, alice_out = join(hub)
    bob, bob_out = join(hub)
    alice_out.take(), bob_out.take()
    clock.advance(1)
    alice.move(move(seq=1))  # idle map: ticks at once
    clock.advance(0)
    assert [m["pins"][0]["seq"] for m in bob_out.take()] == [1]
    alice_out.take()
    for seq in range(2, 7):
        alice.move(move(lat=float(seq), seq=seq))
    clock.advance(0.05)
    assert bob_out.take() == []
    clock.advance(0.05)
    [update] = bob_out.take()
    assert update["type"] == "update" and update["gone"] == []
    assert [(p["seq"], p["lat"]) for p in update["pins"]] == [(6, 6.0)]
    assert alice_out.take() == [update]  # the sender converges too


def test_one_encoded_frame_is_shared_by_every_subscriber(hub, clock):
    members = [join(hub) for _ in range(5)]
    for _, out in members:
        out.take()
    members[0][0].move(move())
    clock.advance(0)
    frames = {id(out.frames[0]) for _, out in members}
    assert len(frames) == 1


def test_no_tick_is_scheduled_while_idle(hub, clock):
    join(hub)
    assert clock.getDelayedCalls() == []
    alice, _ = join(hub)
    alice.move(move())
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert clock.getDelayedCalls() == []


def test_pin_has_server_timestamp_in_ms(hub, clock):
    clock.advance(1234.5)
    alice, out = join(hub)
    alice.move(move())
    clock.advance(0)
    assert out.take()[-1]["pins"][0]["ts"] == 1234500


def test_leave_sends_gone_and_forgets_empty_map(hub, clock):
    alice, _ = join(hub)
    bob, bob_out = join(hub)
    alice.move(move())
    clock.advance(1)
    bob_out.take()
    alice.leave()
    clock.advance(1)
    assert bob_out.take() == [{"type": "update", "pins": [], "gone": ["id0"]}]
    bob.leave()
    assert hub.maps == {}
    assert clock.getDelayedCalls() == []


def test_member_without_pin_leaving_sends_nothing(hub, clock):
    alice, _ = join(hub)
    bob, bob_out = join(hub)
    bob_out.take()
    alice.leave()
    clock.advance(1)
    assert bob_out.take() == []


def test_hello_names_the_pin_now_or_later(hub, clock):
    alice, _ = join(hub)
    bob, bob_out = join(hub)
    alice.hello("Alice")
    clock.advance(1)
    assert bob_out.take()[1:] == []  # no pin yet: nothing to send
    alice.move(move())
    clock.advance(1)
    assert bob_out.take()[-1]["pins"][0]["name"] == "Alice"
    alice.hello("Ally")
    clock.advance(1)
    assert bob_out.take()[-1]["pins"][0]["name"] == "Ally"
    alice.hello("Ally")
    clock.advance(1)
    assert bob_out.take() == []  # same name: nothing changed


def test_view_snapshot_and_updates_follow_the_box(hub, clock):
    watcher, out = join(hub)
    mover, _ = join(hub)
    other, _ = join(hub)
    mover.move(move(lat=0, lng=0))
    other.move(move(lat=50, lng=50))
    clock.advance(1)
    out.take()
    watcher.set_view((-1, -1, 1, 1))
    assert [[p["id"] for p in m["pins"]] for m in out.take()] == [["id1"]]
    other.move(move(lat=51, lng=51))  # outside: nothing for the watcher
    clock.advance(1)
    assert out.take() == []
    mover.move(move(lat=0.5, lng=0.5))
    clock.advance(1)
    assert [(m["pins"][0]["id"], m["gone"]) for m in out.take()] == [("id1", [])]
    mover.move(move(lat=10, lng=10))  # leaves the box
    clock.advance(1)
    assert out.take() == [{"type": "update", "pins": [], "gone": ["id1"]}]
    other.move(move(lat=0.1, lng=0.1))  # enters the box
    clock.advance(1)
    assert [[p["id"] for p in m["pins"]] for m in out.take()] == [["id2"]]
    other.leave()
    clock.advance(1)
    assert out.take() == [{"type": "update", "pins": [], "gone": ["id2"]}]


def test_view_across_the_antimeridian(hub, clock):
    watcher, out = join(hub)
    mover, _ = join(hub)
    watcher.set_view((170, -10, -170, 10))
    out.take()
    for lng, expected in [(175, "pins"), (-175, "pins"), (0, "gone"), (179.99, "pins")]:
        mover.move(move(lat=0, lng=lng))
        clock.advance(1)
        [update] = out.take()
        assert update[expected] and not update["gone" if expected == "pins" else "pins"]


def test_identical_views_share_one_encoded_frame(hub, clock):
    a, a_out = join(hub)
    b, b_out = join(hub)
    mover, _ = join(hub)
    a.set_view((0, 0, 10, 10))
    b.set_view((0, 0, 10, 10))
    a_out.take(), b_out.take()
    mover.move(move(lat=5, lng=5))
    clock.advance(1)
    assert a_out.frames[0] is b_out.frames[0]
    assert len(hub.maps["m"].groups) == 1
    a.set_view(None)
    b.leave()
    assert hub.maps["m"].groups == {} and hub.maps["m"].view_index.empty()


def test_view_snapshot_uses_the_spatial_grid(hub, clock):
    watcher, out = join(hub)
    movers = [join(hub)[0] for _ in range(40)]
    for n, member in enumerate(movers):
        member.move(move(lat=-80 + 4 * n, lng=-170 + 8 * n))
    watcher.set_view((-170, -80, -160, -70))
    snapshot = out.take()[-1]
    assert snapshot["type"] == "snapshot"
    assert sorted((p["lat"], p["lng"]) for p in snapshot["pins"]) == [(-80, -170), (-76, -162)]
    assert hub.maps["m"].pins_in((-180, -90, 180, 90)).__len__() == 40


def test_slow_subscriber_is_paused_by_its_own_write_skipped_then_caught_up(hub, clock):
    slow, slow_view = hubfakes.join(hub, high_water=100)
    mover, _ = join(hub)
    leaver, _ = join(hub)
    leaver.move(move())
    clock.advance(1)
    slow_view.take()
    slow_view.stall()
    mover.move(move(lat=0, seq=0, heading=90.0))
    clock.advance(1)  # this update fills the buffer: the transport pauses the member
    assert slow_view.paused and len(slow_view.take()) == 1
    for seq in range(1, 5):
        mover.move(move(lat=seq, seq=seq))
        clock.advance(1)
    leaver.leave()
    clock.advance(1)
    assert slow_view.take() == []
    assert hub.stats.slow_skips == 6
    slow_view.drain()
    [catch_up] = slow_view.take()
    assert [(p["id"], p["seq"]) for p in catch_up["pins"]] == [("id1", 4)]
    assert catch_up["gone"] == ["id2"]
    mover.move(move(seq=9))
    clock.advance(1)
    assert slow_view.take()[0]["pins"][0]["seq"] == 9


def test_members_paused_from_inside_a_broadcast_cost_nobody_their_update(hub, clock):
    """
    Twisted pauses a producer from inside write(): half the map stalls at
    once, in the middle of one tick, and the tick still reaches everyone
    else, every view and the other nodes.
    """
    published = []
    hub.publisher = lambda name, pins, gone: published.append(
        ([p.id for p in pins], list(gone)))
    slow = [hubfakes.join(hub, high_water=10) for _ in range(20)]
    fast = [hubfakes.join(hub) for _ in range(20)]
    boxed = [hubfakes.join(hub) for _ in range(3)]
    for member, view in boxed:
        member.set_view((0, 0, 10, 10))
    leaver, _ = join(hub)
    leaver.move(move(lat=5, lng=5))
    clock.advance(1)
    for _, view in slow:
        view.stall()
    mover, _ = join(hub)
    mover.move(move(lat=5, lng=5, seq=1))
    leaver.leave()
    clock.advance(1)
    assert all(view.paused for _, view in slow)
    for _, view in fast + boxed:
        assert set(view.sees()) == {mover.id}, view.sees()
    assert published[-1] == ([mover.id], [leaver.id])
    for _, view in slow:
        view.drain()
        assert set(view.sees()) == {mover.id}


def test_a_catch_up_that_fills_the_buffer_again_keeps_the_member_paused(hub, clock):
    slow, slow_view = hubfakes.join(hub, high_water=150)
    movers = [join(hub)[0] for _ in range(3)]
    clock.advance(1)
    slow_view.stall()
    for seq, mover in enumerate(movers):
        mover.move(move(lat=seq, seq=seq))
    clock.advance(1)
    assert slow_view.paused
    for seq, mover in enumerate(movers, start=10):
        mover.move(move(lat=seq, seq=seq))
    clock.advance(1)
    # The client read what was buffered, but reads slowly: the catch-up
    # fills the buffer again and the transport pauses it from inside.
    slow_view.buffered = 0
    slow_view.paused = False
    slow.resume()
    assert slow_view.paused
    for seq, mover in enumerate(movers, start=20):
        mover.move(move(lat=seq, seq=seq))
        clock.advance(1)  # a write now would raise ProtocolViolation
    assert slow in hub.maps["m"].slow
    slow_view.drain()
    assert {p["seq"] for p in slow_view.sees().values()} == {20, 21, 22}


def test_slow_subscriber_is_closed_after_the_timeout(hub, clock):
    slow, slow_view = hubfakes.join(hub, high_water=10)
    mover, _ = join(hub)
    slow_view.stall()
    for _ in range(30):  # paused by the first tick's write, at 1 s
        mover.move(move())
        clock.advance(1)
    assert slow_view.paused and slow_view.closed is None
    mover.move(move())
    clock.advance(1.5)
    assert slow_view.closed == (1008, "too slow: not reading")
    assert hub.stats.slow_closes == 1


def test_slow_subscriber_missed_set_is_bounded(clock):
    hub = Hub(clock, max_missed=10)
    slow, slow_view = hubfakes.join(hub, "m", high_water=10)
    slow_view.stall()
    for _ in range(12):
        hub.join("m", FakeSubscriber()).move(move())
    clock.advance(1)
    assert slow_view.closed is not None


def test_what_a_paused_member_is_owed_is_bounded_by_the_pins_of_the_map(hub, clock):
    """Pins that come and go while it is paused leave nothing behind for it."""
    slow, slow_view = hubfakes.join(hub, high_water=10)
    stayer, _ = join(hub)
    stayer.move(move())
    clock.advance(1)
    slow_view.stall()
    stayer.move(move(seq=1))
    clock.advance(1)
    assert slow_view.paused
    for _ in range(50):
        visitor, _ = join(hub)
        visitor.move(move())
        clock.advance(1)
        visitor.leave()
        clock.advance(1)
    assert len(slow.missed or ()) + len(slow.missed_gone or ()) <= len(hub.maps["m"].pins)
    slow_view.drain()
    assert set(slow_view.sees()) == {stayer.id}


def test_a_paused_member_changing_view_gets_its_snapshot_once_it_drains(hub, clock):
    slow, slow_view = hubfakes.join(hub, high_water=10)
    mover, _ = join(hub)
    mover.move(move(lat=50, lng=50))
    clock.advance(1)
    slow_view.stall()
    mover.move(move(lat=51, lng=51))
    clock.advance(1)
    assert slow_view.paused
    slow_view.take()
    slow.set_view((0, 0, 10, 10))  # a write now would raise ProtocolViolation
    mover.move(move(lat=5, lng=5))
    clock.advance(1)
    slow_view.drain()
    [snapshot] = slow_view.take()
    assert snapshot["type"] == "snapshot"
    assert [p["id"] for p in snapshot["pins"]] == ["id1"]
    mover.move(move(lat=6, lng=6))
    clock.advance(1)
    assert slow_view.take()[0]["pins"][0]["lat"] == 6


def test_errors_for_a_paused_member_are_dropped_not_buffered(hub, clock):
    slow, slow_view = hubfakes.join(hub, high_water=10)
    slow_view.stall()
    slow.send(b'{"type":"error","code":"bad_json","message":"x"}')
    assert slow_view.paused
    slow.send(b'{"type":"error","code":"bad_json","message":"y"}')
    assert hub.stats.dropped_while_paused == 1


def test_a_pause_during_the_welcome_is_kept(hub, clock):
    mover, _ = join(hub)
    for n in range(5):
        join(hub)[0].move(move(lat=n))
    clock.advance(1)
    viewer = hubfakes.Viewer(high_water=10)
    viewer.stall()
    member = hub.join("m", viewer)  # the welcome fills the buffer
    viewer.member = member
    assert viewer.paused
    member.pause()  # what the transports do once the member exists
    mover.move(move(seq=3))
    clock.advance(1)  # a write now would raise ProtocolViolation
    viewer.drain()
    assert viewer.sees()[mover.id]["seq"] == 3


def test_tick_stretches_under_load_instead_of_queueing(hub, clock):
    alice, out = join(hub)
    alice.move(move())
    clock.advance(0)
    for _ in range(100):
        alice.move(move())
    # However many moves arrive, at most one tick is pending.
    assert len(clock.getDelayedCalls()) == 1


def test_pins_api_view(hub, clock):
    alice, _ = join(hub)
    alice.move(move(lat=3, lng=4, seq=2))
    [pin] = hub.pins("m")
    assert (pin["lat"], pin["lng"], pin["seq"]) == (3, 4, 2)
    assert hub.pins("nowhere") == []


def remote(pin_id, version, lat=1.0, lng=2.0, name=None, seq=None, ts=5):
    return {"id": pin_id, "version": version, "lat": lat, "lng": lng, "heading": None,
            "accuracy": None, "name": name, "seq": seq, "ts": ts}


def test_remote_pins_fan_out_and_join_the_welcome(hub, clock):
    watcher, out = join(hub)
    out.take()
    hub.apply_remote("m", "node-b", [remote("r1", 1, seq=1)])
    clock.advance(1)
    assert [p["id"] for p in out.take()[0]["pins"]] == ["r1"]
    _, late_out = join(hub)
    assert [p["id"] for p in late_out.take()[0]["pins"]] == ["r1"]


def test_stale_remote_states_never_win(hub, clock):
    _, out = join(hub)
    hub.apply_remote("m", "node-b", [remote("r1", 5, lat=5.0)])
    hub.apply_remote("m", "node-b", [remote("r1", 4, lat=4.0)])
    hub.apply_remote("m", "node-c", [remote("r1", 9, lat=9.0)])  # not its owner
    assert hub.pins("m")[0]["lat"] == 5.0


def test_publisher_gets_only_local_changes_once_per_tick(hub, clock):
    published = []
    hub.publisher = lambda name, pins, gone: published.append(
        (name, [(p.id, p.version) for p in pins], gone))
    alice, _ = join(hub)
    bob, _ = join(hub)
    alice.move(move())
    alice.move(move())
    hub.apply_remote("m", "node-b", [remote("r1", 1)])
    clock.advance(1)
    assert published == [("m", [("id0", 2)], [])]
    hub.apply_remote("m", "node-b", [], ["r1"])
    clock.advance(1)
    assert len(published) == 1  # remote departures are not re-published
    alice.leave()
    clock.advance(1)
    assert published[-1] == ("m", [], ["id0"])


def test_drop_origin_removes_a_dead_nodes_pins(hub, clock):
    _, out = join(hub)
    hub.apply_remote("m", "node-b", [remote("r1", 1), remote("r2", 1)])
    hub.apply_remote("other", "node-b", [remote("r3", 1)])
    hub.apply_remote("m", "node-c", [remote("r4", 1)])
    clock.advance(1)
    out.take()
    assert hub.drop_origin("node-b") == 3
    clock.advance(1)
    assert sorted(out.take()[0]["gone"]) == ["r1", "r2"]
    assert [p["id"] for p in hub.pins("m")] == ["r4"]
    assert "other" not in hub.maps
    assert [(name, pin.id) for name, pin in hub.local_pins()] == []


# Each of these once left a ghost pin on somebody's map.


def published_log(hub):
    published = []
    hub.publisher = lambda name, pins, gone: published.append(
        (name, [p.id for p in pins], list(gone)))
    return published


@pytest.mark.parametrize("last_step", ["leave", "remote_gone", "drop_origin"])
def test_the_last_departure_of_a_map_is_published_before_the_map_is_forgotten(
        hub, clock, last_step):
    published = published_log(hub)
    alice, _ = join(hub)
    bob, _ = join(hub)
    alice.move(move())
    bob.move(move())
    if last_step != "leave":
        hub.apply_remote("m", "node-b", [remote("r1", 1)])
    clock.advance(1)
    alice.leave()
    clock.advance(1)
    bob.leave()  # the map's last local client: its departure is due at the next tick
    if last_step == "remote_gone":  # ... and then the map's last pin goes
        hub.apply_remote("m", "node-b", [], ["r1"])
    elif last_step == "drop_origin":
        hub.drop_origin("node-b")
    clock.advance(1)
    assert published[-1] == ("m", [], [bob.id])
    assert "m" not in hub.maps
    assert clock.getDelayedCalls() == []


def test_a_pin_snapshotted_into_a_view_and_gone_within_the_tick_is_gone_there(hub, clock):
    watcher, view = hubfakes.join(hub)
    comer, _ = join(hub)
    comer.move(move(lat=5, lng=5))  # not sent by any tick yet
    watcher.set_view((0, 0, 10, 10))
    assert set(view.sees()) == {comer.id}
    comer.leave()
    clock.advance(1)
    assert view.sees() == {}


def test_a_pin_that_moves_into_a_view_and_out_within_the_tick_leaves_it(hub, clock):
    watcher, view = hubfakes.join(hub)
    mover, _ = join(hub)
    mover.move(move(lat=50, lng=50))
    clock.advance(1)
    mover.move(move(lat=5, lng=5))
    watcher.set_view((0, 0, 10, 10))  # snapshot: the pin is in the box now
    assert set(view.sees()) == {mover.id}
    mover.move(move(lat=60, lng=60))
    clock.advance(1)
    assert view.sees() == {}


def test_expiry_and_a_new_move_within_one_tick_name_the_pin_once(hub, clock):
    published = published_log(hub)
    alice, alice_view = hubfakes.join(hub)
    boxed, boxed_view = hubfakes.join(hub)
    boxed.set_view((0, 0, 10, 10))
    alice.move(move(lat=5, lng=5, seq=1))
    clock.advance(1)
    clock.advance(100)
    assert hub.expire_pins(50) == 1
    alice.move(move(lat=6, lng=6, seq=2))  # back before the tick
    clock.advance(1)  # Viewer raises if an update names the pin twice
    assert alice_view.sees()[alice.id]["seq"] == 2
    assert boxed_view.sees()[alice.id]["seq"] == 2
    assert published[-1] == ("m", [alice.id], [])


def test_a_pin_that_expires_and_comes_back_elsewhere_leaves_the_old_view(hub, clock):
    alice, _ = join(hub)
    boxed, boxed_view = hubfakes.join(hub)
    boxed.set_view((0, 0, 10, 10))
    alice.move(move(lat=5, lng=5, seq=1))
    clock.advance(101)
    hub.expire_pins(50)
    alice.move(move(lat=50, lng=50, seq=2))
    clock.advance(1)
    assert boxed_view.sees() == {}


def test_remote_delta_naming_a_pin_in_both_keeps_it(hub, clock):
    _, view = hubfakes.join(hub)
    hub.apply_remote("m", "node-b", [remote("r1", 1)])
    clock.advance(1)
    hub.apply_remote("m", "node-b", [remote("r1", 2, lat=3.0)], ["r1"])
    clock.advance(1)
    assert view.sees()["r1"]["lat"] == 3.0


# Found by the model-based test (tests/test_hub_model.py) run long.


def test_a_member_paused_by_its_snapshot_and_drained_before_the_tick_loses_the_ghost(hub, clock):
    """The pins a snapshot sent early stay owed across a pause that ends before the tick."""
    watcher, view = hubfakes.join(hub, high_water=10)
    view.stall()
    comer, _ = join(hub)
    comer.move(move(lat=-10, lng=-179.5))  # not sent by any tick yet
    watcher.set_view((170, -20, -170, 20))  # the snapshot pauses it
    assert view.paused and set(view.sees()) == {comer.id}
    comer.leave()
    view.drain()  # before the next tick
    clock.advance(1)
    assert view.sees() == {}


def test_own_pin_sent_early_then_moved_out_of_the_box_leaves_it(hub, clock):
    member, view = hubfakes.join(hub, high_water=60)
    view.stall()
    member.move(move(lat=-10, lng=-10))
    member.set_view((-20, -20, 20, 20))  # the snapshot pauses it
    assert view.paused
    member.move(move(lat=-10, lng=-179.5))
    view.drain()
    clock.advance(1)
    assert view.sees() == {}


# Big maps: a stretched tick, and the world sent to in cohorts


def test_a_big_maps_world_is_sent_to_in_cohorts_that_tick_in_turn(clock):
    hub = Hub(clock, tick_interval=0.1, cohort_min=4, cohort_size=2)
    views = [hubfakes.join(hub)[1] for _ in range(6)]
    map_state = hub.maps["m"]
    assert map_state.cohorts is not None and len(map_state.cohorts) == 2
    assert sorted(len(c.members) for c in map_state.cohorts) == [3, 3]
    for _ in range(2):  # twice the cohorts' worth: split again
        views.append(hubfakes.join(hub)[1])
    assert len(map_state.cohorts) == 4
    mover = views[0].member
    sends: dict[int, list[float]] = {id(c): [] for c in map_state.cohorts}
    tick = map_state._cohort_tick

    def timed(cohort):
        sends[id(cohort)].append(round(clock.seconds(), 3))
        tick(cohort)
    map_state._cohort_tick = timed
    seq = 0
    # Ten seconds of moves, the clock running a little late as a busy reactor does.
    while clock.seconds() < 10:
        seq += 1
        mover.move(move(lat=seq % 80, seq=seq))
        clock.advance(0.013)
    clock.advance(1)
    for times in sends.values():
        during = [t for t in times if t < 10]
        gaps = [b - a for a, b in zip(during, during[1:])]
        # Each cohort every 0.2 s (twice the tick), never skipping a turn.
        assert 45 <= len(times) <= 52 and max(gaps) < 0.2 + 0.013 + 1e-6, gaps
    starts = sorted(times[5] % 0.2 for times in sends.values())
    assert all(b - a > 0.03 for a, b in zip(starts, starts[1:])), starts  # in turn
    for view in views:
        assert view.sees()[mover.id]["seq"] == seq


def test_cohorts_merge_back_when_the_map_shrinks_and_owe_nothing(clock):
    hub = Hub(clock, tick_interval=0.1, cohort_min=4, cohort_size=2)
    members = [hubfakes.join(hub) for _ in range(6)]
    mover = members[0][0]
    mover.move(move(seq=1))
    for member, _ in members[3:]:
        member.leave()  # 3 left: under half of cohort_min... not yet (3 >= 2)
    members[2][0].leave()
    members[1][0].move(move(seq=2))
    members[1][0].leave()  # 1 left: the cohorts are merged back, sending what they owed
    map_state = hub.maps["m"]
    assert map_state.cohorts is None
    clock.advance(1)
    assert members[0][1].sees() == {mover.id: members[0][1].sees()[mover.id]}
    assert members[0][1].sees()[mover.id]["seq"] == 1


def test_a_map_with_many_clients_ticks_a_little_less_often(clock):
    hub = Hub(clock, tick_interval=0.1, big_map=3)
    small = hub.map("small")
    for _ in range(3):
        hubfakes.join(hub, "big")
    hubfakes.join(hub, "small")
    assert small.interval == 0.1 and abs(hub.maps["big"].interval - 0.13) < 1e-9


def test_a_member_paused_between_the_maps_tick_and_its_cohorts_is_not_left_behind(clock):
    """The map's tick took a move its cohort had not sent yet when the member paused."""
    hub = Hub(clock, tick_interval=0.1, cohort_min=4, cohort_size=2)
    joined = [hubfakes.join(hub, high_water=200) for _ in range(4)]
    clock.advance(1)
    mover = joined[0][0]
    for member, view in joined:
        view.take()
    mover.move(move(seq=1))
    clock.advance(0)  # the map's tick runs at once; one cohort's slot is later
    # Which members share the later slot depends on the world's set order.
    slow, slow_view = next((m, v) for m, v in joined if m is not mover and m.cohort.dirty)
    assert hub.maps["m"].tick_call is None
    slow_view.stall()
    slow.send(b'{"type":"error","code":"bad_json","message":"' + b"x" * 300 + b'"}')
    assert slow_view.paused  # its transport paused it, before its cohort sent the move
    clock.advance(1)
    slow_view.drain()
    assert slow_view.sees()[mover.id]["seq"] == 1


def test_a_moved_pin_meets_only_the_view_groups_that_can_show_it() -> None:
    """
    A city's street, neighbourhood and city views: the index hands a point
    every group whose box holds it, and few others (with 10-degree cells it
    handed every view of the city).
    """
    import random

    from livemap_tx.hub.grid import ViewIndex
    from livemap_tx.wire import in_bbox

    rng = random.Random(20)
    index: ViewIndex[tuple] = ViewIndex()
    boxes = []
    for n in range(3000):
        half = rng.choice([0.0025, 0.015, 0.1])  # ~500 m, ~3 km, ~20 km wide
        lat, lng = 48.85 + rng.uniform(-0.1, 0.1), 2.35 + rng.uniform(-0.1, 0.1)
        box = (lng - half, lat - half, lng + half, lat + half)
        boxes.append(box)
        index.add(box, box)
    index.add((170.0, -10.0, -170.0, 10.0), (170.0, -10.0, -170.0, 10.0))
    for _ in range(200):
        lat, lng = 48.85 + rng.uniform(-0.12, 0.12), 2.35 + rng.uniform(-0.12, 0.12)
        near = list(index.near(lat, lng, None))
        assert len(near) == len(set(near))
        holding = {box for box in boxes if in_bbox(box, lat, lng)}
        assert holding <= set(near)
        assert len(near) <= 3 * len(holding) + 50, (len(near), len(holding))
    assert set(index.near(0.0, 179.0, None)) == {(170.0, -10.0, -170.0, 10.0)}
    assert set(index.near(0.0, -179.0, (48.85, 2.35))) >= {(170.0, -10.0, -170.0, 10.0)}
    for box in [*boxes, (170.0, -10.0, -170.0, 10.0)]:
        index.remove(box)
    assert index.empty()
