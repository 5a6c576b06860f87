"""
Attacks on txwssec's server TLS transport (txwssec/_tlswire.py), each
differential: the same raw bytes go to Twisted's memory-BIO TLS transport
and to txwssec's, and the client must see the same bytes and the same
ending, the server protocol the same data and the same loss.

The client is Python's C{ssl} over memory BIOs (the bytes on the wire are
the test's to cut, join or corrupt), in a thread, on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio, upgrade_request
from test_tls_wire import ScriptedFactory, context, exchange
from twisted.protocols.tls import TLSMemoryBIOFactory
from wsframes import TEXT, frame

from txwssec._tlswire import ServerTLSFactory

TIMEOUT = 10.0

#: test_tls_wire's fixtures: its certificates, its listening ports.
folder = test_tls_wire.folder
listen = test_tls_wire.listen


class Wire:
    """A TLS client whose records are given to the test, not sent."""

    def __init__(self, port: int, folder: Path, version: ssl.TLSVersion | None = None) -> None:
        self.raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        if version is not None:
            client.maximum_version = version
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = client.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.raw.sendall(self.outgoing.read())
                data = self.raw.recv(65536)
                if not data:
                    raise ConnectionError("closed in the handshake") from None
                self.incoming.write(data)
        self.raw.sendall(self.outgoing.read())

    def records(self, data: bytes) -> bytes:
        """C{data} as TLS records (not sent)."""
        self.tls.write(data)
        return self.outgoing.read()

    def close_notify(self) -> bytes:
        try:
            self.tls.unwrap()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def ending(self) -> tuple[bytes, str]:
        """Read until the server ends: the plaintext, and how it ended."""
        received = b""
        self.raw.settimeout(2.0)
        while True:
            try:
                data = self.raw.recv(65536)
            except ConnectionResetError:
                return received + self._plain(), "reset"
            except TimeoutError:
                return received + self._plain(), "still open"
            if not data:
                received += self._plain()
                return received, "TCP close"
            self.incoming.write(data)
            received += self._plain()

    def _plain(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return out
            except ssl.SSLZeroReturnError:
                return out + b"<close_notify>"
            except ssl.SSLError as error:
                return out + f"<{error.reason}>".encode()
            if not chunk:
                return out
            out += chunk

    def close(self) -> None:
        self.raw.close()


Script = Callable[[int, Path], Any]


async def both(folder: Path, listen: Any, script: Script) -> tuple[Any, Any]:
    """
    Run C{script} against Twisted's transport, then txwssec's; once the
    server has let the connection go, as Twisted's did.
    """
    tls = context(folder)
    twisted_factory = TLSMemoryBIOFactory(tls, False, ScriptedFactory())
    lean_factory = ServerTLSFactory(tls, False, ScriptedFactory())
    twisted_port = await listen(twisted_factory)
    lean_port = await listen(lean_factory)
    twisted_result = await aio(asyncio.to_thread(script, twisted_port, folder))
    lean_result = await aio(asyncio.to_thread(script, lean_port, folder))

    async def let_go() -> None:
        async with asyncio.timeout(TIMEOUT):
            while twisted_factory.protocols or lean_factory.protocols:
                await asyncio.sleep(0.01)

    await aio(let_go())
    return twisted_result, lean_result


def _after_handshake(send: Callable[[Wire], bytes]) -> Script:
    def script(port: int, folder: Path) -> tuple[bytes, str]:
        wire = Wire(port, folder)
        try:
            wire.handshake()
            data = send(wire)
            if data:
                wire.raw.sendall(data)
            return wire.ending()
        finally:
            wire.close()

    return script


def _data_and_close_notify(wire: Wire) -> bytes:
    return wire.records(b"echo\nlast words") + wire.close_notify()


def _many_records(wire: Wire) -> bytes:
    records = wire.records(b"echo\n")
    for index in range(40):
        records += wire.records(b"%d;" % index)
    return records + wire.close_notify()


def _truncated(wire: Wire) -> bytes:
    records = wire.records(b"echo\nwhole") + wire.records(b"cut short")
    wire.raw.sendall(records[:-5])
    wire.raw.shutdown(socket.SHUT_WR)
    return b""


def _corrupted(wire: Wire) -> bytes:
    records = bytearray(wire.records(b"echo\nfirst") + wire.records(b"second"))
    records[-3] ^= 0xFF  # the second record's tag
    return bytes(records)


def _close_then_data(wire: Wire) -> bytes:
    return wire.close_notify() + b"\x17\x03\x03\x00\x05hello"


SCRIPTS = {
    "data and close_notify in one segment": _after_handshake(_data_and_close_notify),
    "many records in one segment": _after_handshake(_many_records),
    "corrupted record": _after_handshake(_corrupted),
    "bytes after close_notify": _after_handshake(_close_then_data),
}


@pytest.mark.parametrize("name", list(SCRIPTS))
@pytest_twisted.ensureDeferred
async def test_records_as_twisted(folder: Path, listen: Any, name: str) -> None:
    theirs, ours = await both(folder, listen, SCRIPTS[name])
    assert ours == theirs


@pytest_twisted.ensureDeferred
async def test_truncated_record_then_eof(folder: Path, listen: Any) -> None:
    """
    A whole record, a truncated one, the TCP EOF: the server protocol gets
    the whole record only, and the connection ends with a TCP close, as
    with Twisted's transport. (The answer to the whole record may be lost
    in the TCP transport's buffer when the EOF is read in the same poll,
    with either: not compared.)
    """
    theirs, ours = await both(folder, listen, _after_handshake(_truncated))
    assert ours[1] == theirs[1] == "TCP close"
    assert ours[0] in (b"", b"echo:whole")
    assert theirs[0] in (b"", b"echo:whole")


def _garbage(port: int, folder: Path) -> tuple[bytes, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        raw.settimeout(2.0)
        try:
            while data := raw.recv(65536):
                received += data
        except ConnectionResetError:
            return received, "reset"
        except TimeoutError:
            return received, "still open"
        return received, "TCP close"


def _vanish_in_handshake(port: int, folder: Path) -> bytes:
    wire = Wire(port, folder)
    try:
        wire.tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    wire.raw.sendall(wire.outgoing.read())
    wire.raw.recv(1)  # the server's first flight has begun
    wire.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    wire.close()  # a reset
    return b""


@pytest.mark.parametrize("script", [_garbage, _vanish_in_handshake], ids=["garbage", "vanish"])
@pytest_twisted.ensureDeferred
async def test_broken_handshakes_as_twisted(folder: Path, listen: Any, script: Script) -> None:
    theirs, ours = await both(folder, listen, script)
    assert ours == theirs


# -- a wss client that stops reading: the route's max_buffered_bytes holds ---------------


@pytest_twisted.ensureDeferred
async def test_tls_peer_that_stops_reading_is_closed_1013(folder: Path, serve: Any) -> None:
    """
    test_limits_slow's flood over txwssec's TLS transport: the client asks
    for 12.5 MiB and stops reading; the route's max_buffered_bytes (256 KiB)
    closes the session with 1013 and the flood stops, the server's memory
    grows by far less than the flood.
    """
    from test_limits_slow import FLOOD_MESSAGES, FloodProtocol

    from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
    from txwssec.policy import RouteLimits

    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=FloodProtocol,
        limits=RouteLimits(max_buffered_bytes=256 * 1024),
    )
    factory = SecureServerFactory(ServerPolicy.single(route))
    port = serve(ServerTLSFactory(context(folder), False, factory))

    def stop_reading() -> None:
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(TIMEOUT)
        raw.connect(("127.0.0.1", port))
        client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(upgrade_request("/echo"))
            head = b""
            while b"\r\n\r\n" not in head:
                head += tls.recv(1)
            assert head.startswith(b"HTTP/1.1 101 ")
            tls.sendall(frame(TEXT, b"flood"))
            deadline = time.monotonic() + TIMEOUT
            while factory.sessions and time.monotonic() < deadline:
                time.sleep(0.05)

    await aio(asyncio.to_thread(stop_reading))
    record = FloodProtocol.events.pop(id(factory))
    protocol = record["protocol"]
    assert factory.counters["limit.max_buffered_bytes"] == 1
    assert (protocol.localCloseCode, protocol.localCloseReason) == (1013, b"slow consumer")
    assert record["sent"] < FLOOD_MESSAGES
    growth = record["rss_peak"] - record["rss_before"]
    assert growth < 8 * 1024 * 1024, f"server RSS grew by {growth} bytes"


# -- mutual TLS and renegotiation ----------------------------------------------------------


@pytest.mark.parametrize("cert", ["alice", None])
@pytest_twisted.ensureDeferred
async def test_required_client_certificate_as_twisted(
    folder: Path,
    listen: Any,
    cert: str | None,
) -> None:
    """A required client certificate: its subject at once; without one, no data."""
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="required")
    theirs, ours = ScriptedFactory(), ScriptedFactory()
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, theirs))
    lean_port = await listen(ServerTLSFactory(tls, False, ours))

    def run(port: int) -> tuple[bytes, str]:
        try:
            return exchange(port, folder, [b"peer\n"], cert=cert)
        except (ssl.SSLError, ConnectionError) as error:
            return b"", type(error).__name__

    twisted_result = await aio(asyncio.to_thread(run, twisted_port))
    lean_result = await aio(asyncio.to_thread(run, lean_port))
    assert lean_result == twisted_result
    if cert is None:
        assert lean_result[0] == b""
        assert [p.lines for p in ours.protocols] == [0] * len(ours.protocols)
    else:
        assert lean_result == (b"'CN=alice,O=txwssec development'", "close_notify")


def _renegotiate(port: int, folder: Path) -> tuple[bytes, int]:
    """openssl s_client over TLS 1.2 asks to renegotiate ("R"), then sends a line."""
    import subprocess

    process = subprocess.run(
        [
            "openssl",
            "s_client",
            "-tls1_2",
            "-quiet",
            "-no_ign_eof",
            "-CAfile",
            str(folder / "ca.pem"),
            "-connect",
            f"127.0.0.1:{port}",
        ],
        input=b"R\necho\nafter\n",
        capture_output=True,
        timeout=TIMEOUT,
        check=False,
    )
    return process.stdout, process.returncode


@pytest_twisted.ensureDeferred
async def test_renegotiation_refused_as_twisted(folder: Path, listen: Any) -> None:
    tls = context(folder, min_version="1.2")
    theirs, ours = ScriptedFactory(), ScriptedFactory()
    twisted_port = await listen(TLSMemoryBIOFactory(tls, False, theirs))
    lean_port = await listen(ServerTLSFactory(tls, False, ours))
    twisted_result = await aio(asyncio.to_thread(_renegotiate, twisted_port, folder))
    lean_result = await aio(asyncio.to_thread(_renegotiate, lean_port, folder))
    assert lean_result == twisted_result
    assert lean_result[1] != 0  # s_client failed: the renegotiation was refused
