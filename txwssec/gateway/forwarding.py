"""
What the gateway forwards to its upstream: the client's headers minus the
hop-by-hop ones, the consumed credentials and the spoofable forwarding
headers, plus its own C{X-Consumer-Username} and C{X-Forwarded-For}; and the
request target minus credential query parameters.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from urllib.parse import unquote_plus, urlsplit

from txwssec.credentials import credential_headers, credential_markers, credential_queries
from txwssec.interfaces import Authenticator
from txwssec.policy import RoutePolicy, ServerPolicy
from txwssec.tickets import TICKET_QUERY
from txwssec.types import Accept, HandshakeRequest

#: Request headers that belong to one hop, or to the WebSocket handshake the
#: gateway makes itself, or that the gateway sets: never forwarded as sent.
HOP_HEADERS = frozenset(
    {
        "host",
        "connection",
        "upgrade",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
        "origin",
        "user-agent",
        "x-consumer-username",
        "x-forwarded-for",
        "pragma",
        "cache-control",
    }
)


def _spoofable(name: str) -> bool:
    """
    Headers an upstream may trust as set by its proxy: the gateway's own
    (X-Consumer-Username, X-Forwarded-For, set below), the other forwarding
    headers, and any name with an underscore (CGI and WSGI servers read
    X_Consumer_Username as X-Consumer-Username).
    """
    return (
        "_" in name
        or name in ("forwarded", "x-real-ip", "x-client-ip")
        or name.startswith("x-forwarded-")
    )


def forwarded_headers(
    request: HandshakeRequest,
    authenticators: Sequence[Authenticator],
    accept: Accept,
    direct_peer: str,
    trust_forwarded_for: bool = False,
    *,
    known_authenticators: Sequence[Authenticator] = (),
    forward_cookie: bool = False,
    forward_authorization: bool = False,
) -> dict[str, str]:
    """
    The headers sent upstream: the client's, minus

      - hop-by-hop and handshake headers (L{HOP_HEADERS}) and every header
        the client's C{Connection} header names (RFC 9110 section 7.6.1);
      - every header any of the route's methods reads credentials from, and
        the one the accepting method read (see L{txwssec.auth.credentials});
      - every header any method of C{known_authenticators} (the server's
        other routes) reads credentials from, and C{Authorization} and
        C{Cookie}, unless C{forward_authorization} / C{forward_cookie} allow
        that one (a route's own credential header is stripped regardless);
      - forwarding headers a client could forge;

    plus C{X-Consumer-Username} and C{X-Forwarded-For}: the address that
    connected to us, after the chain the client sent when C{trust_forwarded_for}
    (the peer is a trusted proxy; a client-made chain is dropped otherwise).
    """
    stripped = stripped_headers(
        authenticators, known_authenticators, forward_cookie, forward_authorization
    )
    return headers_without(request, stripped, accept, direct_peer, trust_forwarded_for)


def stripped_headers(
    authenticators: Sequence[Authenticator],
    known_authenticators: Sequence[Authenticator] = (),
    forward_cookie: bool = False,
    forward_authorization: bool = False,
) -> frozenset[str]:
    """
    The credential header names L{forwarded_headers} strips of every request
    of a route (the accepting method's own aside): its methods', and those
    of C{known_authenticators}, C{Authorization} and C{Cookie} unless
    allowed.
    """
    known = set(credential_headers(known_authenticators)) | {"authorization", "cookie"}
    if forward_authorization:
        known.discard("authorization")
    if forward_cookie:
        known.discard("cookie")
    return frozenset(credential_headers(authenticators) | known)


def headers_without(
    request: HandshakeRequest,
    stripped: frozenset[str],
    accept: Accept,
    direct_peer: str,
    trust_forwarded_for: bool = False,
) -> dict[str, str]:
    """
    L{forwarded_headers} with the credential header names to strip given
    (C{stripped}: L{StrippedNames.headers}): the accepting method's header,
    the request's C{Connection} options, the hop-by-hop and spoofable ones
    are added here.
    """
    stripped = stripped | connection_options(request)
    if accept.credential.header:
        stripped |= {accept.credential.header.lower()}
    forwarded: dict[str, str] = {}
    for name, value in request.headers:
        if name in HOP_HEADERS or name in stripped or _spoofable(name):
            continue
        if name in forwarded:
            forwarded[name] += ("; " if name == "cookie" else ", ") + value
        else:
            forwarded[name] = value
    chain = list(request.header_values("x-forwarded-for")) if trust_forwarded_for else []
    forwarded["X-Forwarded-For"] = ", ".join([*chain, direct_peer])
    forwarded["X-Consumer-Username"] = accept.principal.consumer
    return forwarded


def connection_options(request: HandshakeRequest) -> frozenset[str]:
    """
    The header names listed in the request's C{Connection} header(s): they
    are meant for this hop only and are never forwarded.
    """
    return frozenset(
        token.strip().lower()
        for value in request.header_values("connection")
        for token in value.split(",")
        if token.strip()
    )


def forwarded_target(
    request_uri: str,
    authenticators: Sequence[Authenticator],
    accept: Accept,
    known_authenticators: Sequence[Authenticator] = (),
) -> str:
    """
    The client's path and query, minus every query parameter a method of
    the route or of C{known_authenticators} reads credentials from, and
    always minus C{ticket} (a one-time ticket, even one sent to a route
    without tickets, is still a live credential).

    The query is edited as sent: only the removed C{name=value} pieces go,
    every other byte (percent-encoding, C{+}, order, empty pieces between
    kept ones) is left as the client wrote it, so signed URLs still verify.
    """
    return target_without(
        request_uri, stripped_queries(authenticators, known_authenticators), accept
    )


def stripped_queries(
    authenticators: Sequence[Authenticator], known_authenticators: Sequence[Authenticator] = ()
) -> frozenset[str]:
    """
    The credential query names L{forwarded_target} strips of every request
    of a route (the accepting method's own aside): its methods', those of
    C{known_authenticators}, and C{ticket}.
    """
    return frozenset(
        credential_queries(authenticators) | credential_queries(known_authenticators)
    ) | {TICKET_QUERY}


def target_without(request_uri: str, stripped: frozenset[str], accept: Accept) -> str:
    """
    L{forwarded_target} with the credential query names to strip given
    (C{stripped}: L{StrippedNames.queries}); the accepting method's query
    name is added here.
    """
    names = stripped
    if accept.credential.query:
        names = names | {accept.credential.query}
    path, question, query = request_uri.partition("?")
    query = query.partition("#")[0]  # a client sends none; never forwarded
    if not question or not names:
        return path + (question + query if query else "")
    kept = [
        piece
        for piece in query.split("&")
        if unquote_plus(piece.partition("=")[0], errors="replace") not in names
    ]
    edited = "&".join(kept)
    return path + ("?" + edited if edited else "")


def join_target(upstream_url: str, target: str) -> str:
    """
    The upstream URL for a client's C{target}: the upstream's own path when
    it has one, else the client's path; the client's query either way.
    """
    upstream = urlsplit(upstream_url)
    client = urlsplit(target)
    path = upstream.path if upstream.path not in ("", "/") else client.path
    query = "&".join(q for q in (upstream.query, client.query) if q)
    return upstream._replace(path=path or "/", query=query).geturl()


class StrippedNames:
    """
    What the gateway strips of a route's requests, from the names its
    methods and the server's other routes' methods read credentials from
    (L{forwarded_headers}, L{forwarded_target}, the subprotocol markers):
    found once per route and policy (L{stripped_names}), not per handshake.

    It keeps only weak references to the route and the policy: a policy a
    reload replaced (its methods' keys and secrets, its consumers) is freed
    once its handshakes and sessions are.
    """

    __slots__ = ("headers", "markers", "policy", "queries", "route")

    def __init__(self, route: RoutePolicy, policy: ServerPolicy) -> None:
        #: The route and the policy the names were found for (weakly).
        self.route = weakref.ref(route)
        self.policy = weakref.ref(policy)
        # Every method of the server's routes.
        methods = [method for each in policy.routes for method in each.authenticators]
        #: Header names stripped (but the accepting method's own, per request).
        self.headers = stripped_headers(
            route.authenticators, methods, route.forward_cookie, route.forward_authorization
        )
        #: Query names stripped (but the accepting method's own, per request).
        self.queries = stripped_queries(route.authenticators, methods)
        #: The route's C{Sec-WebSocket-Protocol} credential markers.
        self.markers = credential_markers(route.authenticators)


def stripped_names(route: RoutePolicy, policy: ServerPolicy) -> StrippedNames:
    """
    The L{StrippedNames} of C{route} under C{policy}, kept for the next
    handshake on the same route of the same policy (a reload makes new
    ones) while the route lives; at most L{_KEPT} are kept.
    """
    key = id(route)
    found = _stripped.get(key)
    if found is None or found.route() is not route or found.policy() is not policy:
        if len(_stripped) >= _KEPT:
            _stripped.clear()
        known = found is not None and found.route() is route
        found = _stripped[key] = StrippedNames(route, policy)
        if not known:  # one finalizer per route, however many policies
            weakref.finalize(route, _forget, key)
    return found


def _forget(key: int) -> None:
    """A route is gone: drop its names (unless a newer route took the key)."""
    found = _stripped.get(key)
    if found is not None and found.route() is None:
        del _stripped[key]


#: How many routes' names L{stripped_names} keeps.
_KEPT = 1024
_stripped: dict[int, StrippedNames] = {}
