"""
The big-map scenario inside one process, without sockets: the hub's own CPU
per second of simulated time (task.Clock) for N people moving at 1 Hz and
N clustered viewers laid out as bench/bigmap.py lays them out, with
subscribers that only count frames and bytes. It separates what the hub
costs from what the sockets cost, and being CPU time of one process it
holds on a busy machine.

    .venv/bin/python bench/bigmap_hub.py --people 10000 --viewers 10000
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from twisted.internet.task import Clock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bigmap import CITY, CITY_HALF, CLASSES, HOTSPOT_SIGMA, HOTSPOTS, MOVER_VIEWS  # noqa: E402
from livemap_tx.hub import Frame, Hub  # noqa: E402
from livemap_tx.wire import Move, View  # noqa: E402


class Counting:
    """A subscriber that counts what it is sent."""

    __slots__ = ("bytes", "frames")

    def __init__(self) -> None:
        self.bytes = 0
        self.frames = 0

    def send_frame(self, frame: Frame) -> None:
        self.bytes += len(frame.payload)
        self.frames += 1

    def close(self, code: int, reason: str) -> None:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--people", type=int, default=10000)
    p.add_argument("--viewers", type=int, default=10000)
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--flush-ticks", type=int, default=1, help="Hub.cluster_flush_ticks")
    p.add_argument("--tick", type=float, default=0.1, help="Hub.tick_interval")
    p.add_argument("--seed", type=int, default=20)
    p.add_argument("--people-view", choices=sorted(MOVER_VIEWS), default="street")
    args = p.parse_args()
    rng = random.Random(args.seed)
    clock = Clock()
    clock.advance(1000)
    hub = Hub(clock, tick_interval=args.tick, cluster_flush_ticks=args.flush_ticks)
    hotspots = [(CITY[0] + rng.uniform(-0.07, 0.07), CITY[1] + rng.uniform(-0.1, 0.1))
                for _ in range(HOTSPOTS)]
    people, pos = [], []
    zoom, (dlat, dlng) = MOVER_VIEWS[args.people_view]
    for k in range(args.people):
        if k % 2:
            h = hotspots[k % HOTSPOTS]
            lat, lng = rng.gauss(h[0], HOTSPOT_SIGMA), rng.gauss(h[1], HOTSPOT_SIGMA * 1.5)
        else:
            lat = CITY[0] + rng.uniform(-CITY_HALF[0], CITY_HALF[0])
            lng = CITY[1] + rng.uniform(-CITY_HALF[1], CITY_HALF[1])
        sub = Counting()
        people.append((hub.join("big", sub, View((lng - dlng, lat - dlat, lng + dlng, lat + dlat),
                                                 zoom)), sub))
        pos.append([lat, lng])
    viewers = []
    shares = [share for _, share, _, _ in CLASSES]
    for _ in range(args.viewers):
        name, _, zoom, (dlat, dlng) = rng.choices(CLASSES, shares)[0]
        lat, lng = CITY if name == "zoomed-out" else pos[rng.randrange(args.people)]
        sub = Counting()
        hub.join("big", sub, View((lng - dlng, lat - dlat, lng + dlng, lat + dlat), zoom))
        viewers.append((name, sub))
    seq = 1
    for (member, _), (lat, lng) in zip(people, pos):
        member.move(Move(lat, lng, None, None, seq))
    clock.advance(3)
    for _, sub in [*people, *viewers]:
        sub.bytes = sub.frames = 0
    started = time.process_time()
    slots = round(1 / args.tick)
    for _ in range(args.seconds * slots):  # each tick's share of the people move in it
        seq += 1
        for k in range(seq % slots, args.people, slots):
            p_ = pos[k]
            p_[0] += rng.uniform(-0.0002, 0.0002)
            p_[1] += rng.uniform(-0.0003, 0.0003)
            people[k][0].move(Move(p_[0], p_[1], None, None, seq))
        clock.advance(args.tick)
    cpu = time.process_time() - started
    map_state = hub.maps["big"]
    print(f"{args.people} people ({args.people_view}), {args.viewers} viewers, tick {args.tick} s, flush every {args.flush_ticks} ticks: "
          f"hub CPU {cpu / args.seconds:.3f} s per second; "
          f"{sum(s.frames for _, s in [*people, *viewers]) / args.seconds:,.0f} frames/s; "
          f"{len(map_state.cluster_groups)} groups")
    classes = [("person", sub) for _, sub in people] + viewers
    for name in ["person", *[c[0] for c in CLASSES]]:
        rates = sorted(sub.bytes / args.seconds for n, sub in classes if n == name)
        if rates:
            print(f"  {name}: {len(rates)}, B/s median {statistics.median(rates):,.0f} "
                  f"max {rates[-1]:,.0f}")


if __name__ == "__main__":
    main()
