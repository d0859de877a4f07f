"""The pirate-speak echo: a line server for telnet that answers in pirate.

Each line a client sends comes back translated, ended with CRLF. Lines may
end in CRLF (telnet) or LF (netcat). Limits, so one client never hurts the
others: a line over ``max_line`` bytes gets an error line and a close, an
idle connection is closed after ``idle_timeout`` seconds, and a client that
does not read its replies stops being read (back-pressure) instead of
growing the server's write buffer.
"""

from __future__ import annotations

import re
from typing import Any
from collections.abc import Callable

from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

# Lower-case English word -> pirate. Replacements are lower case too;
# translate() gives them the capitalisation of the word they replace.
WORDS: dict[str, str] = {
    "hello": "ahoy",
    "hi": "ahoy",
    "hey": "ahoy",
    "my": "me",
    "friend": "matey",
    "friends": "mateys",
    "yes": "aye",
    "you": "ye",
    "your": "yer",
    "is": "be",
    "are": "be",
    "the": "th'",
    "stop": "avast",
    "money": "doubloons",
    "boy": "lad",
    "girl": "lass",
    "drink": "grog",
    "wow": "blimey",
}

# Whole words only: not inside a longer word ("theme") and not glued to an
# apostrophe contraction ("you're"). The words match ASCII case-insensitively
# ((?ai:...)), so exotic case folds such as "ſ" or the Kelvin sign never match
# and every match is a key of WORDS once lower-cased.
_WORD_RE = re.compile(
    r"(?<!\w)(?<!\w')(?ai:"
    + "|".join(sorted(map(re.escape, WORDS), key=len, reverse=True))
    + r")(?!'\w)(?!\w)"
)


def _pirate_word(match: re.Match[str]) -> str:
    word = match.group()
    pirate = WORDS[word.lower()]
    if len(word) > 1 and word.isupper():
        return pirate.upper()
    if word[0].isupper():
        return pirate[0].upper() + pirate[1:]
    return pirate


def translate(line: str) -> str:
    """Say ``line`` like a pirate; everything but the known words is kept."""
    return _WORD_RE.sub(_pirate_word, line)


GREETING = "Ahoy, matey! Speak yer mind and I'll say it back like a pirate."
TOO_LONG = "Arr, that line be longer than {max_line} bytes. Begone!"
IDLE = "Ye've been quiet too long. Fair winds!"


class PirateProtocol(LineReceiver, TimeoutMixin):
    """One telnet client: a line in, its pirate translation out."""

    # A TCP transport (write, registerProducer, abortConnection...), not just ITransport.
    transport: Any

    log = Logger()
    # Split on LF and drop a trailing CR, so both telnet and netcat work.
    delimiter = b"\n"
    factory: PirateFactory

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's hook: schedule on the injected clock, not the reactor.
        return self.factory.clock.callLater(period, func)

    def connectionMade(self) -> None:
        self.peer = _describe(self.transport.getPeer())
        # +1 leaves room for the CR of CRLF; lineReceived checks the exact
        # limit. The unterminated buffer is then never held above
        # max_line + 2 bytes plus one read.
        self.MAX_LENGTH = self.factory.max_line + 1
        # We are a push producer: the transport pauses us (and we stop
        # reading the socket) while its write buffer is full.
        self.transport.registerProducer(self, True)
        self.setTimeout(self.factory.idle_timeout)
        self.log.info("pirate client {peer} connected", peer=self.peer)
        self.send_line(GREETING)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.log.info(
            "pirate client {peer} left: {why}",
            peer=self.peer,
            why=reason.getErrorMessage(),
        )

    def dataReceived(self, data: bytes) -> None:
        if self.transport.disconnecting:
            return  # closing already: whatever else arrives is ignored
        self.resetTimeout()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > self.factory.max_line:
            self.lineLengthExceeded(line)
            return
        self.send_line(translate(line.decode("utf-8", errors="replace")))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.clearLineBuffer()
        self.send_line(TOO_LONG.format(max_line=self.factory.max_line))
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        if self.paused or self.transport.disconnecting:
            # It is not reading what we sent, so a graceful close would wait
            # for it forever: drop it.
            self.transport.abortConnection()
            return
        self.send_line(IDLE)
        self.transport.loseConnection()

    def send_line(self, text: str) -> None:
        """Send one line of text, ended with CRLF as telnet expects."""
        self.transport.write(text.encode("utf-8") + b"\r\n")


class PirateFactory(Factory):
    """Builds PirateProtocols; holds the clock and the limits they share."""

    protocol = PirateProtocol  # type: ignore[assignment]

    def __init__(
        self, clock: IReactorTime, idle_timeout: float = 300.0, max_line: int = 4096
    ) -> None:
        if not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be > 0, not {idle_timeout!r}")
        if max_line < 1:
            raise ValueError(f"max_line must be >= 1, not {max_line!r}")
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_line = max_line


def _describe(address: IAddress) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return str(address) if host is None else f"{host}:{port}"
