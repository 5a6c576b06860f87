"""
The server's own frame reading (txwssec._wire): unmasking and UTF-8
validation agree with Autobahn's on every split, and a real server reads
messages cut at every kind of boundary (header split, payload split, many
frames in one write, all three length encodings) exactly as sent, with
Autobahn's own masker never created for a data frame.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import autobahn.websocket.protocol as autobahn_protocol
import pytest
import pytest_twisted
import wsframes
from autobahn.nvx._utf8validator import Utf8Validator as AutobahnUtf8Validator
from autobahn.nvx._xormasker import create_xor_masker
from conftest import aio

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
from txwssec._wire import Masker, Utf8Validator, unmask
from txwssec.apps.echo import EchoProtocol


def echo_factory() -> SecureServerFactory:
    route = RoutePolicy(
        "/echo", [AnonymousAuthenticator()], protocol=EchoProtocol, max_message_size=1 << 20
    )
    return SecureServerFactory(ServerPolicy.single(route))


# -- unmasking ---------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3, 4, 64, 255, 256, 257, 4096, 65536, 70001])
def test_unmask_matches_autobahn(size: int) -> None:
    data, mask = os.urandom(size), os.urandom(4)
    expected = create_xor_masker(mask, size).process(data) if size else b""
    assert unmask(data, mask) == expected
    assert unmask(memoryview(data), mask) == expected


def test_large_payloads_unmasked_into_one_new_bytes_object() -> None:
    """
    From NVX_FROM bytes on, the unmasked payload is one new bytes object
    made by NVX in place (one copy of the payload instead of two); the
    input, whole bytes or a slice of a larger buffer, is never changed.
    """
    import txwssec._wire as wire

    assert wire.FRESH_BYTES  # CPython with Autobahn's NVX: the one-copy path is the one tested
    rng = random.Random(19)
    for size in (256, 257, 1000, 4099, 65536, 70001):
        buffer = os.urandom(size + 20)
        frozen = bytes(memoryview(buffer))
        mask = os.urandom(4)
        expected = create_xor_masker(mask, size).process(buffer[10 : 10 + size])
        offset = rng.randrange(0, 21)
        whole = buffer[offset:] if offset else buffer
        for data in (memoryview(buffer)[10 : 10 + size], buffer[10 : 10 + size], whole):
            out = unmask(data, mask)
            assert type(out) is bytes and out is not data
            if data is whole:
                assert out == create_xor_masker(mask, len(whole)).process(whole)
            else:
                assert out == expected
        assert buffer == frozen  # the received bytes are untouched
        assert whole == frozen[offset:]


def test_unmask_without_the_one_copy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import txwssec._wire as wire

    monkeypatch.setattr(wire, "FRESH_BYTES", False)
    data, mask = os.urandom(70001), os.urandom(4)
    assert unmask(data, mask) == create_xor_masker(mask, 70001).process(data)


def test_masker_continues_the_mask_across_chunks() -> None:
    rng = random.Random(7)
    for _ in range(200):
        size = rng.randrange(1, 3000)
        data, mask = os.urandom(size), os.urandom(4)
        masker = Masker(mask)
        cuts = sorted(rng.sample(range(size + 1), min(size + 1, rng.randrange(1, 6))))
        out, start = [], 0
        for cut in [*cuts, size]:
            out.append(masker.process(memoryview(data)[start:cut]))
            start = cut
        assert b"".join(out) == create_xor_masker(mask, size).process(data)
        assert masker.pointer() == size


# -- UTF-8 validation --------------------------------------------------------

SAMPLES = [
    "κόσμε".encode(),
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",  # surrogate
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited",  # > U+10FFFF
    b"\xed\x9f\xbf\xee\x80\x80\xef\xbf\xbd\xf4\x8f\xbf\xbf",  # boundaries, valid
    b"\xc0\xaf",  # overlong
    b"\xe0\x80\xaf",
    b"\xf0\x80\x80\xaf",
    b"\xf8\x88\x80\x80\x80",
    b"\xed\xbf\xbf",
    b"\xf0\x9f\x98\x80 emoji",
    b"abc\xc3",  # ends inside a code point
    b"\xff",
    b"\x80",
]


def verdicts(validator: Any, chunks: list[bytes]) -> list[tuple[bool, bool]]:
    """(valid, ends on a code point) per chunk, up to the first invalid one."""
    validator.reset()
    seen = []
    for chunk in chunks:
        valid, ends, _, _ = validator.validate(chunk)
        seen.append((valid, ends))
        if not valid:
            break
    return seen


def test_utf8_validator_agrees_with_autobahn_on_every_split() -> None:
    ours, theirs = Utf8Validator(), AutobahnUtf8Validator()
    for sample in SAMPLES:
        for cut in range(len(sample) + 1):
            for cut2 in range(cut, len(sample) + 1):
                chunks = [sample[:cut], sample[cut:cut2], sample[cut2:]]
                assert verdicts(ours, chunks) == verdicts(theirs, chunks), (sample, cut, cut2)


def test_utf8_validator_agrees_with_autobahn_on_random_input() -> None:
    rng = random.Random(19)
    alphabet = [b"a", b"\x80", b"\xbf", b"\xc2", b"\xe0", b"\xed", b"\xa0", b"\xf0", b"\xf4"]
    alphabet += [b"\x90", b"\x8f", b"\xc0", b"\xff", "é".encode(), "€".encode(), "😀".encode()]
    ours, theirs = Utf8Validator(), AutobahnUtf8Validator()
    for _ in range(3000):
        sample = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        cuts = sorted(rng.sample(range(len(sample) + 1), 2))
        chunks = [sample[: cuts[0]], sample[cuts[0] : cuts[1]], sample[cuts[1] :]]
        assert verdicts(ours, chunks) == verdicts(theirs, chunks), (sample, cuts)


def test_utf8_validator_one_instance_agrees_with_autobahn_across_messages() -> None:
    """
    One validator (reset between messages, as a connection's) gives
    Autobahn's whole verdict, octet indexes included, for random messages
    of ASCII runs and multi-byte pieces, valid or not, cut into up to six
    chunks of bytes, bytearray or memoryview: an ASCII chunk right after a
    chunk that ended inside a code point is not taken for valid.
    """
    rng = random.Random(1907)
    pieces = [b"abc", b"x" * 40, b"\xc3", b"\xa9", b"\xe2\x82", b"\xac", b"\xed\xa0"]
    pieces += [b"\xf0\x9f", b"\x98\x80", b"\xff", b"\x80", b"\xc0\xaf", "é€".encode()]
    ours = Utf8Validator()
    for _ in range(5000):
        message = b"".join(rng.choice(pieces) for _ in range(rng.randrange(1, 8)))
        cuts = sorted(rng.sample(range(len(message) + 1), min(len(message), rng.randrange(0, 6))))
        kind = rng.choice([bytes, bytearray, memoryview])
        ends = zip([0, *cuts], [*cuts, len(message)], strict=True)
        chunks = [kind(message[a:b]) for a, b in ends]
        theirs = AutobahnUtf8Validator()
        ours.reset()
        for chunk in chunks:
            expected = theirs.validate(bytes(chunk))
            assert ours.validate(chunk) == expected, (message, cuts, kind)
            if not expected[0]:
                break


def test_utf8_validator_reads_ascii_without_the_decoder() -> None:
    """
    ASCII chunks at a code point boundary are valid without a decode (no
    C{str} made of a large text message); a chunk after one that ended
    inside a code point goes to the decoder.
    """

    class NoDecode:
        def decode(self, data: Any, final: bool = False) -> str:
            raise AssertionError("decoded")

        def reset(self) -> None:
            pass

    validator = Utf8Validator()
    real = validator._decoder
    validator._decoder = NoDecode()  # type: ignore[assignment]
    assert validator.validate(b"a" * 65536) == (True, True, 65536, 65536)
    assert validator.validate(b"bc") == (True, True, 2, 65538)
    validator._decoder = real
    assert validator.validate(b"\xc3") == (True, False, 1, 65539)
    validator._decoder = NoDecode()  # type: ignore[assignment]
    with pytest.raises(AssertionError, match="decoded"):
        validator.validate(b"a")
    validator._decoder = real
    validator.reset()
    validator._decoder = NoDecode()  # type: ignore[assignment]
    assert validator.validate(b"ok") == (True, True, 2, 2)


# -- the server reads frames cut anywhere -----------------------------------


def text_of(size: int) -> bytes:
    """C{size} bytes of valid UTF-8 with one- to four-byte characters."""
    text = ("aé€😀" * (size // 10 + 1)).encode()[:size]
    while True:
        try:
            text.decode()
        except UnicodeDecodeError:
            text = text[:-1]
        else:
            return text + b"a" * (size - len(text))


async def send_in_pieces(port: int, wire: bytes, cuts: list[int]) -> wsframes.RawClient:
    client = await wsframes.connect(port, "/echo")
    start = 0
    for cut in [*cuts, len(wire)]:
        await client.send(wire[start:cut])
        start = cut
    return client


@pytest.mark.parametrize("size", [0, 5, 125, 126, 300, 65535, 65536, 70000])
@pytest.mark.parametrize("opcode", [wsframes.TEXT, wsframes.BINARY], ids=["text", "binary"])
@pytest_twisted.ensureDeferred
async def test_messages_split_anywhere_echo_exactly(serve: Any, size: int, opcode: int) -> None:
    port = serve(echo_factory())
    payload = text_of(size) if opcode == wsframes.TEXT else os.urandom(size)
    # Three messages in one stream: one frame, three fragments, one frame,
    # written in pieces that cut headers and payloads at odd places.
    wire = (
        wsframes.frame(opcode, payload)
        + wsframes.fragments(opcode, payload, 3)
        + wsframes.frame(opcode, payload[::-1] if opcode == wsframes.BINARY else payload)
    )
    rng = random.Random(size * 7 + opcode)
    cuts = sorted({1, 3, 7, *(rng.randrange(len(wire)) for _ in range(6))})
    client = await aio(send_in_pieces(port, wire, [cut for cut in cuts if cut < len(wire)]))
    try:
        for expected in (payload, payload, payload[::-1] if opcode == 2 else payload):
            frame = await aio(wsframes.read_message(client.reader))
            assert (frame.opcode, frame.payload) == (opcode, expected)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_many_small_frames_in_one_write(serve: Any) -> None:
    port = serve(echo_factory())
    messages = [os.urandom(n) for n in range(0, 300, 7)]
    wire = b"".join(wsframes.frame(wsframes.BINARY, message) for message in messages)
    client = await aio(send_in_pieces(port, wire, []))
    try:
        for expected in messages:
            frame = await aio(wsframes.read_message(client.reader))
            assert frame.payload == expected
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_surrogate_split_between_fragments_fails_fast_1007(serve: Any) -> None:
    """The first two bytes of a surrogate end one fragment: 1007 before the message ends."""
    port = serve(echo_factory())
    first = wsframes.frame(wsframes.TEXT, b"abc\xed\xa0", fin=False)
    client = await aio(send_in_pieces(port, first, []))
    try:
        frame = await aio(wsframes.read_frame(client.reader))
        assert (frame.opcode, frame.close_code) == (wsframes.CLOSE, 1007)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_data_frames_do_not_create_autobahns_masker(serve: Any, monkeypatch: Any) -> None:
    created: list[int] = []

    def counting(mask: bytes, length: int) -> Any:
        created.append(length)
        return create_xor_masker(mask, length)

    monkeypatch.setattr(autobahn_protocol, "create_xor_masker", counting)
    port = serve(echo_factory())
    wire = wsframes.frame(wsframes.TEXT, b"hello") + wsframes.frame(wsframes.BINARY, b"x" * 70000)
    client = await aio(send_in_pieces(port, wire, [3]))
    try:
        assert (await aio(wsframes.read_message(client.reader))).payload == b"hello"
        assert (await aio(wsframes.read_message(client.reader))).payload == b"x" * 70000
        # A ping: read by txwssec too (a well-formed control frame).
        await client.send(wsframes.frame(wsframes.PING, b"p"))
        assert (await aio(wsframes.read_frame(client.reader))).payload == b"p"
    finally:
        client.close()
    assert created == []


@pytest_twisted.ensureDeferred
async def test_answers_to_one_read_leave_in_one_direct_send(serve: Any, monkeypatch: Any) -> None:
    """
    The echoes of 20 messages read at once, and of two 64 KiB messages
    (more than Twisted's 128 KiB per send), are written straight to the
    socket: no write-when-writable registration (startWriting), and
    nothing for Twisted's doWrite.
    """
    from twisted.internet.tcp import Server

    registrations: list[object] = []
    start_writing = Server.startWriting

    def counting_start(transport: Any) -> None:
        registrations.append(transport)
        start_writing(transport)

    monkeypatch.setattr(Server, "startWriting", counting_start)
    port = serve(echo_factory())
    client = await aio(send_in_pieces(port, b"", []))
    try:
        for messages in ([os.urandom(10) for _ in range(20)], [os.urandom(65536)] * 2):
            await client.send(b"".join(wsframes.frame(wsframes.BINARY, m) for m in messages))
            for expected in messages:
                assert (await aio(wsframes.read_message(client.reader))).payload == expected
    finally:
        client.close()
    assert registrations == []


@pytest_twisted.ensureDeferred
async def test_large_frames_sent_as_header_and_payload(serve: Any, monkeypatch: Any) -> None:
    """
    The echo of a 64 KiB message leaves as two buffers, its header and the
    payload the application gave (not a joined copy), gathered in one
    sendmsg with the other answers to the same read; small frames are
    joined with their headers.
    """
    import txwssec._wire as wire

    sent: list[list[bytes]] = []
    send_now = wire.send_now

    def recording(sock: Any, chunks: list[bytes]) -> list[bytes]:
        sent.append(list(chunks))
        return send_now(sock, chunks)

    monkeypatch.setattr(wire, "send_now", recording)
    port = serve(echo_factory())
    client = await aio(send_in_pieces(port, b"", []))
    try:
        big, small = os.urandom(65536), b"small"
        await client.send(
            wsframes.frame(wsframes.BINARY, big) + wsframes.frame(wsframes.BINARY, small)
        )
        for expected in (big, small):
            assert (await aio(wsframes.read_message(client.reader))).payload == expected
    finally:
        client.close()
    # (the first send is the 101)
    assert [[len(chunk) for chunk in chunks] for chunks in sent[1:]] == [[10, 65536, 7]]
    assert sent[1][0] == b"\x82\x7f" + (65536).to_bytes(8, "big")
    assert sent[1][1] == big


class FakeSocket:
    """Takes at most C{room} bytes per call; or raises C{error}."""

    def __init__(self, room: int, error: int | None = None) -> None:
        self.room, self.error = room, error
        self.calls: list[int] = []
        self.taken = b""

    def _take(self, data: bytes) -> int:
        if self.error is not None:
            raise OSError(self.error, "fake")
        taken = data[: self.room]
        self.taken += taken
        self.calls.append(len(data))
        return len(taken)

    def send(self, data: bytes) -> int:
        return self._take(bytes(data))

    def sendmsg(self, buffers: list[bytes]) -> int:
        return self._take(b"".join(buffers))


@pytest.mark.parametrize("room", [0, 1, 5, 6, 7, 15, 100])
def test_send_now_returns_what_the_socket_did_not_take(room: int) -> None:
    import errno

    from txwssec._wire import send_now

    chunks = [b"abcde", b"f", b"ghijklmn"]
    sock = FakeSocket(room)
    rest = send_now(sock, list(chunks))
    assert sock.taken + b"".join(rest) == b"abcdefghijklmn"
    assert sock.calls == [14]
    assert send_now(FakeSocket(0, errno.EAGAIN), list(chunks)) == chunks
    assert send_now(FakeSocket(0, errno.ECONNRESET), list(chunks)) == chunks
    many = [b"x"] * 2000
    sock = FakeSocket(1500)
    assert b"".join(send_now(sock, many)) == b"x" * 500
    assert sock.calls == [2000]


@pytest_twisted.ensureDeferred
async def test_plain_tcp_reads_256_kib_at_a_time(serve: Any) -> None:
    """
    A plain TCP server connection reads up to READ_SIZE per recv (its own
    doRead) while open; the override is gone once the connection is, so
    that it holds no reference cycle.
    """
    from txwssec._wire import READ_SIZE

    factory = echo_factory()
    port = serve(factory)
    payload = os.urandom(3 * 65536)
    client = await aio(send_in_pieces(port, wsframes.frame(wsframes.BINARY, payload), []))
    try:
        assert (await aio(wsframes.read_message(client.reader))).payload == payload
        (protocol,) = factory.sessions["anonymous"]
        transport = protocol.transport
        assert "doRead" in transport.__dict__
        assert READ_SIZE == 262144
        await client.send(wsframes.close_frame(1000))
        await aio(wsframes.read_frame(client.reader))
    finally:
        client.close()
    for _ in range(100):
        if not transport.connected:
            break
        await aio(asyncio.sleep(0.01))
    assert "doRead" not in transport.__dict__


@pytest_twisted.ensureDeferred
async def test_connection_made_formats_no_debug_line(serve: Any, monkeypatch: Any) -> None:
    """
    Autobahn formats a debug line's arguments (hltype: qualified names and
    colour codes) in connectionMade and _connectionMade on every
    connection, whatever the log level; the server's own do not.
    """
    import autobahn.twisted.websocket as autobahn_twisted

    formatted: list[str] = []

    def recording(obj: Any) -> str:
        formatted.append(getattr(obj, "__name__", repr(obj)))
        return ""

    monkeypatch.setattr(autobahn_twisted, "hltype", recording)
    monkeypatch.setattr(autobahn_protocol, "hltype", recording)
    port = serve(echo_factory())
    client = await aio(send_in_pieces(port, wsframes.frame(wsframes.TEXT, b"hi"), []))
    try:
        assert (await aio(wsframes.read_message(client.reader))).payload == b"hi"
    finally:
        client.close()
    assert "connectionMade" not in formatted
    assert "_connectionMade" not in formatted
