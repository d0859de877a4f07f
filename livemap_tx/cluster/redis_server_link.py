"""
The link to one Redis server (txredisapi, on the reactor): its address,
and its two connections, one for commands and publishing and one that
subscribes, each reconnecting with capped, jittered back-off. RedisLink
(redis_link.py) spreads a cluster over one or several of these.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Protocol
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer



class RedisLink(Protocol):
    """What a server's link asks of the link that owns it (redis_link.py),
    named here so that the owner imports this module and not the reverse."""

    reactor: Any
    clock: Any
    cluster: str
    max_backoff: float
    reply_timeout: float
    _stopping: bool
    _refusal: dict

    def _connection_lost(self, connection: Any, why: Failure) -> None: ...

    def _failed(self, failure: Failure, command: str) -> None: ...

    def _maybe_up(self) -> None: ...

    def _message(self, message: Any) -> None: ...

    def _refused(self, server: Any, why: str) -> None: ...

# Bumped when messages or channels change shape: nodes of different
# versions never share a channel.
PROTOCOL_VERSION = 2
# Commands Redis answers with one reply per channel or pattern named.
_PER_CHANNEL_COMMANDS = frozenset({"SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE"})


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    tls: bool
    username: Optional[str]
    password: Optional[str]
    # With Sentinel: the sentinels (host, port) and the name of the master
    # they watch (host and port are then the first sentinel's).
    sentinels: tuple[tuple[str, int], ...] = ()
    master: Optional[str] = None

    def __str__(self) -> str:
        """The URL without its secrets, for logs."""
        auth = "***@" if self.password is not None else ""
        if self.sentinels:
            listed = ",".join(_host_port(host, port) for host, port in self.sentinels)
            return f"sentinel://{auth}{listed}/{self.master}/{self.db}"
        return (f"{'rediss' if self.tls else 'redis'}://{auth}"
                f"{_host_port(self.host, self.port)}/{self.db}")

    @property
    def place(self) -> str:
        """Where it is, the same for every node that names it (no secrets)."""
        if self.sentinels:
            listed = ",".join(sorted(f"{host.lower()}:{port}" for host, port in self.sentinels))
            return f"sentinel:{listed}/{self.master}/{self.db}"
        return f"{self.host.lower()}:{self.port}/{self.db}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_sentinel_url(url: str) -> RedisAddress:
    """
    `sentinel://[[user]:password@]host:port[,host:port...]/MASTER[/db]`: the
    sentinels to ask, and the name of the master they watch (the password
    is the master's).
    """
    rest = url[len("sentinel://"):]
    auth, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    parts = [part for part in path.split("/") if part]
    if not parts:
        raise ValueError(f"no master name in {url!r} (sentinel://host:port,.../MASTER)")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"expected /MASTER or /MASTER/DB after the sentinels in {url!r}")
    sentinels = []
    for item in hosts.split(","):
        parsed = urlsplit(f"//{item.strip()}")
        try:
            port = parsed.port or 26379
        except ValueError:
            raise ValueError(f"bad port in {item!r} of {url!r}") from None
        if not parsed.hostname:
            raise ValueError(f"no host in {item!r} of {url!r}")
        sentinels.append((parsed.hostname, port))
    if len({(host.lower(), port) for host, port in sentinels}) != len(sentinels):
        raise ValueError("the same sentinel is named twice")
    username, password = None, None
    if auth:
        user, colon, secret = auth.partition(":")
        username = unquote(user) if user else None
        password = unquote(secret) if colon else None
    return RedisAddress(host=sentinels[0][0], port=sentinels[0][1],
                        db=int(parts[1]) if len(parts) == 2 else 0, tls=False,
                        username=username, password=password, sentinels=tuple(sentinels),
                        master=unquote(parts[0]))


def parse_redis_url(url: str) -> RedisAddress:
    """`redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"not a redis:// or rediss:// URL: {url!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, not {path!r}")
    return RedisAddress(
        host=parts.hostname, port=port, db=int(path or 0), tls=parts.scheme == "rediss",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None)


def parse_redis_urls(value: str) -> list[RedisAddress]:
    """
    One URL, or several separated by commas (maps are spread over them); or
    one `sentinel://` URL (its sentinels are separated by commas).
    """
    if value.strip().startswith("sentinel://"):
        return [parse_sentinel_url(value.strip())]
    urls = [url.strip() for url in value.split(",") if url.strip()]
    if not urls:
        raise ValueError("no Redis URL")
    addresses = [parse_redis_url(url) for url in urls]
    places = [address.place for address in addresses]
    if len(set(places)) != len(places):
        raise ValueError("the same Redis server is named twice")
    return addresses



@implementer(ILogObserver)
def _discard(event: dict) -> None:
    pass


class _QuietClientService(ClientService):
    """ClientService logs every retry; the link logs a loss once instead."""

    _log = Logger(observer=_discard)


class _RedisFactory(txredisapi.RedisFactory):
    """Builds the protocols of one of the link's connections (no pool: one each)."""

    def __init__(self, connection: _RedisConnection, address: RedisAddress,
                 dbid: Optional[int], reply_timeout: float) -> None:
        super().__init__(None, dbid, 1, isLazy=True, charset=None, password=address.password,
                         replyTimeout=reply_timeout, convertNumbers=False,
                         username=address.username)
        self.connection = connection
        self.deferred = None  # nobody waits on a pool

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        protocol = super().buildProtocol(addr)
        protocol.whenConnected().addCallback(self.connection._ready)
        return protocol

    def addConnection(self, conn: Any) -> None:  # noqa: N802 (txredisapi's name)
        """No pool: the link holds its protocol itself."""

    def connectionError(self, why: str) -> None:  # noqa: N802 (txredisapi's name)
        # AUTH or SELECT failed: the connection is closed and retried later.
        self.connection.server.link._refused(self.connection.server, why)


class _CommandProtocol(txredisapi.RedisProtocol):
    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """
    Replies are matched to commands by count. txredisapi hands every
    (un)subscribe acknowledgement to the oldest waiting command, so the
    second acknowledgement of a SUBSCRIBE of two channels fired the next
    SUBSCRIBE's Deferred before Redis had read it: a node then asked for a
    map's pins before it listened to the map, and its first welcome there
    could miss pins.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Per command sent, in order: [replies it gets, replies seen].
        self._owed: deque[list[int]] = deque()

    def execute_command(self, *args: Any, **kwargs: Any) -> defer.Deferred:
        result = super().execute_command(*args, **kwargs)
        name = args[0].upper() if isinstance(args[0], str) else args[0]
        # One acknowledgement per channel, each a reply of its own.
        replies = max(1, len(args) - 1) if name in _PER_CHANNEL_COMMANDS else 1
        self._owed.append([replies, 0])
        return result

    def replyReceived(self, reply: Any) -> None:  # noqa: N802 (txredisapi's name)
        if isinstance(reply, list):
            if len(reply) >= 3 and reply[-3] == b"message":
                self.messageReceived(None, *reply[-2:])
                return
            if len(reply) >= 4 and reply[-4] == b"pmessage":
                self.messageReceived(*reply[-3:])
                return
        if not self._owed:
            if isinstance(reply, Exception):
                self.replyQueue.put(reply)  # connectionLost fails what still waits
            return
        owed = self._owed[0]
        owed[1] += 1
        if isinstance(reply, Exception) or owed[1] >= owed[0]:
            self._owed.popleft()  # an error is the command's only reply
        if owed[1] == 1:
            # Redis subscribes every channel of the command before it
            # acknowledges the first one.
            self.replyQueue.put(reply[-3:] if isinstance(reply, list) else reply)

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:  # noqa: N802
        self.factory.connection.server.link._message(message)

    def connectionLost(self, why: Failure) -> None:  # noqa: N802
        super().connectionLost(why)
        self.factory.connection._lost(self, why)


class _RedisConnection:
    """One Redis connection kept open: reconnects with capped exponential back-off."""

    def __init__(self, server: RedisServerLink, name: str, protocol: type,
                 endpoint: Any, dbid: Optional[int]) -> None:
        self.server = server
        self.name = name
        self.protocol: Any = None
        self._unready = 0
        factory = _RedisFactory(self, server.address, dbid, server.link.reply_timeout)
        factory.protocol = protocol
        self.service = _QuietClientService(endpoint, factory, retryPolicy=self._delay,
                                           clock=server.link.clock,
                                           prepareConnection=self._prepare)

    def _delay(self, attempt: int) -> float:
        # A connection that is accepted and then refused (AUTH) counts as a
        # failure too, or the retries would not back off.
        attempt = max(attempt, self._unready)
        delay = min(self.server.link.max_backoff, 0.25 * 2 ** min(attempt - 1, 16))
        return delay * random.uniform(0.8, 1.2)

    def _prepare(self, protocol: Any) -> None:
        self._unready += 1

    def _ready(self, protocol: Any) -> None:
        self._unready = 0
        if protocol.connected:
            self.protocol = protocol
            self.server._connection_ready(self)

    def _lost(self, protocol: Any, why: Failure) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.server.link._connection_lost(self, why)


@implementer(IStreamClientEndpoint)
class SentinelMasterEndpoint:
    """
    Connects to the master the sentinels name now (txredisapi's Sentinel
    asks them all, and takes the first that sees a master up), before every
    connection attempt: after a failover, the reconnection goes to the
    promoted replica.
    """

    log = Logger()

    def __init__(self, link: RedisLink, address: RedisAddress) -> None:
        self.link = link
        self.address = address
        self.sentinel = txredisapi.Sentinel(list(address.sentinels), replyTimeout=2)
        # Not the 10 s default: while the master is down, retry soon.
        self.sentinel.discovery_timeout = 1.0
        self.master: Optional[tuple[str, int]] = None

    def connect(self, factory: Any) -> defer.Deferred:
        assert self.address.master is not None
        return self.sentinel.discover_master(self.address.master).addCallback(
            self._connect, factory)

    def _connect(self, master: tuple[str, int], factory: Any) -> defer.Deferred:
        if master != self.master:
            self.log.info("the sentinels name {host}:{port} the master of {name}",
                          host=master[0], port=master[1], name=self.address.master)
            self.master = master
        return endpoints.HostnameEndpoint(self.link.reactor, master[0], master[1],
                                          timeout=self.link.reply_timeout).connect(factory)

    def stop(self) -> defer.Deferred:
        return self.sentinel.disconnect()


class RedisServerLink:
    """One Redis server of the link: its two connections and its channels."""

    def __init__(self, link: RedisLink, address: RedisAddress, home: bool) -> None:
        self.link = link
        self.address = address
        self.home = home
        self.channel_prefix = f"livemap:v{PROTOCOL_VERSION}:{link.cluster}:{address.db}"
        # Channels this server's subscriber connection must be on.
        self.channels: set[bytes] = set()
        self.subscribed = False
        # Replicas connected to this server (its ROLE), when it is a master:
        # a write the cluster must not lose waits for one of them.
        self.replicas = 0
        self.sentinel: Optional[SentinelMasterEndpoint] = None
        endpoint = self._endpoint()
        self.commands = _RedisConnection(self, "commands", _CommandProtocol, endpoint,
                                         address.db or None)
        self.subscriber = _RedisConnection(self, "subscriber", _SubscriberProtocol,
                                           endpoint, None)

    def _endpoint(self) -> Any:
        address = self.address
        if address.sentinels:
            self.sentinel = SentinelMasterEndpoint(self.link, address)
            return self.sentinel
        endpoint: Any = endpoints.HostnameEndpoint(self.link.reactor, address.host, address.port,
                                                   timeout=self.link.reply_timeout)
        if address.tls:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = endpoints.wrapClientTLS(optionsForClientTLS(address.host), endpoint)
        return endpoint

    def channel(self, suffix: str) -> bytes:
        return f"{self.channel_prefix}:{suffix}".encode()

    @property
    def ready(self) -> bool:
        return (self.commands.protocol is not None and self.subscriber.protocol is not None
                and self.subscribed)

    def start(self) -> None:
        self.commands.service.startService()
        self.subscriber.service.startService()

    def stop(self) -> defer.Deferred:
        stopped = [self.commands.service.stopService(), self.subscriber.service.stopService()]
        if self.sentinel is not None:
            stopped.append(self.sentinel.stop())
        return defer.gatherResults(stopped, consumeErrors=True)

    def command(self, name: str, *args: Any, **kwargs: Any) -> bool:
        """Send one command if connected; never raises (this runs inside hub ticks)."""
        protocol = self.commands.protocol
        if protocol is None:
            return False
        try:
            sent = getattr(protocol, name)(*args, **kwargs)
        except txredisapi.ConnectionError:
            return False
        sent.addErrback(self.link._failed, name.upper())
        return True

    def query(self, *args: Any) -> defer.Deferred:
        """One command's reply, or a failure if not connected (never raises)."""
        protocol = self.commands.protocol
        if protocol is None:
            return defer.fail(ConnectionError("not connected to Redis"))
        try:
            return protocol.execute_command(*args)
        except Exception:
            return defer.fail()

    def listen(self, channel: bytes) -> defer.Deferred:
        """Subscribe now (if connected) and after every reconnection."""
        self.channels.add(channel)
        protocol = self.subscriber.protocol
        if protocol is None or not self.subscribed:
            return defer.fail(ConnectionError("not connected to Redis"))
        return protocol.subscribe([channel])

    def unlisten(self, channel: bytes) -> None:
        self.channels.discard(channel)
        protocol = self.subscriber.protocol
        if protocol is not None and self.subscribed:
            protocol.unsubscribe([channel]).addErrback(self.link._failed, "UNSUBSCRIBE")

    def _connection_ready(self, connection: _RedisConnection) -> None:
        self.link._refusal.pop(self.address.place, None)
        if self.link._stopping:
            return
        if connection is self.subscriber:
            protocol = connection.protocol
            self.subscribed = False

            def subscribed(_: Any) -> None:
                self.subscribed = True
                self.link._maybe_up()

            def refused(failure: Failure) -> None:
                self.link._failed(failure, "SUBSCRIBE")
                protocol.transport.abortConnection()
            if self.channels:
                protocol.subscribe(sorted(self.channels)).addCallbacks(subscribed, refused)
            else:
                subscribed(None)  # a map server with no map watched yet
        else:
            self.link._maybe_up()


__all__ = ["PROTOCOL_VERSION", "RedisAddress", "RedisServerLink", "SentinelMasterEndpoint",
           "parse_redis_url", "parse_redis_urls", "parse_sentinel_url"]
