"""
Fuzzing a live server: arbitrary frames, JSON and numbers over a real
WebSocket. The server answers with the protocol's error or close, and keeps
serving everyone else.
"""

from __future__ import annotations

import json

import pytest_twisted
from hypothesis import HealthCheck, given, settings, strategies as st

from wsclient import connect

ERROR_CODES = {"bad_json", "bad_message", "out_of_range", "rate_limited", "too_big"}
# 1007: invalid UTF-8 in a text frame (Autobahn); the rest are the protocol's.
CLOSE_CODES = {1007, 1008, 1009}

numbers = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, -0.0, 90, 90.0000001, 180, 360, 2**53, "1", None, True]))
messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["move", "hello", "view", "teleport", 7, None])},
    optional={"lat": numbers, "lng": numbers, "heading": numbers, "accuracy": numbers,
              "seq": numbers, "name": st.one_of(st.text(max_size=80), numbers),
              "bbox": st.one_of(st.none(), st.lists(numbers, max_size=5), st.text(max_size=5))})


def to_frame(obj) -> tuple[bytes, bool]:
    return json.dumps(obj, allow_nan=True).encode(), False


frames = st.one_of(
    messages.map(to_frame),
    st.binary(max_size=200).map(lambda b: (b, False)),
    st.binary(max_size=200).map(lambda b: (b, True)),
    st.text(max_size=200).map(lambda t: (t.encode(), False)),
    st.integers(4090, 70_000).map(lambda n: (b'{"type":"hello","name":"' + b"x" * n + b'"}', False)),
)


async def fuzz_once(server, batch):
    observer = await connect(server.ws_url("fuzz"))
    await observer.next("welcome")
    fuzzer = await connect(server.ws_url("fuzz"))
    await fuzzer.next("welcome")
    for payload, binary in batch:
        if fuzzer.closed.called:
            break
        fuzzer.send_raw(payload, binary=binary)
    # Whatever happened, a well-behaved client on the same map is still served.
    probe = await connect(server.ws_url("fuzz"))
    probe_id = (await probe.next("welcome"))["id"]
    probe.send({"type": "move", "lat": 1, "lng": 1})
    await observer.until(lambda m: m["type"] == "update"
                         and any(p["id"] == probe_id for p in m["pins"]))
    for message in fuzzer.messages:
        assert message["type"] in ("update", "snapshot", "error"), message
        if message["type"] == "error":
            assert message["code"] in ERROR_CODES and message["message"]
    if fuzzer.closed.called:
        assert fuzzer.close_code in CLOSE_CODES, fuzzer.close_code
    for client in (observer, fuzzer, probe):
        client.close()
    for client in (observer, fuzzer, probe):
        await client.wait_closed()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(frames, min_size=1, max_size=6))
@pytest_twisted.ensureDeferred
async def test_live_server_survives_arbitrary_frames(server, batch):
    # pytest-twisted runs each Hypothesis example in the reactor; one server
    # (the fixture) serves them all.
    await fuzz_once(server, batch)
