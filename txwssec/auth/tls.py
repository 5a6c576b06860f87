"""
Mutual TLS authentication: the client certificate that OpenSSL verified
during the TLS handshake names the consumer.

The certificate is read from the TLS connection itself, never from a
header: a C{X-Client-Cert}-style header sent by a client is ignored.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from zope.interface import implementer

from txwssec._schema import Table
from txwssec.auth.context import BuildContext
from txwssec.consumers import ConsumerDirectory
from txwssec.interfaces import IAuthenticator
from txwssec.logs import bounded
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict


@implementer(IAuthenticator)
class TLSClientCertificateAuthenticator:
    """
    Accepts a connection whose verified client certificate maps to a
    consumer (C{tls_fingerprint} first, then C{tls_subject}). The session
    expires no later than the certificate's notAfter.

    It only works on listeners that ask for client certificates
    (C{client_cert = "optional"} or C{"required"} with a C{client_ca}).
    """

    name = "tls"
    challenge = "MutualTLS"

    def __init__(self, consumers: ConsumerDirectory) -> None:
        self.consumers = consumers

    def authenticate(self, request: HandshakeRequest) -> Verdict:
        certificate = request.peer_certificate
        if certificate is None:
            return None
        consumer = self.consumers.by_certificate(certificate)
        subject = certificate.subject.rfc4514_string()
        if consumer is None:
            return Deny(f"client certificate {bounded(subject)!r} maps to no consumer")
        claims = {
            "subject": subject,
            "issuer": certificate.issuer.rfc4514_string(),
            "fingerprint": "sha256:" + certificate.fingerprint(hashes.SHA256()).hex(),
            "serial": certificate.serial_number,
        }
        return Accept(
            Principal(consumer.name, self.name, claims),
            expires_at=certificate.not_valid_after_utc.timestamp(),
        )


def build(section: Table, context: BuildContext) -> TLSClientCertificateAuthenticator:
    """Build from C{[auth.tls]} (which takes no options)."""
    section.finish()
    return TLSClientCertificateAuthenticator(context.consumers)
