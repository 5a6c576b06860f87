"""
Hand-built WebSocket frames over raw asyncio sockets, for tests that need
to send what a well-behaved client library will not: exact fragment
counts, lying length headers, compressed frames, floods of pings.

Client frames are always masked (RFC 6455 section 5.3); server frames are
read unmasked. Everything here is asyncio: await it through C{aio()} from a
Twisted test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from dataclasses import dataclass

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA

#: Default seconds to wait for a server frame.
TIMEOUT = 10.0


def frame_header(
    opcode: int,
    length: int,
    *,
    fin: bool = True,
    rsv1: bool = False,
    mask: bytes = b"\x00\x00\x00\x00",
) -> bytes:
    """
    A masked client frame header announcing C{length} payload bytes (which
    need not follow: a header may promise 2**40 bytes).
    """
    first = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    if length < 126:
        head = struct.pack("!BB", first, 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + mask


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, rsv1: bool = False) -> bytes:
    """A complete masked client frame with a random mask."""
    mask = os.urandom(4)
    return frame_header(opcode, len(payload), fin=fin, rsv1=rsv1, mask=mask) + apply_mask(
        payload, mask
    )


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """XOR C{payload} with the 4-byte C{mask} (masking and unmasking alike)."""
    if not payload:
        return b""
    repeated = (mask * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def fragments(opcode: int, payload: bytes, count: int, *, rsv1: bool = False) -> bytes:
    """
    C{payload} as one message of exactly C{count} frames (the first with
    C{opcode}, the rest continuations; the last has FIN). Chunks may be
    empty when C{payload} is shorter than C{count}.
    """
    assert count >= 1
    step = -(-len(payload) // count) if payload else 0
    chunks = [payload[i * step : (i + 1) * step] for i in range(count)]
    out = []
    for index, chunk in enumerate(chunks):
        out.append(
            frame(
                opcode if index == 0 else CONTINUATION,
                chunk,
                fin=index == count - 1,
                rsv1=rsv1 and index == 0,
            )
        )
    return b"".join(out)


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    """A masked close frame."""
    return frame(CLOSE, struct.pack("!H", code) + reason.encode())


@dataclass(frozen=True)
class Frame:
    """A frame received from the server."""

    opcode: int
    payload: bytes
    fin: bool
    rsv1: bool

    @property
    def close_code(self) -> int | None:
        """The status code of a close frame (None if it has no body)."""
        assert self.opcode == CLOSE
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None

    @property
    def close_reason(self) -> str:
        """The reason text of a close frame."""
        assert self.opcode == CLOSE
        return self.payload[2:].decode()


async def read_frame(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> Frame:
    """Read one unmasked server frame."""

    async def read() -> Frame:
        first, second = await reader.readexactly(2)
        assert not second & 0x80, "server frames must not be masked"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await reader.readexactly(8))
        payload = await reader.readexactly(length)
        return Frame(first & 0x0F, payload, bool(first & 0x80), bool(first & 0x40))

    return await asyncio.wait_for(read(), timeout)


async def read_until_close(
    reader: asyncio.StreamReader, timeout: float = TIMEOUT
) -> tuple[list[Frame], Frame]:
    """
    Read server frames until a close frame.

    @return: the frames before it, and the close frame.
    """
    before: list[Frame] = []
    while True:
        received = await read_frame(reader, timeout)
        if received.opcode == CLOSE:
            return before, received
        before.append(received)


async def read_message(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> Frame:
    """
    Read one whole data message (reassembled, control frames skipped) as a
    single L{Frame} (C{rsv1} from its first frame: compressed); a close
    frame is returned as is.
    """
    first: Frame | None = None
    parts: list[bytes] = []
    while True:
        received = await read_frame(reader, timeout)
        if received.opcode == CLOSE:
            return received
        if received.opcode >= CLOSE:
            continue
        if first is None:
            first = received
        parts.append(received.payload)
        if received.fin:
            return Frame(first.opcode, b"".join(parts), True, first.rsv1)


@dataclass
class RawClient:
    """An upgraded raw connection: the 101 response head and the streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    response: bytes

    async def send(self, data: bytes) -> None:
        """Write bytes and wait until the transport takes them."""
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        """Close the socket (no close handshake)."""
        self.writer.close()


async def connect(
    port: int,
    path: str = "/echo",
    *headers: str,
    local_host: str = "127.0.0.1",
    rcvbuf: int | None = None,
    limit: int = 2**16,
    timeout: float = TIMEOUT,
) -> RawClient:
    """
    Open a WebSocket connection by hand and read the response head.

    @param headers: extra request header lines (C{"Name: value"}).
    @param local_host: source address to bind (e.g. C{"127.0.0.2"}).
    @param rcvbuf: C{SO_RCVBUF} to set before connecting, to make a peer
        whose receive window fills up quickly.
    @param limit: the StreamReader buffer limit.
    @raise AssertionError: if the response is not a 101.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((local_host, 0))
    sock.setblocking(False)
    await asyncio.wait_for(
        asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)), timeout
    )
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *headers,
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    if not response.startswith(b"HTTP/1.1 101 "):
        writer.close()
        raise AssertionError(f"upgrade refused: {response!r}")
    return RawClient(reader, writer, response)
