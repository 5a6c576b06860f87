"""
wss:// server identity, as txwssec's client (SecureClientFactory) and the
gateway's upstream leg check it: every way a certificate can be wrong
fails the TLS handshake, before a byte of HTTP is sent.

Twisted's own check failed the handshake only on service_identity's
C{VerificationError}; a certificate from the trusted CA without
subjectAltName (C{CertificateError}) was accepted for any name, and the
gateway handed the consumer's identity to whoever held it.

Each case serves an upstream with one certificate from a generated CA
(the C{upstream_ca} / C{ca_file}) and connects to it by DNS name
(C{localhost}) or IP address (C{127.0.0.1}).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio
from service_identity import CertificateError, VerificationError
from tlskit import (
    KEY,
    Collector,
    Listeners,
    ReportingUpstreamFactory,
    gateway,
    within,
    write_pem,
)
from twisted.logger import LogLevel, formatEvent
from websockets.exceptions import InvalidStatus

from txwssec.client import ClientTLS, SecureClientFactory
from txwssec.devcert import Issued, issue, make_ca
from txwssec.tls import ChainVerificationError, verify_error_string

TIMEOUT = 10.0
NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Case:
    """A server certificate, the host connected to, and what the refusal says."""

    certificate: Callable[[Issued, Issued], Issued]  # (trusted CA, another CA)
    host: str
    says: str  # in the client's error and the gateway's log
    cause: type[BaseException]  # the client error's __cause__


LOCALHOST = ("localhost",)


def chain_failure(code: int) -> str:
    """
    What the refusal says for OpenSSL's X509 verification error C{code}:
    OpenSSL's own text ("certificate has expired"; the wording of some
    varies between OpenSSL versions), at the server certificate's depth.
    """
    why = verify_error_string(code)
    return f"TLS verification failed: certificate verify failed: {why} (certificate at depth 0)"


def test_chain_failure_texts_are_openssl_reasons() -> None:
    assert chain_failure(10).endswith(": certificate has expired (certificate at depth 0)")
    assert "unable to get local issuer certificate" in chain_failure(20)
    assert "purpose" in chain_failure(26) and "not yet valid" in chain_failure(9)


LOOPBACK = ("127.0.0.1",)

WRONG: dict[str, Case] = {
    "no SAN, CN matches": Case(
        lambda ca, _: issue(ca, "localhost"), "localhost", "subjectAltName", CertificateError
    ),
    "no SAN, CN=evil.test": Case(
        lambda ca, _: issue(ca, "evil.test"), "localhost", "subjectAltName", CertificateError
    ),
    "no SAN, CN is the IP address": Case(
        lambda ca, _: issue(ca, "127.0.0.1"), "127.0.0.1", "subjectAltName", CertificateError
    ),
    "wrong DNS SAN": Case(
        lambda ca, _: issue(ca, "evil.test", dns_names=("evil.test",)),
        "localhost",
        "DNSMismatch",
        VerificationError,
    ),
    "IP SAN, DNS name connected": Case(
        lambda ca, _: issue(ca, "localhost", ip_addresses=LOOPBACK),
        "localhost",
        "DNSMismatch",
        VerificationError,
    ),
    "DNS SAN, IP address connected": Case(
        lambda ca, _: issue(ca, "localhost", dns_names=LOCALHOST),
        "127.0.0.1",
        "IPAddressMismatch",
        VerificationError,
    ),
    "expired": Case(
        lambda ca, _: issue(
            ca, "localhost", dns_names=LOCALHOST, not_before=NOW - 3 * DAY, not_after=NOW - DAY
        ),
        "localhost",
        chain_failure(10),  # X509_V_ERR_CERT_HAS_EXPIRED
        ChainVerificationError,
    ),
    "not yet valid": Case(
        lambda ca, _: issue(
            ca, "localhost", dns_names=LOCALHOST, not_before=NOW + DAY, not_after=NOW + 3 * DAY
        ),
        "localhost",
        chain_failure(9),  # X509_V_ERR_CERT_NOT_YET_VALID
        ChainVerificationError,
    ),
    "signed by another CA": Case(
        lambda _, other: issue(other, "localhost", dns_names=LOCALHOST),
        "localhost",
        chain_failure(20),  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        ChainVerificationError,
    ),
    "clientAuth EKU only": Case(
        lambda ca, _: issue(ca, "localhost", dns_names=LOCALHOST, client=True),
        "localhost",
        chain_failure(26),  # X509_V_ERR_INVALID_PURPOSE
        ChainVerificationError,
    ),
}

GOOD: dict[str, tuple[Callable[[Issued], Issued], str]] = {
    "DNS SAN": (lambda ca: issue(ca, "localhost", dns_names=LOCALHOST), "localhost"),
    "IP SAN": (lambda ca: issue(ca, "ip-server", ip_addresses=LOOPBACK), "127.0.0.1"),
}


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    started = Listeners()
    yield started
    pytest_twisted.blockon(started.stop())


@dataclass
class Upstream:
    url: str
    ca_file: Path
    factory: ReportingUpstreamFactory


@pytest.fixture
def upstream_with(tmp_path: Path, listeners: Listeners) -> Any:
    """Start a wss: upstream with a certificate made from the trusted CA (and another)."""

    async def start(make: Callable[[Issued, Issued], Issued], host: str) -> Upstream:
        ca, other = make_ca("upstream CA"), make_ca("another CA")
        ca_file = tmp_path / "upstream-ca.pem"
        ca_file.write_bytes(ca.cert_pem())
        factory = ReportingUpstreamFactory()
        port = await listeners.wss(factory, write_pem(tmp_path, "upstream", make(ca, other)))
        return Upstream(f"wss://{host}:{port}/", ca_file, factory)

    return start


def assert_nothing_reached(upstream: Upstream) -> None:
    """Not one byte of HTTP, so neither the upgrade request nor a header."""
    assert upstream.factory.received == b""
    assert upstream.factory.requests == []
    assert upstream.factory.identity_headers() == []


# -- SecureClientFactory ---------------------------------------------------------------


def client(upstream: Upstream) -> SecureClientFactory:
    factory = SecureClientFactory(upstream.url, tls=ClientTLS(ca_file=upstream.ca_file))
    factory.protocol = Collector
    return factory


@pytest.mark.parametrize("case", WRONG)
@pytest_twisted.ensureDeferred
async def test_client_refuses(upstream_with: Any, captured_log: CapturedLog, case: str) -> None:
    """
    The connection fails with an error that says why; the server got
    nothing; nothing was logged as critical (Twisted's own check logged
    "critical while verifying certificate" and went on).
    """
    wrong = WRONG[case]
    upstream = await upstream_with(wrong.certificate, wrong.host)
    protocol = await within(client(upstream).connect())
    with pytest.raises(ConnectionError) as caught:
        await within(protocol.opened)
    was_clean, code, _reason = await within(protocol.closed)
    assert (was_clean, code) == (False, 1006)
    assert wrong.says in str(caught.value)
    assert isinstance(caught.value.__cause__, wrong.cause)
    assert_nothing_reached(upstream)
    assert captured_log.matching(log_level=LogLevel.critical) == []


@pytest.mark.parametrize("case", GOOD)
@pytest_twisted.ensureDeferred
async def test_client_accepts(upstream_with: Any, case: str) -> None:
    make, host = GOOD[case]
    upstream = await upstream_with(lambda ca, _: make(ca), host)
    protocol = await within(client(upstream).connect())
    await within(protocol.opened)
    assert await within(protocol.messages.get()) == b"alpn:http/1.1"
    protocol.sendMessage(b"verified")
    assert await within(protocol.messages.get()) == b"verified"
    protocol.sendClose(1000)
    assert await within(protocol.closed) == (True, 1000, None)


# -- the gateway -----------------------------------------------------------------------


async def gateway_session(port: int) -> list[str | bytes]:
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo",
        additional_headers={"apikey": KEY},
        open_timeout=TIMEOUT,
        ping_interval=None,
    ) as ws:
        greeting = await ws.recv()
        await ws.send("relayed")
        return [greeting, await ws.recv()]


async def gateway_refusal(port: int) -> tuple[int, bytes]:
    try:
        await gateway_session(port)
    except InvalidStatus as error:
        return error.response.status_code, bytes(error.response.body or b"")
    raise AssertionError("the gateway accepted the upstream")


@pytest.mark.parametrize("case", WRONG)
@pytest_twisted.ensureDeferred
async def test_gateway_refuses(
    upstream_with: Any, serve: Any, captured_log: CapturedLog, case: str
) -> None:
    """
    Exactly 502 to the WebSocket client; the upstream never received the
    upgrade request nor the consumer's identity; the log says why.
    """
    wrong = WRONG[case]
    upstream = await upstream_with(wrong.certificate, wrong.host)
    port = serve(gateway(upstream.url, upstream.ca_file))
    assert await aio(gateway_refusal(port)) == (502, b"bad gateway\n")
    assert_nothing_reached(upstream)
    [failure] = [formatEvent(e) for e in captured_log.matching(url=upstream.url)]
    assert wrong.says in failure
    assert KEY not in failure
    assert captured_log.matching(log_level=LogLevel.critical) == []


@pytest.mark.parametrize("case", GOOD)
@pytest_twisted.ensureDeferred
async def test_gateway_accepts(upstream_with: Any, serve: Any, case: str) -> None:
    make, host = GOOD[case]
    upstream = await upstream_with(lambda ca, _: make(ca), host)
    port = serve(gateway(upstream.url, upstream.ca_file))
    assert await aio(gateway_session(port)) == ["alpn:http/1.1", "relayed"]
    assert upstream.factory.identity_headers() == ["john"]
