"""
The nodes of a cluster as one node sees them: who was heard from and when
(beats), who is gone (silent for the node TTL, or said goodbye: its pins
are dropped), whether every node was given the same Redis servers, and what
/healthz says about it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ..hub import Hub
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
    disagreeing: dict[str, tuple[float, str]]
    servers_down: dict[str, float]
    down_since: Optional[float]
    ever_linked: bool
    _beat_message: bytes

    _publish: Callable[..., None]

    def health_problem(self) -> Optional[str]:
        """None while linked and agreed; else what /healthz should say (still 200)."""
        refusal = self.refusal()
        if refusal is not None:
            return refusal
        now = self.clock.seconds()
        if not self.link.linked:
            assert self.down_since is not None
            what = "connecting to" if not self.ever_linked else "cut off from"
            return (f"{what} {self.link.describe()} for {now - self.down_since:.0f} s: "
                    f"serving this node's clients only, reconnecting")
        down = [(server, since) for server, since in sorted(self.servers_down.items())]
        if not down:
            return None
        stores = self.link.server_name()
        return "; ".join(
            f"Redis server {server} is down (for {now - since:.0f} s): the maps on it"
            + (", the private maps and the devices" if server == stores else "")
            + " answer 503 until it is back, reconnecting" for server, since in down)

    def refusal(self) -> Optional[str]:
        """Why this node refuses to serve (/healthz is 503), or None."""
        # Twice the TTL: a check that comes late (a busy node) does not make
        # it flap between refusing and serving.
        bound = self.clock.seconds() - 2 * self.node_ttl
        for node, (seen, _) in list(self.disagreeing.items()):
            if seen < bound:
                del self.disagreeing[node]
        if not self.disagreeing:
            if self.mismatch is not None:
                self.log.info("node {node}: every node has the same Redis servers again; "
                              "serving", node=self.node)
                self.mismatch = None
            return None
        if self.mismatch is None:
            node, (_, theirs) = sorted(self.disagreeing.items())[0]
            self.mismatch = (
                f"refusing to serve: node {node} was given another set of Redis servers "
                f"({theirs or 'unknown'}) than this node ({self.link.describe()}), so maps "
                f"would be split between them; give every node the same --redis servers "
                f"(in any order)")
            self.log.error("node {node}: {problem}", node=self.node, problem=self.mismatch)
        return self.mismatch

    def nodes(self) -> int:
        return len(self.last_seen)

    def _check_servers(self, origin: str, fingerprint: Any, described: Any = None) -> None:
        """A hello or beat names its sender's set of servers: the same as ours?"""
        if fingerprint != self.link.fingerprint:
            self.disagreeing[origin] = (self.clock.seconds(), str(described or ""))
            self.refusal()

    def _check_agreement(self) -> None:
        """Every node announces its set of servers on every server: compare them all."""
        def compare(found: dict[str, tuple[str, str]]) -> None:
            for node, (fingerprint, described) in found.items():
                if node != self.node:
                    self._check_servers(node, fingerprint, described)
            self.refusal()
        self.link.fingerprints().addCallbacks(compare, lambda failure: None)

    def _heartbeat(self) -> None:
        if not self.link.linked:
            return
        self.link.announce(self.node_ttl)
        self._check_agreement()
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
        self.disagreeing.pop(origin, None)
        self.have = {pair for pair in self.have if pair[0] != origin}
        self.asked = {pair for pair in self.asked if pair[0] != origin}
        for pair in [pair for pair in self.replacing if pair[0] == origin]:
            del self.replacing[pair]
        dropped = self.hub.drop_origin(origin)
        self.log.info("node {origin} {why}: dropped its {count} pins", origin=origin, why=why,
                      count=dropped)
