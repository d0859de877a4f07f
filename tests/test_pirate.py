"""The pirate echo: translation, the protocol in memory, and real TCP."""

from __future__ import annotations

import pytest
import pytest_twisted
from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from livemap_tx.pirate import (
    GREETING,
    IDLE,
    WORDS,
    PirateFactory,
    PirateProtocol,
    translate,
)

# --- translate() ------------------------------------------------------------


@pytest.mark.parametrize(
    "english, pirate",
    [
        ("hello", "ahoy"),
        ("Hello", "Ahoy"),
        ("HELLO", "AHOY"),
        ("hello my friend", "ahoy me matey"),
        ("Yes, you are the best!", "Aye, ye be th' best!"),
        ("THE END", "TH' END"),
        ("Is it your money?", "Be it yer doubloons?"),
        ("stop... STOP!", "avast... AVAST!"),
        ("(hello)", "(ahoy)"),
        ("'hello'", "'ahoy'"),
        ("my-friend", "me-matey"),
        ("hello\tworld", "ahoy\tworld"),
    ],
)
def test_translate_words_keep_case_and_punctuation(english: str, pirate: str) -> None:
    assert translate(english) == pirate


@pytest.mark.parametrize(
    "text",
    [
        "theme",  # "the" inside a word
        "others",
        "yesterday",
        "this island",
        "myth",
        "you're",  # contractions stay whole
        "it's",
        "hello_world",  # \w includes _
        "héllo",
        "éthe",  # a non-ASCII letter is part of the word
        "ſtop",  # long s case-folds to s: still not "stop"
        "\u212aey",  # Kelvin sign
        "",
        "nothing to see here",
    ],
)
def test_translate_respects_word_boundaries(text: str) -> None:
    assert translate(text) == text


@given(st.text())
def test_translate_never_raises(text: str) -> None:
    assert isinstance(translate(text), str)


@given(st.text(alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzAEHMOY '-,.!é\t")))
def test_translate_leaves_text_without_a_dictionary_word_unchanged(text: str) -> None:
    assume(not any(word in text.lower() for word in WORDS))
    assert translate(text) == text


@given(st.text())
def test_translate_leaves_arbitrary_text_without_a_dictionary_word_unchanged(
    text: str,
) -> None:
    assume(not any(word in text.lower() for word in WORDS))
    assert translate(text) == text


# --- the protocol in memory ---------------------------------------------------


def connect(
    idle_timeout: float = 300.0, max_line: int = 4096
) -> tuple[PirateProtocol, StringTransport, Clock]:
    clock = Clock()
    factory = PirateFactory(clock, idle_timeout=idle_timeout, max_line=max_line)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock


def replies(transport: StringTransport) -> list[bytes]:
    """Take the lines written so far (greeting included), clearing the buffer."""
    data = transport.value()
    transport.clear()
    assert data == b"" or data.endswith(b"\r\n")
    return data.split(b"\r\n")[:-1]


def test_greets_on_connect() -> None:
    _, transport, _ = connect()
    assert replies(transport) == [GREETING.encode()]


def test_registers_as_streaming_producer() -> None:
    proto, transport, _ = connect()
    assert transport.producer is proto and transport.streaming


def test_line_split_across_reads() -> None:
    proto, transport, _ = connect()
    replies(transport)
    for part in (b"hel", b"lo my fr", b"iend\r", b"\n"):
        proto.dataReceived(part)
    assert replies(transport) == [b"ahoy me matey"]


def test_several_lines_in_one_read() -> None:
    proto, transport, _ = connect()
    replies(transport)
    proto.dataReceived(b"hello\r\nyes\nthe end\r\nunfinished")
    assert replies(transport) == [b"ahoy", b"aye", b"th' end"]


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_accepts_lf_and_crlf_and_replies_with_crlf(ending: bytes) -> None:
    proto, transport, _ = connect()
    transport.clear()
    proto.dataReceived(b"you" + ending + ending)
    assert transport.value() == b"ye\r\n\r\n"


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_line_of_exactly_4096_bytes_is_answered(ending: bytes) -> None:
    proto, transport, _ = connect()
    replies(transport)
    proto.dataReceived(b"x" * 4096 + ending)
    assert replies(transport) == [b"x" * 4096]
    assert not transport.disconnecting


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"])
def test_line_over_4096_bytes_gets_error_and_close(ending: bytes) -> None:
    proto, transport, _ = connect()
    replies(transport)
    proto.dataReceived(b"x" * 4097 + ending + b"hello\r\n")
    [error] = replies(transport)
    assert b"4096" in error
    assert transport.disconnecting
    proto.dataReceived(b"hello\r\n")  # a closing connection is not answered
    assert transport.value() == b""


def test_long_line_without_newline_in_chunks_is_caught() -> None:
    proto, transport, _ = connect()
    replies(transport)
    sent = 0
    while not transport.disconnecting:
        proto.dataReceived(b"y" * 100)
        sent += 100
        assert sent <= 4096 + 2 + 100, "buffered past the limit"
    assert len(replies(transport)) == 1


def test_unterminated_buffer_is_bounded_byte_by_byte() -> None:
    # max_line + CR is still possibly a valid line; one byte more is not.
    proto, transport, _ = connect(max_line=16)
    for _ in range(17):
        proto.dataReceived(b"z")
    assert not transport.disconnecting
    proto.dataReceived(b"z")
    assert transport.disconnecting
    assert proto.clearLineBuffer() == b""


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    proto, transport, _ = connect()
    replies(transport)
    proto.dataReceived(b"\xff\xfehello \xc3\r\n\x00\x01\x80\n")
    assert replies(transport) == [
        "\ufffd\ufffdahoy \ufffd".encode(),
        "\x00\x01\ufffd".encode(),
    ]
    assert not transport.disconnecting


@given(st.lists(st.binary(max_size=3000), max_size=5))
def test_arbitrary_bytes_never_crash(chunks: list[bytes]) -> None:
    proto, transport, _ = connect()
    for chunk in chunks:
        proto.dataReceived(chunk)
    proto.connectionLost()
    # Every reply is whole UTF-8 lines.
    transport.value().decode("utf-8")
    assert transport.value().endswith(b"\r\n")


def test_idle_connection_closes_after_timeout() -> None:
    _, transport, clock = connect()
    replies(transport)
    clock.advance(299.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    assert replies(transport) == [IDLE.encode()]


def test_idle_timeout_is_configurable() -> None:
    _, transport, clock = connect(idle_timeout=5)
    clock.advance(5)
    assert transport.disconnecting


def test_activity_resets_idle_timeout() -> None:
    proto, transport, clock = connect()
    clock.advance(200)
    proto.dataReceived(b"hel")  # part of a line counts too
    clock.advance(200)
    assert not transport.disconnecting
    clock.advance(100)
    assert transport.disconnecting


def test_connection_lost_cancels_idle_timer() -> None:
    proto, _, clock = connect()
    assert clock.getDelayedCalls()
    proto.connectionLost()
    assert not clock.getDelayedCalls()


def test_paused_by_full_write_buffer_stops_reading_and_answering() -> None:
    proto, transport, _ = connect()
    replies(transport)
    proto.pauseProducing()  # what a transport with a full write buffer does
    assert transport.producerState == "paused"
    proto.dataReceived(b"hello\r\n")
    assert replies(transport) == []
    proto.resumeProducing()
    assert transport.producerState == "producing"
    assert replies(transport) == [b"ahoy"]


def test_idle_client_not_reading_is_aborted() -> None:
    proto, transport, clock = connect()
    replies(transport)
    proto.pauseProducing()
    clock.advance(300)
    assert transport.disconnected  # StringTransport's mark of abortConnection
    assert replies(transport) == []


def test_logs_open_and_close_once_each_not_per_line() -> None:
    with capturedLogs() as events:
        proto, _, _ = connect()
        proto.dataReceived(b"hello\r\n" * 3)
        proto.connectionLost()
    ours = [e for e in events if e.get("log_namespace", "").startswith("livemap_tx")]
    assert len(ours) == 2
    assert "connected" in ours[0]["log_format"]
    assert "left" in ours[1]["log_format"]


@pytest.mark.parametrize(
    "kwargs", [{"idle_timeout": 0}, {"idle_timeout": -1}, {"max_line": 0}]
)
def test_factory_rejects_nonsense_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PirateFactory(Clock(), **kwargs)  # type: ignore[arg-type]


# --- real TCP on 127.0.0.1 ------------------------------------------------------


class Client(LineReceiver):
    """A telnet-like client that queues the lines it receives."""

    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.lines: DeferredQueue[bytes] = DeferredQueue()
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.lines.put(line)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(None)

    def next_line(self) -> Deferred[bytes]:
        from twisted.internet import reactor

        # A guard so a bug fails the test instead of hanging it.
        return self.lines.get().addTimeout(10, reactor)


class TrackedPirate(PirateProtocol):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.lost.callback(None)


class TrackedFactory(PirateFactory):
    """Remembers its connections, so the test can wait for them to close."""

    protocol = TrackedPirate

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.lost: list[Deferred[None]] = []

    def buildProtocol(self, addr):  # type: ignore[no-untyped-def]
        proto = super().buildProtocol(addr)
        proto.lost = Deferred()
        self.lost.append(proto.lost)
        return proto


@pytest_twisted.async_yield_fixture
async def server():
    from twisted.internet import reactor

    factory = TrackedFactory(reactor)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    clients: list[Client] = []

    async def connect_client() -> Client:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = await connectProtocol(endpoint, Client())
        clients.append(client)
        assert await client.next_line() == GREETING.encode()
        return client

    yield connect_client

    for client in clients:
        client.transport.loseConnection()
        await client.closed
    await gatherResults(factory.lost)
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_tcp_greets_and_answers(server) -> None:
    client = await server()  # the fixture checks the greeting
    client.sendLine(b"Hello, my friend!")
    assert await client.next_line() == b"Ahoy, me matey!"


@pytest_twisted.ensureDeferred
async def test_tcp_line_split_across_packets(server) -> None:
    from twisted.internet import reactor

    client = await server()
    client.transport.write(b"yes, th")
    await deferLater(reactor, 0.05)  # let the first part go out on its own
    client.transport.write(b"e money\r\n")
    assert await client.next_line() == b"aye, th' doubloons"


@pytest_twisted.ensureDeferred
async def test_tcp_several_lines_in_one_write(server) -> None:
    client = await server()
    client.transport.write(b"hello\r\nyou\nare\r\n")
    assert [await client.next_line() for _ in range(3)] == [b"ahoy", b"ye", b"be"]


@pytest_twisted.ensureDeferred
async def test_tcp_garbage_from_one_client_does_not_hurt_another(server) -> None:
    rogue = await server()
    honest = await server()
    rogue.transport.write(b"\xff\xfd\x18\x00\x80garbage\r\n")
    assert (await rogue.next_line()).endswith(b"garbage")
    rogue.transport.write(bytes(range(256)).replace(b"\n", b"") * 40)  # no newline
    assert b"4096" in await rogue.next_line()
    await rogue.closed
    honest.sendLine(b"stop the boy")
    assert await honest.next_line() == b"avast th' lad"
