"""
L{txwssec._cycles.FiredWithProtocol}: a protocol forgets a Deferred that
fired with it, and reading the attribute still gives the protocol.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import Deferred

from txwssec._cycles import FiredWithProtocol


class Holder:
    closed = FiredWithProtocol()


def holding() -> tuple[Holder, Deferred[Any]]:
    """A holder and the (unfired) Deferred it holds."""
    holder = Holder()
    deferred: Deferred[Any] = Deferred()
    holder.closed = deferred
    return holder, deferred


def results(deferred: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    deferred.addCallback(lambda result: seen.append(result) or result)
    return seen


def test_unset_is_an_attribute_error() -> None:
    holder = Holder()
    assert not hasattr(holder, "closed")
    with pytest.raises(AttributeError, match="closed"):
        holder.closed  # noqa: B018


def test_pending_deferred_is_kept() -> None:
    holder, deferred = holding()
    Holder.closed.release(holder)
    assert holder.closed is deferred


def test_fired_with_the_protocol_is_forgotten() -> None:
    holder, deferred = holding()
    before = results(deferred)
    deferred.callback(holder)
    Holder.closed.release(holder)
    assert holder.__dict__["_closed_deferred"] is None
    assert before == [holder]
    # Read again: a new Deferred, already fired with the protocol.
    assert holder.closed is not deferred
    assert results(holder.closed) == [holder]
    assert results(holder.closed) == [holder]


@pytest.mark.parametrize("result", [None, "something else"])
def test_fired_with_something_else_is_kept(result: Any) -> None:
    holder, deferred = holding()
    deferred.callback(result)
    Holder.closed.release(holder)
    assert holder.closed is deferred


def test_paused_deferred_is_kept() -> None:
    holder, deferred = holding()
    waiting: Deferred[Any] = Deferred()
    deferred.addCallback(lambda result: waiting)
    deferred.callback(holder)
    assert deferred.paused
    Holder.closed.release(holder)
    assert holder.closed is deferred
    waiting.callback(holder)
    Holder.closed.release(holder)
    assert holder.__dict__["_closed_deferred"] is None
