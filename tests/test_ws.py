"""The WebSocket endpoint over real sockets on 127.0.0.1 (docs/protocol.md end to end)."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted

from conftest import deferLater, start_server, stop_server
from liveclients import MapView, open_view, start_reading, stop_reading
from livemap_tx import wire
from wsclient import connect

MOVE = {"type": "move", "lat": 48.85, "lng": 2.35, "heading": 90, "accuracy": 5, "seq": 1}


def server_side(server, client_id: str):
    """The server's protocol instance of the client with this pin id."""
    [protocol] = [p for p in server.factory.protocols if p.client and p.client.id == client_id]
    return protocol


def pin_ids(message: dict) -> set:
    return {pin["id"] for pin in message["pins"]}


@pytest_twisted.ensureDeferred
async def test_welcome_then_moves_reach_every_client(server):
    """Welcome comes first; a move reaches every client, the sender included."""
    alice = await connect(server.ws_url("walk"))
    welcome = await alice.next()
    assert welcome["type"] == "welcome" and welcome["pins"] == [] and welcome["id"]
    bob = await connect(server.ws_url("walk"))
    bob_welcome = await bob.next("welcome")
    assert bob_welcome["id"] != welcome["id"]

    alice.send(MOVE)
    for client in (alice, bob):
        update = await client.next("update")
        assert update["gone"] == []
        [pin] = update["pins"]
        assert pin["id"] == welcome["id"]
        assert (pin["lat"], pin["lng"], pin["heading"], pin["accuracy"], pin["seq"]) == (
            48.85, 2.35, 90, 5, 1)
        assert pin["name"] is None and isinstance(pin["ts"], int)

    carol = await connect(server.ws_url("walk"))
    assert pin_ids(await carol.next("welcome")) == {welcome["id"]}
    for client in (alice, bob, carol):
        client.close()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_maps_are_separate(server):
    alice = await connect(server.ws_url("one"))
    await alice.next("welcome")
    bob = await connect(server.ws_url("two"))
    await bob.next("welcome")
    alice.send(MOVE)
    await alice.next("update")
    carol = await connect(server.ws_url("two"))
    assert (await carol.next("welcome"))["pins"] == []
    assert bob.messages == []
    for client in (alice, bob, carol):
        client.close()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_hello_names_the_pin_for_everyone(server):
    alice = await connect(server.ws_url("names"))
    me = (await alice.next("welcome"))["id"]
    bob = await connect(server.ws_url("names"))
    await bob.next("welcome")
    alice.send({"type": "hello", "name": "  Alice  "})
    alice.send(MOVE)
    update = await bob.until(lambda m: m["type"] == "update" and m["pins"])
    assert update["pins"][0]["name"] == "Alice"
    alice.send({"type": "hello", "name": "Al"})
    update = await bob.until(lambda m: m["type"] == "update" and m["pins"])
    assert [(p["id"], p["name"]) for p in update["pins"]] == [(me, "Al")]
    alice.close()
    bob.close()
    await alice.wait_closed()
    await bob.wait_closed()


@pytest_twisted.ensureDeferred
async def test_closed_connection_pin_is_gone_for_everyone(server):
    alice = await connect(server.ws_url("leave"))
    alice_id = (await alice.next("welcome"))["id"]
    bob = await connect(server.ws_url("leave"))
    await bob.next("welcome")
    alice.send(MOVE)
    await bob.next("update")
    alice.abort()
    update = await bob.until(lambda m: m["type"] == "update" and m["gone"])
    assert update["gone"] == [alice_id]
    bob.close()
    await bob.wait_closed()


@pytest_twisted.ensureDeferred
async def test_view_snapshot_and_filtered_updates(server):
    """A view limits what is sent; leaving the box reads as gone."""
    watcher = await connect(server.ws_url("views"))
    await watcher.next("welcome")
    mover = await connect(server.ws_url("views"))
    mover_id = (await mover.next("welcome"))["id"]
    mover.send({"type": "move", "lat": 10, "lng": 10})
    await watcher.next("update")
    watcher.send({"type": "view", "bbox": [170, -10, -170, 10]})  # across the antimeridian
    assert (await watcher.next("snapshot"))["pins"] == []
    mover.send({"type": "move", "lat": 1, "lng": 179.5})
    update = await watcher.until(lambda m: m["type"] == "update" and m["pins"])
    assert pin_ids(update) == {mover_id}
    mover.send({"type": "move", "lat": 1, "lng": 0})
    update = await watcher.until(lambda m: m["type"] == "update" and m["gone"])
    assert update["gone"] == [mover_id] and update["pins"] == []
    watcher.send({"type": "view", "bbox": None})
    assert pin_ids(await watcher.next("snapshot")) == {mover_id}
    for client in (watcher, mover):
        client.close()
        await client.wait_closed()


@pytest.mark.parametrize("payload, code", [
    (b"not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"type": "jump"}', "bad_message"),
    (b'{"type": "move", "lat": "north", "lng": 0}', "bad_message"),
    (b'{"type": "move", "lat": 91, "lng": 0}', "out_of_range"),
    (b'{"type": "move", "lat": NaN, "lng": 0}', "out_of_range"),
    (b'{"type": "move", "lat": 1e999, "lng": 0}', "out_of_range"),
    (b'{"type": "hello", "name": "   "}', "bad_message"),
])
@pytest_twisted.ensureDeferred
async def test_bad_frames_get_errors_and_the_connection_stays(server, payload, code):
    client = await connect(server.ws_url())
    await client.next("welcome")
    client.send_raw(payload)
    error = await client.next("error")
    assert error["code"] == code and error["message"]
    client.send(MOVE)  # still served
    assert (await client.next("update"))["pins"]
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_binary_frame_is_bad_message(server):
    client = await connect(server.ws_url())
    await client.next("welcome")
    client.send_raw(b'{"type": "move", "lat": 1, "lng": 1}', binary=True)
    assert (await client.next("error"))["code"] == "bad_message"
    client.close()
    await client.wait_closed()


@pytest.mark.parametrize("size", [4097, 100_000])
@pytest_twisted.ensureDeferred
async def test_too_big_closes_with_1009(server, size):
    client = await connect(server.ws_url())
    await client.next("welcome")
    client.send_raw(b'{"type":"hello","name":"' + b"x" * size + b'"}')
    code, _ = await client.wait_closed()
    assert code == 1009
    if size < 65536:
        assert any(m.get("code") == "too_big" for m in client.messages)


@pytest_twisted.ensureDeferred
async def test_rate_limit_drops_excess_and_warns_once(server):
    client = await connect(server.ws_url("rate"))
    await client.next("welcome")
    for seq in range(30):
        client.send({**MOVE, "seq": seq})
    error = await client.next("error")
    assert error["code"] == "rate_limited"
    await deferLater(0.3)
    errors = [m for m in client.messages if m["type"] == "error"]
    assert errors == []  # at most one such error a second
    seqs = [pin["seq"] for m in client.messages if m["type"] == "update" for pin in m["pins"]]
    assert seqs and max(seqs) < 30 and seqs == sorted(seqs)
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_bad_map_name_refuses_the_upgrade(server):
    with pytest.raises(Exception):
        await connect(server.ws_url("no.such"))
    with pytest.raises(Exception):
        await connect(server.ws_url("x" * 65))


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_clients_with_1001():
    live = await start_server()
    client = await connect(live.ws_url())
    await client.next("welcome")
    await stop_server(live)
    code, _ = await client.wait_closed()
    assert code == 1001


@pytest_twisted.ensureDeferred
async def test_silent_peer_is_closed_after_ping_timeout():
    """A connection that answers no ping is dropped and its pin goes."""
    live = await start_server("--ping", "1")
    try:
        watcher = await connect(live.ws_url("ping"))
        await watcher.next("welcome")
        silent = await connect(live.ws_url("ping"))
        silent_id = (await silent.next("welcome"))["id"]
        silent.send(MOVE)
        await watcher.next("update")
        # Stop reading: no pongs go back.
        silent.protocol.transport.pauseProducing()
        update = await watcher.until(lambda m: m["type"] == "update" and m["gone"], timeout=10)
        assert update["gone"] == [silent_id]
        silent.protocol.transport.resumeProducing()
        watcher.close()
        await watcher.wait_closed()
        await silent.wait_closed()
    finally:
        await stop_server(live)


def server_buffered(protocol) -> int:
    """Bytes in Twisted's write buffer of a server-side connection (Twisted's own fields)."""
    transport = protocol.transport
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def count_calls(obj, method: str) -> list:
    """Wrap one instance's method; the returned one-item list counts its calls."""
    calls = [0]
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    setattr(obj, method, counted)
    return calls


async def stall(server, client, client_id: str):
    """
    The client stops reading and its server-side buffer is brought to just
    under Twisted's mark with snapshots it asks for: the next broadcast
    fills it, and Twisted pauses the member from inside that write.
    """
    protocol = server_side(server, client_id)
    protocol.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stop_reading(client)
    mark = protocol.transport.bufferSize
    snapshot = len(wire.encode_snapshot([pin.json() for pin in
                                         server.hub.maps[protocol.map_name].pins.values()]))
    handled = count_calls(protocol.client, "message_received")
    for _ in range(1000):
        if server_buffered(protocol) + snapshot > mark:
            break
        asked = handled[0] + 1
        client.send({"type": "view", "bbox": None})
        # Measure only once the server has written this answer: on a busy
        # machine a timer can fire before the server reads the request.
        for _ in range(1000):
            if handled[0] >= asked:
                break
            await deferLater(0.002)
        else:
            raise AssertionError("the server never read the view request")
        await deferLater(0.005)  # the kernel's buffers take the first ones
    else:
        raise AssertionError("the server's buffer never filled")
    assert protocol.client.member.paused_at is None
    return protocol


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


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_paused_mid_broadcast_and_caught_up(
        server, logged_failures):
    """
    Twisted pauses a client whose buffer fills from inside a broadcast's
    write: the tick still reaches every other client, the client is skipped
    and not read from, and one catch-up brings it the latest states.
    """
    slow = await connect(server.ws_url("flow"))
    slow_id = (await slow.next("welcome"))["id"]
    movers = [await open_view(server.ws_url("flow")) for _ in range(8)]
    for number, mover in enumerate(movers):
        mover.hello(f"mover {number} " + "x" * 50)
        mover.move(1, number, seq=0)
    for mover in movers:
        await mover.until(lambda pins: len(pins) == 8 and all(
            name and name.startswith("mover") for _, _, name in pins.values()))
    protocol = await stall(server, slow, slow_id)
    member = protocol.client.member
    seq = 0
    while member.paused_at is None:
        seq += 1
        for number, mover in enumerate(movers):
            mover.move(2, number, seq=seq)
        await deferLater(0.12)
        assert seq < 20, "never paused"
    # The tick that paused it went to everyone else.
    for mover in movers:
        await mover.until(lambda pins: all(
            mover.states[i]["seq"] == seq for i in pins) and len(pins) == 8)
    assert logged_failures == []
    # Skipped from now on, and not read from while it does not read.
    skips = server.hub.stats.slow_skips
    for number, mover in enumerate(movers):
        mover.move(3, number, seq=seq + 1)
    await movers[0].until(lambda pins: all(movers[0].states[i]["seq"] == seq + 1 for i in pins))
    assert server.hub.stats.slow_skips > skips
    slow.send({"type": "move", "lat": 5, "lng": 5, "seq": 77})
    slow.send_raw(b"garbage")
    await deferLater(0.2)
    assert all(pin["seq"] != 77 for pin in server.hub.pins("flow"))
    # It reads again: what was buffered, then one catch-up with the latest states.
    view = MapView(slow)
    view.id = slow_id
    start_reading(slow)
    mover_ids = {mover.id for mover in movers}
    await view.until(lambda pins: mover_ids <= set(pins) and all(
        view.states[i]["seq"] == seq + 1 for i in mover_ids))
    assert (await slow.until(lambda m: m["type"] == "error"))["code"] == "bad_json"
    await movers[0].until(lambda pins: slow_id in pins)
    for client in [slow] + [mover.client for mover in movers]:
        client.close()
        await client.wait_closed()
    assert logged_failures == []


@pytest_twisted.ensureDeferred
async def test_client_stuck_past_the_slow_timeout_is_closed():
    live = await start_server("--slow-timeout", "0.3")
    try:
        slow = await connect(live.ws_url("stuck"))
        slow_id = (await slow.next("welcome"))["id"]
        movers = [await open_view(live.ws_url("stuck")) for _ in range(8)]
        for mover in movers:
            mover.hello("m" * 64)
            mover.move(1, 1)
        await movers[0].until(lambda pins: len(pins) == 8)
        await stall(live, slow, slow_id)
        for seq in range(30):
            for mover in movers:
                mover.move(1, 1, seq=seq)
            await deferLater(0.1)
            if live.hub.stats.slow_closes:
                break
        # It reads again (before Autobahn gives up on the close handshake):
        # what was buffered, then the close frame.
        start_reading(slow)
        code, reason = await slow.wait_closed()
        assert (code, reason) == (1008, "too slow: not reading")
        assert live.hub.stats.slow_closes == 1
        for mover in movers:
            mover.client.close()
            await mover.client.wait_closed()
    finally:
        await stop_server(live)


@pytest_twisted.ensureDeferred
async def test_frames_written_through_the_socket_keep_order_when_it_fills(server):
    """Direct writes leave the rest to Twisted when the kernel buffer is full; order holds."""
    from livemap_tx.hub import Frame
    from twisted.internet import reactor as the_reactor

    client = await connect(server.ws_url("big"))
    client_id = (await client.next("welcome"))["id"]
    protocol = server_side(server, client_id)
    big = b'{"type":"snapshot","pins":[],"pad":"' + b"x" * 4_000_000 + b'"}'
    small = b'{"type":"update","pins":[],"gone":["after"]}'
    protocol.send_frame(Frame(big))
    # The kernel took part; the rest waits in Twisted's buffer for the reactor.
    assert protocol.transport._tempDataBuffer or protocol.transport.dataBuffer
    protocol.send_frame(Frame(small))
    first = await client.next(timeout=20)
    second = await client.next(timeout=20)
    assert (first["type"], len(first["pad"])) == ("snapshot", 4_000_000)
    assert second["gone"] == ["after"]
    # An empty buffer is written at once, without waiting for the reactor.
    protocol.send_frame(Frame(small))
    assert not protocol.transport._tempDataBuffer
    assert protocol.transport not in the_reactor.getWriters()
    await client.next()
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_connections_carry_the_factory_settings_without_copying_them(server):
    """Idle connections stay small: Autobahn's ~30 settings live on a class, not per connection."""
    client = await connect(server.ws_url())
    client_id = (await client.next("welcome"))["id"]
    protocol = server_side(server, client_id)
    assert protocol.autoPingInterval == 30.0 and protocol.maxMessagePayloadSize == 64 * 1024
    assert "autoPingInterval" not in vars(protocol)
    assert not any(name in vars(protocol) for name in type(protocol).CONFIG_ATTRS)
    # Nor the opening handshake, nor statistics nobody reads.
    other = await connect(server.ws_url())
    other_id = (await other.next("welcome"))["id"]
    assert server_side(server, other_id).trafficStats is protocol.trafficStats
    assert protocol.http_headers == {} and protocol.http_request_data is None
    other.close()
    await other.wait_closed()
    client.close()
    await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_a_client_offering_permessage_deflate_is_served_uncompressed(server):
    """Browsers offer compression; livemap declines it (one encoding for every client)."""
    from autobahn.websocket.compress import PerMessageDeflateOffer

    client = await connect(server.ws_url(), offers=[PerMessageDeflateOffer()])
    assert (await client.next())["type"] == "welcome"
    assert client.protocol._perMessageCompress is None
    client.close()
    await client.wait_closed()
