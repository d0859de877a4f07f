"""
SockJS clients that stop polling on a busy map, over real HTTP on
127.0.0.1: the session pauses its member from inside the broadcast's write
when its queue passes the high-water mark, exactly as it would in the field.
(WebSocket clients that stop reading: tests/test_ws.py.)
"""

from __future__ import annotations

import pytest
import pytest_twisted

from conftest import deferLater, eventually
from liveclients import open_view, sockjs_session
from livemap_tx import wire
from livemap_tx.sockjs.session import SessionOptions

HIGH_WATER = SessionOptions().outgoing_high_water


@pytest.fixture
def logged_failures():
    """Failures logged while the test runs (a tick that dies logs one)."""
    from twisted.logger import globalLogPublisher

    failures: list = []

    def observe(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event["log_failure"])
    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


def snapshot_size(server, map_name: str) -> int:
    pins = server.hub.maps[map_name].pins.values()
    return len(wire.encode_snapshot([pin.json() for pin in pins])) + 8


@pytest_twisted.ensureDeferred
async def test_a_sockjs_client_that_stops_polling_is_paused_mid_broadcast(
        server, logged_failures):
    poller = await sockjs_session(server.url, "slow", map_name="busy")
    await poller.poll()  # the welcome
    member = server.hub.maps["busy"].members[poller.view.id]
    connection = member.subscriber.connection
    movers = [await open_view(server.ws_url("busy")) for _ in range(8)]
    for number, mover in enumerate(movers):
        mover.hello(f"mover {number} " + "x" * 50)
        mover.move(1, number, seq=0)
    for mover in movers:
        await mover.until(lambda pins: len(pins) == 8 and all(
            name and name.startswith("mover") for _, _, name in pins.values()))
    # It stops polling; what it asks for piles up in its session to just
    # under the mark, so that the next broadcast goes over it.
    size = snapshot_size(server, "busy")
    while connection.buffered_bytes + size <= HIGH_WATER:
        await poller.send({"type": "view", "bbox": None})
    assert member.paused_at is None
    seq = 0
    while member.paused_at is None:
        seq += 1
        for number, mover in enumerate(movers):
            mover.move(2, number, seq=seq)
        await deferLater(0.12)
        assert seq < 20, "never paused"
    for mover in movers:
        await mover.until(lambda pins: all(mover.states[i]["seq"] == seq for i in pins))
    skips = server.hub.stats.slow_skips
    for number, mover in enumerate(movers):
        mover.move(3, number, seq=seq + 1)
    await movers[0].until(lambda pins: all(movers[0].states[i]["seq"] == seq + 1 for i in pins))
    assert server.hub.stats.slow_skips > skips
    assert connection.buffered_bytes <= HIGH_WATER + 16 * 1024  # nothing more was queued
    # It polls again: what was queued, then one catch-up with the latest states.
    for _ in range(3):  # a poll with nothing queued waits: poll only while short
        await poller.poll()
        if all(poller.view.states.get(mover.id, {}).get("seq") == seq + 1
               for mover in movers):
            break
    else:
        raise AssertionError(f"no catch-up: {poller.view.states}")
    assert logged_failures == []
    for mover in movers:
        mover.client.close()
        await mover.client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_catch_up_that_fills_the_session_again_waits_for_the_next_poll(
        server, logged_failures):
    """
    On a map of 600 pins (another node's), every catch-up is over the mark:
    the session pauses its member again from inside that write, and no tick
    is queued behind it; the session is never cut off for a full queue (1013).
    """
    versions = {f"r{n}": 1 for n in range(600)}

    def move_all(lat: float) -> None:
        states = []
        for pin_id in versions:
            versions[pin_id] += 1
            states.append({"id": pin_id, "version": versions[pin_id], "lat": lat,
                           "lng": 2.0, "heading": None, "accuracy": None,
                           "name": "far away " + pin_id, "seq": versions[pin_id], "ts": 1})
        server.hub.apply_remote("crowd", "node-b", states)

    watcher = await open_view(server.ws_url("crowd"))
    move_all(1.0)
    await watcher.until(lambda pins: len(pins) == 600)
    poller = await sockjs_session(server.url, "slow", map_name="crowd")
    member = server.hub.maps["crowd"].members
    for lat in range(2, 30):
        move_all(float(lat))
        await deferLater(0.1)
        if lat % 8 == 0:
            await poller.poll()  # it polls now and then, never enough
            assert poller.closed is None
    assert server.hub.stats.slow_skips > 0
    [slow] = [m for m in member.values() if m.id == poller.view.id]
    assert slow.paused_at is not None
    assert slow.subscriber.connection.buffered_bytes < 256 * 1024
    for _ in range(10):
        await poller.poll()
        assert poller.closed is None
        if all(state["lat"] == 29.0 for state in poller.view.states.values()):
            break
    assert len(poller.view.states) == 600
    assert {state["lat"] for state in poller.view.states.values()} == {29.0}
    await eventually(lambda: slow.paused_at is None, "drained")
    assert logged_failures == []
    watcher.client.close()
    await watcher.client.wait_closed()
