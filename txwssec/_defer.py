"""
C{isinstance(value, Deferred)} (and against coroutines) for the values the
handshake pipeline hands on, without ABCMeta (issue 19, round 5).

Twisted's C{Deferred} is an C{Awaitable}, so C{isinstance} against it goes
through C{ABCMeta.__instancecheck__}, a Python function: eleven of those per
key handshake, for values that are C{None}, a C{bool}, a C{float}, a
C{tuple} or an L{Accept}. L{is_deferred} and L{is_waiting} answer L{False}
at once for those exact types, none of which is (or subclasses, or is
registered as) a C{Deferred} or a coroutine, and ask C{isinstance} for
anything else.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from txwssec.types import Accept, Deny

if TYPE_CHECKING:
    from typing_extensions import TypeIs

#: Exact types that are never a Deferred or a coroutine.
_NEVER: frozenset[type] = frozenset(
    {type(None), bool, int, float, str, bytes, tuple, list, dict, Accept, Deny}
)
_WAITING = (Deferred, Coroutine)


def is_deferred(value: object) -> TypeIs[Deferred[Any]]:
    """C{isinstance(value, Deferred)}."""
    return type(value) not in _NEVER and isinstance(value, Deferred)


def is_waiting(value: object) -> TypeIs[Deferred[Any] | Coroutine[Any, Any, Any]]:
    """C{isinstance(value, Deferred | Coroutine)}."""
    return type(value) not in _NEVER and isinstance(value, _WAITING)
