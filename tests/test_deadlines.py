"""
L{Deadlines}: many exact timers on one reactor call, with lazy cancellation.

Driven by a fake clock (L{twisted.internet.task.Clock}), which, like the
reactor, runs a call once its time is reached; each test checks what ran,
when, and which reactor call is left pending.
"""

from __future__ import annotations

import gc
import math
import random
import weakref
from collections.abc import Callable

import pytest
from conftest import CapturedLog
from twisted.internet.task import Clock

from txwssec._timers import ExactTimers
from txwssec.deadlines import Deadline, Deadlines


def make(start: float = 1000.0) -> tuple[Clock, Deadlines, list[tuple[str, float]]]:
    clock = Clock()
    clock.advance(start)
    return clock, Deadlines(clock), []


def record(ran: list[tuple[str, float]], clock: Clock, name: str) -> Callable[[], None]:
    return lambda: ran.append((name, clock.seconds()))


def armed_at(clock: Clock) -> list[float]:
    """The times of the reactor calls pending on C{clock}."""
    return [call.getTime() for call in clock.getDelayedCalls()]


# -- exact times ----------------------------------------------------------------


def test_runs_at_its_time_not_before() -> None:
    clock, deadlines, ran = make()
    deadlines.call_at(1010.0, record(ran, clock, "a"))
    deadlines.call_later(2.5, record(ran, clock, "b"))
    assert len(deadlines) == 2
    assert armed_at(clock) == [1002.5]
    clock.advance(2.4999)
    assert ran == []
    clock.advance(0.0001)
    assert ran == [("b", 1002.5)]
    assert armed_at(clock) == [1010.0]
    clock.advance(7.4999)
    assert ran == [("b", 1002.5)]
    clock.advance(0.0001)
    assert ran == [("b", 1002.5), ("a", 1010.0)]
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(("start", "span"), [(1_700_000_000.123, 3), (0.001, 300)])
def test_never_early_whatever_the_float_rounding(start: float, span: float) -> None:
    """
    Random deadlines and random clock steps (from a small clock reading,
    deadlines of other magnitudes, where now + (when - now) can round below
    when): every call runs at the first clock reading at or past its
    deadline, never before it.
    """
    rng = random.Random(7)
    clock, deadlines, _ = make(start)
    due: dict[int, float] = {}
    ran_at: dict[int, float] = {}

    def fire(index: int) -> None:
        ran_at[index] = clock.seconds()

    for index in range(500):
        when = clock.seconds() + rng.uniform(0, span)
        due[index] = when
        deadlines.call_at(when, fire, index)
    while len(ran_at) < len(due):
        clock.advance(rng.uniform(0, span / 300))
        now = clock.seconds()
        for index, when in due.items():
            # Ran, at a reading not before its time, exactly when due.
            assert (index in ran_at) == (when <= now), (index, when, now)
            if index in ran_at:
                assert ran_at[index] >= when
    assert clock.getDelayedCalls() == []


def test_equal_deadlines_run_in_the_order_scheduled() -> None:
    clock, deadlines, ran = make()
    names = [f"n{i}" for i in range(50)]
    for name in names:
        deadlines.call_at(1005.0, record(ran, clock, name))
    # Others around them, to shuffle the heap.
    deadlines.call_at(1004.0, record(ran, clock, "before"))
    deadlines.call_at(1006.0, record(ran, clock, "after"))
    clock.advance(10)
    assert [name for name, _ in ran] == ["before", *names, "after"]


def test_equal_times_are_separate_timers() -> None:
    """
    A deadline is its time (a float), so two due together compare equal;
    they are still two timers, and a timer at time 0 is still true (Autobahn
    tests its timers with "if call:").
    """
    clock, deadlines, ran = make(0.0)
    first = deadlines.call_at(0.0, record(ran, clock, "first"))
    second = deadlines.call_at(0.0, record(ran, clock, "second"))
    assert first == second == 0.0
    assert first is not second
    assert first and second
    first.cancel()
    assert second.active()
    clock.advance(0)
    assert ran == [("second", 0.0)]
    assert first.getTime() == 0.0
    assert type(first.getTime()) is float


def test_all_due_run_in_one_reactor_call() -> None:
    """Deadlines due by the time the reactor call fires run in one batch."""
    clock, deadlines, ran = make()
    for index in range(100):
        deadlines.call_at(1000.0 + index / 1000, record(ran, clock, str(index)))
    assert armed_at(clock) == [1000.0]
    # The reactor is late (a busy turn): its one call runs all 100.
    clock.advance(0.2)
    assert [name for name, _ in ran] == [str(index) for index in range(100)]
    assert clock.getDelayedCalls() == []


def test_past_deadline_runs_in_the_next_turn() -> None:
    clock, deadlines, ran = make()
    deadlines.call_at(900.0, record(ran, clock, "late"))
    assert armed_at(clock) == [1000.0]
    assert ran == []
    clock.advance(0)
    assert ran == [("late", 1000.0)]


def test_nan_refused() -> None:
    _, deadlines, _ = make()
    with pytest.raises(ValueError):
        deadlines.call_at(math.nan, lambda: None)
    assert len(deadlines) == 0


def test_infinite_deadline_never_runs_and_arms_nothing() -> None:
    clock, deadlines, ran = make()
    deadlines.call_later(math.inf, record(ran, clock, "never"))
    assert clock.getDelayedCalls() == []
    assert len(deadlines) == 1


# -- re-arming --------------------------------------------------------------------


def test_earlier_deadline_rearms_the_reactor_call() -> None:
    clock, deadlines, ran = make()
    deadlines.call_at(1010.0, record(ran, clock, "later"))
    deadlines.call_at(1003.0, record(ran, clock, "earlier"))
    assert armed_at(clock) == [1003.0]
    deadlines.call_at(1005.0, record(ran, clock, "middle"))
    assert armed_at(clock) == [1003.0]
    clock.advance(3)
    assert ran == [("earlier", 1003.0)]
    assert armed_at(clock) == [1005.0]
    clock.advance(2)
    clock.advance(5)
    assert ran == [("earlier", 1003.0), ("middle", 1005.0), ("later", 1010.0)]


def test_earlier_deadline_scheduled_while_a_batch_runs() -> None:
    """
    A deadline scheduled by a running one, earlier than every other: the
    reactor call is re-armed for it once the batch is over.
    """
    clock, deadlines, ran = make()

    def first() -> None:
        ran.append(("first", clock.seconds()))
        deadlines.call_at(1002.0, record(ran, clock, "scheduled"))

    deadlines.call_at(1001.0, first)
    deadlines.call_at(1009.0, record(ran, clock, "last"))
    clock.advance(1)
    assert armed_at(clock) == [1002.0]
    clock.advance(1)
    assert ran == [("first", 1001.0), ("scheduled", 1002.0)]
    clock.advance(7)
    assert ran[-1] == ("last", 1009.0)


def test_due_deadline_scheduled_by_a_batch_waits_for_the_next_turn() -> None:
    """
    A running deadline that schedules another already due: it runs after
    the batch (not inside it, so that one rescheduling itself for "now"
    cannot keep the batch going forever).
    """
    clock, deadlines, ran = make()

    def first() -> None:
        ran.append(("first", clock.seconds()))
        deadlines.call_at(999.0, record(ran, clock, "due at once"))

    deadlines.call_at(1001.0, first)
    deadlines.call_at(1001.0, record(ran, clock, "second"))
    clock.advance(1)
    # In heap order it would come before "second" (999 < 1001).
    assert ran == [("first", 1001.0), ("second", 1001.0), ("due at once", 1001.0)]


def test_cancelled_earliest_wakes_once_then_runs_the_next() -> None:
    clock, deadlines, ran = make()
    first = deadlines.call_at(1001.0, record(ran, clock, "cancelled"))
    deadlines.call_at(1005.0, record(ran, clock, "kept"))
    first.cancel()
    clock.advance(1)
    assert ran == []
    assert armed_at(clock) == [1005.0]
    clock.advance(4)
    assert ran == [("kept", 1005.0)]


# -- cancellation -----------------------------------------------------------------


def test_cancel_twice_and_after_running() -> None:
    """Autobahn may cancel its timers twice, and after they ran."""
    clock, deadlines, ran = make()
    cancelled = deadlines.call_later(1, record(ran, clock, "cancelled"))
    kept = deadlines.call_later(2, record(ran, clock, "kept"))
    other = deadlines.call_later(3, record(ran, clock, "other"))
    assert cancelled.active() and kept.active()
    cancelled.cancel()
    cancelled.cancel()
    assert not cancelled.active()
    assert len(deadlines) == 2
    clock.advance(2)
    assert ran == [("kept", 1002.0)]
    assert not kept.active()
    kept.cancel()
    kept.cancel()
    # Neither cancellation counted against the deadline still pending.
    assert len(deadlines) == 1
    assert other.active()
    clock.advance(1)
    assert ran == [("kept", 1002.0), ("other", 1003.0)]
    assert clock.getDelayedCalls() == []


def test_cancelled_while_its_batch_runs() -> None:
    """
    Two deadlines due in the same batch: the first cancels the second,
    which must not run (and a deadline cancelling itself is harmless).
    """
    clock, deadlines, ran = make()
    handles: dict[str, Deadline] = {}

    def first() -> None:
        ran.append(("first", clock.seconds()))
        handles["first"].cancel()
        handles["second"].cancel()
        handles["second"].cancel()

    handles["first"] = deadlines.call_at(1001.0, first)
    handles["second"] = deadlines.call_at(1001.0, record(ran, clock, "second"))
    deadlines.call_at(1001.0, record(ran, clock, "third"))
    clock.advance(1)
    assert ran == [("first", 1001.0), ("third", 1001.0)]
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []


def test_cancelling_everything_leaves_no_reactor_call() -> None:
    clock, deadlines, ran = make()
    handles = [deadlines.call_later(i + 1, record(ran, clock, str(i))) for i in range(10)]
    for handle in handles:
        handle.cancel()
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert ran == []
    # ...and it works again afterwards.
    deadlines.call_later(1, record(ran, clock, "again"))
    clock.advance(1)
    assert ran == [("again", 1101.0)]


def test_reactor_call_cancelled_behind_its_back() -> None:
    """
    A test harness may cancel pending reactor calls (trial's cleanup): the
    next deadline gets a new call, and cancelling everything afterwards does
    not cancel the dead call twice.
    """
    clock, deadlines, ran = make()
    first = deadlines.call_later(5, record(ran, clock, "lost"))
    (call,) = clock.getDelayedCalls()
    call.cancel()
    deadlines.call_later(1, record(ran, clock, "rearmed"))
    assert armed_at(clock) == [1001.0]
    clock.advance(1)
    assert ran == [("rearmed", 1001.0)]
    (call,) = clock.getDelayedCalls()
    call.cancel()
    first.cancel()
    assert len(deadlines) == 0
    assert clock.getDelayedCalls() == []


def test_cancelled_deadline_holds_nothing() -> None:
    """A cancelled deadline drops its function and arguments at once."""

    class Connection:
        def timeout(self, _reason: object) -> None:
            raise AssertionError("cancelled, must not run")

    clock, deadlines, _ = make()
    deadlines.call_later(50, lambda: None)
    connection = Connection()
    argument = Connection()
    gone = [weakref.ref(connection), weakref.ref(argument)]
    handle = deadlines.call_later(10, connection.timeout, argument)
    handle.cancel()
    del connection, argument
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    clock.advance(60)


def test_cancelled_deadlines_do_not_pile_up() -> None:
    """
    Timers armed and cancelled over and over (a handshake timeout per
    connection) while others stay pending: the heap stays about the size
    of what is pending.
    """
    clock, deadlines, ran = make()
    for index in range(100):
        deadlines.call_later(3600 + index, record(ran, clock, str(index)))
    for _ in range(10_000):
        deadlines.call_later(5, lambda: None).cancel()
    assert len(deadlines) == 100
    assert len(deadlines._heap) <= 2 * 100 + 64
    clock.advance(3600 + 100)
    assert len(ran) == 100
    assert deadlines._heap == []


def test_exactness_and_order_survive_compaction() -> None:
    rng = random.Random(3)
    clock, deadlines, ran = make()
    kept = []
    for index in range(2000):
        when = 1000.0 + rng.randrange(100) / 10
        handle = deadlines.call_at(when, record(ran, clock, str(index)))
        if rng.random() < 0.8:
            handle.cancel()
        else:
            kept.append((when, index))
    for _ in range(100):
        clock.advance(0.1)
    expected = sorted(kept)
    assert [name for name, _ in ran] == [str(index) for _, index in expected]
    assert all(when <= at < when + 0.11 for (_, at), (when, _) in zip(ran, expected, strict=True))


# -- errors ------------------------------------------------------------------------


def test_an_error_is_logged_and_the_batch_goes_on(captured_log: CapturedLog) -> None:
    clock, deadlines, ran = make()

    def broken() -> None:
        raise ZeroDivisionError("in a timer")

    deadlines.call_at(1001.0, broken)
    deadlines.call_at(1001.0, record(ran, clock, "after"))
    deadlines.call_at(1002.0, record(ran, clock, "later"))
    clock.advance(1)
    assert ran == [("after", 1001.0)]
    failures = [event for event in captured_log.events if "log_failure" in event]
    assert len(failures) == 1
    assert failures[0]["log_failure"].check(ZeroDivisionError)
    assert failures[0]["log_namespace"] == "txwssec.deadlines"
    clock.advance(1)
    assert ran == [("after", 1001.0), ("later", 1002.0)]


# -- Autobahn's batched-timer interface ----------------------------------------


def test_autobahn_call_later_with_arguments() -> None:
    clock, deadlines, _ = make()
    got: list[tuple[int, str]] = []
    handle = deadlines.call_later(0.5, lambda a, b: got.append((a, b)), 1, "x")
    assert handle.getTime() == 1000.5
    clock.advance(0.5)
    assert got == [(1, "x")]


def test_exact_timers_default_to_the_global_reactor() -> None:
    from twisted.internet import reactor

    timers = ExactTimers()
    assert timers.clock is reactor
    clock = Clock()
    assert ExactTimers(clock).clock is clock
