"""
The one-object TLS transport (txwssec/_tlsport.py, round 6) on the
listeners round 6 left two-layer: C{[server] workers}' shared ports
(L{txwssec.reuseport.SharedTLSPort}) and C{tls:systemd:} sockets
(L{txwssec._tlsport.DirectTLSPort.adopt}).

In this process: a shared C{tls:} listener (two of them on one port, as two
workers) and an adopted systemd socket give txwssec's WebSocket
connections L{DirectTLSServer} and what Autobahn reads of it (client
certificate, channel binding), other protocols and Twisted's C{ssl:} keep
the two-layer transport; a certificate reload while connections are
accepted but not yet in their handshake, mid-handshake and mid-message,
then a broken certificate file, against the two-layer transport, the
single-process direct one and the shared one (differential).

Through the real C{twistd wssec} with two workers (a test-only
C{sitecustomize}, tests/transport_probe/, notes each accepted
connection's transport class in every process): the workers' wss
connections are L{DirectTLSServer}s; client certificates, ALPN
(C{http/1.1} for a browser's offer), SIGHUP's certificate reload (and a
broken file refused, naming it) and SIGTERM's 1001 work on them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import test_tls_wire
from conftest import aio, upgrade_request
from processes import REPO, TIMEOUT, TWISTD, Process, repo_env
from test_mtls import ALICE, PKI
from test_tls_port_direct import Opened, _wss_open_close
from test_tls_server import make_server_files, serial_of
from test_tls_wire import ScriptedFactory, context, exchange
from test_workers import ADMIN_TOKEN, Server, close_code, free_admin_port, held_by, wait_until
from twisted.internet import reactor as global_reactor
from twisted.internet import unix
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogPublisher
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect
from wsframes import apply_mask, frame

from txwssec import (
    AnonymousAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
    _tlsport,
)
from txwssec._tlsport import DirectTLSPort, DirectTLSServer, TLSPortEndpoint
from txwssec._tlswire import ServerTLSFactory, ServerTLSProtocol
from txwssec.devcert import issue
from txwssec.listen import SystemdServerEndpoint, TLSServerEndpoint
from txwssec.reuseport import SharedTLSPort, reserve, shared
from txwssec.tls import ReloadingContextFactory, TLSSettings, reload_certificates

folder = test_tls_wire.folder

pytestmark = pytest.mark.filterwarnings("ignore:connect\\(\\) must be used:DeprecationWarning")


def echo_factory() -> SecureServerFactory:
    """txwssec's echo on /echo, anonymous, noting each transport (L{Opened})."""
    return SecureServerFactory(
        ServerPolicy.single(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Opened))
    )


async def reserved_shared(tls: Any, factory: Any, count: int = 2) -> tuple[list[Any], int]:
    """
    C{count} listeners of a C{tls:} listener's shared form on one reserved
    port (as C{count} workers); the ports and the port number.
    """
    endpoint = shared(
        TLSPortEndpoint(global_reactor, 0, tls, interface="127.0.0.1"), global_reactor
    )
    with reserve(endpoint) as held:
        number = held.getsockname()[1]
        listening = [
            await shared(
                TLSPortEndpoint(global_reactor, 0, tls, interface="127.0.0.1"),
                global_reactor,
                number,
            ).listen(factory)
            for _ in range(count)
        ]
    return listening, number


# -- shared ports, in this process ----------------------------------------------------


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "two layers"])
@pytest_twisted.ensureDeferred
async def test_shared_tls_listener_serves_txwssec_directly(
    folder: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """
    Two shared listeners of a C{tls:} listener on one port: every txwssec
    WebSocket connection gets L{DirectTLSServer} (the two-layer transport
    without L{_tlsport.DIRECT}), with Autobahn's details as the single
    process's: the client certificate, the channel binding.
    """
    monkeypatch.setattr(_tlsport, "DIRECT", direct)
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    Opened.opened = []
    ports, number = await reserved_shared(tls, echo_factory())
    try:
        assert {type(p).__name__ for p in ports} == {"SharedTLSPort" if direct else "ReusePort"}
        for _ in range(4):
            answer = await aio(asyncio.to_thread(_wss_open_close, number, folder))
            assert answer == b"HTTP/1.1 101 Switching Protocols | \x88\x02\x03\xe8"
        assert len(Opened.opened) == 4
        for transport, made, noted, channel in Opened.opened:
            assert (type(transport) is DirectTLSServer) is direct
            if not direct:
                assert isinstance(transport, ServerTLSProtocol)
            assert made == noted
            assert noted["channel_type"] == "tls" and noted["is_secure"]
            assert noted["peer_cert"]["subject"]["cn"] == "alice"
            assert channel is not None and noted["channel_id"]["tls-unique"] == channel
    finally:
        for port in ports:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_shared_other_protocols_keep_two_layers(folder: Path) -> None:
    """
    Another protocol on a shared C{tls:} listener: Twisted's TCP transport
    with L{ServerTLSProtocol}.
    """
    factory = ScriptedFactory()
    ports, number = await reserved_shared(context(folder), factory, count=1)
    try:
        assert type(ports[0]) is SharedTLSPort
        result = await aio(asyncio.to_thread(exchange, number, folder, [b"close\n"]))
        assert result == (b"bye", "close_notify")
        (protocol,) = factory.protocols
        assert isinstance(protocol.transport, ServerTLSProtocol)
    finally:
        await ports[0].stopListening()


def test_shared_endpoints_direct_for_tls_and_wss_only(folder: Path) -> None:
    """
    C{tls:} and C{wss:} listeners' shared forms are direct, as without
    workers; Twisted's C{ssl:} (two-layer with workers) stays so.
    """
    tls = context(folder)
    wss = f"wss:0:interface=127.0.0.1:cert={folder / 'server.pem'}:key={folder / 'server.key'}"
    from twisted.internet.endpoints import serverFromString

    ssl_ = (
        f"ssl:0:interface=127.0.0.1:privateKey={folder / 'server.key'}"
        f":certKey={folder / 'server.pem'}"
    )
    endpoints = [
        TLSPortEndpoint(global_reactor, 0, tls, interface="127.0.0.1"),
        serverFromString(global_reactor, wss),
        serverFromString(global_reactor, ssl_),
    ]
    assert isinstance(endpoints[2], SSL4ServerEndpoint)
    assert [shared(e, global_reactor, 5555).direct for e in endpoints] == [True, True, False]


# -- systemd sockets, in this process -------------------------------------------------


def adopted(family: int, sock: socket.socket) -> SystemdServerEndpoint:
    """A C{systemd:} endpoint on a duplicate of C{sock}, as systemd passes it."""
    endpoint = SystemdServerEndpoint(global_reactor, family, 0, None)
    endpoint._fileno = os.dup(sock.fileno())
    return endpoint


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "two layers"])
@pytest_twisted.ensureDeferred
async def test_systemd_tcp_socket_serves_txwssec_directly(
    folder: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """
    C{tls:systemd:domain=INET}: the passed socket is a L{DirectTLSPort}
    (its descriptor closed once adopted, as Twisted's adoption does), and
    txwssec's connections get L{DirectTLSServer}.
    """
    monkeypatch.setattr(_tlsport, "DIRECT", direct)
    tls = context(folder, client_ca=folder / "client-ca.pem", client_cert="optional")
    Opened.opened = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        systemd = adopted(socket.AF_INET, sock)
        passed = systemd._fileno
        port = await TLSServerEndpoint(systemd, tls).listen(echo_factory())
        try:
            with pytest.raises(OSError):
                os.fstat(passed)  # type: ignore[arg-type]
            assert (type(port) is DirectTLSPort) is direct
            assert port._type == "TLS"
            number = sock.getsockname()[1]
            assert port.getHost().port == number
            answer = await aio(asyncio.to_thread(_wss_open_close, number, folder))
            assert answer == b"HTTP/1.1 101 Switching Protocols | \x88\x02\x03\xe8"
            ((transport, made, noted, _),) = Opened.opened
            assert (type(transport) is DirectTLSServer) is direct
            assert made == noted and noted["peer_cert"]["subject"]["cn"] == "alice"
        finally:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_systemd_unix_socket_keeps_two_layers(folder: Path, tmp_path: Path) -> None:
    """C{tls:systemd:domain=UNIX}: a UNIX port with L{ServerTLSFactory}, as before."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen(4)
        systemd = adopted(socket.AF_UNIX, sock)
        assert not systemd.direct()
        port = await TLSServerEndpoint(systemd, context(folder)).listen(ScriptedFactory())
        try:
            assert type(port) is unix.Port and type(port.factory) is ServerTLSFactory
        finally:
            await port.stopListening()


# -- certificate reloads against each transport ----------------------------------------


class Pumped:
    """A TLS client over a raw socket, stepped by hand (memory BIOs)."""

    def __init__(
        self, port: int, client: ssl.SSLContext, session: ssl.SSLSession | None = None
    ) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = client.wrap_bio(
            self._in, self._out, server_hostname="127.0.0.1", session=session
        )

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("closed by the server")
        self._in.write(data)

    def hello(self) -> None:
        """Send the ClientHello and read the server's first flight (mid-handshake)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.do_handshake()
        self._flush()
        self._feed()

    def handshake(self) -> int:
        """The rest of the handshake; the serial of the server's certificate."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()
        return serial_of(self.tls.getpeercert(binary_form=True))

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def read(self, count: int) -> bytes:
        got = b""
        while len(got) < count:
            try:
                got += self.tls.read(65536)
            except ssl.SSLWantReadError:
                self._feed()
        return got

    def upgrade(self) -> None:
        self.send(upgrade_request("/echo"))
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.read(1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def close(self) -> None:
        self.sock.close()


def masked(text: bytes) -> bytes:
    """A client's masked text frame."""
    data = frame(0x1, text)
    header = bytes([data[0], data[1] | 0x80])
    mask = b"\x01\x02\x03\x04"
    return header + mask + apply_mask(text, mask)


def echoed(text: str) -> bytes:
    """The server's text frame of C{text}."""
    return b"\x81" + bytes([len(text)]) + text.encode()


def reload_scenario(
    port: int,
    client: ssl.SSLContext,
    accepted: Callable[[int], None],
    renew: Callable[[], int],
    reload: Callable[[], Any],
    break_file: Callable[[], Any],
    first: int,
) -> list[tuple[str, Any]]:
    """
    What clients see across two reloads (C{renew} writes a new certificate
    and gives its serial, C{reload} reloads; then C{break_file} writes a
    broken one and reloads): the certificate each connection was shown
    (C{old}, C{new}), whether a TLS session was resumed, and the echoes.
    C{accepted(n)} returns once the server accepted C{n} connections.
    """
    seen: list[tuple[str, Any]] = []
    second = 0

    def label(serial: int) -> str:
        return "old" if serial == first else "new" if serial == second else f"?{serial}"

    # before the reload: one in session (its TLS session resumed once), one
    # mid-message, one mid-handshake, one accepted with nothing sent
    opened = Pumped(port, client)
    seen.append(("opened", label(opened.handshake())))
    opened.upgrade()  # (a TLS 1.3 ticket read on the way)
    ticket = opened.tls.session
    resumed = Pumped(port, client, ticket)
    seen.append(("resumed", label(resumed.handshake()), resumed.tls.session_reused))
    halfway = Pumped(port, client)
    halfway.handshake()
    halfway.upgrade()
    message = masked(b"across the reload")
    halfway.send(message[:9])
    midway = Pumped(port, client)
    midway.hello()
    silent = Pumped(port, client)
    accepted(5)

    second = renew()
    seen.append(("reloaded", reload()))

    halfway.send(message[9:])
    seen.append(("halfway", halfway.read(len(b"across the reload") + 2)))
    seen.append(("midway", label(midway.handshake())))
    seen.append(("silent", label(silent.handshake())))
    fresh = Pumped(port, client)
    seen.append(("fresh", label(fresh.handshake())))
    stale = Pumped(port, client, ticket)
    seen.append(("stale ticket", label(stale.handshake()), stale.tls.session_reused))

    seen.append(("broken", break_file()))
    after = Pumped(port, client)
    seen.append(("after broken", label(after.handshake())))
    for name, each in [
        ("opened", opened),
        ("midway", midway),
        ("silent", silent),
        ("fresh", fresh),
        ("stale ticket", stale),
        ("after broken", after),
    ]:
        if name != "opened":
            each.upgrade()
        each.send(masked(name.encode()))
        seen.append((name, each.read(len(name) + 2)))
    for each in (opened, resumed, halfway, midway, silent, fresh, stale, after):
        each.close()
    return seen


def expected(reloaded: Any, broken: Any) -> list[tuple[Any, ...]]:
    """What L{reload_scenario} sees when C{reload} and C{break_file} give these."""
    return [
        ("opened", "old"),
        ("resumed", "old", True),
        ("reloaded", reloaded),
        ("halfway", echoed("across the reload")),
        ("midway", "old"),
        ("silent", "old"),
        ("fresh", "new"),
        ("stale ticket", "new", False),
        ("broken", broken),
        ("after broken", "new"),
        ("opened", echoed("opened")),
        ("midway", echoed("midway")),
        ("silent", echoed("silent")),
        ("fresh", echoed("fresh")),
        ("stale ticket", echoed("stale ticket")),
        ("after broken", echoed("after broken")),
    ]


class Counting(SecureServerFactory):
    """txwssec's factory, counting the connections it was asked for."""

    built = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.built += 1
        return super().buildProtocol(addr)


@pytest.fixture
def own_reloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """reload_certificates() reaches only this test's context factory."""
    import weakref

    monkeypatch.setattr(ReloadingContextFactory, "_instances", weakref.WeakSet())


@pytest.fixture
def captured() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.mark.parametrize("kind", ["two layers", "direct", "shared"])
@pytest_twisted.ensureDeferred
async def test_reload_mid_handshake_and_mid_message(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    own_reloads: None,
    captured: list[dict[str, Any]],
    kind: str,
) -> None:
    """
    A reload while a connection is accepted with nothing sent, one is
    mid-handshake (ClientHello answered) and one mid-message (half a frame
    received): those keep the old certificate and their sessions, new ones
    get the new one; a broken file is refused, the log naming it, and the
    new certificate stays. The same on the two-layer transport, the direct
    one and the shared (workers') one.
    """
    monkeypatch.setattr(_tlsport, "DIRECT", kind != "two layers")
    files = make_server_files(tmp_path)
    tls = ReloadingContextFactory(TLSSettings(files.cert, files.key))
    Opened.opened = []
    factory = Counting(
        ServerPolicy.single(RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Opened))
    )
    if kind == "shared":
        ports, number = await reserved_shared(tls, factory, count=1)
        port = ports[0]
    else:
        endpoint = TLSPortEndpoint(global_reactor, 0, tls, interface="127.0.0.1")
        port = await endpoint.listen(factory)
        number = port.getHost().port

    def call(f: Callable[[], Any]) -> Any:
        return blockingCallFromThread(global_reactor, f)

    def accepted(count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while call(lambda: factory.built) < count:
            assert time.monotonic() < deadline, "never accepted"
            time.sleep(0.01)

    def renew() -> int:
        return int(files.replace_server_certificate().certificate.serial_number)

    def break_file() -> Any:
        files.cert.write_text("not a certificate\n")
        return call(reload_certificates)

    client = ssl.create_default_context(cafile=str(files.ca_file))
    first = files.server.certificate.serial_number
    scenario = (number, client, accepted, renew, lambda: call(reload_certificates), break_file)
    try:
        seen = await aio(asyncio.to_thread(reload_scenario, *scenario, first))
    finally:
        await port.stopListening()
    assert seen == expected((1, 0), (0, 1))
    kinds = {type(t) for t, *_ in Opened.opened}
    assert kinds == ({DirectTLSServer} if kind != "two layers" else {ServerTLSProtocol})
    failed = [
        e for e in captured if e.get("log_format", "").startswith("certificate reload failed")
    ]
    assert [e["error"] for e in failed] == [f"cert: {files.cert} holds no PEM certificate"]


# -- the real twistd with workers ----------------------------------------------------

PROBE = REPO / "tests" / "transport_probe"
RESERVED = re.compile(r"wssec reserved tls:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)")

WORKERS_CONFIG = """
[server]
listen = ["tls:0:interface=127.0.0.1"]
workers = 2
shutdown_timeout = 5
auth_failures_per_minute = 0

[tls]
cert = "server.pem"
key = "server.key"
client_ca = "client-ca.pem"
client_cert = "optional"

[admin]
listen = ["tcp:{admin}:interface=127.0.0.1"]
token = "sha256:{digest}"

[[consumer]]
name = "alice"
tls_subject = "{alice}"

[[route]]
path = "/echo"
app = "echo"
auth = ["tls"]
"""


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[Server, PKI, Path]]:
    """
    C{twistd wssec} with two workers on a C{tls:} listener (client
    certificates optional, the route needing one), the transport probe on:
    the server, its certificates, the probe's file.
    """
    pki = PKI.create(tmp_path)
    pki.client("alice")
    admin = free_admin_port()
    digest = hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest()
    path = tmp_path / "wssec.toml"
    path.write_text(WORKERS_CONFIG.format(admin=admin, digest=digest, alice=ALICE))
    probe = tmp_path / "transports.txt"
    env = repo_env()
    env["PYTHONPATH"] = os.pathsep.join([str(PROBE), env["PYTHONPATH"]])
    env["TXWSSEC_TRANSPORT_PROBE"] = str(probe)
    process = Process(
        [str(TWISTD), "-n", "--pidfile=", "wssec", "--config", str(path)], tmp_path, env
    )
    try:
        process.wait_for("wssec 2 workers serving")
        server = Server.__new__(Server)
        server.process, server.admin = process, admin
        server.tls_port = int(process.wait_for(RESERVED).group(1))
        yield server, pki, probe
    finally:
        process.kill()
        (tmp_path / "twistd.out").write_text(process.output())


def transports(probe: Path, port: int, unique: bool = True) -> dict[int, Any]:
    """
    By pid: the (transport, protocol) classes of the connections accepted
    on C{port}, each kind once (C{unique}) or one per connection.
    """
    found: dict[int, Any] = {}
    for line in probe.read_text().splitlines():
        pid, local, transport, protocol = line.split()
        if int(local) == port:
            kinds = found.setdefault(int(pid), set() if unique else [])
            (kinds.add if unique else kinds.append)((transport, protocol))
    return found


def browser_like(pki: PKI, client: str | None = "alice") -> ssl.SSLContext:
    """A client context offering ALPN as browsers do (TLS 1.2: see test_workers' Server.open)."""
    context = pki.context(client, ssl.TLSVersion.TLSv1_2)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def opener(server: Server, pki: PKI) -> Callable[[], ClientConnection]:
    url = f"wss://127.0.0.1:{server.tls_port}/echo"
    return lambda: connect(url, ssl=browser_like(pki), proxy=None, open_timeout=TIMEOUT)


def test_workers_serve_wss_directly(workers: tuple[Server, PKI, Path]) -> None:
    """
    Both workers' wss connections are L{DirectTLSServer}s (the probe), with
    the client's certificate as principal, ALPN C{http/1.1} for a browser's
    offer; a client without a certificate is refused; SIGTERM closes every
    session with 1001 and the server exits 0.
    """
    server, pki, probe = workers
    pids = set(server.pids().values())
    clients = held_by(server, pids, opener(server, pki))
    assert {c.socket.selected_alpn_protocol() for c in clients} == {"http/1.1"}  # type: ignore[union-attr]
    records = server.sessions()
    assert {r["worker"] for r in records} == pids
    assert {(r["method"], r["consumer"]) for r in records} == {("tls", "alice")}
    by_pid = transports(probe, server.tls_port)
    assert set(by_pid) == pids
    assert {kind for kinds in by_pid.values() for kind, _ in kinds} == {"DirectTLSServer"}
    url = f"wss://127.0.0.1:{server.tls_port}/echo"
    with pytest.raises(InvalidStatus, match="401"):
        connect(url, ssl=browser_like(pki, None), proxy=None, open_timeout=TIMEOUT)
    server.process.process.send_signal(signal.SIGTERM)
    assert [close_code(client) for client in clients] == [1001] * len(clients)
    assert server.process.stop() == 0
    assert "Traceback" not in server.process.output()


def test_workers_sighup_reloads_certificate_on_direct_transport(
    workers: tuple[Server, PKI, Path],
) -> None:
    """
    SIGHUP with a new server certificate: sessions opened before go on
    (with the old certificate), new ones on both workers get the new one;
    then a broken certificate file is refused once, its log line naming the
    file, and the new certificate stays in use. Every connection was direct.
    """
    server, pki, probe = workers
    pids = set(server.pids().values())
    before = held_by(server, pids, opener(server, pki))
    first = {serial_of(c.socket.getpeercert(binary_form=True)) for c in before}  # type: ignore[union-attr]
    new = pki.write(issue(pki.server_ca, "localhost", ip_addresses=("127.0.0.1",)), "server")
    seen = len(server.process.lines)
    server.process.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "".join(server.process.lines[seen:]).count("configuration reloaded") == 2)
    after = held_by(server, pids, opener(server, pki))
    assert {serial_of(c.socket.getpeercert(binary_form=True)) for c in after} == {  # type: ignore[union-attr]
        new.certificate.serial_number
    }
    for client in before:
        client.send("kept")
        assert client.recv(TIMEOUT) == "kept"
        assert serial_of(client.socket.getpeercert(binary_form=True)) in first  # type: ignore[union-attr]

    (pki.folder / "server.pem").write_text("not a certificate\n")
    seen = len(server.process.lines)
    server.process.process.send_signal(signal.SIGHUP)
    line = server.process.wait_for("configuration reload failed", seen).string
    assert str(pki.folder / "server.pem") in line, line
    latest = held_by(server, pids, opener(server, pki))
    assert {serial_of(c.socket.getpeercert(binary_form=True)) for c in latest} == {  # type: ignore[union-attr]
        new.certificate.serial_number
    }
    by_pid = transports(probe, server.tls_port)
    assert set(by_pid) == pids
    assert {kind for kinds in by_pid.values() for kind, _ in kinds} == {"DirectTLSServer"}
    assert server.process.stop() == 0


def test_workers_sighup_mid_handshake_and_mid_message(
    workers: tuple[Server, PKI, Path],
) -> None:
    """
    L{reload_scenario} against the two workers (SIGHUP to the supervisor,
    each worker reloading the file): as on one process, connections
    accepted, mid-handshake or mid-message at the reload keep the old
    certificate and their sessions, new ones get the new one, a TLS ticket
    from before resumes nothing; a broken certificate file is refused once,
    naming it. All were direct.
    """
    server, pki, probe = workers
    process = server.process
    path = pki.folder / "server.pem"

    def connections() -> int:
        return sum(
            len(kinds) for kinds in transports(probe, server.tls_port, unique=False).values()
        )

    def accepted(count: int) -> None:
        wait_until(lambda: connections() >= count)

    def renew() -> int:
        issued = issue(pki.server_ca, "localhost", ip_addresses=("127.0.0.1",))
        return int(pki.write(issued, "server").certificate.serial_number)

    def reload() -> int:
        seen = len(process.lines)
        process.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "".join(process.lines[seen:]).count("configuration reloaded") == 2)
        return 2

    def break_file() -> str:
        path.write_text("not a certificate\n")
        seen = len(process.lines)
        process.process.send_signal(signal.SIGHUP)
        line = process.wait_for("configuration reload failed", seen).string
        return "refused, naming the file" if str(path) in line else line

    first = serial_of(ssl.PEM_cert_to_DER_cert(path.read_text()))
    client = pki.context("alice")  # TLS 1.3: tickets
    seen = reload_scenario(server.tls_port, client, accepted, renew, reload, break_file, first)
    # a ticket resumes on the worker that issued it only (keys of its own)
    resumed = seen[1]
    assert resumed[:2] == ("resumed", "old") and isinstance(resumed[2], bool)
    seen[1] = ("resumed", "old", True)
    assert seen == expected(2, "refused, naming the file")
    lines = "".join(process.lines)
    assert lines.count("configuration reload failed") == 1
    kinds = transports(probe, server.tls_port)
    assert {kind for each in kinds.values() for kind, _ in each} == {"DirectTLSServer"}
    assert process.stop() == 0
