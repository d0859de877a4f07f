"""
The move rate limit against the rule docs/protocol.md gives clients ("Move
rate"): a client is closed only if, in some stretch of L seconds, it sent
more than rate * L + flood_allowance(rate) moves. Random arrival times on a
task.Clock, checked against that sentence computed by brute force.
"""

from __future__ import annotations

import math

import orjson
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock

from livemap_tx.transports.client import FLOOD_SECONDS, Client, flood_allowance
from livemap_tx.hub import Hub

from test_hub import FakeSubscriber

RATES = st.sampled_from([0.5, 1.0, 2.0, 5.0, 10.0, 30.0])


def run(rate: float, times: list[float]) -> tuple[Client, FakeSubscriber, Hub, Clock, int]:
    """Moves (seq 1, 2, ...) arriving at `times`; returns the index that closed, or -1."""
    clock = Clock()
    hub = Hub(clock)
    out = FakeSubscriber()
    client = Client(hub, "m", out, rate=rate)
    closed_at = -1
    for index, when in enumerate(times):
        clock.advance(when - clock.seconds())
        client.message_received(orjson.dumps(
            {"type": "move", "lat": 1.0, "lng": 2.0, "seq": index + 1}))
        if out.closed is not None:
            closed_at = index
            break
    return client, out, hub, clock, closed_at


def worst_window(rate: float, times: list[float]) -> list[float]:
    """For each arrival k: max over j <= k of (moves in [t_j, t_k]) - rate * (t_k - t_j)."""
    return [max((k - j + 1) - rate * (times[k] - times[j]) for j in range(k + 1))
            for k in range(len(times))]


gaps = st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=150)


@settings(max_examples=300, deadline=None)
@given(rate=RATES, gaps_ms=gaps)
def test_closed_exactly_when_the_written_rule_says(rate, gaps_ms):
    times = [sum(gaps_ms[:i + 1]) / 1000 for i in range(len(gaps_ms))]
    allowance = flood_allowance(rate)
    excess = worst_window(rate, times)
    # Exactly on the line is for floating point to decide: not a case of the rule.
    if any(abs(value - allowance) < 1e-6 for value in excess):
        return
    expected = next((k for k, value in enumerate(excess) if value > allowance), -1)
    _, out, _, _, closed_at = run(rate, times)
    assert closed_at == expected
    if expected >= 0:
        assert out.closed == (1008, "rate limit exceeded")


@settings(max_examples=300, deadline=None)
@given(rate=RATES, slower=st.floats(min_value=1.0, max_value=3.0),
       jitter=st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=1, max_size=300),
       spread=st.floats(min_value=0.0, max_value=1.0))
def test_moves_at_or_below_the_rate_are_never_closed_whatever_their_jitter(
        rate, slower, jitter, spread):
    """
    Moves meant for every 1/rate s (or slower), each late or early by up to
    J = spread * FLOOD_SECONDS * 0.45 s (4.5 s at most): never closed, and
    the pin always ends at the last move sent.
    """
    most = spread * FLOOD_SECONDS * 0.45
    times = sorted(max(0.0, (i + 1) * slower / rate + most * shift)
                   for i, shift in enumerate(jitter))
    client, out, hub, clock, closed_at = run(rate, times)
    assert closed_at == -1 and out.closed is None
    clock.advance(2 / min(rate, 1.0))  # time for a held move to be applied
    [pin] = hub.pins("m")
    assert pin["seq"] == len(times)
    # A held move is applied once: never more moves applied than arrived.
    assert hub.stats.moves_accepted <= len(times)


@settings(max_examples=100, deadline=None)
@given(rate=RATES, start=st.floats(min_value=0.0, max_value=100.0),
       before=st.integers(min_value=0, max_value=50))
def test_ten_times_the_rate_is_closed_within_a_few_seconds(rate, start, before):
    """Whatever came before at the rate, a flood at 10x is closed within 3 s."""
    times = [start + i / rate for i in range(before)]
    flood_start = (times[-1] if times else start) + 1 / rate
    times += [flood_start + i / (10 * rate) for i in range(int(math.ceil(40 * rate)) + 20)]
    _, out, _, _, closed_at = run(rate, times)
    assert closed_at >= 0 and out.closed == (1008, "rate limit exceeded")
    assert times[closed_at] - flood_start <= 3.0
