"""
Sessions: who is connected, until when, and the timers that end it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from txwssec.deadlines import Deadline, Deadlines
from txwssec.types import Principal


class Session:
    """
    An authenticated connection's identity and lifetime.

    The expiry timer is armed by L{start} (when the connection opens) and
    cancelled by L{stop} (when it ends, whatever way), so timers never
    outlive their connections. It runs exactly at C{expires_at}, on the
    server's shared L{Deadlines}.

    @ivar principal: who authenticated.
    @ivar expires_at: POSIX time when the session ends, or L{None}.
    @ivar route: the path of the route it was opened on.
    @ivar id: its id in the server's session registry, unique across
        processes (set when the connection opens; C{""} until then).
    @ivar not_after: a hard end (the route's C{max_lifetime}) that
        L{refresh} cannot move, or L{None}.
    """

    __slots__ = (
        "_clock",
        "_deadlines",
        "_on_expired",
        "_timer",
        "ended",
        "expires_at",
        "id",
        "not_after",
        "principal",
        "route",
    )

    def __init__(
        self,
        principal: Principal,
        expires_at: float | None,
        route: str,
        clock: IReactorTime,
        not_after: float | None = None,
    ) -> None:
        self.principal = principal
        self.not_after = not_after
        self.expires_at = _earliest(expires_at, not_after)
        self.route = route
        self._clock = clock
        self._deadlines: Deadlines | None = None
        self._timer: Deadline | None = None
        self._on_expired: Callable[[], object] | None = None
        self.ended = False
        self.id = ""

    @property
    def consumer(self) -> str:
        """The consumer's name."""
        return self.principal.consumer

    def remaining(self) -> float | None:
        """Seconds until expiry (never negative), or L{None}."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - self._clock.seconds())

    def start(self, on_expired: Callable[[], object], deadlines: Deadlines | None = None) -> None:
        """
        Arm the expiry timer: C{on_expired} is called at the expiry instant,
        unless L{stop} was called first.

        @param deadlines: the timers to use (a server shares one for all its
            connections); by default, the session's own on its clock.
        """
        self._on_expired = on_expired
        self._deadlines = deadlines if deadlines is not None else Deadlines(self._clock)
        self._arm()

    def refresh(self, expires_at: float | None) -> None:
        """
        Move the expiry (for example after the client presented a fresh
        token). L{None} removes it. Never later than C{not_after}.
        """
        self.expires_at = _earliest(expires_at, self.not_after)
        if self._on_expired is not None and not self.ended:
            self._arm()

    def stop(self) -> None:
        """
        Cancel the timer; the session is over. It forgets its callback (a
        connection's bound method, which would otherwise make the session
        and its connection a reference cycle that only the garbage
        collector can free).
        """
        self.ended = True
        self._on_expired = None
        self._cancel()

    def _arm(self) -> None:
        self._cancel()
        deadlines = self._deadlines
        on_expired = self._on_expired
        if self.expires_at is None or on_expired is None or deadlines is None or self.ended:
            return
        # The callback itself, not a wrapper: stop() and refresh() cancel this
        # deadline, so it only ever runs for a live session.
        self._timer = deadlines.call_at(self.expires_at, on_expired)

    def _cancel(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None


def _earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two optional instants."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)
