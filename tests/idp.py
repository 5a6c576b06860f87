"""
A local HTTPS identity provider for tests (and examples/idp/): Twisted Web
on 127.0.0.1, port 0, with a certificate from a CA made on the spot.

It serves a JWKS (``/jwks.json``), an OpenID Connect discovery document
(``/.well-known/openid-configuration``) and an RFC 7662 introspection
endpoint (``/introspect``). A test can rotate its signing keys, publish
hand-made JWKs, make any endpoint fail (HTTP 500, invalid JSON, a refused
connection once stopped) or hold requests (slow), and read what each path
was asked and with which credentials.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import ssl
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txwssec.devcert import issue, make_ca

CLIENT_ID = "wssec"
CLIENT_SECRET = "s3cret: with & odd = chars"


@dataclass
class SigningKey:
    """A private key the IdP signs with, and its public JWK."""

    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]


def public_jwk(private: Any, kid: str, alg: str | None, **extra: Any) -> dict[str, Any]:
    """The public JWK of C{private} (RSA or EC)."""
    public = private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    jwk.update(extra)
    return jwk


def new_key(alg: str, kid: str | None = None, *, publish_alg: bool = True) -> SigningKey:
    """A fresh key for C{alg} (RS*/PS*: RSA 2048; ES256: P-256)."""
    kid = kid or uuid.uuid4().hex[:12]
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(alg)
    return SigningKey(kid, alg, private, public_jwk(private, kid, alg if publish_alg else None))


@dataclass
class Behaviour:
    """How one endpoint answers: normally, 500, invalid JSON, or held."""

    mode: str = "ok"  # "ok" | "500" | "invalid-json" | "hold"
    cache_control: str = ""
    delay: float = 0.0  # seconds before an "ok" answer goes out


@dataclass
class IdentityProvider:
    """The provider's state. Start it with L{start}."""

    folder: Path
    keys: list[SigningKey] = field(default_factory=list)
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_id: str = CLIENT_ID
    client_secret: str = CLIENT_SECRET
    discovery_issuer: str | None = None
    requests: Counter[str] = field(default_factory=Counter)
    introspection_requests: list[tuple[dict[str, list[str]], str]] = field(default_factory=list)
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    held: list[Request] = field(default_factory=list)
    port: Any = None
    connections: list[Any] = field(default_factory=list)

    # -- running -------------------------------------------------------------

    def start(self, reactor: Any = None, port: int = 0) -> IdentityProvider:
        """Listen on 127.0.0.1 (C{port}, 0 for any); write C{ca.pem}."""
        if reactor is None:
            from twisted.internet import reactor
        self.folder.mkdir(parents=True, exist_ok=True)
        ca = make_ca("test IdP CA")
        leaf = issue(ca, "localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",))
        self.ca_file.write_bytes(ca.cert_pem())
        options = ssl.PrivateCertificate.loadPEM(leaf.cert_pem() + leaf.key_pem()).options()
        site = _QuietSite(_Root(self))
        site.connections = self.connections
        self.port = reactor.listenSSL(port, site, options, interface="127.0.0.1")
        return self

    async def stop(self) -> None:
        """Stop listening (connections are then refused) and release held requests."""
        self.release()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        for protocol in self.connections:
            channel = getattr(protocol, "_channel", protocol)
            transport = getattr(channel, "transport", None)
            if transport is not None and not getattr(transport, "disconnected", False):
                try:
                    transport.abortConnection()
                except AttributeError:  # already shut down
                    pass
        self.connections.clear()

    def release(self) -> None:
        """Answer every held request with 500."""
        held, self.held = self.held, []
        for request in held:
            if not request.finished and not request._disconnected:
                request.setResponseCode(500)
                request.write(b"released\n")
                request.finish()

    # -- addresses -------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA certificate the provider's certificate chains to."""
        return self.folder / "idp-ca.pem"

    @property
    def issuer(self) -> str:
        """The provider's base URL (its issuer)."""
        return f"https://127.0.0.1:{self.port.getHost().port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks.json"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/introspect"

    # -- keys and tokens -----------------------------------------------------

    def add_key(self, alg: str = "RS256", kid: str | None = None, **options: Any) -> SigningKey:
        """Publish a new signing key."""
        key = new_key(alg, kid, **options)
        self.keys.append(key)
        return key

    def rotate(self, alg: str = "RS256") -> SigningKey:
        """Replace every published key by a new one."""
        self.keys.clear()
        return self.add_key(alg)

    def sign(
        self,
        key: SigningKey,
        sub: str = "john",
        lifetime: float = 300,
        *,
        alg: str | None = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A token signed with C{key} (its alg unless C{alg} is given)."""
        now = int(time.time())
        payload: dict[str, Any] = {"sub": sub, "exp": now + int(lifetime), "iat": now, **claims}
        return jwt.encode(
            payload,
            key.private,
            algorithm=alg or key.alg,
            headers={"kid": key.kid, **(headers or {})},
        )

    def opaque(self, sub: str = "john", lifetime: float = 300, **claims: Any) -> str:
        """A new active opaque token, known to the introspection endpoint."""
        token = uuid.uuid4().hex + uuid.uuid4().hex
        now = time.time()
        self.tokens[token] = {"active": True, "sub": sub, "exp": int(now + lifetime), **claims}
        return token

    def behaviour(self, path: str) -> Behaviour:
        """The (mutable) behaviour of C{path}."""
        return self.behaviours.setdefault(path, Behaviour())

    # -- answers -------------------------------------------------------------

    def answer(self, request: Request) -> bytes | object:
        path = request.path.decode("latin-1")
        self.requests[path] = self.requests[path] + 1
        behaviour = self.behaviour(path)
        if behaviour.mode == "hold":
            self.held.append(request)
            return NOT_DONE_YET
        if behaviour.mode == "500":
            request.setResponseCode(500)
            return b"broken\n"
        if behaviour.mode == "invalid-json":
            request.setHeader("Content-Type", "application/json")
            return b"{not json"
        if behaviour.cache_control:
            request.setHeader("Cache-Control", behaviour.cache_control)
        if behaviour.delay:
            from twisted.internet import reactor

            def later() -> None:
                if not request._disconnected:
                    request.write(self._content(request, path))
                    request.finish()

            reactor.callLater(behaviour.delay, later)
            return NOT_DONE_YET
        return self._content(request, path)

    def _content(self, request: Request, path: str) -> bytes:
        if path == "/jwks.json" and request.method == b"GET":
            return self._json(request, {"keys": [k.jwk for k in self.keys] + self.extra_jwks})
        if path == "/.well-known/openid-configuration" and request.method == b"GET":
            issuer = self.issuer if self.discovery_issuer is None else self.discovery_issuer
            return self._json(request, {"issuer": issuer, "jwks_uri": self.jwks_url})
        if path == "/introspect" and request.method == b"POST":
            return self._introspect(request)
        request.setResponseCode(404)
        return b"not found\n"

    def _introspect(self, request: Request) -> bytes:
        assert request.content is not None
        form = parse_qs(request.content.read().decode("ascii"))
        authorization = (request.getHeader("authorization") or "").strip()
        self.introspection_requests.append((form, authorization))
        if not self._client_authenticated(authorization):
            request.setResponseCode(401)
            request.setHeader("WWW-Authenticate", 'Basic realm="idp"')
            return self._json(request, {"error": "invalid_client"})
        token = form.get("token", [""])[0]
        answer = self.tokens.get(token, {"active": False})
        exp = answer.get("exp")
        if answer.get("active") and isinstance(exp, int | float) and exp <= time.time():
            answer = {"active": False}
        return self._json(request, answer)

    def _client_authenticated(self, authorization: str) -> bool:
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded, validate=True).decode("ascii")
        except ValueError:
            return False
        client_id, colon, secret = decoded.partition(":")
        return bool(colon) and (unquote_plus(client_id), unquote_plus(secret)) == (
            self.client_id,
            self.client_secret,
        )

    @staticmethod
    def _json(request: Request, value: Any) -> bytes:
        request.setHeader("Content-Type", "application/json")
        return json.dumps(value).encode("utf-8")


class _Root(Resource):
    isLeaf = True

    def __init__(self, idp: IdentityProvider) -> None:
        super().__init__()
        self.idp = idp

    def render(self, request: Request) -> Any:
        return self.idp.answer(request)


class _QuietSite(Site):
    connections: list[Any]

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.connections.append(protocol)
        return protocol

    def log(self, request: Request) -> None:
        pass
