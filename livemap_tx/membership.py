"""
The nodes of a cluster as one node sees them: who was heard from and when
(beats), who is gone (silent for the node TTL, or said goodbye: its pins
are dropped), whether every node was given the same Redis servers, and what
/healthz says about it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from .hub import Hub
from .links import Link

DEFAULT_NODE_TTL = 6.0


class Membership:
    """The backplane's view of the other nodes."""

    log: Logger
    hub: Hub
    link: Link
    clock: IReactorTime
    node: str
    node_ttl: float
    beat_interval: float
    last_publish: float
    stats: Any
    last_seen: dict[str, float]
    have: set[tuple[str, str]]
    asked: set[tuple[str, str]]
    replacing: dict[tuple[str, str], set[str]]
    mismatch: Optional[str]
    down_since: Optional[float]
    ever_linked: bool
    _beat_message: bytes

    def _publish(self, message: bytes, to: Optional[str] = None) -> None:
        raise NotImplementedError

    def health_problem(self) -> Optional[str]:
        """None while linked and agreed; else what /healthz should say (still 200)."""
        if self.mismatch is not None:
            return self.mismatch
        if self.link.linked:
            return None
        assert self.down_since is not None
        since = self.clock.seconds() - self.down_since
        what = "connecting to" if not self.ever_linked else "cut off from"
        return (f"{what} {self.link.describe()} for {since:.0f} s: serving this node's "
                f"clients only, reconnecting")

    def nodes(self) -> int:
        return len(self.last_seen)

    def _check_servers(self, origin: str, fingerprint: Any) -> None:
        if fingerprint == self.link.fingerprint:
            return
        problem = (f"node {origin} uses another list of Redis servers than this node "
                   f"({self.link.describe()}): maps would be split between them; give every "
                   f"node the same --redis list, in the same order")
        if self.mismatch != problem:
            self.mismatch = problem
            self.log.error("{problem}", problem=problem)

    def _heartbeat(self) -> None:
        if not self.link.linked:
            return
        self.link.announce(self.node_ttl)
        if self.clock.seconds() - self.last_publish >= self.beat_interval:
            self._publish(self._beat_message)

    def sweep(self) -> None:
        """Drop the pins of nodes not heard from within the node TTL."""
        bound = self.clock.seconds() - self.node_ttl
        for origin, seen in list(self.last_seen.items()):
            if seen < bound:
                self.stats.nodes_expired += 1
                self._forget(origin, f"silent for {self.node_ttl:g} s")

    def _forget(self, origin: str, why: str) -> None:
        self.last_seen.pop(origin, None)
        self.have = {pair for pair in self.have if pair[0] != origin}
        self.asked = {pair for pair in self.asked if pair[0] != origin}
        for pair in [pair for pair in self.replacing if pair[0] == origin]:
            del self.replacing[pair]
        dropped = self.hub.drop_origin(origin)
        self.log.info("node {origin} {why}: dropped its {count} pins", origin=origin, why=why,
                      count=dropped)
