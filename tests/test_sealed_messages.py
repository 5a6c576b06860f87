"""
Sealed payloads together with message validation and the shared send
guard: the order on a sealed session's message path (open, then the
route's rules on the plaintext, then the application; outgoing, the
application's message is sealed last), on a server route and on a gateway
route that unseals, and the configuration that cannot combine them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import aio
from test_sealed import KEY, Recorder, Upstream, client_echo, open_raw
from twisted.internet import defer
from wsframes import BINARY, CLOSE, frame, read_message

from txwssec import AnonymousAuthenticator, MessageRules, RoutePolicy, SecureServerFactory
from txwssec.config import parse
from txwssec.errors import ConfigError
from txwssec.policy import Sealing
from txwssec.policy import Upstream as UpstreamURL

#: JSON text only, as an object with a "type".
RULES = MessageRules(text="json", binary="none", schema={"type": "object", "required": ["type"]})


def sealed_route(serve: Callable[[Any], int], rules: MessageRules) -> tuple[int, Any]:
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        protocol=Recorder,
        sealing=Sealing("required", keys={"anonymous": (KEY,)}),
        messages=rules,
    )
    factory = SecureServerFactory(route)
    factory.opened = []  # type: ignore[attr-defined]
    return serve(factory), factory


async def exchange(port: int, *messages: tuple[bytes, bool]) -> tuple[list[Any], Any]:
    """Send each message sealed; return the opened answers, then the close frame."""
    client, session = await open_raw(port)
    answers: list[Any] = []
    for payload, binary in messages:
        await client.send(frame(BINARY, session.seal(payload, binary)))
        answer = await read_message(client.reader)
        if answer.opcode == CLOSE:
            client.close()
            return answers, answer
        assert answer.opcode == BINARY
        answers.append(session.unseal(answer.payload, True))
    client.close()
    return answers, None


@pytest_twisted.inlineCallbacks
def test_rules_check_the_plaintext(serve: Callable[[Any], int]) -> Any:
    """
    On the wire every sealed message is a binary frame: with binary = "none"
    a sealed text message still passes (the rules see it opened, as text),
    and is echoed sealed.
    """
    port, factory = sealed_route(serve, RULES)
    answers, close = yield aio(exchange(port, (b'{"type": "say"}', False)))
    assert close is None
    assert answers == [(b'{"type": "say"}', False)]
    assert factory.opened[0].received == [(b'{"type": "say"}', False)]


@pytest.mark.parametrize(
    ("message", "code", "reason", "counter"),
    [
        ((b"hello", False), 1007, "invalid JSON", "message.json"),
        ((b'{"no": "type"}', False), 1007, "message does not match schema", "message.schema"),
        ((b"\x00\x01", True), 1003, "binary messages not accepted", "message.binary"),
    ],
)
@pytest_twisted.inlineCallbacks
def test_rules_refuse_opened_messages(
    serve: Callable[[Any], int],
    message: tuple[bytes, bool],
    code: int,
    reason: str,
    counter: str,
) -> Any:
    """A sealed message that opens but breaks a rule closes as its rule says."""
    port, factory = sealed_route(serve, RULES)
    answers, close = yield aio(exchange(port, (b'{"type": "a"}', False), message))
    assert answers == [(b'{"type": "a"}', False)]
    assert (close.close_code, close.close_reason) == (code, reason)
    assert factory.opened[0].received == [(b'{"type": "a"}', False)]
    assert factory.counters[counter] == 1
    assert factory.counters["limit.sealed_message"] == 0


@pytest_twisted.inlineCallbacks
def test_unsealing_comes_before_the_rules(serve: Callable[[Any], int]) -> Any:
    """A message that does not open closes 1007 as sealed, not as a rule."""
    port, factory = sealed_route(serve, RULES)

    async def send() -> Any:
        client, session = await open_raw(port)
        sealed = bytearray(session.seal(b'{"type": "a"}', False))
        sealed[-1] ^= 1
        await client.send(frame(BINARY, bytes(sealed)))
        answer = await read_message(client.reader)
        client.close()
        return answer

    answer = yield aio(send())
    assert (answer.close_code, answer.close_reason) == (1007, "sealed message rejected")
    assert factory.counters["limit.sealed_message"] == 1
    assert not any(name.startswith("message.") for name in factory.counters)


def test_unsealed_sessions_send_as_before(serve: Callable[[Any], int]) -> None:
    """Without sealing, OpenOnly.sendMessage has no _outgoing hook to call."""
    from txwssec import SecureServerProtocol
    from txwssec.client import SecureClientProtocol

    assert SecureServerProtocol._outgoing is None
    assert SecureClientProtocol._outgoing is None


# -- a gateway that unseals, with rules ----------------------------------------------


@pytest_twisted.inlineCallbacks
def test_gateway_unseals_then_checks(serve: Callable[[Any], int]) -> Any:
    """
    The gateway opens the client's message, checks the plaintext, relays it
    to the upstream; the upstream's answer is checked (upstream_schema),
    then sealed for the client. Whole messages: no frame relay.
    """
    upstream_factory = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Upstream)
    )
    upstream_factory.seen = []  # type: ignore[attr-defined]
    upstream_port = serve(upstream_factory)
    rules = MessageRules(text="json", upstream_schema={"type": "object"})
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        upstream=UpstreamURL((f"ws://127.0.0.1:{upstream_port}",)),
        sealing=Sealing("required", "unseal", keys={"anonymous": (KEY,)}),
        messages=rules,
    )
    factory = SecureServerFactory(route)
    port = serve(factory)
    answers, close = yield aio(
        exchange(port, (b'{"type": "say"}', False), (b"\x07" * 70000, True))
    )
    assert close is None
    assert answers == [(b'{"type": "say"}', False), (b"\x07" * 70000, True)]
    [(offered, received)] = upstream_factory.seen  # type: ignore[attr-defined]
    assert offered is None
    assert received == answers
    # Plain text that is not JSON: refused before the upstream sees it.
    answers, close = yield aio(exchange(port, (b"hello", False)))
    assert (close.close_code, close.close_reason) == (1007, "invalid JSON")
    assert len(upstream_factory.seen) == 2  # type: ignore[attr-defined]
    assert upstream_factory.seen[1][1] == []  # type: ignore[attr-defined]
    # The upstream's JSON array breaks upstream_schema: the client gets 1014.
    answers, close = yield aio(exchange(port, (b"[1]", False)))
    assert (close.close_code, close.close_reason) == (1014, "upstream failed")
    assert factory.counters["message.schema"] == 1


@pytest_twisted.inlineCallbacks
def test_gateway_rules_with_python_client(serve: Callable[[Any], int]) -> Any:
    """The Python client's sealed echo through a gateway that unseals and checks."""
    upstream_factory = SecureServerFactory(
        RoutePolicy("/echo", [AnonymousAuthenticator()], protocol=Upstream)
    )
    upstream_factory.seen = []  # type: ignore[attr-defined]
    upstream_port = serve(upstream_factory)
    route = RoutePolicy(
        "/echo",
        [AnonymousAuthenticator()],
        upstream=UpstreamURL((f"ws://127.0.0.1:{upstream_port}",)),
        sealing=Sealing("required", "unseal", keys={"anonymous": (KEY,)}),
        messages=MessageRules(binary="any", max_json_depth=4),
    )
    port = serve(SecureServerFactory(route))
    messages = yield defer.ensureDeferred(client_echo(f"ws://127.0.0.1:{port}/echo", KEY))
    assert messages == [("héllo".encode(), False), (b"\x00" * 70000, True)]


# -- configuration ---------------------------------------------------------------


def test_passthrough_with_rules_is_refused() -> None:
    """The gateway holds no key in passthrough: rules would check ciphertext."""
    gateway = {"path": "/g", "upstream": "ws://127.0.0.1:1/", "auth": ["anonymous"]}
    with pytest.raises(ConfigError) as raised:
        parse(
            {
                "route": [
                    {
                        **gateway,
                        "sealed": "optional",
                        "sealed_upstream": "passthrough",
                        "messages": {"text": "json"},
                    }
                ]
            }
        )
    assert str(raised.value).startswith("route[0]: messages rules cannot check"), str(raised.value)
    # Either alone, or rules with an unsealing gateway, is fine.
    parse({"route": [{**gateway, "sealed": "optional", "sealed_upstream": "passthrough"}]})
    parse({"route": [{**gateway, "messages": {"text": "json"}}]})
    with pytest.raises(ValueError, match="passthrough"):
        RoutePolicy(
            "/g",
            [AnonymousAuthenticator()],
            upstream=UpstreamURL(("ws://127.0.0.1:1/",)),
            sealing=Sealing("required", "passthrough"),
            messages=MessageRules(binary="none"),
        )


# -- in-band refresh on a sealed session ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sealed_refresh(serve: Callable[[Any], int]) -> None:
    """
    On a sealed route with refresh = true: the server's wssec.expiring
    notice and its answer travel sealed, the Python client opens them and
    refreshes (sealed); the server opens the refresh and takes it before the
    route's rules (which it would break: no "app" key) and the application.
    """
    import time

    from test_refresh import RefreshingClient, exp_of, route, server, token
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    from txwssec.client import BearerToken, SecureClientFactory

    rules = MessageRules(binary="none", schema={"type": "object", "required": ["app"]})
    sealed = Sealing("required", keys={"john": (KEY,)})
    port = serve(server(route(refresh=True, refresh_notice=1, sealing=sealed, messages=rules)))
    first = token(lifetime=2)
    issued: list[str] = []

    def new_token() -> str:
        issued.append(token(lifetime=30))
        return issued[-1]

    factory = SecureClientFactory(
        f"ws://127.0.0.1:{port}/echo", BearerToken(first), refresh=new_token, seal_key=KEY
    )
    factory.protocol = RefreshingClient
    protocol: Any = await factory.connect()
    await protocol.opened
    assert protocol.websocket_protocol_in_use == "wssec.sealed.v1"
    deadline = time.time() + 15
    while not protocol.refreshed and time.time() < deadline:
        await deferLater(reactor, 0.05)
    assert protocol.refreshed == [float(exp_of(issued[0]))]
    protocol.sendMessage(b'{"app": 1}')
    while not protocol.messages and time.time() < deadline:
        await deferLater(reactor, 0.05)
    assert protocol.messages == [b'{"app": 1}']
    protocol.sendClose(1000)
    await protocol.closed
