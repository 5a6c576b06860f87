"""
TLS for servers: hardened pyOpenSSL contexts built with Twisted's
L{CertificateOptions}, reloadable certificates, and the C{wss:} server
endpoint.

Twisted ships its own C{tls:} server endpoint (a directory of PEM files for
SNI); two endpoint plugins cannot share a prefix, so txwssec's endpoint is
C{wss:}::

    serverFromString(reactor, "wss:8443:cert=server.pem:key=server.key")
    serverFromString(reactor, "wss:8443:interface=127.0.0.1:cert=s.pem:key=s.key"
                              ":clientCA=ca.pem:clientCert=required:minVersion=1.3")

In the configuration file, C{listen = ["tls:8443"]} uses the C{[tls]} table
and becomes such an endpoint.

About 400 lines: server contexts, their reloading and the endpoint parser
share the hardening choices, kept in one place.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.bindings.openssl.binding import Binding
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
from OpenSSL.crypto import X509, PKey
from service_identity.hazmat import DNS_ID, IPAddress_ID, ServiceID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IStreamServerEndpointStringParser,
)
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from zope.interface import implementer

from txwssec._tlsport import TLSPortEndpoint

#: TLS 1.2 suites: ephemeral ECDH key exchange and AEAD ciphers only. (TLS
#: 1.3 suites are all AEAD with ephemeral key exchange.)
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: The application protocol a listener selects, and a client offers, by ALPN:
#: a WebSocket (RFC 6455) opens with an HTTP/1.1 upgrade.
HTTP_1_1 = b"http/1.1"

#: Key exchange groups, preferred first, for TLS 1.3 and TLS 1.2's ECDHE
#: alike: the hybrid X25519MLKEM768 (X25519 ECDHE plus ML-KEM-768, when the
#: linked OpenSSL has it, as OpenSSL 3.5 and later do), then ECDHE only. No
#: finite-field groups (ffdhe2048...), no X448, no other curves.
GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CLIENT_CERT_MODES = ("none", "optional", "required")

log = Logger(namespace="txwssec.tls")


class TLSSettingsError(ValueError):
    """
    A TLS setting is unusable.

    @ivar field: the setting's name (C{cert}, C{key}, C{client_ca}...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TLSSettings:
    """
    What a TLS listener needs.

    @ivar cert: PEM file with the server certificate, optionally followed by
        its intermediate certificates.
    @ivar key: PEM file with the private key.
    @ivar chain: optional PEM file with more intermediate certificates.
    @ivar min_version: C{"1.2"} or C{"1.3"}.
    @ivar client_ca: PEM file with the CAs that client certificates must
        chain to (mutual TLS), or L{None}.
    @ivar client_cert: C{"none"}, C{"optional"} or C{"required"}.
    @ivar session_tickets: TLS session resumption: session tickets (and
        the server-side session cache), so that a returning client skips
        the certificate and key exchange work. L{False}: every handshake is
        a full one. See L{certificate_options}.
    """

    cert: Path
    key: Path
    chain: Path | None = None
    min_version: str = "1.2"
    client_ca: Path | None = None
    client_cert: str = "none"
    session_tickets: bool = True

    def __post_init__(self) -> None:
        if self.min_version not in TLS_VERSIONS:
            raise TLSSettingsError("min_version", 'must be "1.2" or "1.3"')
        if self.client_cert not in CLIENT_CERT_MODES:
            raise TLSSettingsError("client_cert", 'must be "none", "optional" or "required"')
        if self.client_cert != "none" and self.client_ca is None:
            raise TLSSettingsError(
                "client_ca", f'is required with client_cert = "{self.client_cert}"'
            )


def _read(path: Path, field: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TLSSettingsError(field, f"cannot read {path}: {error.strerror}") from None


def load_certificates(path: Path, field: str) -> list[x509.Certificate]:
    """Every certificate in the PEM file at C{path}."""
    data = _read(path, field)  # outside the try: its error is a ValueError too
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSettingsError(field, f"{path} holds no PEM certificate") from None
    return certificates


@functools.cache
def _openssl_groups() -> bytes:
    """
    L{GROUPS} as an OpenSSL list, less the groups the linked OpenSSL does
    not have (the hybrid before OpenSSL 3.5, X25519 in some FIPS builds).
    """
    lib = Binding().lib
    probe = SSL.Context(SSL.TLS_METHOD)
    known = []
    for group in GROUPS:
        if lib.SSL_CTX_set1_curves_list(probe._context, group.encode("ascii")) == 1:
            known.append(group)
        else:
            lib.ERR_clear_error()
    if not known:
        raise RuntimeError(f"OpenSSL has none of the key exchange groups {GROUPS}")
    return ":".join(known).encode("ascii")


def restrict_groups(target: SSL.Context | SSL.Connection) -> None:
    """
    Limit the key exchange groups of a context or of one connection to
    L{GROUPS}. pyOpenSSL (26) has no API for groups beyond C{set_tmp_ecdh}
    (one curve): this calls OpenSSL's C{SSL_CTX_set1_groups_list} (or
    C{SSL_set1_groups_list}), under their C{curves} names, through the
    binding pyOpenSSL itself uses.
    """
    lib = Binding().lib
    if isinstance(target, SSL.Context):
        result = lib.SSL_CTX_set1_curves_list(target._context, _openssl_groups())
    else:
        result = lib.SSL_set1_curves_list(target._ssl, _openssl_groups())
    if result != 1:
        lib.ERR_clear_error()
        raise RuntimeError("OpenSSL refused the key exchange groups")


def certificate_options(settings: TLSSettings) -> ssl.CertificateOptions:
    """
    Build hardened server options: TLS 1.2 or 1.3 minimum, ECDHE + AEAD
    suites, the key exchange groups of L{GROUPS}, no compression, server
    cipher preference (set by Twisted), no renegotiation, ALPN C{http/1.1}
    (see L{select_alpn}), client certificates checked against C{client_ca}
    when asked for. Every server context txwssec makes comes from here.

    Session resumption (C{settings.session_tickets}, on by default): session
    tickets and a server-side session cache. Twisted's L{CertificateOptions}
    sets C{OP_NO_TICKET} unless asked for tickets, and OpenSSL 3+ then
    resumed nothing: every wss handshake was a full one. The ticket keys
    are OpenSSL's, made at random with the context, so they live in this
    process only and change whenever the context is rebuilt (a restart, a
    certificate reload, a configuration reload): a ticket from before
    resumes nothing, and the client makes one full handshake. Several
    processes behind one address each have their own keys. The session ID
    context is random per context too (Twisted), so a session never
    resumes on another listener or after a reload, and a resumed session
    carries the client certificate that was verified when it was made:
    resumption cannot skip the client certificate check.

    @raise TLSSettingsError: naming the setting that is unusable.
    """
    chain = load_certificates(settings.cert, "cert")
    if settings.chain is not None:
        chain += load_certificates(settings.chain, "chain")
    key_data = _read(settings.key, "key")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        raise TLSSettingsError(
            "key", f"{settings.key} holds no unencrypted PEM private key"
        ) from None
    verify_options: dict[str, Any] = {}
    cas: list[x509.Certificate] = []
    if settings.client_cert != "none":
        assert settings.client_ca is not None
        cas = load_certificates(settings.client_ca, "client_ca")
        verify_options = {
            "verify": True,
            "caCerts": [X509.from_cryptography(ca) for ca in cas],
            "requireCertificate": settings.client_cert == "required",
        }
    try:
        private_key = PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except TypeError:
        # (X25519, X448: keys that cannot sign; pyOpenSSL's bare TypeError
        # named neither the setting nor the file)
        raise TLSSettingsError(
            "key", f"{settings.key} holds a key that TLS certificates cannot use"
        ) from None
    options = ssl.CertificateOptions(
        privateKey=private_key,
        certificate=X509.from_cryptography(chain[0]),
        extraCertChain=[X509.from_cryptography(c) for c in chain[1:]],
        raiseMinimumTo=TLS_VERSIONS[settings.min_version],
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        enableSessions=settings.session_tickets,
        enableSessionTickets=settings.session_tickets,
        **verify_options,
    )
    try:
        context = options.getContext()
    except SSL.Error:
        raise TLSSettingsError("key", "does not match the certificate") from None
    context.set_options(SSL.OP_NO_RENEGOTIATION)
    context.set_alpn_select_callback(select_alpn)
    restrict_groups(context)
    for ca in cas:
        # Tell clients which CAs we accept, so they pick the right certificate.
        context.add_client_ca(ca)
    return options


def select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    """
    The ALPN choice of a txwssec listener: C{http/1.1} when the client offers
    it (browsers offer C{h2, http/1.1}), otherwise no protocol at all, and
    the handshake goes on as with a client that offers none.

    Twisted's own selection answers an empty protocol when it has none
    configured, which OpenSSL 4 refuses with an C{internal_error}
    alert: every browser's C{wss://} handshake failed.
    """
    return HTTP_1_1 if HTTP_1_1 in offered else SSL.NO_OVERLAPPING_PROTOCOLS


@implementer(IOpenSSLContextFactory)
class ReloadingContextFactory:
    """
    A server context factory whose certificate can be replaced while the
    server runs: each new connection gets the current context, live
    connections keep theirs.

    Every instance is remembered (weakly) so that L{reload_certificates}
    (for Python API users) reaches them all; C{twistd wssec} reads its own
    listeners' files again on SIGHUP (L{txwssec.lifecycle.reload}).
    """

    _instances: weakref.WeakSet[ReloadingContextFactory] = weakref.WeakSet()

    def __init__(self, settings: TLSSettings) -> None:
        self.settings = settings
        self._options = certificate_options(settings)
        self._instances.add(self)

    def reload(self) -> None:
        """
        Read the files again. On any error the current certificate stays in
        use and the error is raised.

        @raise TLSSettingsError: naming the unusable setting.
        """
        self._options = certificate_options(self.settings)

    def replace(self, other: ReloadingContextFactory) -> None:
        """
        Serve new connections with C{other}'s settings and certificate (a
        configuration reload: listeners keep this factory).
        """
        self.settings, self._options = other.settings, other._options

    def getContext(self) -> SSL.Context:
        """The current context (Twisted's old-style context factory API)."""
        return self._options.getContext()


def reload_certificates() -> tuple[int, int]:
    """
    Reload every L{ReloadingContextFactory}; failures are logged and leave
    the old certificate in place.

    @return: how many reloaded, and how many failed.
    """
    reloaded = failed = 0
    for factory in list(ReloadingContextFactory._instances):
        try:
            factory.reload()
        except TLSSettingsError as error:
            failed += 1
            log.error("certificate reload failed, keeping the old one: {error}", error=str(error))
        else:
            reloaded += 1
            log.info("certificate reloaded from {cert}", cert=str(factory.settings.cert))
    return reloaded, failed


def peer_certificate(transport: Any) -> x509.Certificate | None:
    """
    The certificate the peer presented on a TLS transport (verified by
    OpenSSL against the configured CAs, or the handshake would have failed),
    or L{None}.
    """
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        certificate = get()
    except SSL.Error:
        return None
    return certificate.to_cryptography() if certificate is not None else None


class ChainVerificationError(SSL.Error):
    """
    OpenSSL refused the server's certificate chain (not trusted, expired or
    not yet valid, not for servers...). C{str()} is OpenSSL's own reason
    (C{X509_verify_cert_error_string}) and the depth in the chain (0 is the
    server's own certificate), where OpenSSL's L{SSL.Error} says only
    "certificate verify failed".

    An L{SSL.Error}, with C{args} in pyOpenSSL's shape (a list of
    C{(library, function, reason)}), so that code reading OpenSSL errors,
    Autobahn's log line among them, shows the reason.

    @ivar code: OpenSSL's X509 verification error code.
    @ivar depth: the failing certificate's depth in the chain.
    """

    def __init__(self, code: int, depth: int) -> None:
        self.code = code
        self.depth = depth
        self.reason = f"{verify_error_string(code)} (certificate at depth {depth})"
        super().__init__(
            [
                (
                    "SSL routines",
                    "certificate verification",
                    f"certificate verify failed: {self.reason}",
                )
            ]
        )

    def __str__(self) -> str:
        return self.reason


#: Why OpenSSL refused a client connection's server chain: (code, depth).
_chain_failures: weakref.WeakKeyDictionary[SSL.Connection, tuple[int, int]] = (
    weakref.WeakKeyDictionary()
)


def chain_failure(connection: object) -> ChainVerificationError | None:
    """
    Why OpenSSL refused the server certificate chain on C{connection} (an
    L{SSL.Connection} made by L{VerifyingClientTLS}), or L{None}.
    """
    if not isinstance(connection, SSL.Connection):
        return None
    recorded = _chain_failures.get(connection)
    return ChainVerificationError(*recorded) if recorded is not None else None


def verify_error_string(code: int) -> str:
    """OpenSSL's text for an X509 verification error code."""
    binding = Binding()
    text = binding.lib.X509_verify_cert_error_string(code)
    return binding.ffi.string(text).decode("ascii", "replace") if text else f"error {code}"


@implementer(IOpenSSLClientConnectionCreator)
class VerifyingClientTLS:
    """
    Client TLS for C{wss://}: Twisted's L{optionsForClientTLS
    <twisted.internet.ssl.optionsForClientTLS>} (trust root, SNI, client
    certificate, ALPN C{http/1.1}), the key exchange groups of L{GROUPS},
    and the server's identity checked by service_identity so that I{any}
    failure fails the handshake.

    Twisted's own check fails it only on C{VerificationError}: anything else,
    such as the C{CertificateError} of a certificate without
    subjectAltName, was logged and the handshake went on, so a certificate
    from the trusted CA with no subjectAltName was accepted for every name.

    @param hostname: the DNS name or IP address the certificate must be for.
    @param trust_root: CAs to trust (L{None}: the system's).
    @param client_certificate: the certificate to present (mutual TLS).
    """

    def __init__(
        self,
        hostname: str,
        trust_root: Any = None,
        client_certificate: ssl.PrivateCertificate | None = None,
    ) -> None:
        self._options = ssl.optionsForClientTLS(
            hostname,
            trustRoot=trust_root,
            clientCertificate=client_certificate,
            acceptableProtocols=[HTTP_1_1],
        )
        self._service_id: ServiceID = (
            IPAddress_ID(hostname)
            if isIPAddress(hostname) or isIPv6Address(hostname)
            else DNS_ID(hostname)
        )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A connection from Twisted's options, verified by L{_verify}."""
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        restrict_groups(connection)
        return connection

    def _verify(
        self, connection: SSL.Connection, certificate: X509, error: int, depth: int, ok: int
    ) -> bool:
        # OpenSSL has checked the chain (trust, dates, purpose); then the
        # leaf's name. A chain failure is recorded for chain_failure() (the
        # SSL.Error OpenSSL raises says only "certificate verify failed");
        # a name failure becomes the reason the connection was lost.
        if not ok:
            # OpenSSL fails the handshake (and sends the alert); remember why.
            _chain_failures[connection] = (error, depth)
            return False
        if depth != 0:
            return True
        try:
            verify_service_identity(extract_patterns(certificate), [self._service_id], [])
        except Exception:
            connection.get_app_data().failVerification(Failure())
            return False
        return True


@implementer(IPlugin, IStreamServerEndpointStringParser)
class WSSServerEndpointParser:
    """
    The C{wss:} server endpoint: TCP plus txwssec's hardened TLS context
    (and its TLS transports: L{txwssec._tlsport.DirectTLSServer} for
    txwssec's WebSocket protocols, L{txwssec._tlswire.ServerTLSProtocol}
    for any other).

    Arguments: C{PORT}, then C{cert}, C{key} (required), C{chain},
    C{minVersion} (1.2/1.3), C{clientCA}, C{clientCert}
    (none/optional/required), C{sessionTickets} (yes/no, default yes),
    C{interface}, C{backlog}.
    """

    prefix = "wss"

    def parseStreamServer(self, reactor: Any, *args: Any, **kwargs: Any) -> SSL4ServerEndpoint:
        return self._parse(reactor, *args, **kwargs)

    def _parse(
        self,
        reactor: Any,
        port: str,
        cert: str = "",
        key: str = "",
        chain: str = "",
        minVersion: str = "1.2",
        clientCA: str = "",
        clientCert: str = "none",
        sessionTickets: str = "yes",
        interface: str = "",
        backlog: str = "50",
    ) -> SSL4ServerEndpoint:
        if not cert or not key:
            raise ValueError("wss endpoint needs cert= and key=")
        if sessionTickets not in ("yes", "no"):
            raise ValueError("wss endpoint: sessionTickets must be yes or no")
        settings = TLSSettings(
            cert=Path(cert),
            key=Path(key),
            chain=Path(chain) if chain else None,
            min_version=minVersion,
            client_ca=Path(clientCA) if clientCA else None,
            client_cert=clientCert,
            session_tickets=sessionTickets == "yes",
        )
        return TLSPortEndpoint(
            reactor,
            int(port),
            ReloadingContextFactory(settings),
            backlog=int(backlog),
            interface=interface,
        )
