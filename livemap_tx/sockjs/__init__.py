"""
SockJS (protocol 0.3.3) on twisted.web, for Python 3.

Mount one ``SockJSResource`` wherever the service should live (it routes on
``request.postpath`` and keys sessions by mount point), give it a
``handler_factory`` that builds the app's handler for each new session, and
a clock. The library knows nothing of what the messages mean.
"""

from .frames import quote
from .resource import DEFAULT_SOCKJS_URL, SockJSResource
from .session import (
    CONNECTION_INTERRUPTED,
    INTERNAL_ERROR,
    MESSAGE_TOO_BIG,
    SEND_QUEUE_FULL,
    SESSION_TIMED_OUT,
    ConnectionInfo,
    SockJSConnection,
    SockJSHandler,
)

__all__ = [
    "CONNECTION_INTERRUPTED",
    "ConnectionInfo",
    "DEFAULT_SOCKJS_URL",
    "INTERNAL_ERROR",
    "MESSAGE_TOO_BIG",
    "SEND_QUEUE_FULL",
    "SESSION_TIMED_OUT",
    "SockJSConnection",
    "SockJSHandler",
    "SockJSResource",
    "quote",
]
