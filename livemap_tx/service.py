"""
Options to one MultiService: the only place that wires livemap's parts
together (hub, WebSocket, web site, metrics, pirate echo, the Redis
backplane, and the worker processes of `--workers`). The options
themselves are in options.py.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from autobahn.twisted.resource import WebSocketResource
from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource
from zope.interface import implementer

from . import wire
from .admission import Admission, Network, parse_networks
from .cluster.backplane import DEVICE_LEASE, Backplane, BackplaneCollector, make_backplane
from .cluster.links import MapUnavailable
from .hub import Hub
from .hub.people import SEARCH_RATE
from .logfiles import ReopenLogsOnHangup
from .maps import MIN_TTL, MapDirectory
from .metrics import AdmissionCollector, DeviceCollector, make_registry
from .options import (
    LISTEN_BACKLOG,
    REDIS_PASSWORD_VARIABLE,
    SHUTDOWN_GRACE,
    Options,
    livemap_version,
    say_startup_failure,
    split_commas,
)
from .phones.app_routes import PhoneApps
from .phones.apps import DEFAULT_MAX_FRIENDS
from .phones.devices import CREATE_BURST, Devices, Unavailable
from .phones.token_misses import MissCollector
from .pirate import PirateFactory
from .sockjs import SockJSResource
from .sqlite_store import DiskDevices, SqliteStore, StoreError, StoreService, default_data_dir
from .sqlite_store import restore as restore_store
from .transports.sockjs_endpoint import sockjs_resource
from .transports.ws import LiveMapFactory
from .web import LiveMapSite
from .http_site import make_site
from .workers import (
    LOOPBACK,
    PRIVATE_FD,
    SHARED_FD,
    AdoptedPort,
    SessionRouter,
    Supervisor,
    WorkerSpec,
)

log = Logger()

# Start-up mistakes: one line for whoever starts livemap, not a traceback.


class StartupFailed(Exception):
    """livemap cannot start, for a reason its message says in one line."""


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
        allowed_origins=split_commas(options["allow-origin"]),
        trusted_proxies=[*parse_networks(split_commas(options["trust-proxy"])), *trusted])
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
