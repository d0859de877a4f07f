"""
Sharding: which of a cluster's Redis servers carries a map's channel, and
which keeps the stores (private maps, devices), the same on every node
whatever the order its servers are listed in; and the name of the set of
servers, which nodes compare (a node with another set would split maps).

A server is known by its place (`host:port/db`, as written in `--redis`),
so every node must name the servers the same way. A map goes to the server
with the highest hash of (place, map name) (rendezvous hashing): adding or
removing a server moves only the maps that go to, or came from, that one.
"""

from __future__ import annotations

import hashlib
from typing import Sequence


def shard_of(map_name: str, places: Sequence[str]) -> int:
    """The index in `places` of the server that carries a map's channel."""
    name = map_name.encode("utf-8", "surrogatepass")
    return max(range(len(places)), key=lambda index: (
        hashlib.sha256(places[index].encode() + b"\0" + name).digest()[:8], places[index]))


def in_agreed_order(places: Sequence[str]) -> list[str]:
    """The servers in the order every node uses (the first keeps the stores)."""
    return sorted(places)


def servers_fingerprint(places: Sequence[str]) -> str:
    """
    Names a set of servers (where each is, no secrets): nodes compare theirs.
    With several, it names the way maps are placed too: a node that placed
    them another way (an older version, by the order of its list) differs.
    """
    ordered = "|".join(in_agreed_order(places))
    if len(places) > 1:
        ordered = f"rendezvous|{ordered}"
    return hashlib.sha256(ordered.encode()).hexdigest()[:16]


__all__ = ["in_agreed_order", "servers_fingerprint", "shard_of"]
