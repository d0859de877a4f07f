"""The `twistd livemap` plugin: a few lines, so plugin scans stay fast."""

from twisted.application.service import ServiceMaker

livemap = ServiceMaker(
    "livemap",
    "livemap_tx.service",
    "Real-time live-location map: page, WebSocket and SockJS on one port, "
    "plus the pirate-speak echo.",
    "livemap",
)
