"""
JWT verification keys from an identity provider: a JWKS (RFC 7517) fetched
over HTTPS from C{jwks_url}, or from the C{jwks_uri} of the OpenID
Connect discovery document of the configured issuer.

The rules, each a defence:

 - The algorithms stay pinned by configuration. A key verifies a token only
   if the token's C{alg} is configured, fits the key's type (RSA: RS*/PS*
   with at least 2048 bits; EC: the ES* of its curve; OKP: EdDSA) and, when
   the key names its own C{alg}, equals it. C{oct} (HMAC) keys are refused:
   a shared secret published in a key set is an algorithm-confusion risk.
   Keys whose C{use} is not C{sig}, whose C{key_ops} lack C{verify}, or that
   carry private parts are skipped.
 - Keys come only from the configured URL: a token's C{jku}, C{x5u},
   C{x5c} or C{jwk} header is never followed (L{txwssec.auth.jwt} refuses
   such tokens).
 - The key set is cached for the response's C{Cache-Control: max-age},
   bounded to [L{MIN_CACHE}, L{MAX_CACHE}] seconds, or C{jwks_cache}
   without one; it is refreshed in the background when it gets old, so keys
   rotate without a restart.
 - A token naming an unknown C{kid} makes the key set be fetched again, at
   most once per C{jwks_cooldown}: a flood of made-up kids costs one fetch.
   Fetches in flight are shared, never repeated.
 - When the identity provider cannot be reached, the keys last fetched stay
   in use for L{STALE_BOUND} seconds (one hour) past their cache lifetime;
   past that, tokens are refused (401): the method fails closed.
 - A handshake that arrives before the keys are loaded waits for the fetch
   in flight (itself bounded by C{jwks_timeout}), then is refused if it
   failed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from twisted.application.service import Service
from twisted.internet.defer import Deferred, TimeoutError
from twisted.logger import Logger

from txwssec._schema import Table
from txwssec.auth._https import (
    DEFAULT_TIMEOUT,
    FetchError,
    HTTPSClient,
    https_problem,
    load_trust_root,
)
from txwssec.auth.context import BuildContext

#: Bounds of the cache lifetime of a key set, in seconds.
MIN_CACHE = 60
MAX_CACHE = 86400
#: Cached keys stay usable this many seconds past their cache lifetime
#: while the identity provider cannot be reached.
STALE_BOUND = 3600
#: The most keys of a key set considered.
MAX_KEYS = 64
#: Longer RSA keys are skipped (each verification would cost too much).
MAX_RSA_BITS = 8192

_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})\"?", re.IGNORECASE)


@dataclass(frozen=True)
class JWK:
    """
    A verification key from a key set.

    @ivar kid: its key id, or L{None}.
    @ivar key: the cryptography public key object.
    @ivar algorithms: the configured algorithms this key may verify.
    """

    kid: str | None
    key: Any
    algorithms: frozenset[str]


def parse_jwk(jwk: Any, algorithms: Sequence[str]) -> JWK | str:
    """
    The key of one JWK member of a key set, or the reason it is skipped.
    """
    if not isinstance(jwk, Mapping):
        return "not a JSON object"
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "kid is not a string"
    if "use" in jwk and jwk["use"] != "sig":
        return "use is not sig"
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return "key_ops lacks verify"
    if kty == "oct":
        return "symmetric (oct) keys are never taken from a key set"
    if any(member in jwk for member in _PRIVATE_MEMBERS):
        return "holds a private key"
    try:
        if kty == "RSA":
            key: Any = RSAAlgorithm.from_jwk(dict(jwk))
            fits = [a for a in algorithms if a in _RSA]
            if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
                return "RSA key shorter than 2048 bits"
            if key.key_size > MAX_RSA_BITS:
                return f"RSA key longer than {MAX_RSA_BITS} bits"
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(dict(jwk))
            fits = [
                a
                for a in algorithms
                if a in _EC_CURVES
                and isinstance(key, ec.EllipticCurvePublicKey)
                and isinstance(key.curve, _EC_CURVES[a])
            ]
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(dict(jwk))
            okp = isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey)
            fits = ["EdDSA"] if okp and "EdDSA" in algorithms else []
        else:
            return "unsupported kty"
    except Exception:  # PyJWT's InvalidKeyError, ValueError, KeyError...
        return "invalid key parameters"
    alg = jwk.get("alg")
    if alg is not None:
        fits = [alg] if alg in fits else []
    if not fits:
        return "suits no configured algorithm"
    return JWK(kid, key, frozenset(fits))


def cache_lifetime(cache_control: str, default: float) -> float:
    """
    How long to keep a key set: its C{max-age} bounded to [L{MIN_CACHE},
    L{MAX_CACHE}], or C{default} without one. C{no-store} and C{no-cache}
    mean the shortest lifetime.
    """
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return MIN_CACHE
    match = _MAX_AGE.search(cache_control)
    if match is None:
        return default
    return float(min(max(int(match.group(1)), MIN_CACHE), MAX_CACHE))


class JWKSKeys(Service):
    """
    The verification keys of an identity provider, kept fresh.

    As a service it loads the keys when started and refreshes them before
    they get old; used without starting it, the first lookup fetches them.

    @param client: the HTTPS client.
    @param algorithms: the configured algorithms (public-key ones only).
    @param url: the JWKS URL; or, empty, discovered from C{issuer}.
    @param issuer: the issuer whose discovery document names the JWKS URL.
    @param cache: seconds a key set is kept without C{Cache-Control}.
    @param cooldown: the least seconds between two fetches caused by
        unknown kids (and between retries after a failure).
    @param clock: C{seconds()} and C{callLater} (the reactor by default).
    @param where: the configuration path named in log lines.
    """

    log = Logger()

    def __init__(
        self,
        client: HTTPSClient,
        algorithms: Sequence[str],
        *,
        url: str = "",
        issuer: str = "",
        cache: float = 300,
        cooldown: float = 30,
        clock: Any = None,
        where: str = "auth.jwt",
    ) -> None:
        if not url and not issuer:
            raise ValueError("a JWKS URL or an issuer to discover it from is required")
        self.client = client
        self.algorithms = tuple(algorithms)
        self.url = url
        self.issuer = issuer
        self.cache = cache
        self.cooldown = cooldown
        self.where = where
        self._clock = clock
        self._jwks_uri = url
        self._keys: dict[str | None, tuple[JWK, ...]] = {}
        self._loaded = False
        self._fresh_until = 0.0
        self._stale_until = 0.0
        self._last_attempt: float | None = None
        self._last_error = ""
        self._waiters: list[Deferred[None]] | None = None
        self._timer: Any = None
        #: Completed fetches (successful or not), for tests and operators.
        self.fetches = 0

    @property
    def clock(self) -> Any:
        """The clock used for cache lifetimes and timers."""
        if self._clock is None:
            self._clock = self.client.reactor
        return self._clock

    # -- readiness -----------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether usable keys are loaded (what C{/readyz} reports)."""
        return self._loaded and self.clock.seconds() < self._stale_until

    @property
    def reasons(self) -> list[str]:
        """Why the keys are not ready (empty when they are)."""
        if self.ready:
            return []
        if not self._loaded:
            state = "not loaded yet" if not self._last_error else "not loaded"
        else:
            state = "older than the stale bound"
        detail = f": {self._last_error}" if self._last_error else ""
        return [f"{self.where}: JWKS keys {state}{detail}"]

    @property
    def fetching(self) -> bool:
        """Whether a fetch is in flight."""
        return self._waiters is not None

    def stale_bound(self, lifetime: float) -> float:
        """
        Seconds after a successful fetch that its keys stay usable: their
        cache lifetime plus L{STALE_BOUND}, to bridge an outage of the
        identity provider.
        """
        return lifetime + STALE_BOUND

    # -- service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._refresh()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.client.close()

    def _schedule(self, delay: float) -> None:
        if not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._refresh)

    def _refresh(self) -> None:
        self._timer = None
        self.fetch()

    # -- lookup --------------------------------------------------------------

    def lookup(self, kid: str | None, alg: str) -> JWK | str | Deferred[JWK | str]:
        """
        The key to verify a token whose header names C{kid} and C{alg}, or
        the reason there is none; a L{Deferred} of either when the keys
        must be fetched first.
        """
        now = self.clock.seconds()
        if self._loaded and now < self._stale_until:
            if now >= self._fresh_until and self._may_fetch(now):
                self.fetch()  # in the background: the cached keys still serve
            found = self._choose(kid, alg)
            if not isinstance(found, str) or kid in self._keys:
                return found
            if self._waiters is None and not self._may_fetch(now):
                return found
            # An unknown kid may be a rotated key: fetch once, then decide.
        elif self._waiters is None and not self._may_fetch(now):
            return "JWKS keys unavailable" + (f" ({self._last_error})" if self._last_error else "")
        return self.fetch().addCallback(lambda _: self._chosen_after_fetch(kid, alg))

    def _chosen_after_fetch(self, kid: str | None, alg: str) -> JWK | str:
        if not (self._loaded and self.clock.seconds() < self._stale_until):
            return "JWKS keys unavailable" + (f" ({self._last_error})" if self._last_error else "")
        return self._choose(kid, alg)

    def _may_fetch(self, now: float) -> bool:
        return self._last_attempt is None or now - self._last_attempt >= self.cooldown

    def _choose(self, kid: str | None, alg: str) -> JWK | str:
        if kid is None:
            candidates = [k for keys in self._keys.values() for k in keys if alg in k.algorithms]
            if len(candidates) != 1:
                return "token has no kid and the key set has not exactly one key for its alg"
            return candidates[0]
        keys = self._keys.get(kid)
        if not keys:
            return "unknown kid"
        for key in keys:
            if alg in key.algorithms:
                return key
        return "the key of this kid does not allow the token's alg"

    # -- fetching ------------------------------------------------------------

    def fetch(self) -> Deferred[None]:
        """
        Fetch the key set now, or join the fetch in flight. The result
        fires with L{None} whether the fetch succeeded or not (see
        L{ready}); cancelling it leaves the fetch running for the others.
        """
        waiter: Deferred[None] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self._last_attempt = self.clock.seconds()
        fetching = Deferred.fromCoroutine(self._fetch())
        # Discovery and the key set together: still one timeout in all.
        fetching.addTimeout(self.client.timeout, self.client.reactor)
        fetching.addBoth(self._fetched)
        return waiter

    def _fetched(self, result: Any) -> None:
        self.fetches += 1
        now = self.clock.seconds()
        if isinstance(result, tuple):
            keys, lifetime, skipped = result
            self._install(keys, lifetime, now)
            self.log.info(
                "{where}: {count} JWKS keys loaded from {url}, kept {lifetime:g} s",
                where=self.where,
                count=sum(len(k) for k in keys.values()),
                url=self._jwks_uri,
                lifetime=lifetime,
                skipped=skipped,
            )
            for reason in skipped:
                self.log.info(
                    "{where}: JWKS key skipped: {reason}", where=self.where, reason=reason
                )
            self._schedule(lifetime)
        else:
            error = getattr(result, "value", result)
            if isinstance(error, TimeoutError):
                error = FetchError(f"no answer within {self.client.timeout:g} seconds")
            message = str(error) if isinstance(error, FetchError) else type(error).__name__
            self._last_error = message[:200]
            if not isinstance(error, FetchError):
                self.log.failure("{where}: JWKS fetch failed", result, where=self.where)
            usable = self._loaded and now < self._stale_until
            self.log.warn(
                "{where}: cannot fetch JWKS keys: {error}; {state}",
                where=self.where,
                error=self._last_error,
                state=(
                    f"cached keys used for {self._stale_until - now:.0f} s more"
                    if usable
                    else "tokens are refused until keys load"
                ),
            )
            self._schedule(self.cooldown)
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if not waiter.called:
                waiter.callback(None)

    async def _fetch(self) -> tuple[dict[str | None, tuple[JWK, ...]], float, list[str]]:
        if not self._jwks_uri:
            self._jwks_uri = await self._discover()
        try:
            fetched = await self.client.get(self._jwks_uri)
            if fetched.status != 200:
                raise FetchError(f"{self._jwks_uri} answered HTTP {fetched.status}")
            document = fetched.json()
        except FetchError:
            if not self.url:
                self._jwks_uri = ""  # discover again next time
            raise
        keys, skipped = self.parse(document)
        lifetime = cache_lifetime(fetched.header("Cache-Control"), self.cache)
        return keys, lifetime, skipped

    def parse(self, document: Any) -> tuple[dict[str | None, tuple[JWK, ...]], list[str]]:
        """
        The usable keys of a JWKS document by kid, and why the others were
        skipped.

        @raise FetchError: if it has no C{keys} array or no usable key.
        """
        members = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(members, list):
            raise FetchError("the JWKS document has no keys array")
        keys: dict[str | None, list[JWK]] = {}
        skipped: list[str] = []
        for index, member in enumerate(members[:MAX_KEYS]):
            parsed = parse_jwk(member, self.algorithms)
            if isinstance(parsed, str):
                kid = member.get("kid") if isinstance(member, dict) else None
                skipped.append(f"keys[{index}] (kid {str(kid)[:40]!r}): {parsed}")
            else:
                keys.setdefault(parsed.kid, []).append(parsed)
        if not keys:
            raise FetchError("the JWKS document has no usable key")
        return {kid: tuple(found) for kid, found in keys.items()}, skipped

    def load(self, document: Any, lifetime: float | None = None) -> None:
        """
        Use the keys of a JWKS document already at hand (as if just
        fetched, kept C{lifetime} seconds, C{cache} by default), for
        benchmarks and tests.

        @raise FetchError: if it has no usable key.
        """
        keys, _ = self.parse(document)
        self._install(keys, self.cache if lifetime is None else lifetime, self.clock.seconds())

    def _install(
        self, keys: dict[str | None, tuple[JWK, ...]], lifetime: float, now: float
    ) -> None:
        self._keys = keys
        self._loaded = True
        self._last_error = ""
        self._fresh_until = now + lifetime
        self._stale_until = now + self.stale_bound(lifetime)

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
        fetched = await self.client.get(url)
        if fetched.status != 200:
            raise FetchError(f"{url} answered HTTP {fetched.status}")
        document = fetched.json()
        if not isinstance(document, dict):
            raise FetchError("the discovery document is not a JSON object")
        if document.get("issuer") != self.issuer:
            raise FetchError(
                f"the discovery document's issuer {str(document.get('issuer'))[:100]!r}"
                f" is not the configured issuer {self.issuer!r}"
            )
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise FetchError("the discovery document has no jwks_uri")
        problem = https_problem(jwks_uri)
        if problem:
            raise FetchError(f"the discovery document's jwks_uri {problem}")
        return jwks_uri


def build_keys(
    section: Table,
    context: BuildContext,
    algorithms: Sequence[str],
    *,
    url: str,
    issuer: str,
) -> JWKSKeys:
    """
    The L{JWKSKeys} of an C{[auth.jwt]} table with C{jwks_url} or
    C{discovery = true}: reads C{ca}, C{jwks_cache}, C{jwks_cooldown} and
    C{jwks_timeout}.
    """
    if url:
        problem = https_problem(url)
        if problem:
            raise section.error("jwks_url", problem)
    elif not issuer:
        raise section.error("discovery", "needs issuer (the discovery document is under it)")
    else:
        problem = https_problem(issuer)
        if problem:
            raise section.error("issuer", f"{problem} (for discovery)")
    cache = section.number("jwks_cache", 300, minimum=MIN_CACHE)
    if cache > MAX_CACHE:
        raise section.error("jwks_cache", f"must be at most {MAX_CACHE}")
    cooldown = section.number("jwks_cooldown", 30, minimum=1)
    if cooldown > cache:
        raise section.error("jwks_cooldown", "must be at most jwks_cache")
    timeout = section.number("jwks_timeout", DEFAULT_TIMEOUT, minimum=0.1)
    trust_root = _trust_root(section, context.base_dir)
    client = HTTPSClient(trust_root, timeout=timeout)
    return JWKSKeys(
        client,
        algorithms,
        url=url,
        issuer=issuer,
        cache=cache,
        cooldown=cooldown,
        where=section.path,
    )


def _trust_root(section: Table, base_dir: Path) -> Any:
    ca = section.string("ca")
    if not ca:
        return None
    try:
        return load_trust_root(base_dir / ca)
    except OSError as error:
        raise section.error("ca", f"cannot read: {error.strerror}") from None
    except ValueError as error:
        raise section.error("ca", str(error)) from None
