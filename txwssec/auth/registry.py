"""
The registry of authentication method names usable in C{auth = [...]}.

A builder takes the method's C{[auth.NAME]} table and a L{BuildContext} and
returns an authenticator; it reads its options through the L{Table} getters
so that a wrong key names its path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from twisted.application.service import IService

from txwssec._schema import Table
from txwssec.auth import anonymous, basic, introspect, jwt, keys, tls
from txwssec.auth.context import BuildContext
from txwssec.interfaces import Authenticator

AuthenticatorBuilder = Callable[[Table, BuildContext], Authenticator]

_BUILDERS: dict[str, AuthenticatorBuilder] = {}


def register_authenticator(name: str, builder: AuthenticatorBuilder) -> None:
    """
    Make C{name} usable in a route's C{auth} list.

    @param builder: called with the C{[auth.NAME]} table and a L{BuildContext}.
    @raise ValueError: if C{name} is already registered.
    """
    if name in _BUILDERS:
        raise ValueError(f"authentication method {name!r} is already registered")
    _BUILDERS[name] = builder


def builder_for(name: str) -> AuthenticatorBuilder | None:
    """The builder registered under C{name}, if any."""
    return _BUILDERS.get(name)


def registered_names() -> tuple[str, ...]:
    """Every registered method name, sorted."""
    return tuple(sorted(_BUILDERS))


def auth_services(routes: Iterable[Sequence[Authenticator]]) -> list[IService]:
    """
    The services the routes' methods need running (each once), such as a
    JWKS key refresher: an authenticator names one in its optional
    C{service} attribute.
    """
    found: list[IService] = []
    for authenticators in routes:
        for authenticator in authenticators:
            service = getattr(authenticator, "service", None)
            if IService.providedBy(service) and service not in found:
                found.append(service)
    return found


def _register_builtins() -> None:
    register_authenticator("anonymous", anonymous.build)
    register_authenticator("basic", basic.build)
    register_authenticator("introspect", introspect.build)
    register_authenticator("jwt", jwt.build)
    register_authenticator("key", keys.build)
    register_authenticator("tls", tls.build)


_register_builtins()
