"""
Authentication methods, one module each, and the registry that names them.

Adding a method: write a module with a class providing
L{txwssec.interfaces.IAuthenticator} and a builder, then add one line to
L{txwssec.auth.registry}.
"""

from txwssec.auth.anonymous import AnonymousAuthenticator
from txwssec.auth.basic import BasicAuthenticator
from txwssec.auth.context import BuildContext
from txwssec.auth.introspect import IntrospectionAuthenticator
from txwssec.auth.jwks import JWKSKeys
from txwssec.auth.jwt import JWTAuthenticator
from txwssec.auth.keys import KeyAuthenticator
from txwssec.auth.registry import (
    AuthenticatorBuilder,
    builder_for,
    register_authenticator,
    registered_names,
)
from txwssec.auth.tls import TLSClientCertificateAuthenticator

__all__ = [
    "AnonymousAuthenticator",
    "AuthenticatorBuilder",
    "BasicAuthenticator",
    "BuildContext",
    "IntrospectionAuthenticator",
    "JWKSKeys",
    "JWTAuthenticator",
    "KeyAuthenticator",
    "TLSClientCertificateAuthenticator",
    "builder_for",
    "register_authenticator",
    "registered_names",
]
