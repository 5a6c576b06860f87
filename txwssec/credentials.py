"""
Where a route's methods read credentials from: the headers, query
parameters and C{Sec-WebSocket-Protocol} markers that must never be echoed
to a client or forwarded to an upstream.

An authenticator declares them with optional attributes::

    credential_headers = ("x-shared-secret",)   # header names
    credential_queries = ("ticket",)            # query parameter names
    credential_markers = ("token",)             # Sec-WebSocket-Protocol markers

The built-in methods are also read through their C{header}, C{query} and
C{subprotocol} options.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from txwssec.interfaces import Authenticator


def _names(authenticators: Iterable[Authenticator], declared: str, option: str) -> frozenset[str]:
    names: set[str] = set()
    for authenticator in authenticators:
        names.update(getattr(authenticator, declared, ()))
        value = getattr(authenticator, option, "")
        if isinstance(value, str) and value:
            names.add(value)
    return frozenset(names)


def credential_headers(authenticators: Iterable[Authenticator]) -> frozenset[str]:
    """Lower-cased names of the headers the methods read credentials from."""
    return frozenset(n.lower() for n in _names(authenticators, "credential_headers", "header"))


def credential_queries(authenticators: Iterable[Authenticator]) -> frozenset[str]:
    """Names of the query parameters the methods read credentials from."""
    return _names(authenticators, "credential_queries", "query")


def credential_markers(authenticators: Iterable[Authenticator]) -> frozenset[str]:
    """C{Sec-WebSocket-Protocol} entries that announce a credential."""
    return _names(authenticators, "credential_markers", "subprotocol")


def without_credentials(
    subprotocols: Iterable[str], authenticators: Iterable[Authenticator]
) -> list[str]:
    """
    C{subprotocols} minus every marker of the methods and the entry after it
    (the secret), whichever method accepted the connection.
    """
    return without_markers(subprotocols, credential_markers(authenticators))


def without_markers(subprotocols: Iterable[str], markers: Collection[str]) -> list[str]:
    """C{subprotocols} minus every one of C{markers} and the entry after it (the secret)."""
    kept: list[str] = []
    skip_next = False
    for entry in subprotocols:
        if skip_next:
            skip_next = False
        elif entry in markers:
            skip_next = True
        else:
            kept.append(entry)
    return kept
