"""
In-process cost of authenticating one handshake: keys from an identity
provider (JWKS, cache hit) against a static public key, and introspection
with a warm cache against a static key.

    python bench/auth_cost.py            # best of 15 rounds of 1,000 calls each

No network: the key set is loaded from a document at hand and the
introspection answer comes from a stub client. The target (the identity
lifecycle issue) is at most 1.1 times the static cost for each.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from jwt.algorithms import RSAAlgorithm
from twisted.internet import task
from twisted.internet.defer import succeed
from twisted.web.http_headers import Headers

from txwssec.auth._https import Fetched, HTTPSClient
from txwssec.auth.introspect import IntrospectionAuthenticator
from txwssec.auth.jwks import JWKSKeys
from txwssec.auth.jwt import JWTAuthenticator
from txwssec.auth.keys import KeyAuthenticator
from txwssec.consumers import Consumer, ConsumerDirectory, key_digest
from txwssec.types import Accept, HandshakeRequest

CONSUMERS = ConsumerDirectory([Consumer("john", key_digests=(key_digest("john-key"),))])


def request(header: str, value: str) -> HandshakeRequest:
    return HandshakeRequest(
        peer="tcp4:127.0.0.1:1",
        host="127.0.0.1",
        path="/echo",
        query={},
        headers=((header, value),),
        subprotocols=(),
    )


class StubClient(HTTPSClient):
    """Answers every introspection with C{answer} (no network)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__()
        self.body = json.dumps(answer).encode()

    def post_form(self, url: str, body: bytes, headers: Any = None) -> Any:
        return succeed(Fetched(200, Headers(), self.body))


def best_per_call(
    cases: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    """
    Best seconds per call of each case over C{rounds} rounds of C{calls}
    calls; the cases take turns within each round, so that noise from other
    processes hits them alike.
    """
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(rounds):
        for name, function in cases.items():
            start = time.perf_counter()
            for _ in range(calls):
                function()
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=15)
    arguments = parser.parse_args()

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk.update(kid="k1", alg="RS256", use="sig")
    token = jwt.encode(
        {"sub": "john", "exp": int(time.time()) + 3600},
        private,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    bearer = request("authorization", f"Bearer {token}")

    static = JWTAuthenticator(CONSUMERS, pem, ["RS256"])
    keys = JWKSKeys(HTTPSClient(), ["RS256"], url="https://idp.invalid/jwks", clock=task.Clock())
    keys.load({"keys": [jwk]})
    from_jwks = JWTAuthenticator(CONSUMERS, None, ["RS256"], keys=keys)

    opaque = "o" * 43
    answer = {"active": True, "sub": "john", "exp": int(time.time()) + 3600}
    introspect = IntrospectionAuthenticator(
        CONSUMERS, StubClient(answer), "https://idp.invalid/introspect", "wssec", "secret"
    )
    opaque_request = request("authorization", f"Bearer {opaque}")
    introspect.authenticate(opaque_request)  # warms the cache
    api_key = KeyAuthenticator(CONSUMERS)
    key_request = request("apikey", "john-key")

    for authenticator, handshake in (
        (static, bearer),
        (from_jwks, bearer),
        (introspect, opaque_request),
        (api_key, key_request),
    ):
        assert isinstance(authenticator.authenticate(handshake), Accept), authenticator

    costs = best_per_call(
        {
            "static": lambda: static.authenticate(bearer),
            "jwks": lambda: from_jwks.authenticate(bearer),
            "introspect": lambda: introspect.authenticate(opaque_request),
            "key": lambda: api_key.authenticate(key_request),
        },
        arguments.calls,
        arguments.rounds,
    )
    static_cost, jwks_cost = costs["static"], costs["jwks"]
    introspect_cost, key_cost = costs["introspect"], costs["key"]
    print(f"static RS256 public key     {static_cost * 1e6:8.1f} us/handshake")
    print(
        f"JWKS RS256 (cache hit)      {jwks_cost * 1e6:8.1f} us/handshake"
        f"  {jwks_cost / static_cost:.3f}x static key"
    )
    print(
        f"introspection (warm cache)  {introspect_cost * 1e6:8.1f} us/handshake"
        f"  {introspect_cost / static_cost:.3f}x static JWT,"
        f" {introspect_cost / key_cost:.2f}x static API key"
    )
    print(f"static API key              {key_cost * 1e6:8.1f} us/handshake")


if __name__ == "__main__":
    main()
