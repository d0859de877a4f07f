"""The transport-neutral client: size limit, errors, and the move rate limit."""

from __future__ import annotations

import orjson
import pytest
from twisted.internet.task import Clock

from livemap_tx.transports.client import Client, MoveLimiter
from livemap_tx.hub import Hub

from test_hub import FakeSubscriber

MOVE = b'{"type":"move","lat":1,"lng":2}'


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def client(clock):
    hub = Hub(clock)
    out = FakeSubscriber()
    live = Client(hub, "m", out, rate=10)
    out.take()
    return live, out, hub


def errors(out) -> list[str]:
    return [m["code"] for m in out.take() if m["type"] == "error"]


def test_limiter_allows_rate_per_second_with_a_burst_of_rate(clock):
    limiter = MoveLimiter(clock, rate=10)
    verdicts = [limiter.check() for _ in range(12)]
    assert verdicts[:10] == [MoveLimiter.ACCEPT] * 10
    assert verdicts[10:] == [MoveLimiter.WARN, MoveLimiter.DROP]
    clock.advance(0.1)
    assert limiter.check() == MoveLimiter.ACCEPT
    assert limiter.check() == MoveLimiter.DROP  # warned less than a second ago
    clock.advance(1.0)
    assert [limiter.check() for _ in range(10)] == [MoveLimiter.ACCEPT] * 10


def test_limiter_steady_rate_is_never_dropped(clock):
    limiter = MoveLimiter(clock, rate=10)
    for _ in range(100):
        assert limiter.check() == MoveLimiter.ACCEPT
        clock.advance(0.1)


def test_limiter_closes_a_flood_and_only_a_flood(clock):
    """Twice the rate: closed once the excess passes ten seconds' worth (after ~10 s)."""
    limiter = MoveLimiter(clock, rate=10)
    verdicts = []
    for _ in range(180):  # 20 moves a second for 9 s: 90 over, within the allowance
        verdicts.append(limiter.check())
        clock.advance(0.05)
    assert MoveLimiter.CLOSE not in verdicts
    for _ in range(60):
        verdicts.append(limiter.check())
        clock.advance(0.05)
    assert MoveLimiter.CLOSE in verdicts[180:]


def test_limiter_forgives_after_a_quiet_while(clock):
    limiter = MoveLimiter(clock, rate=10)
    for _ in range(50):
        for _ in range(20):
            assert limiter.check() != MoveLimiter.CLOSE
        clock.advance(2.0)  # 20 moves every 2 s: the rate on average


def test_rate_limited_error_at_most_once_a_second_then_1008(client, clock):
    live, out, hub = client
    for _ in range(15):
        live.message_received(MOVE)
    assert errors(out) == ["rate_limited"]
    assert hub.stats.moves_accepted == 10 and hub.stats.rejected == {"rate_limited": 5}
    for _ in range(20):  # ten times the rate
        clock.advance(0.1)
        for _ in range(10):
            live.message_received(MOVE)
    assert out.closed == (1008, "rate limit exceeded")


def test_the_newest_move_over_the_limit_is_applied_once_the_limit_allows(client, clock):
    """Moves that queued up unread arrive at once: the pin ends at the last, not the tenth."""
    live, out, hub = client
    for seq in range(1, 16):
        live.message_received(b'{"type":"move","lat":%d,"lng":2,"seq":%d}' % (seq, seq))
    assert errors(out) == ["rate_limited"]
    clock.advance(0)
    assert hub.pins("m")[0]["seq"] == 10
    clock.advance(0.11)
    assert hub.pins("m")[0]["seq"] == 15 and hub.stats.moves_accepted == 11
    # Within the rate: it took a token, so the bucket still holds the line.
    for seq in range(16, 30):
        live.message_received(b'{"type":"move","lat":1,"lng":2,"seq":%d}' % seq)
    assert hub.stats.moves_accepted == 11  # no token left: each one is held, the newest kept
    clock.advance(0.11)
    assert hub.pins("m")[0]["seq"] == 29 and hub.stats.moves_accepted == 12
    # Closing forgets what was held.
    live.message_received(b'{"type":"move","lat":1,"lng":2,"seq":30}')
    live.connection_lost()
    clock.advance(1)
    assert hub.stats.moves_accepted == 12 and not clock.getDelayedCalls()


@pytest.mark.parametrize("payload, code", [
    (b"{", "bad_json"), (b'{"type":"x"}', "bad_message"),
    (b'{"type":"move","lat":100,"lng":0}', "out_of_range")])
def test_errors_keep_the_connection_open(client, payload, code):
    live, out, hub = client
    live.message_received(payload)
    assert errors(out) == [code] and out.closed is None
    assert hub.stats.rejected == {code: 1}


def test_binary_is_bad_message(client):
    live, out, _ = client
    live.message_received(MOVE, binary=True)
    assert errors(out) == ["bad_message"]


def test_4096_bytes_pass_and_4097_close_with_1009(client):
    live, out, _ = client
    name = b'{"type":"hello","name":"x","pad":"' 
    exact = name + b" " * (4096 - len(name) - 2) + b'"}'
    assert len(exact) == 4096
    live.message_received(exact)
    assert out.take() == [] and out.closed is None
    live.message_received(exact[:-2] + b' "}')
    assert errors(out) == ["too_big"] and out.closed == (1009, "message too big")
    live.message_received(MOVE)  # nothing more after the close
    assert out.take() == []


def test_size_is_counted_in_utf8_bytes(client):
    live, out, _ = client
    live.message_received('{"type":"hello","name":"x","pad":"' + "é" * 2100 + '"}')
    assert errors(out) == ["too_big"]


def test_connection_lost_removes_the_pin(client, clock):
    live, out, hub = client
    live.message_received(MOVE)
    assert hub.pins("m")
    live.connection_lost()
    assert hub.pins("m") == []
