"""
Sharding: which of a cluster's Redis servers carries a map's channel, the
same on every node, and the name of a list of servers that nodes compare.
"""

from __future__ import annotations

import hashlib


def shard_of(map_name: str, count: int) -> int:
    """Which of `count` servers carries a map's channel: stable, and the same on every node."""
    digest = hashlib.sha256(map_name.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


def servers_fingerprint(places: list[str]) -> str:
    """Names a list of servers (where each is, no secrets): nodes compare theirs."""
    return hashlib.sha256("|".join(places).encode()).hexdigest()[:16]


__all__ = ["servers_fingerprint", "shard_of"]
