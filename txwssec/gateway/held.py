"""
The gateway's writes, held by the leg and sent with one C{send} per turn
(issue 19, bench/RESULTS.md "Round 3: gateway").

Twisted's C{transport.write} buffers the bytes and asks epoll to report the
socket writable (an C{epoll_ctl}), sends them when the reactor's next poll
says so (an event and its dispatch), and stops asking (another
C{epoll_ctl}). A gateway leg instead keeps what it writes (relayed frames,
its own frames, the upgrade request, the 101) and L{TurnWrites} calls it
back once: it then sends all of it in one C{send} (L{send_held}), straight
to the socket when the transport buffers nothing, else through the
transport's own write. The bytes leave in the same order.

When: the client leg's writes at the end of the turn in which they were
made (before the reactor polls again: sooner than Twisted's write); the
upstream leg's at the end of the next turn, after one more poll, which is
when Twisted's write would have sent them. Sending to the upstream sooner
was measured worse (bench/RESULTS.md): on a busy machine the upstream then
wakes for each turn's few frames (more context switches, and more reads
and writes per message in both processes), where one more poll lets what
the next turn reads join the same send.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from txwssec._wire import lose_connection as lose_connection  # (re-exported)
from txwssec._wire import write_at_once


class HoldsWrites(Protocol):
    """A gateway leg whose writes L{TurnWrites} releases."""

    def releaseWrites(self) -> None:
        """Write what was held during this turn."""


class TurnWrites:
    """
    Calls L{HoldsWrites.releaseWrites} of each leg that held writes, once:
    at the end of the reactor turn (L{hold}), or at the end of the next one
    (L{holdLater}), with one C{callLater(0)} per turn for all the legs.
    """

    __slots__ = ("_call", "_clock", "_later", "_legs")

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._legs: list[HoldsWrites] = []
        self._later: list[HoldsWrites] = []
        self._call: Any = None

    def hold(self, leg: HoldsWrites) -> None:
        """C{leg} began holding writes: release them at the end of this turn."""
        self._legs.append(leg)
        if self._call is None:
            self._call = self._clock.callLater(0, self._release)

    def holdLater(self, leg: HoldsWrites) -> None:
        """
        C{leg} began holding writes: release them at the end of the next
        turn, after the reactor has polled once more, as Twisted's own
        buffered write does (see the module's docstring).
        """
        self._later.append(leg)
        if self._call is None:
            self._call = self._clock.callLater(0, self._release)

    def _release(self) -> None:
        legs, self._legs, self._later = self._legs, self._later, []
        # (a call made now runs after the reactor's next poll, which does
        # not wait while a call is due)
        self._call = self._clock.callLater(0, self._release) if self._legs else None
        for leg in legs:
            leg.releaseWrites()


_TURNS: dict[int, tuple[IReactorTime, TurnWrites]] = {}


def turn_writes(clock: IReactorTime) -> TurnWrites:
    """The L{TurnWrites} of C{clock} (one per reactor)."""
    entry = _TURNS.get(id(clock))
    if entry is None or entry[0] is not clock:
        entry = _TURNS[id(clock)] = (clock, TurnWrites(clock))
    return entry[1]


#: Write held chunks: straight to an idle plain TCP socket (the upstream
#: leg's L{txwssec.gateway.connect.LeanClient} too), else through the
#: transport's C{writeSequence} (L{txwssec._wire.write_at_once}).
send_held = write_at_once
