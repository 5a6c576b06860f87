"""
Subprotocol selection that consumes credentials carried in
C{Sec-WebSocket-Protocol} and never echoes a secret back.
"""

from __future__ import annotations

from txwssec.types import Accept


def select_subprotocol(
    offered: tuple[str, ...], supported: tuple[str, ...], accept: Accept
) -> str | None:
    """
    Choose the C{Sec-WebSocket-Protocol} to answer with.

    The first of the route's application subprotocols (server preference
    order) that the client offered wins. Otherwise, when the credential came
    through C{Sec-WebSocket-Protocol}, its marker (C{token}, C{bearer}) is
    answered, as browsers require an answer when they offered any entry.
    Otherwise none. The answer is always a configured name, so a secret can
    never be echoed.
    """
    consumed = accept.credential.subprotocols
    candidates = [entry for entry in offered if entry not in consumed]
    for name in supported:
        if name in candidates:
            return name
    return accept.credential.marker
