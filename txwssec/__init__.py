"""
txwssec: secure WebSocket servers, clients and gateways on Twisted and
Autobahn.

The handshake is authenticated (API keys, HTTP Basic, JWT, your own method),
Origin-checked and bounded; sessions end when their credentials do.
"""

from txwssec._version import __version__
from txwssec.auth import (
    AnonymousAuthenticator,
    BasicAuthenticator,
    BuildContext,
    JWTAuthenticator,
    KeyAuthenticator,
    register_authenticator,
)
from txwssec.consumers import Consumer, ConsumerDirectory
from txwssec.errors import CloseCode, ConfigError, HandshakeRefused
from txwssec.interfaces import Authenticator, IAuthenticator
from txwssec.origin import OriginPolicy
from txwssec.passwords import hash_password
from txwssec.policy import MessageRules, RoutePolicy, ServerPolicy
from txwssec.server import SecureServerFactory, SecureServerProtocol
from txwssec.session import Session
from txwssec.types import Accept, Credential, Deny, HandshakeRequest, Principal

__all__ = [
    "Accept",
    "AnonymousAuthenticator",
    "Authenticator",
    "BasicAuthenticator",
    "BuildContext",
    "CloseCode",
    "ConfigError",
    "Consumer",
    "ConsumerDirectory",
    "Credential",
    "Deny",
    "HandshakeRefused",
    "HandshakeRequest",
    "IAuthenticator",
    "JWTAuthenticator",
    "KeyAuthenticator",
    "MessageRules",
    "OriginPolicy",
    "Principal",
    "RoutePolicy",
    "SecureServerFactory",
    "SecureServerProtocol",
    "ServerPolicy",
    "Session",
    "__version__",
    "hash_password",
    "register_authenticator",
]
