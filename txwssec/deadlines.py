"""
Many exact timers on one reactor call: session expiry, idle checks and
Autobahn's per-connection timers (opening and closing handshake, auto-ping).

A Twisted C{DelayedCall} is a large object (an instance dictionary, an
argument tuple, a keyword dictionary, two bound methods), and a server with
thousands of idle connections holds three or four per connection. Here a
timer is a small L{Deadline} in one heap per L{Deadlines}, and the reactor
holds a single call, armed for the earliest deadline. When it fires, every
deadline due by then runs in the same reactor turn (so a thousand sessions
expiring together send their close frames before any reply is read).

Deadlines are exact: a timer never runs before its time (txaio's batched
timer, Autobahn's default, rounds deadlines down by up to one second), and
timers due at the same time run in the order they were scheduled.
Cancelling is lazy: a cancelled deadline forgets its function at once (so
it keeps no connection alive) and leaves the heap when it reaches the top,
or when cancelled deadlines make up half the heap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from heapq import heapify, heappop, heappush
from operator import attrgetter
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger()

#: Logs an error raised by a timer's function (at "critical", with its
#: traceback) and lets the batch go on, as the reactor does for its calls.
_timerFailures = _log.failureHandler("while handling timed call")

#: The order in which deadlines were scheduled.
_scheduled = attrgetter("_seq")

#: Below this many cancelled deadlines the heap is not compacted (they
#: leave it as they reach the top).
_COMPACT_MINIMUM = 64


class Deadline(float):
    """
    One timer of a L{Deadlines}: cancel it with L{cancel} (any number of
    times, before or after it ran).

    Its value is its time: the heap orders deadlines with C{float}'s own
    comparison, without a call into Python (four times faster in a heap of
    tens of thousands), and the time needs no object of its own. So two
    deadlines due at the same time are equal: tell them apart with C{is}.
    """

    __slots__ = ("_args", "_func", "_owner", "_seq")

    _seq: int
    _func: Callable[..., object] | None
    _args: tuple[Any, ...]
    #: The L{Deadlines} whose heap holds it; L{None} once taken out to run.
    _owner: Deadlines | None

    def __new__(
        cls,
        when: float,
        seq: int,
        func: Callable[..., object],
        args: tuple[Any, ...],
        owner: Deadlines,
    ) -> Deadline:
        self = float.__new__(cls, when)
        self._seq = seq
        self._func = func
        self._args = args
        self._owner = owner
        return self

    def __bool__(self) -> bool:
        # A timer is a timer, whatever its time (Autobahn tests its timers
        # with "if call:", and a fake clock starts at 0).
        return True

    def getTime(self) -> float:
        """The POSIX time at which it runs (or was due to)."""
        return float(self)

    def active(self) -> bool:
        """Whether it is still to run: neither run nor cancelled."""
        return self._func is not None

    def cancel(self) -> None:
        """Never run it; harmless if it already ran or was cancelled."""
        if self._func is None:
            return
        # Forget the function and its arguments now (they may hold a
        # connection); the heap drops the deadline itself later.
        self._func = None
        self._args = ()
        owner = self._owner
        if owner is not None:
            # (Deadlines._cancelled, its common case here: one call fewer.)
            owner._dead = dead = owner._dead + 1
            if dead == len(owner._heap) or dead >= _COMPACT_MINIMUM:
                owner._dead = dead - 1
                owner._cancelled()


class Deadlines:
    """
    Exact timers sharing one reactor call.

    It is also an Autobahn batched timer (C{factory._batched_timer}):
    Autobahn calls L{call_later} and cancels what it returns, possibly
    twice.

    @ivar clock: the reactor (or L{twisted.internet.task.Clock}) it runs on.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._heap: list[Deadline] = []
        self._seq = 0
        #: Cancelled deadlines still in the heap.
        self._dead = 0
        #: The reactor call, and the time it was armed for.
        self._call: IDelayedCall | None = None
        self._armed = math.inf
        self._running = False

    def __len__(self) -> int:
        """How many deadlines are still to run."""
        return len(self._heap) - self._dead

    def call_at(self, when: float, func: Callable[..., object], *args: Any) -> Deadline:
        """
        Run C{func(*args)} at the POSIX time C{when} (in the next reactor
        turn if it is already past).
        """
        if when != when:
            raise ValueError("a deadline cannot be NaN")
        self._seq = seq = self._seq + 1
        deadline = Deadline(when, seq, func, args, self)
        heappush(self._heap, deadline)
        if deadline < self._armed and not self._running:
            self._arm(float(deadline))
        return deadline

    def call_later(self, delay: float, func: Callable[..., object], *args: Any) -> Deadline:
        """Run C{func(*args)} C{delay} seconds from now."""
        # (call_at's body: one call per timer fewer, a few per connection.)
        when = self.clock.seconds() + delay
        if when != when:
            raise ValueError("a deadline cannot be NaN")
        self._seq = seq = self._seq + 1
        deadline = Deadline(when, seq, func, args, self)
        heappush(self._heap, deadline)
        if deadline < self._armed and not self._running:
            self._arm(when)
        return deadline

    def _arm(self, when: float) -> None:
        """Have the reactor call L{_run} at C{when}, not a moment sooner."""
        now = self.clock.seconds()
        delay = when - now
        if delay <= 0:
            delay = 0.0
        elif now + delay < when:
            # The reactor adds the delay to its own clock reading: round up
            # so that the sum is not one float step before the deadline.
            delay = math.nextafter(delay, math.inf)
        self._armed = when
        call = self._call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        """Run every deadline due now, in order, then re-arm."""
        self._call = None
        self._armed = math.inf
        self._running = True
        heap = self._heap
        now = self.clock.seconds()
        # The batch: what is due now. Deadlines scheduled while it runs wait
        # for the next turn (one rescheduling itself at once cannot loop).
        batch = []
        while heap and heap[0] <= now:
            deadline = heappop(heap)
            deadline._owner = None
            if deadline._func is None:
                self._dead -= 1
            else:
                batch.append(deadline)
        if len(batch) > 1:
            # The heap does not order equal times: by schedule, then by
            # time (a stable sort).
            batch.sort(key=_scheduled)
            batch.sort()
        try:
            for deadline in batch:
                func = deadline._func
                if func is None:
                    # Cancelled by an earlier one of this batch.
                    continue
                args = deadline._args
                deadline._func = None
                deadline._args = ()
                with _timerFailures:
                    func(*args)
        finally:
            self._running = False
            self._rearm()

    def _rearm(self) -> None:
        """Drop cancelled deadlines from the top, arm for the next one."""
        heap = self._heap
        while heap and heap[0]._func is None:
            heappop(heap)
            self._dead -= 1
        if heap:
            when = float(heap[0])
            if when < self._armed:
                self._arm(when)

    def _cancelled(self) -> None:
        """A deadline in the heap was cancelled."""
        self._dead = dead = self._dead + 1
        heap = self._heap
        if dead == len(heap):
            # Nothing left to run: no reactor call either.
            heap.clear()
            self._dead = 0
            call = self._call
            if call is not None:
                if call.active():
                    call.cancel()
                self._call = None
                self._armed = math.inf
        elif dead >= _COMPACT_MINIMUM and dead * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry._func is not None]
            heapify(heap)
            self._dead = 0
