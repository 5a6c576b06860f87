"""
Closed connections freed by reference counting, not by the cycle collector.

A Deferred that fired with the protocol holding it is a reference cycle:
the protocol refers to the Deferred, whose result is the protocol. Autobahn's
C{is_closed} is one (resolved with the protocol when the connection ends),
as is the client's C{opened}. Through the protocol the cycle holds the whole
connection: its transport, buffers, NVX state and session. CPython frees
such cycles only in a garbage collection, and with thousands of connections
a full collection takes hundreds of milliseconds, often triggered in the
middle of a burst of closes (10,000 sessions expiring within a second).

L{FiredWithProtocol} holds such a Deferred for its protocol. Once the
connection is lost, L{FiredWithProtocol.release} lets the protocol forget a
Deferred that has fired with the protocol and has nothing left to run:
reading the attribute afterwards gives a new Deferred, already fired with
the protocol, which is everything a caller could observe of the old one.
"""

from __future__ import annotations

from typing import Any, overload

from twisted.internet.defer import Deferred, succeed


class FiredWithProtocol:
    """
    A protocol attribute holding a Deferred that fires with the protocol.

    Use it as a class attribute; assign the Deferred as usual.
    """

    _slot: str

    def __init__(self, madeWhenRead: bool = False) -> None:
        #: Whether one never assigned is made when first read (else reading
        #: it is an AttributeError, as for any unset attribute).
        self._madeWhenRead = madeWhenRead

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_deferred"

    @overload
    def __get__(self, protocol: None, owner: type | None = None) -> FiredWithProtocol: ...

    @overload
    def __get__(self, protocol: object, owner: type | None = None) -> Deferred[Any]: ...

    def __get__(self, protocol: object, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        found = protocol.__dict__
        deferred = found.get(self._slot, _UNMADE)
        if deferred is _UNMADE:
            if not self._madeWhenRead:
                raise AttributeError(self._slot[1:].removesuffix("_deferred"))
            # Never assigned (a protocol whose __init__ leaves it to be made
            # when first read): a new Deferred, not fired yet.
            deferred = found[self._slot] = Deferred()
        elif deferred is None:
            return succeed(protocol)
        return deferred

    def __set__(self, protocol: object, deferred: Deferred[Any]) -> None:
        protocol.__dict__[self._slot] = deferred

    def made(self, protocol: object) -> bool:
        """Whether C{protocol}'s Deferred was made (assigned, or read) already."""
        return protocol.__dict__.get(self._slot, _UNMADE) is not _UNMADE

    def fire(self, protocol: object) -> None:
        """
        Fire it with C{protocol} (C{txaio.resolve(protocol.is_closed,
        protocol)}); one never made is not made: it is left as released.
        """
        deferred = protocol.__dict__.get(self._slot, _UNMADE)
        if deferred is _UNMADE and self._madeWhenRead:
            protocol.__dict__[self._slot] = None
        else:
            self.__get__(protocol).callback(protocol)

    def release(self, protocol: object) -> None:
        """
        Forget the Deferred if it has fired with C{protocol} and has run
        its callbacks (it is not paused waiting for another Deferred).
        """
        deferred = protocol.__dict__.get(self._slot)
        if (
            deferred is not None
            and deferred.called
            and not deferred.paused
            and deferred.result is protocol
        ):
            protocol.__dict__[self._slot] = None


_UNMADE: Any = object()


class FiredWhenOpen:
    """
    A protocol attribute holding Autobahn's C{is_open}: a Deferred made
    when first read, fired with L{None} when the connection opens (see
    L{FiredWhenOpen.fire}); one fired before it was ever read is made
    already fired when read.

    Use it as a class attribute; assign a Deferred as usual.
    """

    _slot: str

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_deferred"

    def __get__(self, protocol: object, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        found = protocol.__dict__
        deferred = found.get(self._slot, _UNMADE)
        if deferred is _UNMADE:
            deferred = found[self._slot] = Deferred()
        elif deferred is _OPENED:
            deferred = found[self._slot] = succeed(None)
        return deferred

    def __set__(self, protocol: object, deferred: Deferred[Any]) -> None:
        protocol.__dict__[self._slot] = deferred

    def fire(self, protocol: object) -> None:
        """Fire it with L{None} (C{txaio.resolve(protocol.is_open, None)})."""
        found = protocol.__dict__
        deferred = found.get(self._slot, _UNMADE)
        if deferred is _UNMADE:
            found[self._slot] = _OPENED
        else:
            self.__get__(protocol).callback(None)


_OPENED: Any = object()


def fire(protocol: Any, name: str, result: Any) -> None:
    """
    C{txaio.resolve(getattr(protocol, name), result)}, without making the
    Deferred of a L{FiredWithProtocol} or L{FiredWhenOpen} attribute that
    nothing read.
    """
    attribute = getattr(type(protocol), name, None)
    if isinstance(attribute, FiredWithProtocol | FiredWhenOpen):
        attribute.fire(protocol)
    else:
        getattr(protocol, name).callback(result)
