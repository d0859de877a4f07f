"""
What one OwnTracks report costs the server as its map grows (issue 22 item
12): the report applied through `Devices` and its Friends answer (the
nearest `--max-friends` people, tids, JSON), in one process, on a fake
clock, for maps of 100 to 10,000 people. Next to it, the same answer made
by walking every pin (what the code before issue 22 did, as a baseline of
the shape, not its exact code).

    .venv/bin/python bench/owntracks_report.py                # table on stdout
    .venv/bin/python bench/owntracks_report.py --json out.json

Bounded: at most `--reports` reports per size (default 300), no network.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from livemap_tx.phones.apps import DEFAULT_MAX_FRIENDS, Friends, MapTids, owntracks_friends
from livemap_tx.phones.devices import Devices, Fix
from livemap_tx.hub import DEVICES, Hub
from livemap_tx.maps import MapDirectory

SIZES = (100, 1_000, 3_000, 10_000)
NOW = 1_800_000_000.0


def run(coroutine: Any) -> Any:
    result: list = []
    defer.Deferred.fromCoroutine(coroutine).addBoth(result.append)
    return result[0]


def populate(hub: Hub, size: int, rng: random.Random) -> None:
    """`size` people spread over a city (about 30 km across), as device pins."""
    states = [{"id": f"p{n}", "lat": 48.7 + rng.random() * 0.3, "lng": 2.2 + rng.random() * 0.4,
               "heading": None, "accuracy": 10.0, "name": f"Person {n}", "seq": None,
               "ts": int(NOW * 1000), "source": "owntracks", "battery": 50, "version": 1}
              for n in range(size)]
    hub.apply_remote("city", DEVICES, states)


def walk_every_pin(pins: dict, own_id: str, lat: float, lng: float, limit: int) -> bytes:
    """The baseline: every pin's distance, then a fresh tid book, then the answer."""
    scale = math.cos(math.radians(lat))
    nearest = heapq.nsmallest(limit, (pin for pin in pins.values() if pin.id != own_id),
                              key=lambda p: math.hypot(p.lat - lat, (p.lng - lng) * scale))
    book = MapTids()
    for pin_id in sorted(pins):  # a tid for every pin, as before
        book.tid(pin_id)
    shown = [pin.as_dict() for pin in nearest]
    return owntracks_friends(shown, {pin["id"]: book.tid(pin["id"]) for pin in shown})


def measure(size: int, reports: int, seed: int) -> dict:
    rng = random.Random(seed)
    clock = Clock()
    clock.advance(NOW)
    hub = Hub(clock, max_members=size + 10)
    maps = MapDirectory(clock)
    devices = Devices(hub, maps, clock, rate=1000.0)
    populate(hub, size, rng)
    token, device = run(devices.create("city", "Ada", "10.0.0.1"))
    friends = Friends(DEFAULT_MAX_FRIENDS)
    pins = hub.maps["city"].pins
    places = [(48.7 + rng.random() * 0.3, 2.2 + rng.random() * 0.4) for _ in range(reports)]
    ours, warm, walked = [], [], []
    # Twice over the same places: the first pass pays each person's first
    # tid and face once; the second is the steady state of a live map.
    for times in (ours, warm):
        for n, (lat, lng) in enumerate(places):
            clock.advance(0.05)  # 20 reports a second on the map: the grid is rebuilt every 2 s
            fix = Fix(lat, lng, int(clock.seconds() * 1000), "owntracks", accuracy=5.0, tid="AL")
            started = time.perf_counter()
            run(devices.report(device, fix))
            answer = friends.answer("city", pins, device.id, fix.tid, lat, lng, clock.seconds())
            times.append(time.perf_counter() - started)
            if times is ours and n % 10 == 0:
                started = time.perf_counter()
                walk_every_pin(pins, device.id, lat, lng, DEFAULT_MAX_FRIENDS)
                walked.append(time.perf_counter() - started)
    friends_shown = sum(1 for m in json.loads(answer) if m["_type"] == "location")
    return {"size": size, "reports": reports, "friends": friends_shown,
            "median_ms": statistics.median(ours) * 1000,
            "p95_ms": sorted(ours)[int(len(ours) * 0.95)] * 1000,
            "mean_ms": statistics.fmean(ours) * 1000,
            "max_ms": max(ours) * 1000,
            "warm_median_ms": statistics.median(warm) * 1000,
            "warm_p95_ms": sorted(warm)[int(len(warm) * 0.95)] * 1000,
            "walk_median_ms": statistics.median(walked) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reports", type=int, default=300, help="reports per map size (<= 2000)")
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    reports = max(10, min(args.reports, 2000))
    results = [measure(size, reports, args.seed) for size in SIZES]
    print("| people on the map | friends sent | first pass: median | p95 | mean | max "
          "| second pass: median | p95 | walking every pin (median) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['size']:,} | {r['friends']} | {r['median_ms']:.2f} ms | {r['p95_ms']:.2f} ms "
              f"| {r['mean_ms']:.2f} ms | {r['max_ms']:.2f} ms | {r['warm_median_ms']:.2f} ms "
              f"| {r['warm_p95_ms']:.2f} ms | {r['walk_median_ms']:.2f} ms |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)


if __name__ == "__main__":
    main()
