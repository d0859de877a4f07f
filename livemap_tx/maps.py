"""
Which maps exist: `public`, any well-formed name while maps are open, and
private maps created through the API with an unguessable name and an
optional expiry. Names are never listed: knowing one is the only way in.

In a cluster (`--redis`) the private maps live in a `MapStore` shared by
every node (the backplane's Redis): creating one writes it there before the
API answers, so any node can find it from that moment, and its expiry time
is the store's, so every node expires it at the same time, whichever node
made it and whether that node still lives. Each node keeps the maps it knows
in memory (bounded), so it still serves them while Redis is away. A single
node without Redis is the whole truth in memory, and writes each private
map to its disk (`persist`, sqlite_store.py) before giving its link.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import wire

MIN_TTL = 15 * 60.0
MAX_TTL = 3 * 24 * 3600.0
DEFAULT_MAX_PRIVATE = 100_000
# How long an expired name stays refused.
TOMBSTONE = MAX_TTL
# 18 random bytes: 144 bits, 24 characters of the map-name alphabet.
NAME_BYTES = 18
# The length of every private map's name: only names of this length are
# ever looked up in the cluster's store.
PRIVATE_NAME_LENGTH = 24
# Different names being looked up in the store at once (requests for one
# name share one lookup); beyond this a request is told to try again.
MAX_LOOKUPS = 1000


class DirectoryFull(Exception):
    """No more private maps may be created now."""


class DirectoryUnavailable(Exception):
    """The cluster's store (Redis) cannot be asked now: try again shortly."""


class MapStore(Protocol):
    """Where the private maps of a cluster are kept (the backplane, on Redis)."""

    def add_map(self, name: str, expires: Optional[float], *, cap: int,
                forget_before: float) -> defer.Deferred:
        """
        Add a private map expiring at `expires` (the clock's seconds; None:
        never), unless the store holds `cap` maps once those that expired
        before `forget_before` are forgotten. Fires "added", "full" or
        "taken"; fails if the store cannot be reached.
        """

    def find_map(self, name: str) -> defer.Deferred:
        """Fires None (no such map) or its expiry (seconds; `math.inf`: never)."""


@dataclass
class PrivateMap:
    name: str
    expires: Optional[float]  # the clock's seconds, or None for never
    call: Optional[IDelayedCall] = None
    expired: bool = False


def parse_ttl(value: Optional[str], minimum: float = MIN_TTL) -> Optional[float]:
    """Seconds from `?ttl=` (15 minutes to 3 days), None for never; ValueError if bad."""
    if value is None or value in ("", "never"):
        return None
    ttl = float(value)
    if not minimum <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be from {minimum:g} to {MAX_TTL:g} seconds, or 'never'")
    return ttl


def shielded(deferred: defer.Deferred) -> defer.Deferred:
    """
    A new Deferred with `deferred`'s result, whose cancellation (Klein
    cancels a route's Deferred when its client leaves) leaves `deferred` and
    whatever it waits on (a Redis reply) alone.
    """
    out: defer.Deferred = defer.Deferred()

    def relay(result: Any) -> None:
        if out.called:
            return  # cancelled: the result has nowhere to go
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
    deferred.addBoth(relay)
    return out


class MapDirectory:
    """
    The maps of this server, and the expiry of private ones.

    Without a store (one process) it is the whole truth. With one, it is
    this node's bounded view of the cluster's private maps: those it
    created, heard of (`learn`) or looked up (`resolve`).
    """

    log = Logger()

    def __init__(self, clock: IReactorTime, *, open_maps: bool = True, public: bool = True,
                 max_private: int = DEFAULT_MAX_PRIVATE, min_ttl: float = MIN_TTL,
                 on_expire: Callable[[str], None] = lambda name: None,
                 in_use: Callable[[str], bool] = lambda name: False,
                 store: Optional[MapStore] = None, max_lookups: int = MAX_LOOKUPS,
                 persist: Optional[Callable[[str, Optional[int]], defer.Deferred]] = None
                 ) -> None:
        self.clock = clock
        self.open_maps = open_maps
        self.public = public
        self.max_private = max_private
        self.min_ttl = min_ttl
        self.on_expire = on_expire
        # Whether a map has clients on this node: such an entry is never
        # dropped to make room (its expiry must close them).
        self.in_use = in_use
        self.store = store
        self.max_lookups = max_lookups
        # Without a store: writes a new private map (name, expiry in ms or
        # None) to this node's disk; its link is given once that is done.
        self.persist = persist
        # Least recently used first (with a store; without one, creation order).
        self.private: dict[str, PrivateMap] = {}
        self._lookups: dict[str, list[defer.Deferred]] = {}

    def exists(self, name: str) -> bool:
        """Whether `name` exists as far as this node knows (never asks the store)."""
        if not wire.is_map_name(name):
            return False
        entry = self.private.get(name)
        if entry is not None:
            return not self._gone(entry)
        if name == wire.DEFAULT_MAP:
            return self.public
        return self.open_maps

    def resolve(self, name: str) -> defer.Deferred:
        """
        Fires with whether `name` exists: `exists`, except that a name that
        could be a private map and that this node does not know is looked up
        in the store. Fails with DirectoryUnavailable if the store must be
        asked and cannot be.
        """
        entry = self.private.get(name)
        if entry is not None:
            if self.store is not None:
                self._touch(name, entry)
            return defer.succeed(not self._gone(entry))
        if (self.store is None or len(name) != PRIVATE_NAME_LENGTH
                or not wire.is_map_name(name)):
            return defer.succeed(self.exists(name))
        return self._lookup(name)

    def expiry(self, name: str) -> Optional[float]:
        """When a private map this node knows expires (the clock's seconds), else None."""
        entry = self.private.get(name)
        return None if entry is None else entry.expires

    def is_expired(self, name: str) -> bool:
        """Whether `name` is a private map known to have expired (its tombstone)."""
        entry = self.private.get(name)
        return entry is not None and self._gone(entry)

    def _gone(self, entry: PrivateMap) -> bool:
        # By the clock, not only by the expiry's timer: a busy reactor runs
        # it late, and every node must refuse the map from the same moment.
        return entry.expired or (entry.expires is not None
                                 and entry.expires <= self.clock.seconds())

    def create(self, ttl: Optional[float] = None) -> PrivateMap:
        """A private map of this node alone (no store)."""
        if len(self.private) >= self.max_private:
            raise DirectoryFull("too many private maps")
        name = secrets.token_urlsafe(NAME_BYTES)
        # Whole milliseconds: what a store keeps, so a restart changes nothing.
        entry = PrivateMap(name, None if ttl is None
                           else round((self.clock.seconds() + ttl) * 1000) / 1000)
        if ttl is not None:
            entry.call = self.clock.callLater(ttl, self._expire, name)
        self.private[name] = entry
        self.log.info("private map created, expires in {ttl} s", ttl=ttl)
        return entry

    def create_private(self, ttl: Optional[float] = None) -> defer.Deferred:
        """
        What POST /api/maps does: `create`, or with a store, a map written
        to the store before this fires, so that every node finds it. Fails
        with DirectoryFull, or DirectoryUnavailable when the store cannot be
        reached (a map known to this node alone would be a 404 on the others).
        """
        if self.store is None:
            try:
                entry = self.create(ttl)
            except DirectoryFull:
                return defer.fail()
            if self.persist is None:
                return defer.succeed(entry)
            return shielded(self._persist(entry))
        # Shielded: a client that leaves mid-way does not cancel the Redis
        # command; the map is made (and remembered here) all the same.
        return shielded(defer.Deferred.fromCoroutine(self._create_shared(ttl)))

    def _persist(self, entry: PrivateMap) -> defer.Deferred:
        assert self.persist is not None

        def failed(failure: Failure) -> None:
            # Not on disk: not given, so gone here too.
            self.log.warn("could not save a private map: {error}",
                          error=failure.getErrorMessage() or failure.type.__name__)
            if self.private.get(entry.name) is entry:
                del self.private[entry.name]
            if entry.call is not None and entry.call.active():
                entry.call.cancel()
            raise DirectoryUnavailable("this server cannot save a private map now; "
                                       "try again shortly")
        expires_ms = None if entry.expires is None else round(entry.expires * 1000)
        try:
            written = self.persist(entry.name, expires_ms)
        except Exception:
            written = defer.fail()
        return written.addCallbacks(lambda _: entry, failed)

    async def _create_shared(self, ttl: Optional[float]) -> PrivateMap:
        assert self.store is not None
        for _ in range(3):  # a taken name: 144 random bits make it never happen
            now = self.clock.seconds()
            # Whole milliseconds: what the store keeps, so every node agrees.
            expires = None if ttl is None else round((now + ttl) * 1000) / 1000
            name = secrets.token_urlsafe(NAME_BYTES)
            try:
                outcome = await self.store.add_map(name, expires, cap=self.max_private,
                                                   forget_before=now - TOMBSTONE)
            except Exception as error:
                self.log.warn("could not create a private map in the cluster: {error}",
                              error=str(error) or type(error).__name__)
                raise DirectoryUnavailable(
                    "the cluster's map directory (Redis) cannot be reached now; "
                    "try again shortly") from None
            if outcome == "full":
                raise DirectoryFull("too many private maps")
            if outcome == "added":
                entry = self.private.get(name) or self._remember(name, expires)
                self.log.info("private map created in the cluster, expires in {ttl} s", ttl=ttl)
                return entry
        raise DirectoryUnavailable("could not find a free name")

    def learn(self, name: str, expires: Optional[float]) -> None:
        """Another node made a private map (its `map` message): know it now."""
        if (len(name) == PRIVATE_NAME_LENGTH and wire.is_map_name(name)
                and name not in self.private):
            self._remember(name, expires)

    def entries(self) -> Iterator[tuple[str, Optional[float]]]:
        """Every private map this node knows, with its expiry (expired ones too)."""
        for entry in list(self.private.values()):
            yield entry.name, entry.expires

    def stop(self) -> None:
        """Cancel pending expiries (the process is stopping)."""
        for entry in self.private.values():
            if entry.call is not None and entry.call.active():
                entry.call.cancel()

    # Expiry

    def _expire(self, name: str) -> None:
        entry = self.private.get(name)
        if entry is None or entry.expired:
            return
        # Kept as a tombstone for a while, so that open maps cannot bring an
        # expired link back to life.
        entry.expired = True
        entry.call = self.clock.callLater(TOMBSTONE, self.private.pop, name, None)
        self.log.info("a private map expired")
        self.on_expire(name)

    # The cluster: this node's bounded view of the store

    def _remember(self, name: str, expires: Optional[float]) -> PrivateMap:
        if len(self.private) >= self.max_private:
            self._make_room()
        entry = PrivateMap(name, expires)
        delay = None if expires is None else expires - self.clock.seconds()
        if delay is not None and delay > 0:
            entry.call = self.clock.callLater(delay, self._expire, name)
        elif delay is not None:
            # Expired already: a tombstone for what is left of its time.
            entry.expired = True
            entry.call = self.clock.callLater(max(0.0, delay + TOMBSTONE),
                                              self.private.pop, name, None)
        self.private[name] = entry
        return entry

    def _touch(self, name: str, entry: PrivateMap) -> None:
        # Most recently used last: the first to go are the least used.
        del self.private[name]
        self.private[name] = entry

    def _make_room(self) -> None:
        """
        Forget the least recently used map without clients here: the store
        still has it, and it is looked up again if asked for. A map with
        clients here stays (its expiry must close them): at most as many as
        the hub's --max-maps are over the bound.
        """
        for name, entry in self.private.items():
            if not self.in_use(name):
                del self.private[name]
                if entry.call is not None and entry.call.active():
                    entry.call.cancel()
                return

    def _lookup(self, name: str) -> defer.Deferred:
        # One waiter per request, so that a request that is cancelled (its
        # client left) cancels neither the lookup nor the others' waiters.
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._lookups.get(name)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        if len(self._lookups) >= self.max_lookups:
            return defer.fail(DirectoryUnavailable("too many map lookups at once"))
        self._lookups[name] = [waiter]
        assert self.store is not None
        try:
            asked = self.store.find_map(name)
        except Exception:
            asked = defer.fail()
        # The errback also catches a failure of `_found`: no waiter hangs.
        asked.addCallback(self._found, name).addErrback(self._lookup_failed, name)
        return waiter

    def _found(self, expires: Optional[float], name: str) -> None:
        if expires is not None and name not in self.private:
            self._remember(name, None if math.isinf(expires) else expires)
        answer = self.exists(name)
        for waiter in self._lookups.pop(name, []):
            if not waiter.called:
                waiter.callback(answer)

    def _lookup_failed(self, failure: Failure, name: str) -> None:
        self.log.warn("could not look a map up in the cluster: {error}",
                      error=failure.getErrorMessage() or failure.type.__name__)
        for waiter in self._lookups.pop(name, []):
            if not waiter.called:
                waiter.errback(DirectoryUnavailable(
                    "the cluster's map directory (Redis) cannot be reached now"))
