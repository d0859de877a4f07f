"""
The command line of `twistd livemap` (and `livemap`): every option, its
default, its limits and the checks between options, so that a mistake is
one line at start and never a traceback. service.py turns the checked
options into the running parts.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any, Optional, Sequence

from twisted.internet import endpoints
from twisted.python import usage

from . import wire
from .admission import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_IP, parse_networks
from .cluster.backplane import DEFAULT_CLUSTER, DEFAULT_NODE_TTL
from .cluster.redis_link import parse_redis_urls
from .http_site import BODY_TIMEOUT, MIN_BODY_RATE
from .hub.people import SEARCH_BURST, SEARCH_RATE
from .maps import MAX_TTL, MIN_TTL
from .phones.apps import DEFAULT_MAX_FRIENDS
from .phones.devices import CREATE_BURST
from .transports.client import DEFAULT_RATE
from .web import OSM_ATTRIBUTION, OSM_TILES

LISTEN_BACKLOG = 1024
SHUTDOWN_GRACE = 3.0
MAX_WORKERS = 256
# Used when the --redis URL has no password of its own.
REDIS_PASSWORD_VARIABLE = "LIVEMAP_REDIS_PASSWORD"


def _positive(name: str, low: float = 0.0, high: float = float("inf")):
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if not low < number <= high:
            raise usage.UsageError(f"--{name} must be in ({low:g}, {high:g}], not {value!r}")
        return number
    coerce.coerceDoc = f"A number in ({low:g}, {high:g}]."  # type: ignore[attr-defined]
    return coerce


def _at_least(name: str, low: float, high: float):
    """A number in [low, high] (zero allowed where low is 0)."""
    def coerce(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a number, not {value!r}") from None
        if not low <= number <= high:
            raise usage.UsageError(f"--{name} must be in [{low:g}, {high:g}], not {value!r}")
        return number
    coerce.coerceDoc = f"A number in [{low:g}, {high:g}]."  # type: ignore[attr-defined]
    return coerce


def _count(name: str, high: int = 10_000_000):
    """A whole number from 1 to `high`."""
    def coerce(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise usage.UsageError(f"--{name} must be a whole number, not {value!r}") from None
        if not 1 <= number <= high:
            raise usage.UsageError(f"--{name} must be from 1 to {high}, not {value!r}")
        return number
    coerce.coerceDoc = f"A whole number from 1 to {high}."  # type: ignore[attr-defined]
    return coerce


def split_commas(value: str) -> list[str]:
    """The non-empty, stripped parts of a comma-separated option."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _workers(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        raise usage.UsageError(f"--workers must be a whole number, not {value!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise usage.UsageError(f"--workers must be from 1 to {MAX_WORKERS}, not {value!r}")
    return count


_workers.coerceDoc = "A whole number; more than 1 needs --redis."  # type: ignore[attr-defined]


STORES = ("sqlite", "memory")


def _store(value: str) -> str:
    if value not in STORES:
        raise usage.UsageError(f"--store must be one of {', '.join(STORES)}, not {value!r}")
    return value


_store.coerceDoc = "sqlite or memory."  # type: ignore[attr-defined]


class Options(usage.Options):
    """twistd livemap [options]"""

    synopsis = "[options]"
    longdesc = ("Serve the livemap page, its WebSocket (/ws/MAP) and SockJS (/sockjs/MAP) "
                "endpoints on one port, and the pirate-speak echo on another.")
    optParameters: list[list[Any]] = [
        ["port", "p", "tcp:8080",
         "Endpoint of the page, WebSocket and SockJS (e.g. tcp:8080, "
         "ssl:8443:privateKey=key.pem:certKey=cert.pem)."],
        ["pirate", None, "tcp:8007",
         "Endpoint of the pirate-speak echo for telnet, or 'none' to disable."],
        ["tiles", None, OSM_TILES, "Map tile URL template with {z}, {x} and {y}."],
        ["attribution", None, OSM_ATTRIBUTION,
         "Attribution HTML the tile provider requires."],
        ["rate", None, DEFAULT_RATE, "Moves per second allowed per connection.",
         _positive("rate", 0.0, 1000.0)],
        ["tick", None, 0.1, "Seconds between fan-out ticks per map.",
         _positive("tick", 0.0, 5.0)],
        ["ping", None, 30.0, "Seconds between WebSocket pings; a connection that does "
         "not answer within another such interval is closed. At least 1: Autobahn "
         "runs its ping timers in one-second buckets.",
         _at_least("ping", 1.0, 3600.0)],
        ["slow-timeout", None, 30.0,
         "Seconds a client that does not read may stay before it is closed.",
         _positive("slow-timeout", 0.0, 3600.0)],
        ["redis", None, None,
         "Link this process to every other one given the same Redis and --cluster, so "
         "they serve one map: redis://[[user]:password@]host[:port][/db], or rediss:// "
         "for TLS (the password may instead be in $LIVEMAP_REDIS_PASSWORD). Several "
         "comma-separated URLs spread the maps' traffic over several Redis servers "
         "(every node must list the same ones, in any order). Or "
         "sentinel://host:port[,host:port...]/MASTER[/db]: follow the master the "
         "Redis Sentinels name, through failovers. Without it the process stands alone."],
        ["store", None, "sqlite",
         "Where a node without --redis keeps its devices, private maps and devices' last "
         "positions: sqlite (a file in --data-dir, kept across restarts) or memory "
         "(forgotten at exit). With --redis, Redis is the store.", _store],
        ["data-dir", None, None,
         "Directory of the sqlite store (created if missing). Default: $STATE_DIRECTORY "
         "(systemd's StateDirectory=), else $XDG_STATE_HOME/livemap, else "
         "~/.local/state/livemap."],
        ["cluster", None, DEFAULT_CLUSTER,
         "Name of the group of processes that share maps through --redis."],
        ["node-ttl", None, DEFAULT_NODE_TTL,
         "Seconds after which the other processes drop the pins of one they no longer "
         "hear from (it died, or lost Redis); each sends a heartbeat when quiet for a quarter of it.",
         _positive("node-ttl", 0.0, 600.0)],
        ["workers", None, 1,
         "Processes sharing --port on this machine, linked through --redis "
         "(about one per core).", _workers],
        ["allow-origin", None, "",
         "Comma-separated origins (https://example.org) whose pages may open live "
         "connections besides the server's own; other browsers' upgrades are refused."],
        ["trust-proxy", None, "",
         "Comma-separated addresses or CIDR blocks of reverse proxies whose "
         "X-Forwarded-For names the client."],
        ["max-connections", None, DEFAULT_MAX_CONNECTIONS,
         "Live connections (WebSocket and SockJS) this process accepts in all.",
         _count("max-connections")],
        ["max-per-ip", None, DEFAULT_MAX_PER_IP,
         "Live connections accepted from one client address.", _count("max-per-ip")],
        ["max-maps", None, 10_000, "Maps with connections that may exist at once.",
         _count("max-maps")],
        ["max-pins-per-map", None, 50_000,
         "Connections (each with at most one pin) one map may have.",
         _count("max-pins-per-map")],
        ["handshake-timeout", None, 10.0, "Seconds a WebSocket upgrade may take.",
         _positive("handshake-timeout", 0.0, 600.0)],
        ["header-timeout", None, 20.0,
         "Seconds each HTTP request's headers may take to arrive (also the idle "
         "keep-alive time); slower clients are cut off.",
         _positive("header-timeout", 0.0, 600.0)],
        ["body-timeout", None, BODY_TIMEOUT,
         "Seconds a request body may go without sending anything; also the part of its "
         "deadline that does not depend on its size (see --min-body-rate).",
         _positive("body-timeout", 0.0, 600.0)],
        ["min-body-rate", None, MIN_BODY_RATE,
         "Bytes a second a request body must average after its first --body-timeout "
         "seconds: its deadline is --body-timeout plus one second per this many bytes "
         "received.", _positive("min-body-rate", 0.0, 1e9)],
        ["precision", None, 0.0,
         "Coarsen every position to about this many metres before it is stored or "
         "sent (0: as the client sent it).", _at_least("precision", 0.0, 100_000.0)],
        ["stale", None, 600.0,
         "Seconds without a new fix after which the page shows a pin as stale.",
         _positive("stale", 0.0, 86_400.0)],
        ["expire", None, 3600.0,
         "Seconds without a new fix after which a pin is removed from its map.",
         _positive("expire", 0.0, 7 * 86_400.0)],
        ["device-burst", None, CREATE_BURST,
         "Phone-app devices one client address may set up at once (a venue's audience "
         "behind one NAT address); after that, one every 30 s.",
         _count("device-burst", 100_000)],
        ["search-rate", None, SEARCH_RATE,
         "People searches (GET /api/maps/MAP/people) one client address may make a "
         f"second, after a burst of {SEARCH_BURST}; past that they are answered 429.",
         _positive("search-rate", 0.0, 10_000.0)],
        ["max-friends", None, DEFAULT_MAX_FRIENDS,
         "People an OwnTracks phone is shown as Friends, the nearest first.",
         _count("max-friends", 10_000)],
        ["min-ttl", None, MIN_TTL,
         "Shortest life (?ttl=, seconds) a private map may be given; below 15 minutes "
         "only for tests.", _positive("min-ttl", 0.0, MAX_TTL)],
    ]
    optFlags: list[list[Any]] = [
        ["open-maps", None, "Any well-formed name is a map (the default)."],
        ["no-open-maps", None,
         "Only `public` and maps created with POST /api/maps exist; any other name "
         "is a 404 and a refused upgrade."],
        ["no-public", None, "Disable the `public` map too."],
        ["log-sockjs-requests", None,
         "Access-log every SockJS transport request (one per message for polling "
         "clients), to check that a load balancer keeps each session on one node."],
    ]

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:  # noqa: N802
        """Under twistd or `livemap`, a mistake is one line on stderr, not the whole --help."""
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            if self.parent is None:  # type: ignore[attr-defined]
                raise
            raise SystemExit(say_startup_failure(f"{error} (--help lists the options)", 2))

    def opt_version(self) -> None:  # noqa: N802 (Twisted's name)
        """Display the livemap and Twisted versions and exit."""
        from twisted import copyright
        sys.stdout.write(f"livemap {livemap_version()} (Twisted {copyright.version})\n")
        sys.exit(0)

    def postOptions(self) -> None:  # noqa: N802 (Twisted's name)
        from twisted.internet import reactor
        for name in ("port", "pirate"):
            value = self[name]
            if name == "pirate" and value == "none":
                continue
            try:
                endpoints.serverFromString(reactor, value)
            except OSError as error:  # the files of an ssl: endpoint
                raise usage.UsageError(f"--{name}: cannot read {error.filename or 'a file'} "
                                       f"({error.strerror or error}) of {value!r}") from None
            except Exception as error:  # ValueError, KeyError, OpenSSL's Error...
                raise usage.UsageError(f"--{name}: bad endpoint {value!r}: {error}") from None
        if not all(part in self["tiles"] for part in ("{z}", "{x}", "{y}")):
            raise usage.UsageError("--tiles must contain {z}, {x} and {y}")
        if self["redis"] is not None:
            try:
                parse_redis_urls(self["redis"])
            except ValueError as error:
                raise usage.UsageError(f"--redis: {error}") from None
        if self["open-maps"] and self["no-open-maps"]:
            raise usage.UsageError("--open-maps and --no-open-maps contradict each other")
        for origin in split_commas(self["allow-origin"]):
            if not origin.startswith(("http://", "https://")):
                raise usage.UsageError(f"--allow-origin: {origin!r} is not an http(s) origin")
        try:
            parse_networks(split_commas(self["trust-proxy"]))
        except ValueError as error:
            raise usage.UsageError(f"--trust-proxy: {error}") from None
        if not wire.is_map_name(self["cluster"]):
            raise usage.UsageError("--cluster must be 1 to 64 characters of A-Z a-z 0-9 _ -")
        if self["workers"] > 1:
            if self["redis"] is None:
                raise usage.UsageError("--workers above 1 needs --redis: the workers share "
                                       "their maps through it")
            if self["port"].split(":", 1)[0] not in ("tcp", "tcp6"):
                raise usage.UsageError("--workers shares a plain TCP --port (tcp:... or "
                                       "tcp6:...); terminate TLS in front of it")


def livemap_version() -> str:
    """The installed distribution's version: setup.cfg says it once."""
    try:
        return metadata.version("livemap")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def say_startup_failure(message: str, status: int = 1) -> int:
    """Write the one line to the real stderr (twistd redirects sys.stderr into its log)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"livemap: {message}\n")
    stream.flush()
    return status
