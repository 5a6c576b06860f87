"""
The gateway: relay an authenticated client connection to an upstream
WebSocket server.

The client's 101 is sent only once the upstream's 101 has arrived, so the
client sees the upstream's subprotocol choice, and a refused or unreachable
upstream is a 502 (504 on timeout) before the client is upgraded. Then
messages, pings, pongs and close codes pass through both ways, with
backpressure both ways: a peer that does not read pauses reading from the
other one. txwssec keeps enforcing the route's limits and the session's
expiry on the client leg for the whole session; when it ends a session
(3000, 3003, 3008, 1008...) the upstream sees a plain 1001.

Once both legs are open, data frames pass as they came, with their
fragment boundaries (L{txwssec.gateway.relay}): their headers are checked against
the route's limits, their payloads are not read. Text is not UTF-8
validated by the gateway: the upstream validates what the client sends
(invalid UTF-8 gets its 1007, relayed), the client what the upstream sends.
Control frames go through Autobahn (pings and pongs relayed, close codes
relayed, protocol errors failed as before). A route with compression keeps
the full relay: Autobahn inflates, checks and reassembles every message,
and the gateway sends it again, uncompressed, to the upstream; so does a
L{GatewayProtocol} subclass that overrides C{onMessage}.
"""

from txwssec.gateway.forwarding import (
    HOP_HEADERS,
    connection_options,
    forwarded_headers,
    forwarded_target,
)
from txwssec.gateway.protocol import GatewayProtocol
from txwssec.gateway.upstream import (
    BadGateway,
    GatewayTimeout,
    UpstreamPool,
    UpstreamProtocol,
)
from txwssec.observers import gatewayLog
from txwssec.policy import Upstream

__all__ = [
    "HOP_HEADERS",
    "BadGateway",
    "GatewayProtocol",
    "GatewayTimeout",
    "Upstream",
    "UpstreamPool",
    "UpstreamProtocol",
    "connection_options",
    "forwarded_headers",
    "forwarded_target",
    "gatewayLog",
]
