"""
Events nobody wants are not built (issue 19, round 4): L{Events.wants}, and
the server's C{session.closed}, left out when every observer ignores it
(the default counters and text log), emitted as before otherwise
(tests/test_observation.py checks its fields with an observer).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import pytest_twisted
from conftest import aio
from test_observation import Seen, connect, key_factory, settle

import txwssec._ends
import txwssec.server.protocol
from txwssec import events
from txwssec.events import Events
from txwssec.observers import CounterObserver, TextLogObserver


def test_wants() -> None:
    counters = CounterObserver(Counter())
    text = TextLogObserver()
    assert not Events().wants(events.SESSION_CLOSED)
    defaults = Events([counters, text])
    assert not defaults.wants(events.SESSION_CLOSED)
    for name in events.EVENTS:
        if name != events.SESSION_CLOSED:
            assert defaults.wants(name), name
    defaults.add(Seen())
    assert defaults.wants(events.SESSION_CLOSED)


def test_a_text_log_with_a_closed_line_wants_it() -> None:
    def closed(fields: Mapping[str, Any]) -> None:
        pass

    class ClosedLines(TextLogObserver):
        lines = {**TextLogObserver.lines, events.SESSION_CLOSED: closed}

    class SameLines(TextLogObserver):
        pass

    assert Events([ClosedLines()]).wants(events.SESSION_CLOSED)
    assert not Events([SameLines()]).wants(events.SESSION_CLOSED)
    assert TextLogObserver.ignores == frozenset({events.SESSION_CLOSED})


@pytest_twisted.ensureDeferred
async def test_session_closed_not_built_for_the_default_observers(
    serve: Any, monkeypatch: Any
) -> None:
    """Counters and text log only: no session.closed, its fields not read."""
    factory = key_factory()
    emitted: list[str] = []
    built: list[int] = []
    emit = Events.emit

    def spy(self: Events, event: str, **fields: Any) -> None:
        emitted.append(event)
        emit(self, event, **fields)

    def end_fields(protocol: Any, duration: float) -> dict[str, Any]:
        built.append(1)
        return txwssec._ends.end_fields(protocol, duration)

    monkeypatch.setattr(Events, "emit", spy)
    monkeypatch.setattr(txwssec.server.protocol, "end_fields", end_fields)
    port = serve(factory)

    async def client() -> None:
        ws = await connect(port, "john-key")
        await ws.close()
        await settle(lambda: factory.connections.total == 0)

    await aio(client())
    assert emitted == ["handshake.accepted", "session.opened"]
    assert built == []
    assert factory.counters["session.opened"] == 1


def test_an_observer_subclass_with_its_own_call_wants_every_event() -> None:
    """
    A subclass of the counters or of the text log that observes events in
    its own __call__ may want session.closed: it does not inherit the
    base's ignores (unless it sets its own), and its subclasses keep that.
    """

    class Counting(CounterObserver):
        def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
            super().__call__(event, fields)

    class Writing(TextLogObserver):
        def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
            super().__call__(event, fields)

    class StillWriting(Writing):
        pass

    class Quiet(Writing):
        ignores = frozenset({events.SESSION_CLOSED})

    class Plain(CounterObserver):
        pass

    for kind in (Counting, Writing, StillWriting):
        observer = kind(Counter()) if issubclass(kind, CounterObserver) else kind()
        assert Events([observer]).wants(events.SESSION_CLOSED), kind
    assert not Events([Quiet()]).wants(events.SESSION_CLOSED)
    assert not Events([Plain(Counter())]).wants(events.SESSION_CLOSED)
