"""
txwssec._defer (issue 19, round 5): C{is_deferred} and C{is_waiting} give
C{isinstance}'s answer for every kind of value, and a key handshake runs
its pipeline without C{ABCMeta.__instancecheck__}.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_upgrade_reader import exchange, request
from twisted.internet.defer import Deferred, succeed

from txwssec import (
    Consumer,
    ConsumerDirectory,
    KeyAuthenticator,
    RoutePolicy,
    SecureServerFactory,
    ServerPolicy,
)
from txwssec._defer import is_deferred, is_waiting
from txwssec.apps.echo import EchoProtocol
from txwssec.consumers import key_digest
from txwssec.types import Accept, Deny, Principal


class MyDeferred(Deferred[Any]):
    pass


class MyAccept(Accept):
    pass


class MyTuple(tuple[Any, ...]):
    pass


async def _coroutine() -> None:
    pass


def values() -> list[Any]:
    principal = Principal("c", "key")
    return [
        None,
        True,
        0,
        1.5,
        "s",
        b"b",
        (),
        (1, 2),
        MyTuple(),
        [],
        {},
        Accept(principal),
        MyAccept(principal),
        Deny("no"),
        Deferred(),
        succeed(1),
        MyDeferred(),
        object(),
        asyncio.Future,
    ]


@pytest.mark.parametrize("value", values(), ids=lambda value: type(value).__name__)
def test_same_answers_as_isinstance(value: Any) -> None:
    assert is_deferred(value) is isinstance(value, Deferred)
    assert is_waiting(value) is isinstance(value, Deferred | Coroutine)


def test_a_coroutine_is_waiting_not_deferred() -> None:
    coroutine = _coroutine()
    try:
        assert is_waiting(coroutine)
        assert not is_deferred(coroutine)
    finally:
        coroutine.close()


@pytest_twisted.ensureDeferred
async def test_key_handshake_without_abc_instance_checks(
    serve: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = ConsumerDirectory([Consumer("carol", (key_digest("carol-key"),))])
    route = RoutePolicy("/echo", [KeyAuthenticator(directory)], protocol=EchoProtocol)
    port = serve(SecureServerFactory(ServerPolicy(routes=(route,))))
    checked: list[str] = []
    original = abc.ABCMeta.__instancecheck__

    def counted(cls: Any, instance: Any) -> bool:
        if cls is Deferred or cls.__name__ == "Coroutine":
            checked.append(f"{cls.__name__}({type(instance).__name__})")
        return original(cls, instance)

    monkeypatch.setattr(abc.ABCMeta, "__instancecheck__", counted)
    answer = await aio(exchange(port, request("apikey: carol-key")))
    monkeypatch.undo()
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert checked == []
