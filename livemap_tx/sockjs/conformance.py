"""
The four services the sockjs-protocol test suite expects, on one port.

    python -m livemap_tx.sockjs.conformance --port 8081

then run the suite with ``SOCKJS_URL=http://localhost:8081``. Streaming
responses end after 4096 bytes, as the suite assumes; heartbeat 25 s,
disconnect delay 5 s.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.web.resource import Resource
from twisted.web.server import Site

from .resource import SockJSResource
from .session import SockJSConnection

log = Logger()

#: the suite's assumption for every streaming transport
RESPONSE_LIMIT = 4096


class EchoHandler:
    """Sends every message straight back."""

    def __init__(self, conn: SockJSConnection) -> None:
        self.conn = conn

    def message_received(self, message: str) -> None:
        self.conn.send(message)

    def connection_lost(self, code: int, reason: str) -> None:
        pass

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


class CloseHandler(EchoHandler):
    """Closes every session as soon as it opens."""

    def __init__(self, conn: SockJSConnection) -> None:
        super().__init__(conn)
        conn.close(3000, "Go away!")


def make_root(clock: IReactorTime, response_limit: int = RESPONSE_LIMIT) -> Resource:
    """The resource tree of the conformance server (also used by tests)."""
    root = Resource()
    common = dict(response_limit=response_limit, heartbeat=25.0, disconnect_delay=5.0)
    root.putChild(b"echo", SockJSResource(EchoHandler, clock, **common))  # type: ignore[arg-type]
    root.putChild(b"close", SockJSResource(CloseHandler, clock, **common))  # type: ignore[arg-type]
    root.putChild(
        b"disabled_websocket_echo",
        SockJSResource(EchoHandler, clock, websocket=False, **common),  # type: ignore[arg-type]
    )
    root.putChild(
        b"cookie_needed_echo",
        SockJSResource(EchoHandler, clock, cookie_needed=True, **common),  # type: ignore[arg-type]
    )
    return root


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)])
    site = Site(make_root(reactor))
    port = reactor.listenTCP(args.port, site, interface=args.interface)
    log.info("SockJS conformance server on {host}:{port}", host=args.interface, port=port.getHost().port)
    reactor.run()


if __name__ == "__main__":
    main()
