"""
Hardening found by a black-box attack: X-Forwarded-For is believed only
from trusted proxies and only as IP addresses; IPv6 clients are counted per
/64; the failure window stays small whatever keys a client makes up.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio, raw_exchange, upgrade_request
from test_limits_connections import BAD_KEY, JOHN_KEY, echo, make_factory, refused

from txwssec.admission import Admission, client_address
from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.limits import FailureWindow, address_key
from txwssec.logs import bounded

Serve = Callable[[Any], int]
XFF = "X-Forwarded-For"
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)


# -- which address is the client ---------------------------------------------------


def test_client_address_rules() -> None:
    """The walk from the right, through trusted proxies only, IPs only."""
    proxies = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert client_address("127.0.0.1", ["6.6.6.6"], proxies, 1) == "6.6.6.6"
    # A peer that is not a trusted proxy: its header is ignored.
    assert client_address("192.0.2.7", ["6.6.6.6"], proxies, 1) == "192.0.2.7"
    # Two hops: the second entry only because the first is a trusted proxy.
    assert client_address("127.0.0.1", ["1.1.1.1, 10.1.1.1"], proxies, 2) == "1.1.1.1"
    assert client_address("127.0.0.1", ["1.1.1.1", "10.1.1.1"], proxies, 2) == "1.1.1.1"
    assert client_address("127.0.0.1", ["1.1.1.1, 2.2.2.2"], proxies, 2) == "2.2.2.2"
    assert client_address("127.0.0.1", ["1.1.1.1, 10.1.1.1"], proxies, 1) == "10.1.1.1"
    # Garbage: the last address believed so far.
    for garbage in ("not-an-ip", "", " ", "x" * 4096, "1.2.3.4:80", "[::1]"):
        assert client_address("127.0.0.1", [garbage], proxies, 1) == "127.0.0.1"
    assert client_address("127.0.0.1", ["junk, 10.1.1.1"], proxies, 2) == "10.1.1.1"
    # Normal forms: IPv4-mapped IPv6 as IPv4, IPv6 compressed.
    assert client_address("::ffff:127.0.0.1", ["2001:DB8:0::1"], proxies, 1) == "2001:db8::1"
    assert client_address("127.0.0.1", ["::ffff:6.6.6.6"], proxies, 1) == "6.6.6.6"


def test_trust_forwarded_for_without_trusted_proxies_is_a_config_error() -> None:
    """Either key alone is an error that names both."""
    base: dict[str, Any] = {"route": [{"path": "/", "app": "echo", "auth": ["anonymous"]}]}
    with pytest.raises(ConfigError) as caught:
        parse({**base, "server": {"trust_forwarded_for": 1}})
    assert caught.value.path == "server.trust_forwarded_for"
    assert "server.trusted_proxies" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({**base, "server": {"trusted_proxies": ["127.0.0.1"]}})
    assert caught.value.path == "server.trusted_proxies"
    assert "server.trust_forwarded_for" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse({**base, "server": {"trust_forwarded_for": 1, "trusted_proxies": ["10.0.0.1/8"]}})
    assert caught.value.path == "server.trusted_proxies[0]"
    with pytest.raises(ConfigError) as caught:
        parse({**base, "server": {"trust_forwarded_for": 1, "trusted_proxies": "10.0.0.0/8"}})
    assert str(caught.value) == "server.trusted_proxies: expected array"
    policy = parse(
        {**base, "server": {"trust_forwarded_for": 1, "trusted_proxies": ["10.0.0.0/8", "::1"]}}
    ).policy
    assert [str(n) for n in policy.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert parse(base).policy.trusted_proxies == ()


@pytest_twisted.ensureDeferred
async def test_direct_client_rotating_forwarded_for_is_locked_out(serve: Serve) -> None:
    """
    The attack: trust_forwarded_for = 1 and a client that connects directly
    (not from a trusted proxy) sends a new X-Forwarded-For each time. Its
    failures count against its real address, which is locked out.
    """
    factory = make_factory(
        auth_failures_per_minute=3,
        max_connections_per_ip=1,
        trust_forwarded_for=1,
        trusted_proxies=("10.0.0.0/8",),
    )
    port = serve(factory)

    async def client() -> None:
        for n in range(3):
            response = await refused(port, BAD_KEY, headers={XFF: f"198.51.100.{n}"})
            assert response.status_code == 401
        blocked = await refused(port, JOHN_KEY, headers={XFF: "198.51.100.99"})
        assert blocked.status_code == 429
        assert "Retry-After" in blocked.headers

    await aio(client())
    assert list(factory.admission.auth_failures._counts) == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_direct_client_rotating_forwarded_for_hits_per_ip_cap(serve: Serve) -> None:
    factory = make_factory(
        max_connections_per_ip=1, trust_forwarded_for=1, trusted_proxies=("10.0.0.0/8",)
    )
    port = serve(factory)
    from test_limits_connections import connect

    async def client() -> None:
        async with connect(port, headers={XFF: "198.51.100.1"}) as first:
            await echo(first)
            assert factory.connections.count("127.0.0.1") == 1
            second = await refused(port, headers={XFF: "198.51.100.2"})
            assert second.status_code == 429

    await aio(client())


@pytest_twisted.ensureDeferred
async def test_forwarded_for_from_trusted_proxy_is_honoured(serve: Serve) -> None:
    """From a trusted proxy (127.0.0.1 here), each forwarded client is its own."""
    factory = make_factory(
        auth_failures_per_minute=1, trust_forwarded_for=1, trusted_proxies=("127.0.0.0/8",)
    )
    port = serve(factory)
    from test_limits_connections import connect

    async def client() -> None:
        assert (await refused(port, BAD_KEY, headers={XFF: "198.51.100.1"})).status_code == 401
        assert (await refused(port, JOHN_KEY, headers={XFF: "198.51.100.1"})).status_code == 429
        async with connect(port, headers={XFF: "198.51.100.2"}) as other:
            await echo(other)

    await aio(client())
    assert list(factory.admission.auth_failures._counts) == ["198.51.100.1"]


@pytest_twisted.ensureDeferred
async def test_garbage_forwarded_for_falls_back_to_the_peer(
    serve: Serve, captured_log: Any
) -> None:
    """
    Values that are not IP addresses, from a trusted proxy: the peer's
    address is the key (one key for all of them), and no log line carries
    the value.
    """
    factory = make_factory(
        auth_failures_per_minute=100, trust_forwarded_for=1, trusted_proxies=("127.0.0.1",)
    )
    port = serve(factory)
    long_value = "A" * 4096
    for value in ("not-an-ip", "", long_value, "1.2.3.4.5", "999.0.0.1"):
        request = upgrade_request("/echo", f"apikey: {BAD_KEY}", f"{XFF}: {value}")
        response = await aio(raw_exchange(port, request))
        assert response.startswith(b"HTTP/1.1 401 ")
    assert list(factory.admission.auth_failures._counts) == ["127.0.0.1"]
    assert long_value not in captured_log.text()
    assert "not-an-ip" not in captured_log.text()


# -- bounded state, IPv6 /64 ---------------------------------------------------------


def test_failure_window_stays_bounded_after_many_distinct_keys() -> None:
    """
    Many distinct forwarded addresses (from a trusted proxy): the window
    keeps at most max_keys keys, each a short address text.
    """
    policy = make_factory(auth_failures_per_minute=5).policy
    admission = Admission(policy)
    admission.auth_failures = FailureWindow(5, max_keys=1000)
    for n in range(5000):
        host = client_address(
            "127.0.0.1", [f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}"], LOOPBACK, 1
        )
        admission.authentication_failed(host, 1.0)
        admission.authentication_failed(
            client_address("127.0.0.1", ["x" * 4096 + str(n)], LOOPBACK, 1), 1.0
        )
    window = admission.auth_failures
    assert len(window) == 1000
    assert max(len(key) for key in window._counts) <= len("255.255.255.255")
    # The most recent ones are kept; the oldest were evicted.
    assert "10.0.19.135" in window._counts  # n = 4999
    assert "10.0.0.0" not in window._counts


def test_ipv6_keys_per_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert address_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_key("192.0.2.1") == "192.0.2.1"


@pytest_twisted.ensureDeferred
async def test_two_ipv6_addresses_in_one_64_share_lockout_and_cap(serve: Serve) -> None:
    """Forwarded by a trusted proxy: 2001:db8::1 and 2001:db8::2 are one client."""
    factory = make_factory(
        auth_failures_per_minute=2,
        max_connections_per_ip=1,
        trust_forwarded_for=1,
        trusted_proxies=("127.0.0.1",),
    )
    port = serve(factory)
    from test_limits_connections import connect

    async def client() -> None:
        async with connect(port, headers={XFF: "2001:db8::1"}) as first:
            await echo(first)
            assert factory.connections.count("2001:db8::/64") == 1
            capped = await refused(port, headers={XFF: "2001:db8::ffff:2"})
            assert capped.status_code == 429
            # Another /64 is another client.
            async with connect(port, headers={XFF: "2001:db8:0:1::1"}) as other:
                await echo(other)
        for address in ("2001:db8::3", "2001:db8::4"):
            assert (await refused(port, BAD_KEY, headers={XFF: address})).status_code == 401
        locked = await refused(port, headers={XFF: "2001:db8::5"})
        assert locked.status_code == 429
        assert "Retry-After" in locked.headers
        async with connect(port, headers={XFF: "2001:db8:0:1::9"}) as other:
            await echo(other)

    await aio(client())


# -- the default Origin rule: configured names, never the Host header -------------


def origin_factory(**server_options: Any) -> Any:
    """C{/echo} for anyone, with no allowed_origins (the default rule)."""
    from txwssec import AnonymousAuthenticator, RoutePolicy, SecureServerFactory, ServerPolicy
    from txwssec.apps.echo import EchoProtocol

    route = RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=EchoProtocol)
    return SecureServerFactory(ServerPolicy.single(route, ping_interval=0, **server_options))


async def status_of(port: int, host: str, origin: str | None, tls: Any = None) -> bytes:
    """The status line answered to an upgrade with this Host and Origin."""
    import asyncio

    extra = [f"Origin: {origin}"] if origin is not None else []
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="app.example.test" if tls else None
    )
    writer.write(upgrade_request("/echo", *extra, host=host))
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()
    return head.split(b"\r\n", 1)[0]


OK = b"HTTP/1.1 101 Switching Protocols"
FORBIDDEN = b"HTTP/1.1 403 Forbidden"


@pytest_twisted.ensureDeferred
async def test_dns_rebinding_origin_is_refused(serve: Serve) -> None:
    """
    A page on evil.test whose name now resolves to this server sends
    Host: evil.test and Origin: http://evil.test: 403, with or without the
    port. Before, the Origin matched the Host header and was accepted.
    """
    port = serve(origin_factory())
    for host, origin in (
        ("evil.test", "http://evil.test"),
        (f"evil.test:{port}", f"http://evil.test:{port}"),
        (f"127.0.0.1:{port}", "http://evil.test"),
        (f"127.0.0.1:{port}", f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}"),
    ):
        assert await aio(status_of(port, host, origin)) == FORBIDDEN, (host, origin)
    # The listener's own loopback origin, whatever the Host header says.
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        assert await aio(status_of(port, "evil.test", origin)) == OK
    # No Origin header: not a browser, allowed.
    assert await aio(status_of(port, "evil.test", None)) == OK


@pytest_twisted.ensureDeferred
async def test_configured_public_origin_is_allowed(serve: Serve) -> None:
    port = serve(origin_factory(public_origins=("https://app.example.com",)))
    assert await aio(status_of(port, "app.example.com", "https://app.example.com")) == OK
    assert await aio(status_of(port, "app.example.com", "https://app.example.com:443")) == OK
    assert await aio(status_of(port, "evil.test", "https://evil.test")) == FORBIDDEN
    assert await aio(status_of(port, "app.example.com", "http://app.example.com")) == FORBIDDEN


@pytest_twisted.ensureDeferred
async def test_certificate_name_origin_on_tls(tmp_path: Any) -> None:
    """
    On a wss listener, https://NAME:PORT is allowed for the certificate's
    DNS names (a wildcard covers one label) and the listener's port.
    """
    import ssl

    from test_tls_server import endpoint_for, write
    from twisted.internet import reactor

    from txwssec.devcert import issue, make_ca

    ca = make_ca("hardening CA")
    server = issue(ca, "app.example.test", dns_names=("app.example.test", "*.apps.example.test"))
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    write(server, cert, key)
    (tmp_path / "ca.pem").write_bytes(ca.cert_pem())
    listening = await endpoint_for(cert, key).listen(origin_factory())
    try:
        port = listening.getHost().port
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))

        async def status(origin: str) -> bytes:
            return await status_of(port, "app.example.test", origin, context)

        assert await aio(status(f"https://app.example.test:{port}")) == OK
        assert await aio(status(f"https://one.apps.example.test:{port}")) == OK
        for refused_origin in (
            f"https://evil.test:{port}",
            f"http://app.example.test:{port}",
            "https://app.example.test",
            f"https://two.one.apps.example.test:{port}",
            f"https://apps.example.test:{port}",
        ):
            assert await aio(status(refused_origin)) == FORBIDDEN, refused_origin
        # The listener is on loopback: its loopback origin over https too.
        assert await aio(status(f"https://localhost:{port}")) == OK
    finally:
        await listening.stopListening()
    del reactor


def test_listener_rule_off_loopback() -> None:
    """A listener on a public address allows no loopback origin by default."""
    from txwssec.origin import Listener, OriginPolicy

    public = Listener(host="192.0.2.10", port=8080)
    assert not OriginPolicy().allows("http://localhost:8080", public)
    assert not OriginPolicy().allows("http://192.0.2.10:8080", public)
    assert OriginPolicy().allows(None, public)
    loopback = Listener(host="::1", port=8080)
    assert OriginPolicy().allows("http://[::1]:8080", loopback)
    assert OriginPolicy().allows("http://app.localhost:8080", loopback)
    assert not OriginPolicy().allows("null", loopback)
    listed = Listener(
        host="192.0.2.10", port=8080, public_origins=frozenset({("https", "a.test", 443)})
    )
    assert OriginPolicy().allows("https://a.test", listed)
    # A route's own list replaces the default rule entirely.
    assert not OriginPolicy.from_list(["https://b.test"]).allows("https://a.test", listed)


def test_public_origins_config() -> None:
    base: dict[str, Any] = {"route": [{"path": "/", "app": "echo", "auth": ["anonymous"]}]}
    assert parse(base).policy.public_origins == ()
    policy = parse({**base, "server": {"public_origins": ["https://app.example.com"]}}).policy
    assert policy.public_origins == ("https://app.example.com",)
    for value, message in (
        ("https://a.test", "server.public_origins: expected array"),
        (
            ["https://a.test/path"],
            "server.public_origins[0]: an origin is scheme://host[:port] only",
        ),
        (["null"], "server.public_origins[0]: null is not a public origin"),
        ([1], "server.public_origins[0]: expected string"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse({**base, "server": {"public_origins": value}})
        assert str(caught.value) == message


@pytest_twisted.ensureDeferred
async def test_refused_origin_is_logged_bounded(serve: Serve, captured_log: Any) -> None:
    port = serve(origin_factory())
    long_origin = "http://" + "a" * 4000 + ".test"
    assert await aio(status_of(port, "evil.test", long_origin)) == FORBIDDEN
    (event,) = captured_log.matching(status=403)
    assert event["reason"] == f"origin {bounded(long_origin)!r} not allowed"
    assert "a" * 257 not in captured_log.text()
