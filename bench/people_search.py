"""
What one people search (`GET /api/maps/{map}/people`, hub/people.py) costs
on the reactor on a map of N people spread over a city, next to a scan of
every pin (the search before issue 20's loose ends). In one process, no
network: the hub's own search, timed with timeit (best of several rounds).

    .venv/bin/python bench/people_search.py --people 10000

Prints a Markdown table (milliseconds per search) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet.task import Clock  # noqa: E402

from livemap_tx.hub import Hub, people  # noqa: E402

CENTRE = (52.52, 13.405)
# (what is searched, near where): the page asks with the viewer's position
# and limit=100.
CASES = [
    ("walker 123", CENTRE, "part of a name"),
    ("nobody", CENTRE, "no match"),
    ("walker", CENTRE, "everyone matches, near the viewer"),
    ("", CENTRE, "no text: the nearest 100"),
    ("", (48.85, 2.35), "no text, from another city (every pin measured)"),
]


def scan(pins, text, point, limit):
    """The search before: every pin's name folded and every match measured, per request."""
    needle = text.casefold()
    found = (pin for pin in pins
             if not needle or (pin.name is not None and needle in pin.name.casefold()))
    return [pin.as_dict() for pin in heapq.nsmallest(
        limit, found, key=lambda pin: people._distance(pin.lat, pin.lng, point))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--people", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=0.1, help="degrees around the centre")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(20)
    hub = Hub(Clock())
    for n in range(args.people):
        hub.apply_remote("m", "node-2", [{
            "id": f"r{n}", "lat": CENTRE[0] + rng.uniform(-args.spread, args.spread),
            "lng": CENTRE[1] + rng.uniform(-1.6 * args.spread, 1.6 * args.spread),
            "heading": None, "accuracy": None, "name": f"Walker {n:04d}", "seq": 1, "ts": 1,
            "version": 1}])
    pins = hub.maps["m"].pins
    print(f"{args.people:,} people within ±{args.spread}° of Berlin, limit={args.limit}, "
          f"best of {args.rounds} rounds, Python {sys.version.split()[0]}\n")
    print("| search | results | scan of every pin (ms) | livemap (ms) |")
    print("| --- | ---: | ---: | ---: |")
    for text, point, what in CASES:
        total, found = hub.people("m", text, point, args.limit)
        expected = scan(pins.values(), text, point, args.limit)
        assert [p["id"] for p in found] == [p["id"] for p in expected], text

        def best(call) -> float:
            number = 20
            return min(timeit.repeat(call, number=number, repeat=args.rounds)) / number * 1000
        before = best(lambda: scan(pins.values(), text, point, args.limit))
        now = best(lambda: hub.people("m", text, point, args.limit))
        print(f"| {what} (`q={text}`) | {len(found)} | {before:.2f} | {now:.2f} |")


if __name__ == "__main__":
    main()
