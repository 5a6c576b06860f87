"""
A credential-adding relay between kosoku and txwssec.

kosoku connects with ``GET / HTTP/1.1``, no credentials and no way to add
any. For each connection this relay reads the request head, rewrites the
request path, inserts the API key header after the request line, connects
to the target (plain TCP, or TLS verified against a CA file), writes the
rewritten head and then pipes bytes both ways untouched, with flow control
both ways (each transport is the other's producer, as in
``twisted.protocols.portforward``). When one side closes, the other side is
closed once its pending bytes are written, so kosoku sees the server's TCP
close as it happened.

    python conformance/relay.py --target-port 9080 [--path /gw] [--tls-ca ca.pem]

The key comes from the environment variable named by ``--key-env`` (default
``CONFORMANCE_API_KEY``), so that it does not show in process listings.
Prints ``LISTENING <port>`` once it listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from listening import serve
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

reactor: Any = _reactor

#: A request head longer than this is refused (kosoku's is a few hundred bytes).
MAX_HEAD = 65536


@dataclass(frozen=True)
class Settings:
    """Where to relay to and what to add."""

    target: IStreamClientEndpoint
    path: str
    header: bytes


def rewrite_head(head: bytes, path: str, header: bytes) -> bytes:
    """
    The request head with its target's path replaced by C{path} (the query
    is kept) and C{header} (a full ``Name: value`` line, without CRLF)
    inserted after the request line.
    """
    request_line, sep, rest = head.partition(b"\r\n")
    method, target, version = request_line.split(b" ", 2)
    _, question, query = target.partition(b"?")
    target = path.encode("ascii") + question + query
    return b" ".join((method, target, version)) + sep + header + b"\r\n" + rest


class _Pipe(Protocol):
    """One leg of a relayed connection; C{peer} is the other leg."""

    peer: _Pipe | None = None

    def connectionMade(self) -> None:
        # Small writes go out at once, as from the endpoints themselves (both
        # kosoku and Autobahn disable Nagle): with Nagle's algorithm on, each
        # relayed small frame can wait for a delayed ACK (tens of ms).
        transport: Any = self.transport
        transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.peer = None
            if peer.transport is not None:
                peer.transport.loseConnection()


class Upstream(_Pipe):
    """The leg to txwssec."""

    peer: Downstream | None

    def connectionMade(self) -> None:
        super().connectionMade()
        downstream = self.peer
        assert downstream is not None and downstream.transport is not None
        if downstream.lost:
            return
        transport: Any = self.transport
        other: Any = downstream.transport
        transport.registerProducer(other, True)
        other.registerProducer(transport, True)
        other.resumeProducing()


class Downstream(_Pipe):
    """The leg kosoku connected to: holds bytes until the head is complete."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.buffer = b""
        self.connecting = False
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
            return
        self.buffer += data
        if self.connecting:
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse(b"431 Request Header Fields Too Large")
            return
        try:
            head = rewrite_head(self.buffer[: end + 4], self.settings.path, self.settings.header)
        except ValueError:
            self._refuse(b"400 Bad Request")
            return
        self.buffer = head + self.buffer[end + 4 :]
        self.connecting = True
        assert self.transport is not None
        transport: Any = self.transport
        transport.pauseProducing()
        upstream = Upstream()
        upstream.peer = self
        connecting = self.settings.target.connect(_Once(upstream))
        connecting.addCallbacks(self._connected, self._failed)

    def _connected(self, upstream: Upstream) -> None:
        assert upstream.transport is not None
        if self.lost:
            upstream.transport.loseConnection()
            return
        self.peer = upstream
        pending, self.buffer = self.buffer, b""
        upstream.transport.write(pending)

    def _failed(self, failure: Failure) -> None:
        if self.lost:
            return
        print(f"relay: cannot reach the target: {failure.getErrorMessage()}", file=sys.stderr)
        self._refuse(b"502 Bad Gateway")

    def _refuse(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        super().connectionLost(reason)


class _Once(Factory):
    """A client factory for exactly one, already built, protocol."""

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._protocol


class RelayFactory(Factory):
    """Builds a L{Downstream} per kosoku connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Downstream(self.settings)
        protocol.factory = self
        return protocol


def target_endpoint(
    host: str, port: int, ca_file: Path | None, hostname: str
) -> IStreamClientEndpoint:
    """TCP to C{host:port}, wrapped in TLS verified against C{ca_file} if given."""
    tcp = TCP4ClientEndpoint(reactor, host, port)
    if ca_file is None:
        return tcp
    trust = ssl.Certificate.loadPEM(ca_file.read_bytes())
    return wrapClientTLS(ssl.optionsForClientTLS(hostname, trustRoot=trust), tcp)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="kosoku -> txwssec relay")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any)")
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--path", default="/", help="request path sent to the target")
    parser.add_argument("--header-name", default="apikey", help="credential header")
    parser.add_argument("--key-env", default="CONFORMANCE_API_KEY")
    parser.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA")
    parser.add_argument("--tls-hostname", default="localhost", help="name to verify")
    options = parser.parse_args(argv)

    key = os.environ.get(options.key_env, "")
    if not key:
        parser.error(f"the environment variable {options.key_env} must hold the key")
    settings = Settings(
        target=target_endpoint(
            options.target_host, options.target_port, options.tls_ca, options.tls_hostname
        ),
        path=options.path,
        header=f"{options.header_name}: {key}".encode("ascii"),
    )

    serve(reactor, RelayFactory(settings), options.port)


if __name__ == "__main__":
    main()
