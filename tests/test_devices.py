"""Devices and their fixes, on the hub with a fake clock (devices.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

import hubfakes
from livemap_tx.phones.devices import (
    DEVICE_IDLE,
    Devices,
    DeviceError,
    Fix,
    Full,
    LocalDevices,
    NoSuchMap,
    TooFast,
    UnknownDevice,
    fix_version,
    looks_like_token,
    token_hash,
)
from livemap_tx.hub import DEVICES, Hub
from livemap_tx.maps import MapDirectory


def run(coroutine: Any) -> Any:
    """The result of a coroutine that finishes at once (the local store does)."""
    result = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(result.append)
    [outcome] = result
    if isinstance(outcome, Failure):
        outcome.raiseException()
    return outcome


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


@pytest.fixture
def hub(clock: Clock) -> Hub:
    ids = (f"id{n}" for n in itertools.count())
    return Hub(clock, tick_interval=0.1, new_id=lambda: next(ids), max_members=5)


@pytest.fixture
def maps(clock: Clock) -> MapDirectory:
    return MapDirectory(clock, min_ttl=10)


@pytest.fixture
def devices(hub: Hub, maps: MapDirectory, clock: Clock) -> Devices:
    return Devices(hub, maps, clock, rate=2.0, expire=3600.0)


def fix(clock: Clock, ago: float = 0.0, lat: float = 52.5, lng: float = 13.4,
        **extra: Any) -> Fix:
    return Fix(lat, lng, int((clock.seconds() - ago) * 1000), "owntracks", **extra)


def test_a_device_gets_a_long_random_token_kept_only_as_a_hash(devices, hub):
    token, device = run(devices.create("family", "Ada", "10.0.0.1"))
    assert looks_like_token(token) and len(token) == 32  # 192 bits
    assert device.token_hash == token_hash(token) != token
    assert token not in repr(devices.known) and token not in repr(devices.local.records)
    assert run(devices.find(token)) is device
    with pytest.raises(UnknownDevice):
        run(devices.find("x" * 32))


def test_a_report_moves_the_devices_pin_for_every_viewer(devices, hub, clock):
    viewer, view = hubfakes.join(hub, "family")
    token, device = run(devices.create("family", "Ada", "10.0.0.1"))
    taken = fix(clock, heading=90.0, battery=80, accuracy=5.0)
    outcome = run(devices.report(device, taken))
    assert outcome == "moved"
    clock.advance(0.1)
    pin = view.sees()[device.id]
    assert (pin["lat"], pin["lng"], pin["heading"], pin["name"]) == (52.5, 13.4, 90.0, "Ada")
    assert (pin["source"], pin["battery"], pin["accuracy"], pin["seq"]) == (
        "owntracks", 80, 5.0, None)
    assert pin["ts"] == taken.ts  # the time of the fix
    assert hub.maps["family"].pins[device.id].origin == DEVICES


def test_an_older_fix_never_moves_the_pin_back(devices, hub, clock):
    token, device = run(devices.create("family", None, "10.0.0.1"))
    assert run(devices.report(device, fix(clock, ago=10, lat=1.0))) == "moved"
    clock.advance(1)
    assert run(devices.report(device, fix(clock, ago=60, lat=2.0))) == "older"
    assert hub.pins("family")[0]["lat"] == 1.0


def test_a_fix_in_the_future_is_skipped_and_counted_a_little_is_not(devices, hub, clock):
    token, device = run(devices.create("family", None, "10.0.0.1"))
    # Skipped, not refused: an app resends a refused report (docs/protocol.md).
    assert run(devices.report(device, fix(clock, ago=-301))) == "future"
    assert hub.pins("family") == [] and devices.stats["skipped"] == 1
    assert run(devices.report(device, fix(clock, ago=-60))) == "moved"
    # Shown as of now, not as a time to come...
    assert hub.pins("family")[0]["ts"] == int(clock.seconds() * 1000)
    # ... and ordered as of now: the next fix, a second later, is newer.
    clock.advance(1)
    assert run(devices.report(device, fix(clock, lat=7.0))) == "moved"
    assert hub.pins("family")[0]["lat"] == 7.0


def test_a_fix_older_than_expire_makes_no_pin(devices, hub, clock):
    token, device = run(devices.create("family", None, "10.0.0.1"))
    assert run(devices.report(device, fix(clock, ago=3601))) == "expired"
    assert hub.pins("family") == []


def test_reports_faster_than_the_rate_are_held_and_the_newest_applied_later(devices, hub,
                                                                               clock):
    token, device = run(devices.create("family", None, "10.0.0.1"))
    assert run(devices.report(device, fix(clock, ago=5, lat=1.0))) == "moved"
    assert run(devices.report(device, fix(clock, ago=4, lat=2.0))) == "moved"
    # Too soon: taken (never refused), and the newest of them is kept.
    assert run(devices.report(device, fix(clock, ago=2, lat=4.0))) == "held"
    assert run(devices.report(device, fix(clock, ago=3, lat=3.0))) == "held"
    assert devices.stats["held"] == 2 and hub.pins("family")[0]["lat"] == 2.0
    clock.advance(0.5)  # a token at --rate 2
    hub.maps["family"].tick()
    assert hub.pins("family")[0]["lat"] == 4.0 and device.held is None
    assert run(devices.report(device, fix(clock, lat=5.0))) == "held"
    clock.advance(0.5)
    assert hub.pins("family")[0]["lat"] == 5.0


def test_creations_from_one_address_admit_a_venue_and_stop_a_flood(devices, clock):
    """120 people behind one NAT address set up their phones within a minute."""
    devices.hub.max_members = 1000
    for _ in range(120):
        run(devices.create("family", None, "10.0.0.1"))
        clock.advance(0.1)
    with pytest.raises(TooFast):
        run(devices.create("family", None, "10.0.0.1"))
    run(devices.create("family", None, "10.0.0.2"))  # another address
    flood = 0
    for _ in range(1000):  # a flood over the next minute: one every 30 s gets through
        try:
            run(devices.create("family", None, "10.0.0.1"))
            flood += 1
        except TooFast:
            pass
        clock.advance(0.06)
    assert flood <= 3


def test_the_creation_burst_is_an_option(hub, maps, clock):
    few = Devices(hub, maps, clock, create_burst=2)
    hub.max_members = 100
    run(few.create("family", None, "10.0.0.1"))
    run(few.create("family", None, "10.0.0.1"))
    with pytest.raises(TooFast, match="at most 2 devices"):
        run(few.create("family", None, "10.0.0.1"))


def test_device_pins_count_toward_the_maps_places(devices, hub, clock):
    members = [hubfakes.join(hub, "small")[0] for _ in range(3)]
    created = [run(devices.create("small", None, f"10.0.0.{n}")) for n in range(2)]
    for _, device in created:
        run(devices.report(device, fix(clock)))
    with pytest.raises(Full):
        run(devices.create("small", None, "10.0.0.9"))
    assert not hub.can_join("small")
    members[0].leave()
    assert hub.can_join("small")


def test_the_pin_expires_after_expire_without_a_fix_and_comes_back(devices, hub, clock):
    viewer, view = hubfakes.join(hub, "family")
    token, device = run(devices.create("family", None, "10.0.0.1"))
    run(devices.report(device, fix(clock)))
    clock.advance(3000)
    assert hub.expire_pins(3600) == 0
    clock.advance(601)
    assert hub.expire_pins(3600) == 1
    clock.advance(0.1)
    assert view.sees() == {}
    run(devices.report(device, fix(clock)))
    clock.advance(0.1)
    assert set(view.sees()) == {device.id}


def test_deleting_a_device_removes_its_pin_and_refuses_its_token(devices, hub, clock):
    viewer, view = hubfakes.join(hub, "family")
    token, device = run(devices.create("family", None, "10.0.0.1"))
    run(devices.report(device, fix(clock)))
    clock.advance(0.1)
    run(devices.delete(token))
    clock.advance(0.1)
    assert view.sees() == {}
    with pytest.raises(UnknownDevice):
        run(devices.find(token))
    with pytest.raises(UnknownDevice):
        run(devices.delete(token))


def test_a_private_maps_expiry_removes_its_devices(hub, clock):
    maps = MapDirectory(clock, open_maps=False, min_ttl=10)
    devices = Devices(hub, maps, clock)
    maps.on_expire = devices.forget_map
    private = maps.create(ttl=60)
    viewer, view = hubfakes.join(hub, private.name)
    token, device = run(devices.create(private.name, "Ada", "10.0.0.1"))
    assert device.expires == private.expires
    run(devices.report(device, fix(clock)))
    clock.advance(0.1)
    assert set(view.sees()) == {device.id}
    clock.advance(60)
    clock.advance(0.1)
    assert view.sees() == {}
    with pytest.raises(UnknownDevice):
        run(devices.find(token))
    with pytest.raises(NoSuchMap):
        run(devices.create(private.name, None, "10.0.0.1"))
    with pytest.raises(NoSuchMap):
        run(devices.create("not-made", None, "10.0.0.1"))


def test_an_idle_device_is_forgotten(devices, clock):
    token, device = run(devices.create("family", None, "10.0.0.1"))
    devices.known.clear()
    clock.advance(DEVICE_IDLE - 1)
    assert run(devices.find(token)).id == device.id
    devices.known.clear()
    clock.advance(2)
    with pytest.raises(UnknownDevice):
        run(devices.find(token))


def test_precision_coarsens_app_fed_pins_too(hub, maps, clock):
    devices = Devices(hub, maps, clock, precision=1000)
    token, device = run(devices.create("family", None, "10.0.0.1"))
    run(devices.report(device, fix(clock, lat=48.85837, lng=2.29448, accuracy=5.0)))
    [pin] = hub.pins("family")
    assert (pin["lat"], pin["lng"]) != (48.85837, 2.29448) and pin["accuracy"] == 1000


def test_equal_times_are_ordered_by_content_the_same_everywhere(clock):
    first = fix(clock, lat=1.0)
    second = fix(clock, lat=2.0)
    assert fix_version(first) != fix_version(second)
    assert fix_version(first) // 65536 == first.ts
    assert fix_version(fix(clock, lat=1.0)) == fix_version(first)


class SharedStore:
    """A cluster's store as one node sees it: other nodes change it too (`truth`)."""

    def __init__(self) -> None:
        self.truth = LocalDevices()
        self.finds = 0

    def add_device(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        return self.truth.add_device(*args, **kwargs)

    def find_device(self, token_hash: str, now_ms: float) -> defer.Deferred:
        self.finds += 1
        return self.truth.find_device(token_hash, now_ms)

    def remove_device(self, *args: Any) -> defer.Deferred:
        return self.truth.remove_device(*args)

    def save_fix(self, *args: Any) -> defer.Deferred:
        return self.truth.save_fix(*args)


def test_in_a_cluster_every_request_asks_the_store_and_keeps_its_rate_limit(hub, maps, clock):
    shared = SharedStore()
    devices = Devices(hub, maps, clock, rate=1.0, store=shared)
    token, device = run(devices.create("family", None, "10.0.0.1"))
    found = run(devices.find(token))
    assert found is device and shared.finds == 1  # the same device: the same limit
    assert run(devices.report(found, fix(clock))) == "moved"
    # Found again, it is the same device with the same budget: a report too
    # soon is held (never refused: docs/protocol.md), not taken at once.
    assert run(devices.report(run(devices.find(token)), fix(clock, lat=1.0))) == "held"
    assert shared.finds == 2
    # Another node deletes it: the next request here is refused, whatever
    # it holds (no fix to save, or one too old to show).
    shared.truth.remove(device.token_hash)
    with pytest.raises(UnknownDevice):
        run(devices.find(token))
    assert device.token_hash not in devices.known


def test_a_device_deleted_elsewhere_is_never_written_back_nor_shown_again(hub, maps, clock):
    shared = SharedStore()
    devices = Devices(hub, maps, clock, store=shared)
    viewer, view = hubfakes.join(hub, "family")
    token, device = run(devices.create("family", None, "10.0.0.1"))
    kept_token, kept = run(devices.create("family", None, "10.0.0.1"))
    state = devices.state(device, fix(clock), clock.seconds())
    devices.apply("family", [dict(state, version=1)])
    clock.advance(0.1)
    assert set(view.sees()) == {device.id}
    # Told by the node that deleted it (even for a map this node does not serve).
    devices.remote_gone("family", [device.id], [device.token_hash])
    devices.remote_gone("elsewhere", ["p9"], ["h9"])
    assert "elsewhere" not in hub.maps
    clock.advance(0.1)
    assert view.sees() == {}
    assert [key for key, _, _ in devices.known_records()] == [kept.token_hash]
    # A fix of it that comes late (from a node that had not heard) shows nothing.
    devices.apply("family", [dict(state, version=2)])
    clock.advance(0.1)
    assert view.sees() == {}
    # And should a store bring it back (a node cut off then restored it), it
    # stays refused here.
    shared.truth.add(device.token_hash, device.record(), clock.seconds() * 1000 + 1e6,
                     cap=10, now_ms=clock.seconds() * 1000)
    with pytest.raises(UnknownDevice):
        run(devices.find(token))
    assert run(devices.find(kept_token)) is kept


def test_deleted_devices_are_remembered_for_a_bounded_number_and_time(hub, maps, clock):
    devices = Devices(hub, maps, clock, max_devices=3)
    for n in range(5):
        devices.forget_deleted(f"h{n}", f"p{n}", "family")
    assert list(devices.deleted) == ["h2", "h3", "h4"]
    assert devices.deleted_pins == {"p2", "p3", "p4"}
    clock.advance(DEVICE_IDLE + 1)
    devices.forget_deleted("h5", "p5", "family")
    assert list(devices.deleted) == ["h5"] and devices.deleted_pins == {"p5"}
