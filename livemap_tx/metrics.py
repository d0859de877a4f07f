"""
Prometheus metrics: a registry per server, read from the hub's plain
counters at scrape time so the hot path never touches a metric object.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .admission import Admission
from .phones.devices import Devices
from .hub import Hub
from .privacy import map_label

# Per-map series are capped so that many maps cannot blow up the scrape.
MAX_MAP_SERIES = 20


class HubCollector(Collector):
    """Reads the hub's counters and sizes when Prometheus scrapes."""

    def __init__(self, hub: Hub, extra: Callable[[], Iterator[Metric]] = lambda: iter(())) -> None:
        self.hub = hub
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        hub, stats = self.hub, self.hub.stats
        yield GaugeMetricFamily("livemap_connections", "Open client connections.",
                                value=hub.connection_count())
        yield CounterMetricFamily("livemap_connections_opened", "Client connections opened.",
                                  value=stats.connections_opened)
        yield GaugeMetricFamily("livemap_maps", "Maps with connections or pins.",
                                value=len(hub.maps))
        yield GaugeMetricFamily("livemap_pins", "Pins on all maps.",
                                value=sum(len(m.pins) for m in hub.maps.values()))
        # Labelled as the logs name maps: `public`, or a keyed digest, never
        # the name itself (a private map's name is its only key).
        per_map = GaugeMetricFamily(
            "livemap_map_pins",
            f"Pins of each of the {MAX_MAP_SERIES} busiest maps, labelled as in the logs "
            "(public, or ~ and a digest that is not the name).",
            labels=["map"])
        busiest = sorted(hub.maps.values(), key=lambda m: len(m.pins), reverse=True)
        for map_state in busiest[:MAX_MAP_SERIES]:
            per_map.add_metric([map_label(map_state.name)], len(map_state.pins))
        yield per_map
        yield CounterMetricFamily("livemap_moves_accepted", "Moves accepted.",
                                  value=stats.moves_accepted)
        rejected = CounterMetricFamily("livemap_messages_rejected",
                                       "Client messages rejected, by error code.",
                                       labels=["code"])
        for code, count in sorted(stats.rejected.items()):
            rejected.add_metric([code], count)
        yield rejected
        yield CounterMetricFamily("livemap_frames_sent", "Frames sent to clients.",
                                  value=stats.frames_sent)
        yield CounterMetricFamily("livemap_bytes_sent", "Payload bytes sent to clients.",
                                  value=stats.bytes_sent)
        yield CounterMetricFamily("livemap_ticks", "Fan-out ticks run.", value=stats.ticks)
        yield CounterMetricFamily("livemap_slow_skips",
                                  "Ticks a congested client was skipped for.",
                                  value=stats.slow_skips)
        yield GaugeMetricFamily("livemap_paused_connections",
                                "Connections skipped now because they do not read "
                                "(their buffer is full).",
                                value=sum(len(m.slow) for m in hub.maps.values()))
        yield CounterMetricFamily("livemap_slow_closes",
                                  "Clients closed for not reading.",
                                  value=stats.slow_closes)
        yield from self.extra()


class AdmissionCollector(Collector):
    """Connections refused before they became clients, by reason."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    def collect(self) -> Iterator[Metric]:
        refused = CounterMetricFamily("livemap_connections_refused",
                                      "Live connections refused, by reason.", labels=["reason"])
        for reason, count in sorted(self.admission.refused.items()):
            refused.add_metric([reason], count)
        yield refused


class DeviceCollector(Collector):
    """Phone apps' devices: made, deleted, reports taken and refused."""

    def __init__(self, devices: Devices) -> None:
        self.devices = devices

    def collect(self) -> Iterator[Metric]:
        stats = self.devices.stats
        for name, text in (("created", "Devices made."), ("deleted", "Devices deleted."),
                           ("reports", "Reports of devices applied."),
                           ("refused", "Device creations refused as too fast."),
                           ("held", "Device reports that came sooner than --rate allows "
                                    "(answered as taken; the newest is applied later)."),
                           ("skipped", "Device fixes that could not be used (from the "
                                       "future, a bad point of a batch), answered as taken.")):
            yield CounterMetricFamily(f"livemap_devices_{name}", text, value=stats[name])
        yield GaugeMetricFamily(
            "livemap_device_pins", "Pins of phone apps on all maps.",
            value=sum(m.device_pins for m in self.devices.hub.maps.values()))


def make_registry(hub: Hub) -> tuple[CollectorRegistry, Histogram]:
    """A fresh registry for one server (tests run several in one process)."""
    registry = CollectorRegistry()
    registry.register(HubCollector(hub))
    tick_seconds = Histogram(
        "livemap_tick_seconds", "Time one map's fan-out tick took.",
        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
        registry=registry)
    return registry, tick_seconds
