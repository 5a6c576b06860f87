"""
Sealed payloads (wssec.sealed.v1, docs/sealed-v1.md): the test vectors,
every refusal at the handshake, every tampering case on an open session
(each closes 1007), the Python client both ways, the configuration keys,
and a session through the real ``twistd wssec``.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from processes import free_port, repo_env, twistd
from twisted.internet import defer
from twisted.internet.defer import Deferred
from wsframes import BINARY, CLOSE, TEXT, RawClient, connect, frame, read_message

from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, SecureServerProtocol
from txwssec.client import SecureClientFactory, SecureClientProtocol
from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.messages import sealing
from txwssec.policy import Sealing

REPO = Path(__file__).resolve().parent.parent
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))

#: The test vectors of docs/sealed-v1.md (key 00..1f, client nonce 40..4f,
#: server nonce 80..8f, path /echo).
VECTORS = {
    "kid": "ccfdd5ff469a1254",
    "offer": "wssec.seal.zP3V_0aaElRAQUJDREVGR0hJSktMTU5P",
    "c2s_key": "387118c8c3eaccf0d574e51cb85773061fc36ea1f17d27a5df1f637a9934135a",
    "s2c_key": "63152b21bd77a6878fdd3a0af2448e537db1840cbf21a227ecee5c750271120d",
    "hello": "000000000000000000808182838485868788898a8b8c8d8e8f155e44860573d7735a06e25573c16edf",
    "c2s_0_text_hello": "01000000000000000061ae19a712d0c1ec055ef347693e3d0dcae8140ffd",
    "c2s_1_binary_00010203": "020000000000000001bd3e7cc4071a2a72575f52a872892facd71065d9",
    "s2c_1_text_hello": "01000000000000000111bc44db562a619580074abd4b786012b9aa55463f",
}


# -- the wire format ---------------------------------------------------------


def test_vectors() -> None:
    """The Python implementation produces the spec's vectors, and the spec shows them."""
    client_nonce, server_nonce = bytes(range(0x40, 0x50)), bytes(range(0x80, 0x90))
    handshake = sealing.ClientHandshake(KEY, "/echo", client_nonce)
    c2s, s2c = sealing.derive_keys(KEY, client_nonce, server_nonce, "/echo")
    server, hello = sealing.server_session(KEY, client_nonce, "/echo", server_nonce)
    client = handshake.accept_hello(hello, True)
    produced = {
        "kid": sealing.key_id(KEY).hex(),
        "offer": handshake.offer,
        "c2s_key": c2s.hex(),
        "s2c_key": s2c.hex(),
        "hello": hello.hex(),
        "c2s_0_text_hello": client.seal(b"hello", False).hex(),
        "c2s_1_binary_00010203": client.seal(b"\x00\x01\x02\x03", True).hex(),
    }
    server.unseal(bytes.fromhex(produced["c2s_0_text_hello"]), True)
    produced["s2c_1_text_hello"] = server.seal(b"hello", False).hex()
    assert produced == VECTORS
    spec = (REPO / "docs" / "sealed-v1.md").read_text()
    for value in VECTORS.values():
        assert value in spec


def test_keys_parse() -> None:
    text = "base64:" + base64.b64encode(KEY).decode()
    assert sealing.parse_key(text) == KEY
    assert sealing.parse_key("base64:" + base64.urlsafe_b64encode(KEY).decode()) == KEY
    assert len(sealing.parse_key(sealing.new_key())) == 32
    for bad in ("plain", "base64:!!!", "base64:" + base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError) as raised:
            sealing.parse_key(bad)
        assert bad[7:] not in str(raised.value) or bad == "plain"


def test_nothing_shows_keys() -> None:
    client_nonce = bytes(16)
    server, _ = sealing.server_session(KEY, client_nonce, "/echo")
    shown = " ".join(
        [
            repr(server),
            repr(sealing.ClientHandshake(KEY, "/echo")),
            repr(Sealing("required", keys={"alice": (KEY,)})),
            repr(SecureClientFactory("ws://127.0.0.1:1/echo", seal_key=KEY)),
        ]
    )
    for form in (KEY.hex(), repr(KEY), base64.b64encode(KEY).decode()):
        assert form not in shown


def test_offer_parsing() -> None:
    assert sealing.parse_offer(["chat", "token"]) is None
    entry = sealing.make_offer(KEY, bytes(16))
    assert sealing.parse_offer([entry]) == (sealing.key_id(KEY), bytes(16))
    for bad in ([entry, entry], ["wssec.seal.short"], [entry[:-1] + "*"]):
        with pytest.raises(sealing.SealError):
            sealing.parse_offer(bad)


# -- a server ------------------------------------------------------------------


class Recorder(SecureServerProtocol):
    """Echoes what it received, and remembers it in plaintext."""

    received: list[tuple[bytes, bool]]

    def onOpen(self) -> None:
        self.received = []
        self.factory.opened.append(self)  # type: ignore[attr-defined]

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((payload, isBinary))
        self.sendMessage(payload, isBinary)


def sealed_server(
    serve: Callable[[Any], int], mode: str = "required", keys: tuple[bytes, ...] = (KEY,)
) -> tuple[int, SecureServerFactory]:
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=Recorder,
        sealing=Sealing(mode, keys={"anonymous": keys}),
    )
    factory = SecureServerFactory(route)
    factory.opened = []  # type: ignore[attr-defined]
    return serve(factory), factory


def offer_header(handshake: sealing.ClientHandshake, *extra: str) -> str:
    return "Sec-WebSocket-Protocol: " + ", ".join([sealing.PROTOCOL, handshake.offer, *extra])


async def open_raw(port: int) -> tuple[RawClient, sealing.SealedSession]:
    handshake = sealing.ClientHandshake(KEY, "/echo")
    client = await connect(port, "/echo", offer_header(handshake))
    assert b"\r\nSec-WebSocket-Protocol: wssec.sealed.v1\r\n" in client.response
    assert handshake.offer.encode() not in client.response
    hello = await read_message(client.reader)
    assert hello.opcode == BINARY
    return client, handshake.accept_hello(hello.payload, True)


async def echo_raw(port: int) -> None:
    client, session = await open_raw(port)
    for payload, binary in ((b"hello", False), (bytes(range(256)), True)):
        await client.send(frame(BINARY, session.seal(payload, binary)))
        answer = await read_message(client.reader)
        assert answer.opcode == BINARY
        assert session.unseal(answer.payload, True) == (payload, binary)
    client.close()


@pytest_twisted.inlineCallbacks
def test_sealed_echo(serve: Callable[[Any], int]) -> Any:
    """The application sees and sends plaintext; the wire carries sealed binary frames."""
    port, factory = sealed_server(serve)
    yield aio(echo_raw(port))
    assert factory.opened[0].received == [(b"hello", False), (bytes(range(256)), True)]  # type: ignore[attr-defined]


def _flip(index: int) -> Callable[[bytes], bytes]:
    def tamper(message: bytes) -> bytes:
        changed = bytearray(message)
        changed[index] ^= 0x01
        return bytes(changed)

    return tamper


#: Each case: what is done to the second and third sealed messages the
#: client sends (the first goes through and is echoed).
TAMPERING: dict[str, Callable[[list[bytes]], list[tuple[int, bytes]]]] = {
    "ciphertext bit": lambda m: [(BINARY, _flip(10)(m[1]))],
    "tag bit": lambda m: [(BINARY, _flip(-1)(m[1]))],
    "counter bit": lambda m: [(BINARY, _flip(8)(m[1]))],
    "kind bit": lambda m: [(BINARY, _flip(0)(m[1]))],
    "replay": lambda m: [(BINARY, m[0])],
    "reorder": lambda m: [(BINARY, m[2]), (BINARY, m[1])],
    "drop": lambda m: [(BINARY, m[2])],
    "truncate tag": lambda m: [(BINARY, m[1][:-1])],
    "truncate to header": lambda m: [(BINARY, m[1][:9])],
    "text frame": lambda m: [(TEXT, base64.b64encode(m[1]))],
    "plaintext": lambda m: [(TEXT, b"hello")],
    "hello from client": lambda m: [(BINARY, m[1][:0] + b"\x00" + m[1][1:])],
}


async def tampered(port: int, case: str) -> tuple[int | None, str]:
    client, session = await open_raw(port)
    messages = [session.seal(b"message %d" % n, False) for n in range(3)]
    await client.send(frame(BINARY, messages[0]))
    echoed = await read_message(client.reader)
    assert session.unseal(echoed.payload, True) == (b"message 0", False)
    for opcode, payload in TAMPERING[case](messages):
        await client.send(frame(opcode, payload))
    answer = await read_message(client.reader)
    client.close()
    assert answer.opcode == CLOSE
    return answer.close_code, answer.close_reason


@pytest.mark.parametrize("case", sorted(TAMPERING))
@pytest_twisted.inlineCallbacks
def test_tampering_closes_1007(
    serve: Callable[[Any], int], captured_log: CapturedLog, case: str
) -> Any:
    port, factory = sealed_server(serve)
    code, reason = yield aio(tampered(port, case))
    assert (code, reason) == (1007, "sealed message rejected")
    # Only the untampered first message reached the application.
    assert factory.opened[0].received == [(b"message 0", False)]  # type: ignore[attr-defined]
    assert factory.counters["limit.sealed_message"] == 1
    lines = captured_log.matching(log_namespace="txwssec.server")
    assert any("sealed message rejected from" in str(e.get("log_format")) for e in lines)
    assert KEY.hex() not in captured_log.text()


@pytest_twisted.inlineCallbacks
def test_invalid_utf8_text_closes_1007(serve: Callable[[Any], int]) -> Any:
    """A sealed "text" message must be UTF-8 like any text message."""
    port, factory = sealed_server(serve)

    async def send() -> int | None:
        client, session = await open_raw(port)
        await client.send(frame(BINARY, session.seal(b"\xff\xfe", False)))
        answer = await read_message(client.reader)
        client.close()
        return answer.close_code

    assert (yield aio(send())) == 1007
    assert factory.opened[0].received == []  # type: ignore[attr-defined]


def refused(port: int, *headers: str) -> Deferred[bytes]:
    return aio(raw_exchange(port, upgrade_request("/echo", *headers)))


@pytest_twisted.inlineCallbacks
def test_refusals(serve: Callable[[Any], int]) -> Any:
    port, factory = sealed_server(serve)
    handshake = sealing.ClientHandshake(KEY, "/echo")
    stranger = sealing.ClientHandshake(OTHER_KEY, "/echo")
    cases = {
        # required, not offered
        (): b"HTTP/1.1 403 ",
        ("Sec-WebSocket-Protocol: chat",): b"HTTP/1.1 403 ",
        # the protocol without the offer, and the reverse
        (f"Sec-WebSocket-Protocol: {sealing.PROTOCOL}",): b"HTTP/1.1 400 ",
        (f"Sec-WebSocket-Protocol: {handshake.offer}",): b"HTTP/1.1 400 ",
        # two offers, a malformed one
        (offer_header(handshake, stranger.offer),): b"HTTP/1.1 400 ",
        (f"Sec-WebSocket-Protocol: {sealing.PROTOCOL}, wssec.seal.AAAA",): b"HTTP/1.1 400 ",
        # a key the consumer does not have
        (offer_header(stranger),): b"HTTP/1.1 403 ",
    }
    for headers, status in cases.items():
        response = yield refused(port, *headers)
        assert response.startswith(status), (headers, response)
        assert b"wssec.seal." not in response
    assert factory.opened == []  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_optional_and_off(serve: Callable[[Any], int]) -> Any:
    """Optional: sealed when offered, plaintext otherwise; off: never answered."""
    port, _ = sealed_server(serve, "optional")
    yield aio(echo_raw(port))
    client = yield aio(connect(port, "/echo"))
    assert b"Sec-WebSocket-Protocol" not in client.response
    client.close()
    port, _ = sealed_server(serve, "off")
    handshake = sealing.ClientHandshake(KEY, "/echo")
    client = yield aio(connect(port, "/echo", offer_header(handshake)))
    assert b"Sec-WebSocket-Protocol" not in client.response
    client.close()


@pytest_twisted.inlineCallbacks
def test_key_rotation(serve: Callable[[Any], int]) -> Any:
    """A consumer with two keys: a client of either is served."""
    port, _ = sealed_server(serve, keys=(OTHER_KEY, KEY))
    yield aio(echo_raw(port))


# -- the Python client -----------------------------------------------------------


class Collector(SecureClientProtocol):
    def onOpen(self) -> None:
        self.messages: list[tuple[bytes, bool]] = []
        self.got: Deferred[None] = Deferred()

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.messages.append((payload, isBinary))
        if len(self.messages) == 2:
            self.got.callback(None)


async def client_echo(url: str, key: bytes | str) -> list[tuple[bytes, bool]]:
    factory = SecureClientFactory(url, seal_key=key)
    factory.protocol = Collector
    protocol: Any = await factory.connect()
    await protocol.opened
    assert protocol.websocket_protocol_in_use == sealing.PROTOCOL
    protocol.sendMessage("héllo".encode(), False)
    protocol.sendMessage(b"\x00" * 70000, True)
    from twisted.internet import reactor

    await protocol.got.addTimeout(10, reactor)
    protocol.sendClose(1000)
    await protocol.closed
    messages: list[tuple[bytes, bool]] = protocol.messages
    return messages


@pytest_twisted.inlineCallbacks
def test_python_client(serve: Callable[[Any], int]) -> Any:
    port, factory = sealed_server(serve)
    messages = yield defer.ensureDeferred(
        client_echo(f"ws://127.0.0.1:{port}/echo", "base64:" + base64.b64encode(KEY).decode())
    )
    assert messages == [("héllo".encode(), False), (b"\x00" * 70000, True)]
    assert factory.opened[0].received == messages  # type: ignore[attr-defined]


@pytest_twisted.inlineCallbacks
def test_python_client_refuses_unsealed_server(serve: Callable[[Any], int]) -> Any:
    """A server that does not answer wssec.sealed.v1 is closed 1002; nothing opens."""
    port, _ = sealed_server(serve, "off")
    factory = SecureClientFactory(f"ws://127.0.0.1:{port}/echo", seal_key=KEY)
    protocol: Any = yield factory.connect()
    with pytest.raises(ConnectionError):
        yield protocol.opened
    yield protocol.closed
    assert protocol.localCloseCode == 1002


class Tamperer(SecureServerProtocol):
    """Sends its sealed reply with one bit of the tag flipped."""

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        assert self._seal is not None
        sealed = bytearray(self._seal.seal(payload, isBinary))
        sealed[-1] ^= 1
        from autobahn.twisted.websocket import WebSocketServerProtocol

        WebSocketServerProtocol.sendMessage(self, bytes(sealed), True)


@pytest_twisted.inlineCallbacks
def test_python_client_closes_on_tampering(
    serve: Callable[[Any], int], captured_log: CapturedLog
) -> Any:
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=Tamperer,
        sealing=Sealing("required", keys={"anonymous": (KEY,)}),
    )
    port = serve(SecureServerFactory(route))
    factory = SecureClientFactory(f"ws://127.0.0.1:{port}/echo", seal_key=KEY)
    factory.protocol = Collector
    protocol: Any = yield factory.connect()
    yield protocol.opened
    protocol.sendMessage(b"hi", False)
    yield protocol.closed
    assert protocol.localCloseCode == 1007
    assert protocol.messages == []
    formats = [e.get("log_format") or "" for e in captured_log.events]
    assert any("sealed message rejected" in line for line in formats)


# -- configuration -----------------------------------------------------------------


def config(route: dict[str, Any], consumer: dict[str, Any] | None = None) -> Any:
    consumer = consumer if consumer is not None else {}
    return parse(
        {
            "consumer": [{"name": "alice", "keys": ["k"], **consumer}],
            "route": [{"path": "/echo", "app": "echo", "auth": ["key"], **route}],
        }
    )


def test_config() -> None:
    text = "base64:" + base64.b64encode(KEY).decode()
    route = config({}).policy.routes[0]
    assert route.sealing == Sealing()  # default: off
    loaded = config({"sealed": "required"}, {"seal_keys": [text]})
    assert loaded.policy.routes[0].sealing.mode == "required"
    assert loaded.policy.routes[0].sealing.keys == {"alice": (KEY,)}
    assert loaded.consumers.by_name("alice").seal_keys == (KEY,)
    errors = {
        "route[0].sealed: expected string": ({"sealed": True}, {}),
        'route[0].sealed: expected one of "off", "optional", "required"': (
            {"sealed": "yes"},
            {},
        ),
        "route[0].sealed: no [[consumer]] has seal_keys": ({"sealed": "optional"}, {}),
        "route[0].sealed_upstream: only applies to routes with an upstream": (
            {"sealed_upstream": "unseal"},
            {},
        ),
        "consumer[0].seal_keys[0]: seal key must be": ({}, {"seal_keys": ["base64:AAAA"]}),
        "consumer[0].seal_keys: expected": ({}, {"seal_keys": text}),
    }
    for message, (route_keys, consumer_keys) in errors.items():
        with pytest.raises(ConfigError) as raised:
            config(route_keys, consumer_keys)
        assert str(raised.value).startswith(message), str(raised.value)
        assert base64.b64encode(KEY).decode() not in str(raised.value)


def test_config_shared_key() -> None:
    text = "base64:" + base64.b64encode(KEY).decode()
    with pytest.raises(ConfigError) as raised:
        parse(
            {
                "consumer": [
                    {"name": "alice", "seal_keys": [text]},
                    {"name": "bob", "seal_keys": [text]},
                ],
                "route": [{"path": "/", "app": "echo", "auth": ["anonymous"]}],
            }
        )
    assert str(raised.value) == (
        'consumer[1].seal_keys[0]: seal key already belongs to consumer "alice"'
    )


# -- through twistd wssec -------------------------------------------------------------


def write_config(folder: Path, port: int) -> Path:
    path = folder / "sealed.toml"
    key = "base64:" + base64.b64encode(KEY).decode()
    path.write_text(
        f"""
[server]
listen = ["tcp:{port}:interface=127.0.0.1"]

[[consumer]]
name = "alice"
keys = ["alice-key"]
seal_keys = ["{key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
sealed = "required"
"""
    )
    return path


@pytest_twisted.inlineCallbacks
def test_twistd_sealed_session(tmp_path: Path) -> Any:
    """Through twistd wssec: the Python client echoes intact; tampering closes 1007."""
    from txwssec.client import ApiKey

    port = free_port()
    server = twistd(write_config(tmp_path, port), tmp_path)
    try:
        server.wait_for("listening on")
        factory = SecureClientFactory(
            f"ws://127.0.0.1:{port}/echo", ApiKey("alice-key"), seal_key=KEY
        )
        factory.protocol = Collector
        protocol: Any = yield factory.connect()
        yield protocol.opened
        protocol.sendMessage(b"one", False)
        protocol.sendMessage(b"\x01\x02", True)
        yield protocol.got
        assert protocol.messages == [(b"one", False), (b"\x01\x02", True)]
        protocol.sendClose(1000)
        yield protocol.closed

        async def tamper() -> int | None:
            handshake = sealing.ClientHandshake(KEY, "/echo")
            client = await connect(port, "/echo", "apikey: alice-key", offer_header(handshake))
            session = handshake.accept_hello((await read_message(client.reader)).payload, True)
            sealed = bytearray(session.seal(b"x", False))
            sealed[12] ^= 0x80
            await client.send(frame(BINARY, bytes(sealed)))
            answer = await read_message(client.reader)
            client.close()
            return answer.close_code

        assert (yield aio(tamper())) == 1007
    finally:
        server.stop()
    assert "Traceback" not in server.output()
    assert KEY.hex() not in server.output()
    assert base64.b64encode(KEY).decode() not in server.output()


# -- a gateway ----------------------------------------------------------------------


class Upstream(SecureServerProtocol):
    """A plain upstream: echoes, and records what it got and was offered."""

    def onOpen(self) -> None:
        self.received: list[tuple[bytes, bool]] = []
        self.factory.seen.append(  # type: ignore[attr-defined]
            (self.http_headers.get("sec-websocket-protocol"), self.received)
        )

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.received.append((payload, isBinary))
        self.sendMessage(payload, isBinary)


def gateway(serve: Callable[[Any], int], upstream_sealing: Sealing, mode: str) -> tuple[int, Any]:
    from txwssec.policy import Upstream as UpstreamURL

    upstream_route = RoutePolicy(
        "/echo", [AnonymousAuthenticator()], protocol=Upstream, sealing=upstream_sealing
    )
    upstream_factory = SecureServerFactory(upstream_route)
    upstream_factory.seen = []  # type: ignore[attr-defined]
    upstream_port = serve(upstream_factory)
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        upstream=UpstreamURL((f"ws://127.0.0.1:{upstream_port}",)),
        sealing=Sealing("required", mode, keys={"anonymous": (KEY,)} if mode == "unseal" else {}),
    )
    return serve(SecureServerFactory(route)), upstream_factory


@pytest_twisted.inlineCallbacks
def test_gateway_unseals(serve: Callable[[Any], int]) -> Any:
    """sealed_upstream = "unseal": the upstream gets plaintext and no wssec.* entry."""
    port, upstream = gateway(serve, Sealing(), "unseal")
    messages = yield defer.ensureDeferred(client_echo(f"ws://127.0.0.1:{port}/echo", KEY))
    assert messages == [("héllo".encode(), False), (b"\x00" * 70000, True)]
    [(offered, received)] = upstream.seen
    assert offered is None
    assert received == messages
    code, reason = yield aio(tampered(port, "counter bit"))
    assert (code, reason) == (1007, "sealed message rejected")


@pytest_twisted.inlineCallbacks
def test_gateway_passes_sealed_through(serve: Callable[[Any], int]) -> Any:
    """sealed_upstream = "passthrough": the upstream seals; the gateway holds no key."""
    port, upstream = gateway(serve, Sealing("required", keys={"anonymous": (KEY,)}), "passthrough")
    messages = yield defer.ensureDeferred(client_echo(f"ws://127.0.0.1:{port}/echo", KEY))
    assert messages == [("héllo".encode(), False), (b"\x00" * 70000, True)]
    [(offered, received)] = upstream.seen
    assert offered.startswith("wssec.sealed.v1,wssec.seal.")
    assert received == messages
    code, reason = yield aio(tampered(port, "tag bit"))
    assert (code, reason) == (1007, "sealed message rejected")
    response = yield refused(port)
    assert response.startswith(b"HTTP/1.1 403 ")


def test_config_gateway() -> None:
    def load(**route: Any) -> Any:
        return parse(
            {
                "route": [
                    {"path": "/g", "upstream": "ws://127.0.0.1:1/", "auth": ["anonymous"], **route}
                ]
            }
        )

    sealing_of = load(sealed="required", sealed_upstream="passthrough").policy.routes[0].sealing
    assert (sealing_of.mode, sealing_of.upstream, dict(sealing_of.keys)) == (
        "required",
        "passthrough",
        {},
    )
    assert load().policy.routes[0].sealing.upstream == "unseal"
    for route, message in (
        ({"sealed_upstream": "open"}, 'route[0].sealed_upstream: expected one of "unseal"'),
        ({"sealed_upstream": 1}, "route[0].sealed_upstream: expected string"),
        ({"sealed": "required"}, "route[0].sealed: no [[consumer]] has seal_keys"),
    ):
        with pytest.raises(ConfigError) as raised:
            load(**route)
        assert str(raised.value).startswith(message), str(raised.value)


# -- docs/guide.rst --------------------------------------------------------------------------


def readme_block(language: str) -> str:
    """The first C{language} block of the user guide's "Sealed payloads"."""
    text = (REPO / "docs" / "guide.rst").read_text(encoding="utf-8")
    start = text.index("Sealed payloads\n===============")
    found = re.search(rf"\.\. code-block:: {language}\n\n((?:    .*\n|\n)+)", text[start:])
    assert found is not None
    return "\n".join(line[4:] for line in found.group(1).splitlines())


def test_readme_example(tmp_path: Path) -> None:
    """The user guide's "Sealed payloads": its TOML under twistd, its client echoes sealed."""
    port = free_port()
    config = tmp_path / "sealed.toml"
    config.write_text(readme_block("toml").replace("9090", str(port)))
    server = twistd(config, tmp_path)
    try:
        server.wait_for("wssec listening on")
        client = subprocess.run(
            [sys.executable, "-c", readme_block("python").replace("9090", str(port))],
            env=repo_env(),
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.stop()
    assert client.stdout == "subprotocol wssec.sealed.v1\ngot hello, sealed\n", client.stderr


# -- reload ------------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_reload_that_removes_a_seal_key_ends_its_sessions_3003(
    tmp_path: Path, serve: Callable[[Any], int]
) -> Any:
    """
    SIGHUP's reload (L{txwssec.lifecycle.reload}): a session sealed under a
    key that its consumer no longer has closes 3003; one sealed under a key
    the consumer keeps goes on.
    """
    from txwssec.client import ApiKey
    from txwssec.config import load
    from txwssec.lifecycle import reload

    def encoded(key: bytes) -> str:
        return "base64:" + base64.b64encode(key).decode()

    path = write_config(tmp_path, 0)
    text = path.read_text()
    both = f'seal_keys = ["{encoded(KEY)}", "{encoded(OTHER_KEY)}"]'
    path.write_text(re.sub(r"seal_keys = \[.*\]", both, text))
    current = load(path)
    factory = SecureServerFactory(current.policy)
    port = serve(factory)
    url = f"ws://127.0.0.1:{port}/echo"

    protocols: list[Any] = []
    for key in (KEY, OTHER_KEY):
        client = SecureClientFactory(url, ApiKey("alice-key"), seal_key=key)
        client.protocol = Collector
        protocol: Any = yield client.connect()
        yield protocol.opened
        protocols.append(protocol)
    removed, kept = protocols

    path.write_text(re.sub(r"seal_keys = \[.*\]", f'seal_keys = ["{encoded(OTHER_KEY)}"]', text))
    reload(path, [factory], current)
    from twisted.internet import reactor

    yield removed.closed.addTimeout(10, reactor)
    assert removed.remoteCloseCode == 3003
    kept.sendMessage(b"one", False)
    kept.sendMessage(b"two", False)
    yield kept.got
    assert kept.messages == [(b"one", False), (b"two", False)]
    kept.sendClose(1000)
    yield kept.closed
