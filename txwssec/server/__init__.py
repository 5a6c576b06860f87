"""
The secure server: an Autobahn factory and protocol whose opening handshake
runs txwssec's pipeline (see L{SecureServerProtocol.secureHandshake}).

The package is the protocols layer's server (see docs/architecture.md):
L{txwssec.server.protocol} (the pipeline and the session's end),
L{txwssec.server.handshake} (reading the request, answering refusals),
L{txwssec.server.flow} (limits, backpressure, idle) and
L{txwssec.server.factory} (what connections share).
"""

from txwssec.observers import securityLog
from txwssec.server.context import ServerContext
from txwssec.server.factory import SecureServerFactory
from txwssec.server.protocol import SecureServerProtocol

__all__ = ["SecureServerFactory", "SecureServerProtocol", "ServerContext", "securityLog"]
