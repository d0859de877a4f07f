"""The hub's state and fan-out rules, with a fake clock and fake subscribers."""

from __future__ import annotations

import itertools

import orjson
import pytest
from twisted.internet.task import Clock

from livemap_tx.hub import Frame, Hub
from livemap_tx.wire import Move


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
    assert hub.maps["m"].groups == {} and hub.maps["m"].view_cells == {}


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


def test_slow_subscriber_is_skipped_then_caught_up_with_latest_states(hub, clock):
    slow, slow_out = join(hub)
    mover, _ = join(hub)
    leaver, _ = join(hub)
    leaver.move(move())
    clock.advance(1)
    slow_out.take()
    slow.pause()
    for seq in range(5):
        mover.move(move(lat=seq, seq=seq))
        clock.advance(1)
    leaver.leave()
    clock.advance(1)
    assert slow_out.take() == []
    assert hub.stats.slow_skips == 6
    slow.resume()
    [catch_up] = slow_out.take()
    assert [(p["id"], p["seq"]) for p in catch_up["pins"]] == [("id1", 4)]
    assert catch_up["gone"] == ["id2"]
    mover.move(move(seq=9))
    clock.advance(1)
    assert slow_out.take()[0]["pins"][0]["seq"] == 9


def test_slow_subscriber_is_closed_after_the_timeout(hub, clock):
    slow, slow_out = join(hub)
    mover, _ = join(hub)
    slow.pause()
    for _ in range(29):
        mover.move(move())
        clock.advance(1)
    assert slow_out.closed is None
    mover.move(move())
    clock.advance(1.5)
    assert slow_out.closed == (1008, "too slow: not reading")
    assert hub.stats.slow_closes == 1


def test_slow_subscriber_missed_set_is_bounded(clock):
    hub = Hub(clock, max_missed=10)
    slow_sub = FakeSubscriber()
    slow = hub.join("m", slow_sub)
    slow.pause()
    for _ in range(12):
        hub.join("m", FakeSubscriber()).move(move())
    clock.advance(1)
    assert slow_sub.closed is not None


def test_paused_member_can_change_view_and_resumes_into_it(hub, clock):
    slow, out = join(hub)
    mover, _ = join(hub)
    slow.pause()
    slow.set_view((0, 0, 10, 10))
    assert out.take()[-1]["type"] == "snapshot"
    mover.move(move(lat=5, lng=5))
    clock.advance(1)
    slow.resume()
    assert out.take()[0]["pins"][0]["id"] == "id1"
    mover.move(move(lat=6, lng=6))
    clock.advance(1)
    assert out.take()[0]["pins"][0]["lat"] == 6


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
