"""
JWT bearer authentication with PyJWT and static keys.

The accepted algorithms come from configuration, never from the token. Every
token must carry C{exp}; C{nbf} and C{iat} are checked when present; each of
the three must be a JSON number (RFC 7519 NumericDate), never a string, a
boolean or null, which PyJWT would convert; C{iss} and C{aud} must match
exactly when configured. Tokens whose header names a key
source (C{jku}, C{x5u}, C{jwk}, C{x5c}) are refused: keys are never fetched
from a URL a token names. The key is a static one (C{secret},
C{public_key}) or comes from the identity provider's key set
(C{jwks_url} or C{discovery}, see L{txwssec.auth.jwks}).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from base64 import urlsafe_b64decode
from collections.abc import Sequence
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm
from twisted.internet.defer import Deferred
from zope.interface import implementer

from txwssec._schema import Table
from txwssec.auth._extract import Found, find_bearer
from txwssec.auth.context import BuildContext
from txwssec.auth.jwks import JWK, JWKSKeys, build_keys
from txwssec.consumers import ConsumerDirectory
from txwssec.interfaces import IAuthenticator
from txwssec.logs import bounded
from txwssec.types import Accept, Deny, HandshakeRequest, Principal, Verdict

#: Longer tokens are refused before any parsing.
MAX_TOKEN_LENGTH = 8192

_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_KEY_SOURCE_HEADERS = ("jku", "x5u", "jwk", "x5c")
#: The claims that hold a NumericDate (RFC 7519 section 2).
_NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")

_HMAC = ("HS256", "HS384", "HS512")
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
SUPPORTED_ALGORITHMS = (*_HMAC, *_RSA, *_EC_CURVES, "EdDSA")

#: Shortest HMAC secret accepted, in bytes (RFC 7518 section 3.2 for HS256).
MIN_SECRET_BYTES = 32


class KeyMismatch(ValueError):
    """The key does not suit the configured algorithms."""

    def __init__(self, message: str, about_algorithms: bool = False) -> None:
        super().__init__(message)
        self.about_algorithms = about_algorithms


def check_key(key: str | bytes, algorithms: Sequence[str]) -> Any:
    """
    Check that C{key} suits every algorithm in C{algorithms} and return the
    key object PyJWT should verify with.

    A family (HMAC, RSA, one EC curve, EdDSA) per authenticator: mixing an
    HMAC secret with public-key algorithms is how key confusion happens.

    @raise KeyMismatch: naming the problem.
    """
    if not algorithms:
        raise KeyMismatch("at least one algorithm is required", about_algorithms=True)
    unknown = [a for a in algorithms if a not in SUPPORTED_ALGORITHMS]
    if unknown:
        raise KeyMismatch(
            f"unsupported algorithm {unknown[0]!r} (none is never allowed)", about_algorithms=True
        )
    secret = key.encode("utf-8") if isinstance(key, str) else key
    if all(a in _HMAC for a in algorithms):
        if b"-----BEGIN" in secret or secret.startswith(b"ssh-"):
            raise KeyMismatch("HS* algorithms need a shared secret, not a public key")
        if len(secret) < MIN_SECRET_BYTES:
            raise KeyMismatch(f"HMAC secret must be at least {MIN_SECRET_BYTES} bytes")
        return secret
    if any(a in _HMAC for a in algorithms):
        raise KeyMismatch(
            "HS* algorithms cannot be mixed with public-key algorithms", about_algorithms=True
        )
    try:
        public = load_pem_public_key(secret)
    except ValueError:
        raise KeyMismatch("public key is not a PEM public key") from None
    for algorithm in algorithms:
        if algorithm in _RSA:
            suits = isinstance(public, rsa.RSAPublicKey) and public.key_size >= 2048
        elif algorithm in _EC_CURVES:
            suits = isinstance(public, ec.EllipticCurvePublicKey) and isinstance(
                public.curve, _EC_CURVES[algorithm]
            )
        else:
            suits = isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
        if not suits:
            raise KeyMismatch(f"public key does not suit {algorithm}")
    return public


@implementer(IAuthenticator)
class JWTAuthenticator:
    """
    Accepts a signed JWT naming a known consumer.

    @param key: the HMAC secret or a PEM public key (text or bytes).
    @param algorithms: accepted algorithms, one key family only.
    @param issuer: required exact C{iss} when not empty.
    @param audience: required C{aud} when not empty.
    @param leeway: clock skew allowed, in seconds. The session expiry is
        C{exp + leeway}, so a token is never cut off before it stops being
        valid by the same rule that accepted it.
    @param header: header carrying C{Bearer <jwt>} (the C{Bearer} prefix is
        optional for a header other than C{Authorization}).
    @param subprotocol: marker in C{Sec-WebSocket-Protocol} before the token.
    @param query: query parameter, off by default.
    @param consumer_claim: claim naming the consumer.
    @param kid: when set, the token's C{kid} header must equal it.
    @param keys: keys from an identity provider, instead of C{key} (which
        must then be L{None}); C{algorithms} must be public-key ones.
    """

    name = "jwt"

    def __init__(
        self,
        consumers: ConsumerDirectory,
        key: str | bytes | None,
        algorithms: Sequence[str] = ("HS256",),
        *,
        issuer: str = "",
        audience: str = "",
        leeway: float = 0,
        header: str = "Authorization",
        subprotocol: str = "bearer",
        query: str = "",
        consumer_claim: str = "sub",
        kid: str = "",
        keys: JWKSKeys | None = None,
    ) -> None:
        self.consumers = consumers
        self.algorithms = list(algorithms)
        self.keys = keys
        #: The SHA-256 digest of the static key as configured: what a session
        #: opened with a token verified by it records (L{Principal.key});
        #: L{None} with an identity provider's keys (rotated by the provider).
        self.key_digest: bytes | None = None
        if keys is None:
            if key is None:
                raise KeyMismatch("a key or an identity provider's keys are required")
            self._key = check_key(key, self.algorithms)
            self.key_digest = hashlib.sha256(
                key.encode("utf-8") if isinstance(key, str) else key
            ).digest()
        else:
            if key is not None:
                raise KeyMismatch("a static key and an identity provider's keys are exclusive")
            self._key = None
            check_jwks_algorithms(self.algorithms)
        #: What verifies tokens: PyJWT's module functions, or for a static
        #: HMAC secret a decoder that checks that secret once (see _decoder).
        self._decode: Any = _decoder(self._key, self.algorithms).decode
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self.header = header
        self.subprotocol = subprotocol
        self.query = query
        self.consumer_claim = consumer_claim
        self.kid = kid
        self.challenge = 'Bearer realm="wssec"'
        required = []
        if issuer:
            required.append("iss")
        if audience:
            required.append("aud")
        # PyJWT verifies the signature, iss and aud; the NumericDate claims
        # are type-checked first and then time-checked here (_check_times),
        # so a wrong type is never reported as a time (PyJWT converts them).
        self._options: jwt.types.Options = {
            "require": required,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        }

    def _find(self, request: HandshakeRequest) -> Found | Deny | None:
        return find_bearer(request, self.header, self.subprotocol, self.query)

    def authenticate(self, request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        found = self._find(request)
        if found is None or isinstance(found, Deny):
            return found
        token = found.value
        if len(token) > MAX_TOKEN_LENGTH:
            return Deny("token too long")
        if not _TOKEN_SHAPE.fullmatch(token):
            return Deny("malformed token")
        header = _unverified_header(token)
        if header is None:
            return Deny("malformed token header")
        named = [name for name in _KEY_SOURCE_HEADERS if name in header]
        if named:
            return Deny(f"token header names a key source ({named[0]}); keys are never fetched")
        if header.get("alg") not in self.algorithms:
            return Deny("token algorithm not allowed")
        if self.kid and header.get("kid") != self.kid:
            return Deny("token kid does not match")
        if self.keys is None:
            return self._verify(token, self._key, self.algorithms, found)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return Deny("token kid is not a string")
        chosen = self.keys.lookup(kid, header["alg"])
        if isinstance(chosen, Deferred):
            return chosen.addCallback(self._verify_with, token, header["alg"], found)
        return self._verify_with(chosen, token, header["alg"], found)

    @property
    def service(self) -> JWKSKeys | None:
        """What must run while this method is used: the key set's refresher."""
        return self.keys

    def _verify_with(self, chosen: JWK | str, token: str, alg: str, found: Found) -> Verdict:
        """Verify with a key of the key set, for the token's (checked) alg only."""
        if isinstance(chosen, str):
            return Deny(chosen)
        return self._verify(token, chosen.key, [alg], found)

    def _verify(self, token: str, key: Any, algorithms: list[str], found: Found) -> Verdict:
        """Check the signature with C{key} and the claims."""
        try:
            claims = self._decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer or None,
                audience=self.audience or None,
                leeway=self.leeway,
                options=self._options,
            )
        except jwt.PyJWTError as error:
            return Deny(f"invalid token: {bounded(error)}")
        if "exp" not in claims:
            return Deny('invalid token: Token is missing the "exp" claim')
        for claim in _NUMERIC_DATE_CLAIMS:
            if claim in claims and not _is_numeric_date(claims[claim]):
                return Deny(f"invalid token: {claim} is not a number")
        too_early = _check_times(claims, time.time(), self.leeway)
        if too_early is not None:
            return Deny(f"invalid token: {too_early}")
        name = claims.get(self.consumer_claim)
        if not isinstance(name, str):
            return Deny(f"token has no string {self.consumer_claim} claim")
        consumer = self.consumers.by_name(name)
        if consumer is None:
            return Deny("token names an unknown consumer")
        exp = claims["exp"]
        return Accept(
            Principal(consumer.name, self.name, claims, key=self.key_digest),
            expires_at=float(exp) + self.leeway,
            credential=found.credential,
        )


class _CheckedHMAC(HMACAlgorithm):
    """
    PyJWT's HMAC algorithm, which checks its key (not a PEM, SSH, DER or
    JWK text) on every token: the authenticator's secret, checked once by
    PyJWT's own C{prepare_key} when the decoder was made, is used as it is.
    Any other key is checked as PyJWT does.
    """

    def __init__(self, hash_alg: Any, secret: bytes) -> None:
        super().__init__(hash_alg)
        self._secret = HMACAlgorithm(hash_alg).prepare_key(secret)

    def prepare_key(self, key: str | bytes) -> bytes:
        if key is self._secret:
            return key
        return super().prepare_key(key)


def _decoder(key: Any, algorithms: Sequence[str]) -> Any:
    """
    What decodes tokens for a static C{key}: for an HMAC secret, a
    L{jwt.PyJWT} whose HMAC algorithms take the secret as checked once
    (L{_CheckedHMAC}); else (or if PyJWT would refuse the secret: every
    token is then refused by PyJWT, as before) PyJWT's module.
    """
    if not isinstance(key, bytes) or not all(a in _HMAC for a in algorithms):
        return jwt
    decoder = jwt.PyJWT()
    signatures = getattr(decoder, "_jws", None)
    if signatures is None:  # pragma: no cover - another PyJWT
        return jwt
    try:
        for name, hash_alg in _HMAC_HASHES.items():
            checked = _CheckedHMAC(hash_alg, key)
            signatures.unregister_algorithm(name)
            signatures.register_algorithm(name, checked)
    except (jwt.InvalidKeyError, KeyError):
        return jwt
    return decoder


_HMAC_HASHES = {
    "HS256": HMACAlgorithm.SHA256,
    "HS384": HMACAlgorithm.SHA384,
    "HS512": HMACAlgorithm.SHA512,
}


def check_jwks_algorithms(algorithms: Sequence[str]) -> None:
    """
    Check algorithms for keys from a key set: supported, public-key only.

    @raise KeyMismatch: naming the problem.
    """
    if not algorithms:
        raise KeyMismatch("at least one algorithm is required", about_algorithms=True)
    for algorithm in algorithms:
        if algorithm not in SUPPORTED_ALGORITHMS:
            raise KeyMismatch(
                f"unsupported algorithm {algorithm!r} (none is never allowed)",
                about_algorithms=True,
            )
        if algorithm in _HMAC:
            raise KeyMismatch(
                f"{algorithm} cannot be used with keys from an identity provider"
                " (HMAC keys are never taken from a key set)",
                about_algorithms=True,
            )


def _check_times(claims: dict[str, Any], now: float, leeway: float) -> str | None:
    """
    PyJWT's time checks (same rules and wording), on claims already known
    to be NumericDates: why the token is not valid at C{now}, or L{None}.
    """
    if "iat" in claims and claims["iat"] > now + leeway:
        return "The token is not yet valid (iat)"
    if "nbf" in claims and claims["nbf"] > now + leeway:
        return "The token is not yet valid (nbf)"
    if claims["exp"] <= now - leeway:
        return "Signature has expired"
    return None


def _is_numeric_date(value: object) -> bool:
    """
    Whether a claim is a NumericDate: a JSON number (an int or a float, not
    a bool), finite as a float (so that an expiry can be computed from it).
    """
    if type(value) is int:
        return abs(value) <= _LARGEST_FLOAT_INT
    return type(value) is float and math.isfinite(value)


#: Larger ints have no float value (C{float()} raises OverflowError).
_LARGEST_FLOAT_INT = int(float.fromhex("0x1.fffffffffffffp+1023"))


def _unverified_header(token: str) -> dict[str, Any] | None:
    """
    The JOSE header of a token of the right shape, before verification, or
    L{None} if it is not a JSON object. It only lets a bad token be refused
    with a precise reason, before any key is used: PyJWT parses it again,
    strictly, when it verifies the token, and decides.
    """
    segment = token[: token.index(".")]
    try:
        header = json.loads(urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error, UnicodeDecodeError, JSON
        return None
    return header if isinstance(header, dict) else None


def build(section: Table, context: BuildContext) -> JWTAuthenticator:
    """
    Build from C{[auth.jwt]}. C{public_key} is a PEM file path, relative to
    the configuration file's folder; C{jwks_url} or C{discovery = true}
    take the keys from an identity provider (see L{txwssec.auth.jwks}).
    """
    algorithms = section.strings("algorithms", ("HS256",))
    secret = section.string("secret")
    public_key_path = section.string("public_key")
    jwks_url = section.string("jwks_url")
    discovery = section.boolean("discovery")
    sources = [
        name
        for name, value in (
            ("secret", secret),
            ("public_key", public_key_path),
            ("jwks_url", jwks_url),
            ("discovery", discovery),
        )
        if value
    ]
    if len(sources) != 1:
        raise section.error(
            sources[0] if sources else "secret",
            "set exactly one of secret, public_key, jwks_url and discovery",
        )
    keys = None
    if jwks_url or discovery:
        try:
            check_jwks_algorithms(algorithms)
        except KeyMismatch as error:
            raise section.error("algorithms", str(error)) from None
        issuer = section.string("issuer")
        keys = build_keys(section, context, algorithms, url=jwks_url, issuer=issuer)
    else:
        for name in ("ca", "jwks_cache", "jwks_cooldown", "jwks_timeout"):
            if section.has(name):
                raise section.error(name, "only applies with jwks_url or discovery")
    key: str | bytes | None = secret or None
    if public_key_path:
        try:
            key = (context.base_dir / public_key_path).read_bytes()
        except OSError as error:
            raise section.error("public_key", f"cannot read: {error.strerror}") from None
    options = {
        "issuer": section.string("issuer"),
        "audience": section.string("audience"),
        "leeway": section.number("leeway", 0),
        "header": section.string("header", "Authorization"),
        "subprotocol": section.string("subprotocol", "bearer"),
        "query": section.string("query"),
        "consumer_claim": section.string("consumer_claim", "sub"),
        "kid": section.string("kid"),
    }
    section.finish()
    try:
        return JWTAuthenticator(
            context.consumers,
            key,
            algorithms,
            keys=keys,
            **options,  # type: ignore[arg-type]
        )
    except KeyMismatch as error:
        if error.about_algorithms:
            raise section.error("algorithms", str(error)) from None
        raise section.error("public_key" if public_key_path else "secret", str(error)) from None
