"""The WebSocket endpoint over real sockets on 127.0.0.1 (PROTOCOL.md end to end)."""

from __future__ import annotations

import pytest
import pytest_twisted

from conftest import deferLater, start_server, stop_server
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


@pytest_twisted.ensureDeferred
async def test_flow_control_skips_a_paused_client_and_catches_it_up(server):
    """Twisted's pause/resume of a socket reaches the hub: skipped, then one catch-up."""
    slow = await connect(server.ws_url("flow"))
    slow_id = (await slow.next("welcome"))["id"]
    mover = await connect(server.ws_url("flow"))
    await mover.next("welcome")
    protocol = server_side(server, slow_id)
    producer = protocol.transport.producer  # what Twisted calls when the buffer fills
    producer.pauseProducing()
    for seq in range(3):
        mover.send({"type": "move", "lat": 1, "lng": seq, "seq": seq})
        await mover.until(lambda m, s=seq: m["type"] == "update"
                          and any(p["seq"] == s for p in m["pins"]))
    assert server.hub.stats.slow_skips >= 1
    assert slow.messages == []
    # Nor is it read from while it does not read: its messages wait.
    slow.send({"type": "move", "lat": 5, "lng": 5, "seq": 77})
    slow.send_raw(b"garbage")
    await deferLater(0.2)
    assert all(pin["seq"] != 77 for pin in server.hub.pins("flow"))
    producer.resumeProducing()
    catch_up = await slow.next("update")
    assert [pin["seq"] for pin in catch_up["pins"]] == [2]  # only the latest state
    assert (await slow.next("error"))["code"] == "bad_json"  # read once resumed
    await mover.until(lambda m: m["type"] == "update" and any(p["seq"] == 77 for p in m["pins"]))
    mover.send({"type": "move", "lat": 1, "lng": 9, "seq": 9})
    await slow.until(lambda m: m["type"] == "update" and any(p["seq"] == 9 for p in m["pins"]))
    for client in (slow, mover):
        client.close()
        await client.wait_closed()


@pytest_twisted.ensureDeferred
async def test_client_stuck_past_the_slow_timeout_is_closed():
    live = await start_server("--slow-timeout", "0.3")
    try:
        slow = await connect(live.ws_url("stuck"))
        slow_id = (await slow.next("welcome"))["id"]
        mover = await connect(live.ws_url("stuck"))
        await mover.next("welcome")
        protocol = server_side(live, slow_id)
        protocol.transport.producer.pauseProducing()
        for seq in range(6):
            mover.send({"type": "move", "lat": 1, "lng": 1, "seq": seq})
            await deferLater(0.1)
        code, reason = await slow.wait_closed()
        assert (code, reason) == (1008, "too slow: not reading")
        assert live.hub.stats.slow_closes == 1
        mover.close()
        await mover.wait_closed()
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
