"""
Sessions: who is connected, until when, and the timers that end it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import overload

from twisted.internet.defer import Deferred, fail
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
    @ivar opened_at: when the registry listed it (POSIX time; 0 until then).
    @ivar not_after: a hard end (the route's C{max_lifetime}) that
        L{refresh} cannot move, or L{None}.
    @ivar refresher: what checks a new credential for L{refresh} (set by
        the server's protocol on a route with C{refresh = true}).
    """

    __slots__ = (
        "_clock",
        "_deadlines",
        "_notice",
        "_notice_timer",
        "_noticed",
        "_on_expired",
        "_on_expiring",
        "_timer",
        "ended",
        "expires_at",
        "id",
        "not_after",
        "opened_at",
        "principal",
        "refresher",
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
        self._notice = 0.0
        self._on_expiring: Callable[[float], object] | None = None
        self._notice_timer: Deadline | None = None
        #: The expiry a notice was armed for (not armed again for it).
        self._noticed: float | None = None
        self.refresher: Callable[[str], Deferred[float | None]] | None = None
        self.ended = False
        self.id = ""
        self.opened_at = 0.0

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

    def notify(self, seconds: float, on_expiring: Callable[[float], object]) -> None:
        """
        Call C{on_expiring(expires_at)} C{seconds} before each expiry
        (at once if it is nearer than that), once per expiry: a refresh to
        a later one arms it again. Call after L{start}.
        """
        self._notice = seconds
        self._on_expiring = on_expiring
        self._arm()

    @overload
    def refresh(self, expires_at: str) -> Deferred[float | None]: ...

    @overload
    def refresh(self, expires_at: float | None) -> None: ...

    def refresh(self, expires_at: str | float | None) -> Deferred[float | None] | None:
        """
        Move the expiry: to a POSIX time (L{None} removes it), never later
        than C{not_after}; or, given a credential (a C{str}), check it with
        the route's methods as a C{wssec.refresh} message would be (see
        L{txwssec.refresh}) and move the expiry to the new credential's.

        @return: for a credential, a L{Deferred} firing with the new
            C{expires_at}, or failing with
            L{txwssec.refresh.RefreshRejected} (the session is left as it
            was) or L{txwssec.refresh.ConsumerChanged} (the session closes
            with 3003); else L{None}.
        """
        if isinstance(expires_at, str):
            refresher = self.refresher
            if refresher is None or self.ended:
                return fail(RuntimeError("this session cannot be refreshed"))
            return refresher(expires_at)
        self.expires_at = _earliest(expires_at, self.not_after)
        if self._on_expired is not None and not self.ended:
            self._arm()
        return None

    def stop(self) -> None:
        """
        Cancel the timer; the session is over. It forgets its callback (a
        connection's bound method, which would otherwise make the session
        and its connection a reference cycle that only the garbage
        collector can free).
        """
        self.ended = True
        self._on_expired = None
        self._on_expiring = None
        self.refresher = None
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
        on_expiring = self._on_expiring
        if on_expiring is not None and self._notice > 0 and self._noticed != self.expires_at:
            self._notice_timer = deadlines.call_at(
                self.expires_at - self._notice, self._expiring, self.expires_at
            )

    def _expiring(self, expires_at: float) -> None:
        self._notice_timer = None
        self._noticed = expires_at
        on_expiring = self._on_expiring
        if on_expiring is not None and not self.ended:
            on_expiring(expires_at)

    def _cancel(self) -> None:
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        notice = self._notice_timer
        if notice is not None:
            notice.cancel()
            self._notice_timer = None


def _earliest(first: float | None, second: float | None) -> float | None:
    """The earlier of two optional instants."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)
