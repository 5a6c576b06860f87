"""
The gateway (txwssec.proxy) against real upstream servers on 127.0.0.1.

Upstreams are plain Autobahn servers on the same reactor (L{Backend}) that
record what they received (path, query, headers, offered subprotocols, the
raw request bytes, messages, pings, pongs, closes) and can be told to choose
a subprotocol, hold their 101, refuse with 403, or speak first in C{onOpen};
raw TCP servers play an upstream that redirects (301) and one that accepts
TCP and never answers. Clients are the C{websockets} library and raw
sockets (tests/wsframes.py) where the exact bytes or frames matter.

What happens when the upstream sends a message over the route's
C{max_message_size}: the gateway's upstream leg refuses it like any
txwssec endpoint (it closes the upstream connection with 1009), then the
client leg, whose upstream is gone without a close from the upstream,
closes the client with 1014 "upstream failed" and counts
C{gateway.upstream_lost}. No byte of the oversized message reaches the
client, and the gateway keeps serving new sessions.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import pytest_twisted
import websockets
import wsframes
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from conftest import CapturedLog, aio
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent
from websockets.exceptions import ConnectionClosed, InvalidStatus

from txwssec import (
    BasicAuthenticator,
    Consumer,
    ConsumerDirectory,
    JWTAuthenticator,
    KeyAuthenticator,
    OriginPolicy,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
    hash_password,
)
from txwssec.client import ApiKey, SecureClientFactory
from txwssec.consumers import key_digest
from txwssec.devcert import Issued, issue, make_ca
from txwssec.interfaces import Authenticator
from txwssec.policy import DEFAULT_MAX_MESSAGE_SIZE
from txwssec.proxy import Upstream

TIMEOUT = 10.0
KEY = "john-key"
PASSWORD = "alice-password"
JWT_SECRET = b"gateway-tests-0123456789abcdef-012345678"

CONSUMERS = ConsumerDirectory(
    [
        Consumer("john", key_digests=(key_digest(KEY),)),
        Consumer("jane"),  # JWT sub
        Consumer("alice", password=hash_password(PASSWORD, "pbkdf2-sha256")),
    ]
)


def reactor() -> Any:
    from twisted.internet import reactor

    return reactor


async def eventually(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait until C{condition()} holds (checked every 10 ms), or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await aio(asyncio.sleep(0.01))


# -- upstreams -------------------------------------------------------------


@dataclass
class Seen:
    """One upgrade request as an upstream received it."""

    path: str
    params: dict[str, list[str]]
    headers: dict[str, str]
    protocols: list[str]
    raw: bytes

    def header_lines(self, name: str) -> list[str]:
        """Every value of header C{name} in the raw request, in order."""
        prefix = name.lower().encode() + b":"
        return [
            line.split(b":", 1)[1].strip().decode("latin-1")
            for line in self.raw.split(b"\r\n")[1:]
            if line.lower().startswith(prefix)
        ]


class Backend(WebSocketServerProtocol):
    """
    An upstream that records everything and echoes messages, except text
    commands: C{!big N} sends N binary bytes, C{!ping P} pings with P,
    C{!close CODE REASON} closes.
    """

    factory: BackendFactory

    def onConnect(self, request: ConnectionRequest) -> Any:
        factory = self.factory
        factory.seen.append(
            Seen(
                request.path,
                {k: list(v) for k, v in request.params.items()},
                dict(request.headers),
                list(request.protocols),
                bytes(self.http_request_data),
            )
        )
        factory.connections.append(self)
        if factory.refuse:
            raise ConnectionDeny(403, "go away")
        chosen = next((p for p in factory.choose if p in request.protocols), None)
        if not factory.delay:
            factory.answered = True
            return chosen
        held: Deferred[str | None] = Deferred()

        def answer() -> None:
            factory.answered = True
            held.callback(chosen)

        reactor().callLater(factory.delay, answer)
        return held

    def onOpen(self) -> None:
        for payload, is_binary in self.factory.greetings:
            self.sendMessage(payload, is_binary)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.messages.append((payload, isBinary))
        if not isBinary and payload.startswith(b"!"):
            command, _, argument = payload[1:].partition(b" ")
            if command == b"big":
                self.sendMessage(b"x" * int(argument), True)
            elif command == b"ping":
                self.sendPing(argument)
            elif command == b"close":
                code, _, reason = argument.partition(b" ")
                self.sendClose(int(code), reason.decode())
            return
        self.sendMessage(payload, isBinary)

    def onPing(self, payload: bytes) -> None:
        self.factory.pings.append(payload)
        if self.factory.autopong:
            super().onPing(payload)
        else:
            # No pong: a text message instead, so that a client can tell the
            # ping arrived here and that nobody else answered it.
            self.sendMessage(b"pinged:" + payload, False)

    def onPong(self, payload: bytes) -> None:
        self.factory.pongs.append(payload)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.closes.append((wasClean, code, reason))


class BackendFactory(WebSocketServerFactory):
    """The upstream's factory: its behaviour, and what it recorded."""

    protocol = Backend  # type: ignore[assignment]

    def __init__(
        self,
        *,
        choose: Iterable[str] = (),
        refuse: bool = False,
        delay: float = 0,
        greetings: Iterable[tuple[bytes, bool]] = (),
        autopong: bool = True,
    ) -> None:
        super().__init__()
        self.setProtocolOptions(autoPingInterval=0, failByDrop=False)
        self.choose = tuple(choose)
        self.refuse = refuse
        self.delay = delay
        self.greetings = tuple(greetings)
        self.autopong = autopong
        self.answered = False
        self.seen: list[Seen] = []
        self.connections: list[Backend] = []
        self.messages: list[tuple[bytes, bool]] = []
        self.pings: list[bytes] = []
        self.pongs: list[bytes] = []
        self.closes: list[tuple[bool, int | None, str | None]] = []

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]


class RawProtocol(Protocol):
    """A TCP connection to a raw server; C{reply} is sent after the head."""

    factory: RawFactory

    def __init__(self) -> None:
        self.buffer = b""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.factory.reply and b"\r\n\r\n" in self.buffer:
            transport: Any = self.transport
            transport.write(self.factory.reply)


class RawFactory(Factory):
    """A raw TCP server: answers C{reply} to a request, or never answers."""

    protocol = RawProtocol  # type: ignore[assignment]

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.connections: list[RawProtocol] = []


@pytest.fixture
def raw_servers() -> Iterator[Callable[[RawFactory], RawFactory]]:
    """Track raw servers; abort every connection they accepted afterwards."""
    factories: list[RawFactory] = []

    def track(factory: RawFactory) -> RawFactory:
        factories.append(factory)
        return factory

    yield track
    for factory in factories:
        for connection in factory.connections:
            transport: Any = connection.transport
            transport.abortConnection()


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the gateway -------------------------------------------------------------


def gateway(
    *urls: str,
    authenticators: list[Authenticator] | None = None,
    ca_file: Path | None = None,
    timeout: float = 5.0,
    cooldown: float = 10.0,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    trust_forwarded_for: int = 0,
) -> SecureServerFactory:
    """A gateway with one route, C{/echo}, relaying to C{urls}."""
    route = RoutePolicy(
        "/echo",
        authenticators or [KeyAuthenticator(CONSUMERS, query="apikey")],
        origins=OriginPolicy.from_list(["*"]),
        max_message_size=max_message_size,
        upstream=Upstream(urls, ca_file=ca_file, timeout=timeout, cooldown=cooldown),
    )
    return SecureServerFactory(
        ServerPolicy.single(
            route,
            ping_interval=0,
            trust_forwarded_for=trust_forwarded_for,
            trusted_proxies=("127.0.0.1",) if trust_forwarded_for else (),
        )
    )


def ws_url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/"


async def connect(
    port: int,
    path: str = "/echo",
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    origin: str | None = None,
    max_size: int | None = 2**20,
) -> websockets.ClientConnection:
    """A websockets client through the gateway (the key in a header by default)."""
    if headers is None:
        headers = {"apikey": KEY}
    return await websockets.connect(
        f"ws://127.0.0.1:{port}{path}",
        additional_headers=headers,
        subprotocols=subprotocols,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        max_size=max_size,
        open_timeout=TIMEOUT,
        ping_interval=None,
    )


async def refused(port: int, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """The status and body of a refused handshake through the gateway."""
    try:
        ws = await connect(port, headers=headers)
    except InvalidStatus as error:
        return error.response.status_code, bytes(error.response.body or b"")
    await ws.close()
    raise AssertionError("the handshake succeeded")


async def exchange(ws: websockets.ClientConnection, message: str | bytes) -> str | bytes:
    await ws.send(message)
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def closed_with(ws: websockets.ClientConnection) -> tuple[int | None, str | None]:
    """Wait for the connection to close; the close code and reason received."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    except ConnectionClosed as closed:
        if closed.rcvd is None:
            return None, None
        return closed.rcvd.code, closed.rcvd.reason


def bearer_token(sub: str = "jane") -> str:
    now = datetime.datetime.now(datetime.UTC)
    return jwt.encode(
        {"sub": sub, "exp": now + datetime.timedelta(minutes=5)}, JWT_SECRET, algorithm="HS256"
    )


# -- the forwarded request -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_sees_path_query_and_headers_without_credentials(serve: Any) -> None:
    """
    The upstream gets the client's path and query minus the query
    credential; X-Consumer-Username (a client-sent one is replaced) and
    X-Forwarded-For = the client's address (a client-sent chain is dropped
    with trust_forwarded_for = 0); other headers and Origin pass; Cookie is
    stripped (forward_cookie is off by default). The query is not re-encoded.
    """
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))
    ws = await aio(
        connect(
            port,
            "/echo?room=5&apikey=" + KEY + "&x=y%20z",
            headers={
                "Cookie": "session=abc",
                "X-Trace": "trace-1",
                "X-Consumer-Username": "admin",
                "X-Forwarded-For": "10.9.8.7",
            },
            origin="https://app.example.com",
        )
    )
    assert await aio(exchange(ws, "hi")) == "hi"
    await aio(ws.close())

    seen = backend.last
    assert seen.raw.startswith(b"GET /echo?room=5&x=y%20z HTTP/1.1\r\n")
    assert seen.path == "/echo"
    assert seen.params == {"room": ["5"], "x": ["y z"]}
    assert seen.header_lines("x-consumer-username") == ["john"]
    assert seen.header_lines("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header_lines("cookie") == []
    assert seen.header_lines("x-trace") == ["trace-1"]
    assert seen.header_lines("origin") == ["https://app.example.com"]
    assert seen.header_lines("apikey") == []
    assert seen.header_lines("authorization") == []
    assert seen.header_lines("sec-websocket-protocol") == []
    assert KEY.encode() not in seen.raw
    assert b"10.9.8.7" not in seen.raw


@pytest_twisted.ensureDeferred
async def test_trusted_forwarded_for_chain_is_kept_and_extended(serve: Any) -> None:
    """trust_forwarded_for = 1: the client's chain, then the address that connected."""
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend)), trust_forwarded_for=1))
    ws = await aio(connect(port, headers={"apikey": KEY, "X-Forwarded-For": "10.9.8.7"}))
    await aio(ws.close())
    seen = backend.last
    assert seen.header_lines("x-forwarded-for") == ["10.9.8.7, 127.0.0.1"]
    assert seen.header_lines("x-consumer-username") == ["john"]
    # The key came in the apikey header: not forwarded.
    assert seen.header_lines("apikey") == []
    assert KEY.encode() not in seen.raw


@pytest_twisted.ensureDeferred
async def test_key_in_subprotocol_is_not_forwarded(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))
    ws = await aio(connect(port, headers={}, subprotocols=["chat.v1", "token", KEY]))
    await aio(ws.close())
    seen = backend.last
    assert seen.protocols == ["chat.v1"]
    assert seen.header_lines("sec-websocket-protocol") == ["chat.v1"]
    assert KEY.encode() not in seen.raw
    assert b"token" not in seen.raw


@pytest_twisted.ensureDeferred
async def test_basic_authorization_is_not_forwarded(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend)), authenticators=[BasicAuthenticator(CONSUMERS)]))
    ws = await aio(
        websockets.connect(
            f"ws://alice:{PASSWORD}@127.0.0.1:{port}/echo",
            additional_headers={"X-Trace": "t"},
            open_timeout=TIMEOUT,
        )
    )
    await aio(ws.close())
    seen = backend.last
    assert seen.header_lines("authorization") == []
    assert seen.header_lines("x-consumer-username") == ["alice"]
    assert seen.header_lines("x-trace") == ["t"]
    assert b"Basic" not in seen.raw


@pytest.mark.parametrize("via", ["header", "subprotocol"])
@pytest_twisted.ensureDeferred
async def test_bearer_token_is_not_forwarded(serve: Any, via: str) -> None:
    backend = BackendFactory(choose=["chat.v1"])
    port = serve(
        gateway(ws_url(serve(backend)), authenticators=[JWTAuthenticator(CONSUMERS, JWT_SECRET)])
    )
    token = bearer_token()
    if via == "header":
        ws = await aio(
            connect(port, headers={"Authorization": f"Bearer {token}"}, subprotocols=["chat.v1"])
        )
    else:
        ws = await aio(connect(port, headers={}, subprotocols=["chat.v1", "bearer", token]))
    assert ws.subprotocol == "chat.v1"
    await aio(ws.close())
    seen = backend.last
    assert seen.header_lines("authorization") == []
    assert seen.protocols == ["chat.v1"]
    assert seen.header_lines("x-consumer-username") == ["jane"]
    assert token.encode() not in seen.raw
    assert token.split(".")[2].encode() not in seen.raw
    assert b"bearer" not in seen.raw.lower()


@pytest_twisted.ensureDeferred
async def test_upstream_path_overrides_the_clients(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(f"ws://127.0.0.1:{serve(backend)}/feed"))
    ws = await aio(connect(port, "/echo?room=5"))
    await aio(ws.close())
    assert backend.last.raw.startswith(b"GET /feed?room=5 HTTP/1.1\r\n")
    assert backend.last.path == "/feed"


# -- subprotocols end to end -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_sees_the_upstreams_subprotocol(serve: Any) -> None:
    backend = BackendFactory(choose=["chat.v1"])
    port = serve(gateway(ws_url(serve(backend))))
    ws = await aio(connect(port, headers={}, subprotocols=["chat.v2", "chat.v1", "token", KEY]))
    assert ws.subprotocol == "chat.v1"
    await aio(ws.close())
    assert backend.last.protocols == ["chat.v2", "chat.v1"]


@pytest_twisted.ensureDeferred
async def test_no_upstream_choice_gives_the_marker_for_a_subprotocol_key(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))
    ws = await aio(connect(port, headers={}, subprotocols=["chat.v2", "chat.v1", "token", KEY]))
    assert ws.subprotocol == "token"
    await aio(ws.close())


@pytest_twisted.ensureDeferred
async def test_no_upstream_choice_gives_none_for_a_header_key(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))
    ws = await aio(connect(port, subprotocols=["chat.v2", "chat.v1"]))
    assert ws.subprotocol is None
    await aio(ws.close())
    assert backend.last.protocols == ["chat.v2", "chat.v1"]


# -- the client's 101 waits for the upstream's -------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_101_is_sent_only_after_the_upstreams(serve: Any) -> None:
    """
    An upstream holding its 101 for 0.5 s: the client receives nothing
    meanwhile, and its first byte arrives after the upstream answered.
    """
    backend = BackendFactory(delay=0.5, choose=["chat.v1"])
    port = serve(gateway(ws_url(serve(backend))))

    async def handshake() -> tuple[bool, bytes, bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                (
                    "GET /echo HTTP/1.1\r\n"
                    f"Host: 127.0.0.1:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Protocol: chat.v1\r\n"
                    f"apikey: {KEY}\r\n\r\n"
                ).encode()
            )
            await writer.drain()
            try:
                early = await asyncio.wait_for(reader.read(1), 0.3)
            except TimeoutError:
                early = b""
            first = early or await asyncio.wait_for(reader.read(1), TIMEOUT)
            answered_at_first_byte = backend.answered
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            return answered_at_first_byte, head, early == b""
        finally:
            writer.close()

    answered, head, quiet = await aio(handshake())
    assert quiet, "the gateway answered the client within 0.3 s of a 0.5 s upstream"
    assert answered, "the client's first byte came before the upstream's 101"
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
    assert b"Sec-WebSocket-Protocol: chat.v1\r\n" in head


# -- 502 and 504 -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_nothing_listening_upstream_is_502(serve: Any) -> None:
    factory = gateway(ws_url(closed_port()))
    port = serve(factory)
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    assert factory.counters["handshake.refused.502"] == 1


@pytest_twisted.ensureDeferred
async def test_upstream_refusing_is_502(serve: Any) -> None:
    backend = BackendFactory(refuse=True)
    port = serve(gateway(ws_url(serve(backend))))
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    assert len(backend.seen) == 1


@pytest_twisted.ensureDeferred
async def test_upstream_redirect_is_not_followed(serve: Any, raw_servers: Any) -> None:
    target = raw_servers(RawFactory())
    target_port = serve(target)
    redirect = raw_servers(
        RawFactory(
            b"HTTP/1.1 301 Moved Permanently\r\n"
            + f"Location: ws://127.0.0.1:{target_port}/\r\n\r\n".encode()
        )
    )
    port = serve(gateway(ws_url(serve(redirect))))
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    assert len(redirect.connections) == 1
    assert target.connections == []


@pytest_twisted.ensureDeferred
async def test_silent_upstream_is_504(serve: Any, raw_servers: Any) -> None:
    silent = raw_servers(RawFactory())
    factory = gateway(ws_url(serve(silent)), timeout=0.5)
    port = serve(factory)
    assert await aio(refused(port)) == (504, b"gateway timeout\n")
    assert len(silent.connections) == 1
    assert factory.counters["handshake.refused.504"] == 1
    # The gateway gave up on the upstream connection too.
    await eventually(
        lambda: not getattr(silent.connections[0].transport, "connected", True),
        "the gateway to drop the silent upstream",
    )


# -- wss:// upstreams ----------------------------------------------------------------


@dataclass
class Pem:
    cert: Path
    key: Path


def write_pem(folder: Path, name: str, issued: Issued) -> Pem:
    pem = Pem(folder / f"{name}.pem", folder / f"{name}.key")
    pem.cert.write_bytes(issued.cert_pem())
    pem.key.write_bytes(issued.key_pem())
    return pem


@dataclass
class TLSUpstreams:
    """Starts wss: Autobahn echo upstreams with chosen certificates."""

    folder: Path
    ca: Issued = field(default_factory=make_ca)
    ports: list[Any] = field(default_factory=list)

    @property
    def ca_file(self) -> Path:
        path = self.folder / "ca.pem"
        if not path.exists():
            path.write_bytes(self.ca.cert_pem())
        return path

    async def serve(self, name: str, issued: Issued) -> tuple[int, BackendFactory]:
        pem = write_pem(self.folder, name, issued)
        backend = BackendFactory()
        cert, key = (str(p).replace("\\", "\\\\").replace(":", "\\:") for p in (pem.cert, pem.key))
        endpoint = serverFromString(reactor(), f"wss:0:interface=127.0.0.1:cert={cert}:key={key}")
        port = await endpoint.listen(backend)
        self.ports.append(port)
        return int(port.getHost().port), backend


@pytest.fixture
def tls_upstreams(tmp_path: Path) -> Iterator[TLSUpstreams]:
    upstreams = TLSUpstreams(tmp_path)
    yield upstreams
    for port in upstreams.ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _expired(ca: Issued) -> Issued:
    now = datetime.datetime.now(datetime.UTC)
    return issue(
        ca,
        "127.0.0.1",
        ip_addresses=("127.0.0.1",),
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )


CERTIFICATES: dict[str, Callable[[Issued], Issued]] = {
    "wrong-name": lambda ca: issue(ca, "upstream.example", dns_names=("upstream.example",)),
    "untrusted-ca": lambda ca: issue(
        make_ca("other CA"), "127.0.0.1", ip_addresses=("127.0.0.1",)
    ),
    "expired": _expired,
}


@pytest.mark.parametrize("case", sorted(CERTIFICATES))
@pytest_twisted.ensureDeferred
async def test_wss_upstream_failing_verification_is_502(
    serve: Any, tls_upstreams: TLSUpstreams, captured_log: CapturedLog, case: str
) -> None:
    tls_port, backend = await tls_upstreams.serve(case, CERTIFICATES[case](tls_upstreams.ca))
    url = f"wss://127.0.0.1:{tls_port}/"
    port = serve(gateway(url, ca_file=tls_upstreams.ca_file))
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    # The upgrade request (and its headers) never reached the upstream.
    assert backend.seen == []
    failures = [formatEvent(e) for e in captured_log.matching(url=url)]
    assert len(failures) == 1
    assert "verif" in failures[0]  # "certificate verify failed" / "TLS verification failed"


@pytest_twisted.ensureDeferred
async def test_wss_upstream_with_its_ca_relays(serve: Any, tls_upstreams: TLSUpstreams) -> None:
    ca = tls_upstreams.ca
    tls_port, backend = await tls_upstreams.serve(
        "good", issue(ca, "127.0.0.1", ip_addresses=("127.0.0.1",))
    )
    port = serve(gateway(f"wss://127.0.0.1:{tls_port}/", ca_file=tls_upstreams.ca_file))
    ws = await aio(connect(port))
    assert await aio(exchange(ws, "over tls")) == "over tls"
    await aio(ws.close())
    assert backend.messages == [(b"over tls", False)]
    assert backend.last.header_lines("x-consumer-username") == ["john"]


@pytest_twisted.ensureDeferred
async def test_wss_upstream_tls_options_are_built_once_per_url(
    serve: Any, tls_upstreams: TLSUpstreams, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The CA file is read and the TLS options made at the first connection
    to an upstream URL, then reused: every session still verifies and
    relays.
    """
    built: list[str] = []
    tls_options = SecureClientFactory.tls_options

    def counting(self: SecureClientFactory) -> Any:
        built.append(self.url)
        return tls_options(self)

    monkeypatch.setattr(SecureClientFactory, "tls_options", counting)
    tls_port, backend = await tls_upstreams.serve(
        "good", issue(tls_upstreams.ca, "127.0.0.1", ip_addresses=("127.0.0.1",))
    )
    port = serve(gateway(f"wss://127.0.0.1:{tls_port}/", ca_file=tls_upstreams.ca_file))
    for index in range(3):
        ws = await aio(connect(port, f"/echo?n={index}"))
        assert await aio(exchange(ws, f"over tls {index}")) == f"over tls {index}"
        await aio(ws.close())
    assert len(built) == 1
    assert [m for m, _ in backend.messages] == [b"over tls 0", b"over tls 1", b"over tls 2"]


@pytest_twisted.ensureDeferred
async def test_sessions_do_not_log_the_upstream_factory(
    serve: Any, captured_log: CapturedLog
) -> None:
    """One line per session (accepted), not Twisted's start/stop of a factory."""
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))
    before = len(captured_log.events)
    ws = await aio(connect(port))
    assert await aio(exchange(ws, "x")) == "x"
    await aio(ws.close())
    await eventually(lambda: len(backend.closes) == 1, "the upstream closed")
    lines = [formatEvent(e) or "" for e in captured_log.events[before:]]
    assert [line for line in lines if "factory" in line.lower()] == []
    assert len([line for line in lines if line.startswith("accepted ")]) == 1


# -- relaying ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_message_sent_in_on_open_is_not_lost(serve: Any) -> None:
    backend = BackendFactory(
        greetings=[(b"welcome", False), (b"\x00\x01", True), (b"third", False)]
    )
    port = serve(gateway(ws_url(serve(backend))))

    async def run() -> list[str | bytes]:
        async with await connect(port) as ws:
            return [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in range(3)]

    assert await aio(run()) == ["welcome", b"\x00\x01", "third"]


@pytest_twisted.ensureDeferred
async def test_text_binary_large_and_fragmented_messages_are_relayed(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend)), max_message_size=2**20))
    large = bytes(range(256)) * 2048  # 512 KiB

    async def run() -> list[str | bytes]:
        async with await connect(port, max_size=2**20) as ws:
            return [
                await exchange(ws, "héllo"),
                await exchange(ws, b"\x00\xffbinary"),
                await exchange(ws, large),
                await exchange(ws, ["frag", "men", "ted"]),  # type: ignore[arg-type]
                await exchange(ws, [b"\x01" * 1000, b"\x02" * 1000]),  # type: ignore[arg-type]
            ]

    echoed = await aio(run())
    assert echoed == [
        "héllo",
        b"\x00\xffbinary",
        large,
        "fragmented",
        b"\x01" * 1000 + b"\x02" * 1000,
    ]
    assert backend.messages == [
        ("héllo".encode(), False),
        (b"\x00\xffbinary", True),
        (large, True),
        (b"fragmented", False),
        (b"\x01" * 1000 + b"\x02" * 1000, True),
    ]


@pytest_twisted.ensureDeferred
async def test_client_ping_reaches_the_upstream_and_its_pong_comes_back(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))

    async def run() -> wsframes.Frame:
        client = await wsframes.connect(port, "/echo", f"apikey: {KEY}")
        try:
            await client.send(wsframes.frame(wsframes.PING, b"ping-1"))
            return await wsframes.read_frame(client.reader)
        finally:
            client.close()

    pong = await aio(run())
    assert (pong.opcode, pong.payload) == (wsframes.PONG, b"ping-1")
    assert backend.pings == [b"ping-1"]


@pytest_twisted.ensureDeferred
async def test_gateway_does_not_answer_client_pings_itself(serve: Any) -> None:
    """
    An upstream that does not pong: the client's next frame is the
    upstream's text message about the ping, with no pong before it.
    """
    backend = BackendFactory(autopong=False)
    port = serve(gateway(ws_url(serve(backend))))

    async def run() -> wsframes.Frame:
        client = await wsframes.connect(port, "/echo", f"apikey: {KEY}")
        try:
            await client.send(wsframes.frame(wsframes.PING, b"p"))
            return await wsframes.read_frame(client.reader)
        finally:
            client.close()

    first = await aio(run())
    assert (first.opcode, first.payload) == (wsframes.TEXT, b"pinged:p")


@pytest_twisted.ensureDeferred
async def test_upstream_ping_reaches_the_client_and_its_pong_goes_back(serve: Any) -> None:
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend))))

    async def run() -> wsframes.Frame:
        client = await wsframes.connect(port, "/echo", f"apikey: {KEY}")
        try:
            await client.send(wsframes.frame(wsframes.TEXT, b"!ping up-1"))
            ping = await wsframes.read_frame(client.reader)
            await client.send(wsframes.frame(wsframes.PONG, ping.payload))
            # An echo round trip: the pong went before it.
            await client.send(wsframes.frame(wsframes.TEXT, b"after"))
            await wsframes.read_frame(client.reader)
            return ping
        finally:
            client.close()

    ping = await aio(run())
    assert (ping.opcode, ping.payload) == (wsframes.PING, b"up-1")
    assert backend.pongs == [b"up-1"]


# -- round-robin -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_round_robin_alternates_between_healthy_upstreams(serve: Any) -> None:
    first, second = BackendFactory(), BackendFactory()
    port = serve(gateway(ws_url(serve(first)), ws_url(serve(second))))
    served: list[str] = []
    for _ in range(4):
        before = len(first.seen), len(second.seen)
        ws = await aio(connect(port))
        await aio(ws.close())
        after = len(first.seen), len(second.seen)
        assert sum(after) - sum(before) == 1
        served.append("first" if after[0] > before[0] else "second")
    assert served == ["first", "second", "first", "second"]


@pytest_twisted.ensureDeferred
async def test_a_down_upstream_is_tried_after_the_healthy_one(
    serve: Any, captured_log: CapturedLog
) -> None:
    """
    With the first URL down (nothing listening), every handshake succeeds
    through the healthy one; the down URL, tried once, then goes last for
    C{cooldown} seconds.
    """
    healthy = BackendFactory()
    down_url, healthy_url = ws_url(closed_port()), ws_url(serve(healthy))
    factory = gateway(down_url, healthy_url, cooldown=60)
    port = serve(factory)
    for _ in range(3):
        ws = await aio(connect(port))
        assert await aio(exchange(ws, "x")) == "x"
        await aio(ws.close())
    assert len(healthy.seen) == 3
    assert len(captured_log.matching(url=down_url)) == 1
    pool = factory.upstreamPool(factory.policy.routes[0])
    assert pool.order() == [healthy_url, down_url]
    assert pool.order() == [healthy_url, down_url]


@pytest_twisted.ensureDeferred
async def test_a_failed_upstream_is_back_in_turn_after_its_cooldown(serve: Any) -> None:
    refusing, healthy = BackendFactory(refuse=True), BackendFactory()
    factory = gateway(ws_url(serve(refusing)), ws_url(serve(healthy)), cooldown=0.3)
    port = serve(factory)
    for _ in range(3):
        ws = await aio(connect(port))
        await aio(ws.close())
    # Tried first, failed, then kept last while the healthy one answers.
    assert (len(refusing.seen), len(healthy.seen)) == (1, 3)
    await aio(asyncio.sleep(0.4))
    for _ in range(2):
        ws = await aio(connect(port))
        await aio(ws.close())
    # Out of cooldown: tried in its turn again (and failed again).
    assert (len(refusing.seen), len(healthy.seen)) == (2, 5)


@pytest_twisted.ensureDeferred
async def test_all_upstreams_down_is_502(serve: Any) -> None:
    refusing = BackendFactory(refuse=True)
    factory = gateway(ws_url(closed_port()), ws_url(serve(refusing)))
    port = serve(factory)
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    assert await aio(refused(port)) == (502, b"bad gateway\n")
    # Each handshake tried each URL once.
    assert len(refusing.seen) == 2


# -- the upstream's size limit -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_upstream_message_over_the_limit_closes_the_client_1014(serve: Any) -> None:
    """
    The upstream sends more than the route's max_message_size: the upstream
    leg closes the upstream with 1009, the client gets 1014 "upstream
    failed" and nothing of the message; the gateway keeps serving.
    """
    backend = BackendFactory()
    factory = gateway(ws_url(serve(backend)), max_message_size=1000)
    port = serve(factory)

    async def run() -> tuple[str | bytes, tuple[int | None, str | None]]:
        ws = await connect(port)
        exact = await exchange(ws, "!big 1000")
        await ws.send("!big 1001")
        return exact, await closed_with(ws)

    exact, closed = await aio(run())
    assert exact == b"x" * 1000
    assert closed == (1014, "upstream failed")
    await eventually(lambda: len(backend.closes) == 1, "the upstream to see its close")
    assert backend.closes[0][1] == 1009
    assert factory.counters["gateway.upstream_lost"] == 1

    ws = await aio(connect(port))
    assert await aio(exchange(ws, "still here")) == "still here"
    await aio(ws.close())


@pytest_twisted.ensureDeferred
async def test_txwssec_client_sees_1014_when_the_upstream_fails(serve: Any) -> None:
    """
    DESIGN.md: 1014 means "upstream failed (gateway): reconnect with
    backoff", so txwssec's own client must report it as 1014.
    """
    backend = BackendFactory()
    port = serve(gateway(ws_url(serve(backend)), max_message_size=1000))
    factory = SecureClientFactory(f"ws://127.0.0.1:{port}/echo", ApiKey(KEY))
    protocol: Any = await factory.connect().addTimeout(TIMEOUT, reactor())
    await protocol.opened.addTimeout(TIMEOUT, reactor())
    protocol.sendMessage(b"!big 1001", False)
    assert await protocol.closed.addTimeout(TIMEOUT, reactor()) == (
        True,
        1014,
        "upstream failed",
    )
