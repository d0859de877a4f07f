"""
Which maps exist: `public`, any well-formed name while maps are open, and
private maps created through the API with an unguessable name and an
optional expiry. Names are never listed: knowing one is the only way in.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Callable, Optional

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from . import wire

MIN_TTL = 15 * 60.0
MAX_TTL = 3 * 24 * 3600.0
DEFAULT_MAX_PRIVATE = 100_000
# How long an expired name stays refused.
TOMBSTONE = MAX_TTL
# 18 random bytes: 144 bits, 24 characters of the map-name alphabet.
NAME_BYTES = 18


class DirectoryFull(Exception):
    """No more private maps may be created now."""


@dataclass
class PrivateMap:
    name: str
    expires: Optional[float]  # the clock's seconds, or None for never
    call: Optional[IDelayedCall] = None
    expired: bool = False


def parse_ttl(value: Optional[str]) -> Optional[float]:
    """Seconds from `?ttl=` (15 minutes to 3 days), None for never; ValueError if bad."""
    if value is None or value in ("", "never"):
        return None
    ttl = float(value)
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be from {MIN_TTL:g} to {MAX_TTL:g} seconds, or 'never'")
    return ttl


class MapDirectory:
    """The maps of this server, and the expiry of private ones."""

    log = Logger()

    def __init__(self, clock: IReactorTime, *, open_maps: bool = True, public: bool = True,
                 max_private: int = DEFAULT_MAX_PRIVATE,
                 on_expire: Callable[[str], None] = lambda name: None) -> None:
        self.clock = clock
        self.open_maps = open_maps
        self.public = public
        self.max_private = max_private
        self.on_expire = on_expire
        self.private: dict[str, PrivateMap] = {}

    def exists(self, name: str) -> bool:
        if not wire.is_map_name(name):
            return False
        entry = self.private.get(name)
        if entry is not None:
            return not entry.expired
        if name == wire.DEFAULT_MAP:
            return self.public
        return self.open_maps

    def create(self, ttl: Optional[float] = None) -> PrivateMap:
        if len(self.private) >= self.max_private:
            raise DirectoryFull("too many private maps")
        name = secrets.token_urlsafe(NAME_BYTES)
        entry = PrivateMap(name, None if ttl is None else self.clock.seconds() + ttl)
        if ttl is not None:
            entry.call = self.clock.callLater(ttl, self._expire, name)
        self.private[name] = entry
        self.log.info("private map created, expires in {ttl} s", ttl=ttl)
        return entry

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

    def stop(self) -> None:
        """Cancel pending expiries (the process is stopping)."""
        for entry in self.private.values():
            if entry.call is not None and entry.call.active():
                entry.call.cancel()
