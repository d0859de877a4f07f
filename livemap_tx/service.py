"""
Options to one MultiService: the only place that wires livemap's parts
together (hub, WebSocket, web site, metrics, pirate echo, the Redis
backplane, and the worker processes of `--workers`).
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from importlib import metadata
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from autobahn.twisted.resource import WebSocketResource
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from . import wire
from .admission import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_PER_IP,
    Admission,
    Network,
    parse_networks,
)
from .cluster.backplane import (
    DEFAULT_CLUSTER,
    DEFAULT_NODE_TTL,
    DEVICE_LEASE,
    Backplane,
    BackplaneCollector,
    make_backplane,
)
from .transports.client import DEFAULT_RATE
from .phones.app_routes import PhoneApps
from .phones.apps import DEFAULT_MAX_FRIENDS
from .hub.people import SEARCH_BURST, SEARCH_RATE
from .phones.devices import CREATE_BURST, Devices, Unavailable
from .hub import Hub
from .cluster.links import MapUnavailable
from .logfiles import ReopenLogsOnHangup
from .maps import MAX_TTL, MIN_TTL, MapDirectory
from .metrics import AdmissionCollector, DeviceCollector, make_registry
from .pirate import PirateFactory
from .cluster.redis_link import parse_redis_urls
from .phones.token_misses import MissCollector
from .sockjs import SockJSResource
from .sqlite_store import DiskDevices, SqliteStore, StoreError, StoreService, default_data_dir
from .sqlite_store import restore as restore_store
from .transports.sockjs_endpoint import sockjs_resource
from .web import (
    BODY_TIMEOUT,
    MIN_BODY_RATE,
    OSM_ATTRIBUTION,
    OSM_TILES,
    LiveMapSite,
    make_site,
)
from .workers import (
    LOOPBACK,
    PRIVATE_FD,
    SHARED_FD,
    AdoptedPort,
    SessionRouter,
    Supervisor,
    WorkerSpec,
)
from .transports.ws import LiveMapFactory

log = Logger()

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


def _split(value: str) -> list[str]:
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
        for origin in _split(self["allow-origin"]):
            if not origin.startswith(("http://", "https://")):
                raise usage.UsageError(f"--allow-origin: {origin!r} is not an http(s) origin")
        try:
            parse_networks(_split(self["trust-proxy"]))
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


# Start-up mistakes: one line for whoever starts livemap, not a traceback.


class StartupFailed(Exception):
    """livemap cannot start, for a reason its message says in one line."""


def say_startup_failure(message: str, status: int = 1) -> int:
    """Write the one line to the real stderr (twistd redirects sys.stderr into its log)."""
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"livemap: {message}\n")
    stream.flush()
    return status


def _startup_excepthook(kind: Any, value: BaseException, traceback: Any) -> None:
    if isinstance(value, StartupFailed):
        say_startup_failure(str(value))
    else:
        sys.__excepthook__(kind, value, traceback)


def _cannot_listen(error: CannotListenError, options: Options) -> str:
    port = str(error.port)
    option = next((f"--{name}" for name in ("port", "pirate")
                   if port in str(options.get(name, "")).split(":")), "--port")
    where = f"port {port}" + (f" on {error.interface}" if error.interface not in ("", None) else "")
    code = getattr(error.socketError, "errno", None)
    if code == errno.EADDRINUSE:
        return (f"{where} is already in use by another program: stop it, or choose another "
                f"port with {option}")
    if code == errno.EACCES:
        return (f"{where} needs privileges (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE): choose another port with {option}")
    return f"cannot listen on {where} ({error.socketError}): check {option}"


@implementer(IStreamServerEndpoint)
class RememberPort:
    """An endpoint that keeps the port it listens on (to say the page's address)."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self.endpoint = endpoint
        self.port: Any = None

    def listen(self, factory: Any) -> defer.Deferred:
        def keep(port: Any) -> Any:
            self.port = port
            return port
        return self.endpoint.listen(factory).addCallback(keep)


class StartOrSayWhy(service.MultiService):
    """
    The top service: a port that cannot be opened ends the start with one
    clear line; once running, the last line of the start says the page's address.
    """

    def __init__(self, options: Options, reactor: Any) -> None:
        super().__init__()
        self.options = options
        self.reactor = reactor
        # The port the page is served on, once listening (None until then).
        self.page: Callable[[], Any] = lambda: None
        # Whatever stops the start reaches the top of twistd (or `livemap`) as an
        # exception: a StartupFailed is printed as its message alone.
        sys.excepthook = _startup_excepthook

    def privilegedStartService(self) -> None:  # noqa: N802
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            message = _cannot_listen(error, self.options)
            log.error("{message}", message=message)  # for a log file, when daemonized
            raise StartupFailed(message) from None

    def startService(self) -> None:  # noqa: N802
        super().startService()
        self.reactor.callWhenRunning(self._announce)

    def _announce(self) -> None:
        port = self.page()
        host = port.getHost() if port is not None else None
        if host is None or not hasattr(host, "port"):
            return
        name = "localhost" if host.host in ("0.0.0.0", "::", "") else host.host
        name = f"[{name}]" if ":" in name else name
        scheme = "https" if self.options["port"].startswith("ssl:") else "http"
        log.info("livemap is up: open {url}", url=f"{scheme}://{name}:{host.port}/")


def _say_if_unlinked(how: str, backplane: Backplane) -> None:
    """
    Redis out of reach at start is no reason to stop (the node serves its
    own clients and keeps trying, docs/deployment.md), but whoever started
    it should know at once, in one line, in case --redis is wrong.
    """
    if how != "stopped" and not backplane.link.linked:
        message = (f"cannot reach Redis at {backplane.link.describe()} yet: serving this "
                   f"node's clients alone and retrying (check --redis)")
        log.warn("{message}", message=message)
        say_startup_failure(message)


def livemap_version() -> str:
    """The installed distribution's version: setup.cfg says it once."""
    try:
        return metadata.version("livemap")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def with_backlog(description: str, backlog: int = LISTEN_BACKLOG) -> str:
    """Raise the listen backlog of tcp/ssl endpoints that do not set one."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "ssl", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={backlog}"
    return description


def raise_open_file_limit() -> Optional[int]:
    """A real-time server runs out of descriptors first: take all we may."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        log.failure("could not raise the open-file limit")
        return None
    log.info("open-file limit is {limit}", limit=soft)
    return soft


class GracefulClose(service.Service):
    """On stop, close every client (WebSocket and SockJS) with 1001 and give them a moment."""

    def __init__(self, factory: LiveMapFactory, clock: Any, grace: float = SHUTDOWN_GRACE,
                 sockjs: Optional[SockJSResource] = None):
        self.factory = factory
        self.clock = clock
        self.grace = grace
        self.sockjs = sockjs

    def stopService(self) -> defer.Deferred:  # noqa: N802
        super().stopService()
        self.factory.close_all(wire.CLOSE_GOING_AWAY, "server shutting down")
        if self.sockjs is not None:
            self.sockjs.close_all(wire.CLOSE_GOING_AWAY, "server shutting down")
        return self._wait(self.clock.seconds() + self.grace)

    def _open(self) -> bool:
        return bool(self.factory.protocols) or bool(
            self.sockjs is not None and self.sockjs.session_count)

    def _wait(self, deadline: float) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()

        def check() -> None:
            if not self._open() or self.clock.seconds() >= deadline:
                done.callback(None)
            else:
                self.clock.callLater(0.05, check)
        check()
        return done


@dataclass
class Node:
    """One livemap node's parts: what a listener serves and what a backplane links."""

    hub: Hub
    factory: LiveMapFactory
    site: LiveMapSite
    backplane: Optional[Backplane]
    sockjs: SockJSResource
    directory: MapDirectory
    # The store of a node without --redis (None: memory only).
    store: Optional[SqliteStore] = None


def device_map_unavailable(failure: Failure) -> None:
    """A phone app's report to a map that cannot be served now: a 503 it retries."""
    failure.trap(MapUnavailable)
    raise Unavailable(failure.value.reason)


def make_node(reactor: Any, options: Options, *,
              route_sockjs: Optional[Callable[[IResource], IResource]] = None,
              trusted: Sequence[Network] = (), store: Optional[SqliteStore] = None) -> Node:
    """
    The hub, WebSocket factory and site of one node, wired together, with a
    backplane if `--redis` is given (not started: it is a Service).
    `trusted` adds proxies whose X-Forwarded-For is believed; with `store`
    (no --redis), devices and private maps are kept in it, and what it
    holds is back at once.
    """
    hub = Hub(reactor, tick_interval=options["tick"], slow_timeout=options["slow-timeout"],
              max_members=options["max-pins-per-map"], max_maps=options["max-maps"])
    registry, tick_seconds = make_registry(hub)
    hub.tick_observer = tick_seconds.observe
    # One admission for both transports: switching to SockJS gets around nothing.
    admission = Admission(
        max_connections=options["max-connections"], max_per_ip=options["max-per-ip"],
        allowed_origins=_split(options["allow-origin"]),
        trusted_proxies=[*parse_networks(_split(options["trust-proxy"])), *trusted])
    registry.register(AdmissionCollector(admission))

    def in_use(name: str) -> bool:
        # A map with clients here: the directory never forgets it (see maps.py).
        map_state = hub.maps.get(name)
        return map_state is not None and bool(map_state.members)
    def expired(name: str) -> None:
        hub.close_map(name, wire.CLOSE_POLICY, "map expired")
        devices.forget_map(name)
    directory = MapDirectory(
        reactor, open_maps=not options["no-open-maps"], public=not options["no-public"],
        min_ttl=options.get("min-ttl", MIN_TTL), in_use=in_use, on_expire=expired,
        persist=None if store is None else store.add_map)
    disk = None if store is None else DiskDevices(store)
    devices = Devices(hub, directory, reactor, rate=options["rate"],
                      precision=options["precision"], expire=options["expire"], store=disk,
                      create_burst=options.get("device-burst", CREATE_BURST))
    if store is not None and disk is not None and store.contents is not None:
        restore_store(store.contents, directory, devices, disk, reactor.seconds())
        store.contents = None
    factory = LiveMapFactory(hub, reactor, rate=options["rate"], precision=options["precision"],
                             ping_interval=options["ping"], ping_timeout=options["ping"],
                             handshake_timeout=options["handshake-timeout"],
                             admission=admission)
    local_sockjs = sockjs_resource(hub, reactor, rate=options["rate"],
                                   precision=options["precision"], ping=options["ping"],
                                   admission=admission)
    sockjs: IResource = local_sockjs
    if route_sockjs is not None:
        sockjs = route_sockjs(sockjs)
    site = LiveMapSite(hub, WebSocketResource(factory), registry, tiles=options["tiles"],
                       attribution=options["attribution"], rate=options["rate"],
                       sockjs=sockjs, directory=directory, stale=options["stale"],
                       apps=PhoneApps(devices, admission,
                                      max_friends=options.get("max-friends", DEFAULT_MAX_FRIENDS)),
                       admission=admission,
                       search_rate=options.get("search-rate", SEARCH_RATE))
    registry.register(DeviceCollector(devices))
    if site.apps is not None:
        registry.register(MissCollector(site.apps.misses))
    backplane = None
    if options.get("redis"):
        # The password may come from the environment rather than the URL:
        # a command line is readable by every local user.
        backplane = make_backplane(hub, reactor, options["redis"], cluster=options["cluster"],
                                   node_ttl=options["node-ttl"],
                                   password=os.environ.get(REDIS_PASSWORD_VARIABLE))
        registry.register(BackplaneCollector(backplane))
        # Private maps live in Redis: every node finds them, and they outlive
        # the node that made them.
        backplane.share_maps(directory)
        # And so do devices and their latest fixes: a device's pin belongs
        # to it, not to the node that took its last report.
        backplane.share_devices(devices)
        # Degraded, not down: /healthz stays 200 while Redis is away.
        site.health_checks["redis"] = backplane.health_problem
        # A node given other Redis servers than the others refuses (503).
        site.refusals["redis"] = backplane.refusal
        # A node holds the pins of the maps it serves: a request that needs
        # a map's pins waits until this node serves it (a phone app's report
        # keeps it served longer: its next report and OwnTracks' Friends).
        site.map_ready = backplane.watch
        if site.apps is not None:
            site.apps.map_ready = lambda name: backplane.watch(name, DEVICE_LEASE).addErrback(
                device_map_unavailable)
    return Node(hub, factory, site, backplane, local_sockjs, directory, store)


def make_server(reactor: Any, options: Options) -> tuple[Hub, LiveMapFactory, LiveMapSite]:
    """The hub, WebSocket factory and site of one server, wired together."""
    node = make_node(reactor, options)
    return node.hub, node.factory, node.site


@implementer(IStreamServerEndpoint)
class AcceptWhen:
    """
    An endpoint that listens at once (a busy port still fails at start) but
    accepts connections only once `ready()` fires, so that the first
    welcome of a node that joins a cluster already holds the others' pins.
    """

    def __init__(self, endpoint: IStreamServerEndpoint,
                 ready: Callable[[], defer.Deferred]) -> None:
        self.endpoint = endpoint
        self.ready = ready

    def listen(self, factory: Any) -> defer.Deferred:
        def hold(port: Any) -> Any:
            waiting = self.ready()
            if not waiting.called:
                port.stopReading()
                waiting.addCallback(lambda _: port.startReading() if port.connected else None)
            return port
        return self.endpoint.listen(factory).addCallback(hold)


def _serve_node(reactor: Any, top: service.MultiService, node: Node, options: Options,
                listeners: Callable[[Any, Optional[Callable[[], defer.Deferred]]], None]) -> None:
    # Order matters for stopping (MultiService stops children in reverse):
    # clients hear 1001 first, then the listeners close, and the backplane
    # says goodbye last, after the departures of those clients went out;
    # the store closes after every write that was asked of it.
    if node.store is not None:
        StoreService(node.store, reactor).setServiceParent(top)
    if node.backplane is not None:
        node.backplane.setServiceParent(top)
    gate = node.backplane.when_synced if node.backplane is not None else None
    listeners(make_site(node.site.resource(), reactor, header_timeout=options["header-timeout"],
                        body_timeout=options["body-timeout"],
                        min_body_rate=options["min-body-rate"],
                        log_sockjs=bool(options["log-sockjs-requests"]),
                        admission=node.factory.admission), gate)
    expire = options["expire"]
    sweep = TimerService(min(60.0, expire / 4), node.hub.expire_pins, expire)
    sweep.clock = reactor
    sweep.setServiceParent(top)
    ReopenLogsOnHangup(reactor).setServiceParent(top)
    ExpiryCanceller(node.directory).setServiceParent(top)
    GracefulClose(node.factory, reactor, sockjs=node.sockjs).setServiceParent(top)


class ExpiryCanceller(service.Service):
    """Pending expiries of private maps do not outlive the service."""

    def __init__(self, directory: MapDirectory) -> None:
        self.directory = directory

    def stopService(self) -> None:  # noqa: N802
        super().stopService()
        self.directory.stop()


def make_worker_service(reactor: Any, options: Options, spec: WorkerSpec) -> service.MultiService:
    """One child of `--workers`: a node on the inherited shared and private ports."""
    top = service.MultiService()
    node = make_node(reactor, options,
                     route_sockjs=lambda local: SessionRouter(local, spec, reactor),
                     # Sessions forwarded by the other workers come from
                     # loopback, with the real client in X-Forwarded-For.
                     trusted=parse_networks(LOOPBACK))

    def listeners(site: Any, gate: Optional[Callable[[], defer.Deferred]]) -> None:
        AdoptedPort(reactor, SHARED_FD, spec.family, site, gate).setServiceParent(top)
        # Forwarded SockJS requests come in here, from the other workers only.
        AdoptedPort(reactor, PRIVATE_FD, spec.family, site).setServiceParent(top)
    _serve_node(reactor, top, node, options, listeners)
    return top


def open_store(reactor: Any, options: Options) -> Optional[SqliteStore]:
    """
    The sqlite store of a node without --redis, open and checked; a store
    that cannot be used ends the process with one line saying why.
    """
    if options.get("redis") or options.get("store", "sqlite") != "sqlite":
        return None
    data_dir = options.get("data-dir") or default_data_dir()
    try:
        store = SqliteStore.open(data_dir, reactor)
    except StoreError as error:
        raise SystemExit("livemap: " + " ".join(str(error).split())) from None
    log.info("keeping devices and private maps in {path}", path=str(store.path))
    return store


def makeService(options: Options) -> service.MultiService:  # noqa: N802 (twistd's name)
    from twisted.internet import reactor
    log.info("livemap {version} starting", version=livemap_version())
    raise_open_file_limit()
    top = StartOrSayWhy(options, reactor)
    if options["workers"] > 1:
        supervisor = Supervisor(reactor, with_backlog(options["port"]), options["workers"],
                                {**options, "workers": 1})
        supervisor.setServiceParent(top)
        top.page = lambda: supervisor.shared
    else:
        node = make_node(reactor, options, store=open_store(reactor, options))

        def listeners(site: Any, gate: Optional[Callable[[], defer.Deferred]]) -> None:
            http = strports.service(with_backlog(options["port"]), site)
            if gate is not None:
                http.endpoint = AcceptWhen(http.endpoint, gate)
            http.endpoint = remembered = RememberPort(http.endpoint)
            top.page = lambda: remembered.port
            http.setServiceParent(top)
        _serve_node(reactor, top, node, options, listeners)
        if node.backplane is not None:
            node.backplane.when_synced().addCallback(_say_if_unlinked, node.backplane)
    if options["pirate"] != "none":
        # In the parent only when there are workers: one echo is plenty.
        pirate = strports.service(with_backlog(options["pirate"]), PirateFactory(reactor))
        pirate.setServiceParent(top)
    return top
