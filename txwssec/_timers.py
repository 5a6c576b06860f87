"""
Exact timers for Autobahn's per-connection timeouts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txaio
from twisted.internet.interfaces import IDelayedCall


class ExactTimers:
    """
    Autobahn's per-connection timers (opening and closing handshake,
    auto-ping), on txaio's reactor like before, but exact: txaio's batched
    timer, Autobahn's default, rounds every deadline down to a whole second,
    so a 1 s handshake timeout could fire at once and a 0.5 s ping timeout
    before any pong could arrive.
    """

    def call_later(self, delay: float, func: Callable[..., object], *args: Any) -> TimerCall:
        return TimerCall(txaio.call_later(delay, func, *args))  # type: ignore[attr-defined]


class TimerCall:
    """A timer that, like txaio's batched calls, may be cancelled twice."""

    __slots__ = ("_call",)

    def __init__(self, call: IDelayedCall) -> None:
        self._call = call

    def cancel(self) -> None:
        if self._call.active():
            self._call.cancel()
