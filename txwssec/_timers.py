"""
Exact timers for Autobahn's per-connection timeouts.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from txwssec._reactor import default_reactor
from txwssec.deadlines import Deadlines


class ExactTimers(Deadlines):
    """
    Autobahn's per-connection timers (opening and closing handshake,
    auto-ping) for a factory, exact: txaio's batched timer, Autobahn's
    default, rounds every deadline down to a whole second, so a 1 s
    handshake timeout could fire at once and a 0.5 s ping timeout before
    any pong could arrive.

    Its calls may be cancelled twice (as txaio's can): see L{Deadlines}.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        super().__init__(clock if clock is not None else default_reactor())
