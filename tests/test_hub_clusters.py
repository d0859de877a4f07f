"""
Clustered views (extension "clusters") in the hub, with a task.Clock and
fake transports: cells over K become clusters and back, clusters go on
their slower cadence, views with the same cells and zoom share one frame.
"""

from __future__ import annotations

import itertools

import pytest
from twisted.internet.task import Clock

import hubfakes
from livemap_tx.hub.clusters import tile, tile_box, TileRange
from livemap_tx.hub import Hub
from livemap_tx.wire import Move, View

TICK = 0.1
# Zoom 12: cells of level 13, about 3 km in Paris.
ZOOM = 12
PARIS = (2.2, 48.8, 2.5, 48.9)


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1000)
    return clock


@pytest.fixture
def hub(clock) -> Hub:
    ids = itertools.count()
    return Hub(clock, tick_interval=TICK, cluster_size=4, cluster_interval=1.0,
               new_id=lambda: f"p{next(ids)}")


def people(hub, count, lat=48.85, lng=2.35, step=0.0001):
    """`count` people a few metres apart (in one cell of level 13), who have moved."""
    found = []
    for n in range(count):
        member, viewer = hubfakes.join(hub)
        member.move(Move(lat + n * step, lng, None, None, 1))
        found.append(member)
    return found


def watch(hub, bbox=PARIS, zoom=ZOOM):
    member, viewer = hubfakes.join(hub)
    member.set_view(bbox, zoom)
    return member, viewer


def updates(viewer):
    return [m for m in viewer.take() if m["type"] == "update"]


def test_a_cell_over_k_is_one_cluster_with_the_count_centre_and_box(hub, clock):
    crowd = people(hub, 5)
    clock.advance(TICK)
    _, viewer = watch(hub)
    [snapshot] = [m for m in viewer.take() if m["type"] == "snapshot"]
    assert snapshot["pins"] == [] and snapshot["total"] == 5
    [cluster] = snapshot["clusters"]
    x, y = tile(48.85, 2.35)
    assert cluster["id"] == f"c:13/{x >> 10}/{y >> 10}"
    assert cluster["count"] == 5
    assert cluster["lat"] == pytest.approx(48.8502) and cluster["lng"] == pytest.approx(2.35)
    assert cluster["bbox"] == [2.35, 48.85, 2.35, pytest.approx(48.8504)]
    assert len(crowd) == 5


def test_crossing_k_swaps_pins_and_cluster_in_one_update(hub, clock):
    crowd = people(hub, 4)
    clock.advance(TICK)
    _, viewer = watch(hub)
    assert len(viewer.take()[-1]["pins"]) == 4
    clock.advance(1.0)
    viewer.take()
    # A fifth person: within a second (at the cluster pass) its cell's pins
    # are gone and its cluster comes, in one update.
    [fifth] = people(hub, 1, lat=48.851)
    for _ in range(11):
        clock.advance(TICK)
    sent = updates(viewer)
    [update] = [m for m in sent if m["clusters"]]
    assert {m.id for m in crowd} <= set(update["gone"]) <= {m.id for m in [*crowd, fifth]}
    assert [c["count"] for c in update["clusters"]] == [5] and update["pins"] == []
    assert viewer.pins == {}
    cluster_id = update["clusters"][0]["id"]
    # Back to four: the cluster is gone and the four pins come back, together.
    fifth.leave()
    clock.advance(TICK)
    clock.advance(1.0)
    merged = updates(viewer)
    assert [m["gone"] for m in merged if cluster_id in m["gone"]] == [[cluster_id]]
    back = [m for m in merged if cluster_id in m["gone"]][0]
    assert sorted(p["id"] for p in back["pins"]) == sorted(m.id for m in crowd)
    assert back["total"] == 4
    assert viewer.pins.keys() == {m.id for m in crowd} and viewer.clusters == {}


def test_pins_inside_a_cluster_cost_no_frames_and_clusters_go_once_a_second(hub, clock):
    crowd = people(hub, 8)
    clock.advance(TICK)
    _, viewer = watch(hub)
    viewer.take()
    clock.advance(1.0)
    viewer.take()
    seq = itertools.count(2)
    for step in range(10):  # ten ticks of moves of a few metres
        for n, member in enumerate(crowd):
            member.move(Move(48.85 + n * 0.0001 + step * 1e-5, 2.35, None, None, next(seq)))
        clock.advance(TICK)
    # Nothing for the pins of the cluster, and its centre moved under 1/8
    # of its cell: nothing at the pass either.
    assert updates(viewer) == []
    # A move of more than 1/8 of the cell (3 km / 8): the cluster goes
    # again, once, at the next pass.
    for member in crowd:
        member.move(Move(48.85 + 0.006, 2.35 + 0.006, None, None, next(seq)))
    for _ in range(12):
        clock.advance(TICK)
    sent = updates(viewer)
    assert len(sent) == 1 and len(sent[0]["clusters"]) == 1
    assert sent[0]["clusters"][0]["lat"] == pytest.approx(48.856)


def test_the_same_cells_and_zoom_share_one_group_and_one_frame(hub, clock):
    people(hub, 6)
    clock.advance(TICK)
    # Two pages a few metres apart: the same cells once widened.
    a, a_out = watch(hub, (2.3, 48.82, 2.4, 48.88))
    b, b_out = watch(hub, (2.3001, 48.8201, 2.4001, 48.8801))
    c, c_out = watch(hub, (2.3, 48.82, 2.4, 48.88), ZOOM + 1)
    frames: dict[object, list] = {a_out: [], b_out: [], c_out: []}
    for out, sent in frames.items():
        receive = out.send_frame
        out.send_frame = lambda frame, sent=sent, receive=receive: (  # type: ignore[method-assign]
            sent.append(frame), receive(frame))
    map_state = hub.maps["m"]
    assert a.group is b.group and c.group is not a.group
    assert len(map_state.cluster_groups) == 2
    [mover] = people(hub, 1, lat=48.86, lng=2.31)
    clock.advance(TICK)
    assert frames[a_out] and frames[a_out][-1] is frames[b_out][-1]
    assert frames[c_out][-1] is not frames[a_out][-1]
    a.leave(), b.leave(), c.leave()
    assert map_state.cluster_groups == {} and map_state.cluster_views == {}
    assert mover.pin is not None


def test_nothing_is_clustered_from_zoom_18_up(hub, clock):
    crowd = people(hub, 6)
    clock.advance(TICK)
    _, viewer = watch(hub, (2.349, 48.849, 2.351, 48.852), 18)
    snapshot = viewer.take()[-1]
    assert snapshot["clusters"] == [] and len(snapshot["pins"]) == 6
    assert hub.maps["m"].aggregates == {}
    assert len(crowd) == 6


def test_the_welcome_is_for_the_view_in_the_url(hub, clock):
    crowd = people(hub, 6)
    people(hub, 2, lat=10.0, lng=10.0)
    clock.advance(TICK)
    viewer = hubfakes.Viewer()
    member = hub.join("m", viewer, View(PARIS, ZOOM))
    viewer.member = member
    [welcome] = viewer.take()
    assert welcome["type"] == "welcome" and welcome["pins"] == [] and welcome["total"] == 8
    assert [c["count"] for c in welcome["clusters"]] == [6]
    plain = hubfakes.Viewer()
    hub.join("m", plain, View(PARIS))
    [welcome] = plain.take()
    assert set(welcome) == {"type", "id", "pins"} and len(welcome["pins"]) == 6
    assert len(crowd) == 6


def test_a_clustered_view_that_stops_reading_is_caught_up_with_a_snapshot(hub, clock):
    crowd = people(hub, 6)
    clock.advance(TICK)
    member, viewer = watch(hub)
    viewer.high_water = 10
    viewer.stall()
    seq = itertools.count(2)
    while not viewer.paused:
        crowd[0].move(Move(48.7, 2.25, None, None, next(seq)))  # a sparse cell
        clock.advance(TICK)
    assert member.paused_at is not None and member.resync
    for member_ in crowd[1:4]:
        member_.leave()
    clock.advance(2.0)
    viewer.drain()
    assert viewer.messages[-1]["type"] == "snapshot"
    hubfakes.check_clustered(viewer, {p.id: p.as_dict() for p in hub.maps["m"].pins.values()},
                             PARIS, ZOOM, 4)


def test_a_whole_world_clustered_view_and_the_antimeridian(hub, clock):
    # (Off the equator: it is a cell boundary at every level.)
    people(hub, 5, lat=0.3, lng=179.9)
    people(hub, 3, lat=0.3, lng=-179.9)
    clock.advance(TICK)
    # Zoom 0: four cells, the world's quarters; 179.9 and -179.9 are in two.
    _, world = watch(hub, None, 0)
    snapshot = world.take()[-1]
    assert [c["count"] for c in snapshot["clusters"]] == [5] and len(snapshot["pins"]) == 3
    _, across = watch(hub, (179.0, -1.0, -179.0, 1.0), 8)
    snapshot = across.take()[-1]
    assert [c["count"] for c in snapshot["clusters"]] == [5] and len(snapshot["pins"]) == 3


def test_tile_ranges_widen_a_box_to_whole_cells():
    tiles = TileRange(13, PARIS)
    west, south, east, north = tiles.bbox()
    assert west <= 2.2 and south <= 48.8 and east >= 2.5 and north >= 48.9
    assert east - west < 0.3 + 2 * 360 / 2**13
    assert tiles.holds(*(v >> 10 for v in tile(48.85, 2.35)))
    assert not tiles.holds(*(v >> 10 for v in tile(48.95, 2.35)))
    assert tile_box(0, 0, 0) == (-180.0, -90.0, 180.0, 90.0)
    assert TileRange(1, (10.0, -5.0, 5.0, 5.0)).count() == 4  # all the way round


def test_aggregates_are_kept_only_for_levels_in_use(hub, clock):
    people(hub, 6)
    clock.advance(TICK)
    member, _ = watch(hub)
    map_state = hub.maps["m"]
    assert set(map_state.aggregates) == {ZOOM + 1}
    member.set_view(PARIS, 3)
    assert set(map_state.aggregates) == {ZOOM + 1, 4}
    crowd_mover = people(hub, 1)[0]
    for step in range(15):
        crowd_mover.move(Move(48.85, 2.35 + step * 1e-4, None, None, step + 2))
        clock.advance(1.0)
    # Unused for 10 seconds: dropped at a pass.
    assert set(map_state.aggregates) == {4}


def test_the_people_search_limits_and_orders(hub, clock):
    from livemap_tx.hub import people as search

    assert search.parse(None, None, None) == ("", None, search.DEFAULT_LIMIT)
    assert search.parse(" ada ", "1.5,-2", "1000") == ("ada", (1.5, -2.0), search.MAX_LIMIT)
    for bad in [("x" * 65, None, None), (None, "1,2,3", None), (None, "1,181", None),
                (None, None, "-3"), (None, None, "2.5")]:
        with pytest.raises(search.BadQuery):
            search.parse(*bad)
    crowd = people(hub, 5)
    crowd[0].hello("Ada"), crowd[1].hello("ADAM"), crowd[2].hello("Bo")
    total, found = hub.people("m", "ada", (48.86, 2.35), 10)
    assert total == 5 and [pin["name"] for pin in found] == ["ADAM", "Ada"]
    total, found = hub.people("m", "", (48.85, 2.35), 3)
    assert [pin["id"] for pin in found] == [m.id for m in crowd[:3]]
    # Nearest across the antimeridian too.
    far = people(hub, 1, lat=48.85, lng=179.99)[0]
    near = people(hub, 1, lat=48.85, lng=170.0)[0]
    assert [p["id"] for p in hub.people("m", "", (48.85, -179.99), 2)[1]] == [far.id, near.id]
    assert hub.people("nowhere", "", None, 5) == (0, [])


def test_on_a_big_map_a_clustered_group_is_sent_at_most_every_other_tick(clock):
    ids = itertools.count()
    # cohort_min=3: a tick of its base length (a map between big_map and
    # cohort_min ticks 1.3 times less often: the test below).
    hub = Hub(clock, tick_interval=TICK, big_map=3, cohort_min=3, cluster_flush_ticks=2,
              new_id=lambda: f"p{next(ids)}")
    walkers = people(hub, 3, step=0.01)  # three sparse cells
    clock.advance(TICK)
    member, viewer = watch(hub, (2.3, 48.8, 2.4, 48.9), 16)
    viewer.take()
    seq = itertools.count(2)
    ticks = hub.stats.ticks
    for _ in range(10):
        for n, walker in enumerate(walkers):
            walker.move(Move(48.85 + n * 0.01, 2.35 + next(seq) * 1e-6, None, None, next(seq)))
        clock.advance(TICK)
    ticks = hub.stats.ticks - ticks
    sent = updates(viewer)
    # Moves in every tick, an update every other tick.
    assert ticks >= 4 and ticks // 2 <= len(sent) <= (ticks + 1) // 2, (ticks, len(sent))
    clock.advance(TICK)
    clock.advance(1.0)
    assert hub.maps["m"].settled()
    hubfakes.check_clustered(viewer, {p.id: p.as_dict() for p in hub.maps["m"].pins.values()},
                             (2.3, 48.8, 2.4, 48.9), 16, 4)
    # A small map sends every tick.
    small = Hub(clock, tick_interval=TICK, new_id=lambda: f"q{next(ids)}")
    [walker] = people(small, 1)
    clock.advance(TICK)
    _, viewer = watch(small, (2.3, 48.8, 2.4, 48.9), 16)
    viewer.take()
    for _ in range(4):
        walker.move(Move(48.85, 2.35 + next(seq) * 1e-6, None, None, next(seq)))
        clock.advance(TICK)
    assert len(updates(viewer)) == 4
    assert member.group is not None


def test_a_map_whose_tick_is_stretched_sends_clustered_groups_every_tick(clock):
    """
    Whatever the map's tick, a change waits at most cluster_flush_ticks base
    ticks (the p99 target of big maps, 250 ms, with ticks of 100 ms): a map
    whose tick is 130 ms cannot wait two of them.
    """
    ids = itertools.count()
    hub = Hub(clock, tick_interval=TICK, big_map=3, cluster_flush_ticks=2,
              new_id=lambda: f"p{next(ids)}")
    walkers = people(hub, 3, step=0.01)
    clock.advance(TICK)
    _, viewer = watch(hub, (2.3, 48.8, 2.4, 48.9), 16)
    assert hub.maps["m"].interval > TICK
    viewer.take()
    seq = itertools.count(2)
    ticks = hub.stats.ticks
    for _ in range(10):
        for n, walker in enumerate(walkers):
            walker.move(Move(48.85 + n * 0.01, 2.35 + next(seq) * 1e-6, None, None, next(seq)))
        clock.advance(hub.maps["m"].interval)
    ticks = hub.stats.ticks - ticks
    assert ticks >= 9 and len(updates(viewer)) >= ticks - 1, (ticks, len(updates(viewer)))
