"""
An Origin header is exactly RFC 6454's serialization, scheme "://" host
[":" port]: anything else (a path, even "/", a leading-zero port, "*" or an
empty label in the host, an IPv6 zone id...) is refused with 403 and logged
bounded. Certificate names match origins as RFC 6125 says: a wildcard is
only the whole left-most label of a name of 3 labels or more, and an IP
address matches only an IP address.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_hardening_trust import FORBIDDEN, OK, origin_factory, status_of

from txwssec.devcert import issue, make_ca
from txwssec.logs import bounded
from txwssec.origin import Listener, OriginPolicy, parse_origin

PORT = 19080
LOOPBACK = Listener(host="127.0.0.1", port=PORT)

MALFORMED = [
    f"http://localhost:{PORT}/",
    f"http://localhost:0{PORT}",
    f"http://*.localhost:{PORT}",
    f"http://.localhost:{PORT}",
    f"http://a..localhost:{PORT}",
    f"http://localhost.:{PORT}",
    f"http://-a.localhost:{PORT}",
    f"http://[::1%25lo]:{PORT}",
    f"http://[::1%lo]:{PORT}",
    f"http://user@localhost:{PORT}",
    f"http://localhost:{PORT}?",
    f"http://localhost:{PORT}#",
    f"http://localhost:{PORT}/path",
    "http://localhost:",
    "http://localhost:0",
    "http://localhost:65536",
    "http://localhost:+80",
    "http://[127.0.0.1]:80",
    "http://localhost\\:80",
    "http://l\u00f6calhost:80",
]


@pytest.mark.parametrize("origin", MALFORMED)
def test_malformed_origin_refused(origin: str) -> None:
    with pytest.raises(ValueError):
        parse_origin(origin)
    assert not OriginPolicy().allows(origin, LOOPBACK)


@pytest.mark.parametrize(
    "origin",
    [
        f"http://localhost:{PORT}",
        f"http://app.localhost:{PORT}",
        f"http://127.0.0.1:{PORT}",
        f"http://[::1]:{PORT}",
        f"HTTP://LocalHost:{PORT}",
    ],
)
def test_loopback_origins_still_allowed(origin: str) -> None:
    assert OriginPolicy().allows(origin, LOOPBACK)


def test_null_still_refused() -> None:
    assert not OriginPolicy().allows("null", LOOPBACK)
    assert not OriginPolicy.from_list(["https://a.test"]).allows("null")


@pytest.mark.parametrize("origin", [f"http://localhost:{PORT}/", f"http://*.localhost:{PORT}"])
@pytest_twisted.ensureDeferred
async def test_malformed_origin_403_logged_bounded(
    serve: Any, captured_log: Any, origin: str
) -> None:
    port = serve(origin_factory())
    origin = origin.replace(str(PORT), str(port))
    assert await aio(status_of(port, "localhost", f"http://localhost:{port}")) == OK
    assert await aio(status_of(port, "localhost", origin)) == FORBIDDEN
    event = captured_log.matching(status=403)[-1]
    assert event["reason"] == f"origin {bounded(origin)!r} not allowed"


def certificate_listener(*dns_names: str, ips: tuple[str, ...] = ()) -> Listener:
    ca = make_ca("origin CA")
    server = issue(ca, "server", dns_names=dns_names, ip_addresses=ips)
    return Listener(
        secure=True, host="192.0.2.1", port=443, certificate=lambda: server.certificate
    )


@pytest.mark.parametrize(
    ("names", "origin", "allowed"),
    [
        (("*.apps.example.test",), "https://one.apps.example.test", True),
        (("*.apps.example.test",), "https://two.one.apps.example.test", False),
        (("*.apps.example.test",), "https://apps.example.test", False),
        # RFC 6125 allows a 3-label wildcard: the certificate's names are the
        # operator's own (no public-suffix list is consulted).
        (("*.co.uk",), "https://evil.co.uk", True),
        (("*.com",), "https://evil.com", False),
        (("*.test",), "https://a.test", False),
        (("*",), "https://a", False),
        (("f*.example.test",), "https://foo.example.test", False),
        (("*.*.example.test",), "https://a.b.example.test", False),
        (("a.*.example.test",), "https://a.b.example.test", False),
        (("*.0.0.1",), "https://127.0.0.1", False),
        (("127.0.0.1",), "https://127.0.0.1", False),  # a DNS name, not an IP
        (("app.example.test",), "https://app.example.test", True),
    ],
)
def test_certificate_name_rule(names: tuple[str, ...], origin: str, allowed: bool) -> None:
    assert OriginPolicy().allows(origin, certificate_listener(*names)) is allowed


def test_certificate_ip_address() -> None:
    listener = certificate_listener(ips=("192.0.2.1", "2001:db8::1"))
    assert OriginPolicy().allows("https://192.0.2.1", listener)
    assert OriginPolicy().allows("https://[2001:db8:0::1]", listener)
    assert not OriginPolicy().allows("https://192.0.2.2", listener)


@pytest.mark.parametrize("origin", ["https://a.example/", "https://a.example:0443", "https://*.a"])
def test_configured_origin_must_be_exact(origin: str) -> None:
    from test_config import config_error

    message = config_error(lambda d: d["route"][0].update(allowed_origins=[origin]))
    assert message == "route[0].allowed_origins[0]: an origin is scheme://host[:port] only"
