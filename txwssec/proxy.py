"""
The gateway, under its first import path: everything is in
L{txwssec.gateway} now (the client leg, the upstream leg, the relay and
what is forwarded), re-exported here for existing imports
(C{from txwssec.proxy import Upstream}).

This module is in the top layer (see docs/architecture.md), over the
gateway: only txwssec.config (above it) imports it.
"""

from txwssec.gateway import (
    HOP_HEADERS,
    BadGateway,
    GatewayProtocol,
    GatewayTimeout,
    Upstream,
    UpstreamPool,
    UpstreamProtocol,
    connection_options,
    forwarded_headers,
    forwarded_target,
    gatewayLog,
)

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
