"""
Custom authenticators: written against L{txwssec.interfaces.IAuthenticator}
(or its typing.Protocol twin), used directly in a L{RoutePolicy} or named in
the configuration through the registry or a C{builder = "module:function"}
reference.

Every verdict an authenticator can give (accept now or later, deny with 401
or 403, abstain, raise, return nonsense) is checked through a real socket,
with the exact status, body and challenge headers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import pytest_twisted
import websockets
from conftest import CapturedLog, aio
from twisted.internet.defer import Deferred
from websockets.exceptions import ConnectionClosed, InvalidStatus
from zope.interface import implementer
from zope.interface.verify import verifyObject

import txwssec
from txwssec import (
    Accept,
    Authenticator,
    BuildContext,
    ConfigError,
    Consumer,
    ConsumerDirectory,
    Deny,
    HandshakeRequest,
    IAuthenticator,
    KeyAuthenticator,
    Principal,
    RoutePolicy,
    SecureServerFactory,
    SecureServerProtocol,
    config,
)
from txwssec._schema import Table
from txwssec.apps.echo import EchoProtocol
from txwssec.auth import registry
from txwssec.consumers import key_digest
from txwssec.types import Verdict

JOHN_KEY = "john-custom-key"
KEY_CHALLENGE = 'ApiKey header="apikey"'
BUG_TEXT = "custom authenticator bug: secret-internal-detail-42"

Serve = Callable[[Any], int]


# -- authenticators ---------------------------------------------------------


@implementer(IAuthenticator)
class TicketAuthenticator:
    """
    Accepts C{X-Ticket: <ticket>} for one consumer; abstains without the
    header; denies (with C{status}) any other ticket.
    """

    name = "ticket"

    def __init__(
        self,
        ticket: str = "good-ticket",
        consumer: str = "ticket-user",
        *,
        header: str = "x-ticket",
        status: int = 401,
        challenge: str = 'Ticket realm="custom"',
        expires_at: float | None = None,
    ) -> None:
        self.ticket = ticket
        self.consumer = consumer
        self.header = header
        self.status = status
        self.challenge = challenge
        self.expires_at = expires_at
        self.seen: list[HandshakeRequest] = []

    def authenticate(self, request: HandshakeRequest) -> Verdict:
        self.seen.append(request)
        values = request.header_values(self.header)
        if not values:
            return None
        if values == (self.ticket,):
            return Accept(Principal(self.consumer, self.name), self.expires_at)
        return Deny("wrong ticket", status=self.status)


@implementer(IAuthenticator)
class DelayedAuthenticator:
    """Accepts every request, through a Deferred fired later by the reactor."""

    name = "delayed"
    challenge = "Delayed"

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.calls = 0

    def authenticate(self, request: HandshakeRequest) -> Deferred[Verdict]:
        from twisted.internet import reactor

        self.calls += 1
        d: Deferred[Verdict] = Deferred()
        reactor.callLater(self.delay, d.callback, Accept(Principal("later", self.name)))
        return d


@implementer(IAuthenticator)
class ConstantAuthenticator:
    """Always gives the same verdict (or the same wrong value)."""

    def __init__(self, name: str, verdict: Any, challenge: str = "") -> None:
        self.name = name
        self.verdict = verdict
        self.challenge = challenge
        self.calls = 0

    def authenticate(self, request: HandshakeRequest) -> Any:
        self.calls += 1
        return self.verdict


class CustomBug(RuntimeError):
    pass


@implementer(IAuthenticator)
class RaisingAuthenticator:
    """Has a bug: raises, synchronously or through its Deferred."""

    name = "buggy"
    challenge = "Buggy"

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred

    def authenticate(self, request: HandshakeRequest) -> Verdict | Deferred[Verdict]:
        if self.deferred:
            from twisted.internet import reactor

            d: Deferred[Verdict] = Deferred()
            reactor.callLater(0.01, d.errback, CustomBug(BUG_TEXT))
            return d
        raise CustomBug(BUG_TEXT)


class StructuralAuthenticator:
    """No zope declaration: satisfies the typing.Protocol by shape only."""

    name = "structural"
    challenge = "Structural"

    def authenticate(self, request: HandshakeRequest) -> Verdict:
        if request.header_values("x-structural") == ("yes",):
            return Accept(Principal("shape", self.name))
        return None


# -- helpers ----------------------------------------------------------------


def directory() -> ConsumerDirectory:
    return ConsumerDirectory([Consumer("john", (key_digest(JOHN_KEY),))])


class WhoAmI(SecureServerProtocol):
    """Sends C{consumer method} on open, then echoes."""

    def onOpen(self) -> None:
        assert self.session is not None
        principal = self.session.principal
        self.sendMessage(f"{principal.consumer} {principal.method}".encode(), False)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(payload, isBinary)


def factory_for(authenticators: Sequence[Any]) -> SecureServerFactory:
    return SecureServerFactory(RoutePolicy("/echo", list(authenticators), protocol=WhoAmI))


async def who(port: int, headers: Mapping[str, str] | None = None) -> str:
    """Connect, return the server's greeting (C{consumer method})."""
    async with websockets.connect(
        f"ws://127.0.0.1:{port}/echo", additional_headers=dict(headers or {}), open_timeout=5
    ) as ws:
        greeting = await ws.recv()
        await ws.send("ping")
        assert await ws.recv() == "ping"
        assert isinstance(greeting, str)
        return greeting


async def refused(port: int, headers: Mapping[str, str] | None = None) -> Any:
    """Connect, expecting a refusal; return the HTTP response."""
    try:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo",
            additional_headers=dict(headers or {}),
            open_timeout=5,
        ):
            pass
    except InvalidStatus as error:
        return error.response
    raise AssertionError("handshake was accepted")


def challenges(response: Any) -> list[str]:
    return list(response.headers.get_all("WWW-Authenticate"))


@pytest.fixture
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test are forgotten afterwards."""
    monkeypatch.setattr(registry, "_BUILDERS", dict(registry._BUILDERS))
    yield


# -- the interface ----------------------------------------------------------


def test_interface_declarations() -> None:
    """zope declarations verify; the typing.Protocol matches by shape."""
    for authenticator in (
        TicketAuthenticator(),
        DelayedAuthenticator(),
        RaisingAuthenticator(),
        KeyAuthenticator(directory()),
    ):
        assert verifyObject(IAuthenticator, authenticator)
        assert isinstance(authenticator, Authenticator)
    structural = StructuralAuthenticator()
    assert not IAuthenticator.providedBy(structural)
    assert isinstance(structural, Authenticator)
    assert not isinstance(object(), Authenticator)


# -- verdicts through real sockets --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_accept_synchronously(serve: Serve) -> None:
    ticket = TicketAuthenticator()
    port = serve(factory_for([ticket]))
    assert await aio(who(port, {"X-Ticket": "good-ticket"})) == "ticket-user ticket"
    (request,) = ticket.seen
    assert request.path == "/echo"
    assert request.header_values("x-ticket") == ("good-ticket",)
    assert request.peer.startswith("tcp4:127.0.0.1:")
    assert request.host == "127.0.0.1"
    assert request.secure is False


@pytest_twisted.ensureDeferred
async def test_accept_through_deferred(serve: Serve) -> None:
    """An Accept fired later through a Deferred opens the connection."""
    delayed = DelayedAuthenticator(delay=0.1)
    factory = factory_for([delayed])
    port = serve(factory)
    assert await aio(who(port)) == "later delayed"
    assert delayed.calls == 1
    assert not any(k.startswith("handshake.refused.") for k in factory.counters)


@pytest_twisted.ensureDeferred
async def test_accept_with_expiry_from_custom_authenticator(serve: Serve) -> None:
    """A custom Accept's expires_at becomes the session's expiry (3000)."""
    expires_at = time.time() + 1
    port = serve(factory_for([TicketAuthenticator(expires_at=expires_at)]))

    async def client() -> tuple[int, str]:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers={"X-Ticket": "good-ticket"}
        ) as ws:
            await ws.recv()
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as closed:
                assert time.time() >= expires_at
                assert closed.rcvd is not None
                return closed.rcvd.code, closed.rcvd.reason

    assert await aio(client()) == (3000, "credentials expired")


@pytest_twisted.ensureDeferred
async def test_deny_gives_401_with_challenge(serve: Serve, captured_log: CapturedLog) -> None:
    factory = factory_for([TicketAuthenticator()])
    port = serve(factory)
    response = await aio(refused(port, {"X-Ticket": "bad-ticket"}))
    assert response.status_code == 401
    assert response.body == b"authentication required\n"
    assert challenges(response) == ['Ticket realm="custom"']
    assert factory.counters["handshake.refused.401"] == 1
    (event,) = captured_log.matching(status=401)
    assert event["method"] == "ticket"
    assert event["reason"] == "ticket: wrong ticket"


@pytest_twisted.ensureDeferred
async def test_deny_403(serve: Serve, captured_log: CapturedLog) -> None:
    """Deny(status=403): a valid-looking credential not allowed here."""
    port = serve(factory_for([TicketAuthenticator(status=403)]))
    response = await aio(refused(port, {"X-Ticket": "bad-ticket"}))
    assert response.status_code == 403
    assert response.body == b"forbidden\n"
    assert challenges(response) == []
    (event,) = captured_log.matching(status=403)
    assert event["method"] == "ticket"


@pytest_twisted.ensureDeferred
async def test_all_abstain_gives_401_with_every_challenge(serve: Serve) -> None:
    first = ConstantAuthenticator("first", None, "First")
    second = ConstantAuthenticator("second", None, 'Second realm="two"')
    silent = ConstantAuthenticator("silent", None, "")
    port = serve(factory_for([first, silent, second, KeyAuthenticator(directory())]))
    response = await aio(refused(port))
    assert response.status_code == 401
    assert response.body == b"authentication required\n"
    # Every method's challenge, in route order; an empty one is not sent.
    assert challenges(response) == ["First", 'Second realm="two"', KEY_CHALLENGE]
    assert (first.calls, silent.calls, second.calls) == (1, 1, 1)


@pytest_twisted.ensureDeferred
async def test_structural_authenticator_works(serve: Serve) -> None:
    port = serve(factory_for([StructuralAuthenticator()]))
    assert await aio(who(port, {"X-Structural": "yes"})) == "shape structural"
    response = await aio(refused(port))
    assert response.status_code == 401
    assert challenges(response) == ["Structural"]


@pytest.mark.parametrize("deferred", [False, True], ids=["sync", "deferred"])
@pytest_twisted.ensureDeferred
async def test_raising_gives_fixed_500_and_logs(
    serve: Serve, captured_log: CapturedLog, deferred: bool
) -> None:
    """
    A bug in an authenticator (raised, or an errback) is a 500 with the
    fixed body; the exception is in the server log, never in the response.
    The server keeps serving.
    """
    ticket = TicketAuthenticator()
    factory = SecureServerFactory(
        RoutePolicy("/echo", [RaisingAuthenticator(deferred)], protocol=WhoAmI)
    )
    port = serve(factory)
    response = await aio(refused(port))
    assert response.status_code == 500
    assert response.body == b"internal error: see server log\n"
    raw = bytes(response.body) + repr(list(response.headers.raw_items())).encode()
    assert b"secret-internal-detail" not in raw
    assert b"CustomBug" not in raw
    assert challenges(response) == []
    assert factory.counters["handshake.refused.500"] == 1

    failures = [e["log_failure"] for e in captured_log.events if "log_failure" in e]
    assert any(f.check(CustomBug) and str(f.value) == BUG_TEXT for f in failures)
    (refusal,) = captured_log.matching(status=500)
    assert refusal["route"] == "/echo"
    assert BUG_TEXT not in str(refusal["reason"])

    # Still serving, on another route of a fresh factory and on this one.
    other = serve(factory_for([ticket]))
    assert await aio(who(other, {"X-Ticket": "good-ticket"})) == "ticket-user ticket"
    assert (await aio(refused(port))).status_code == 500


@pytest.mark.parametrize(
    "verdict",
    [True, "yes", Principal("john", "wrong"), 401, Deferred.fromCoroutine],
    ids=["bool", "str", "principal", "int", "function"],
)
@pytest_twisted.ensureDeferred
async def test_wrong_return_type_gives_500(
    serve: Serve, captured_log: CapturedLog, verdict: Any
) -> None:
    factory = factory_for([ConstantAuthenticator("confused", verdict, "Confused")])
    port = serve(factory)
    response = await aio(refused(port))
    assert response.status_code == 500
    assert response.body == b"internal error: see server log\n"
    failures = [e["log_failure"] for e in captured_log.events if "log_failure" in e]
    assert any(f.check(TypeError) and "confused" in str(f.value) for f in failures)


@pytest_twisted.ensureDeferred
async def test_deferred_firing_wrong_type_gives_500(serve: Serve) -> None:
    from twisted.internet import reactor

    class LateNonsense(ConstantAuthenticator):
        def authenticate(self, request: HandshakeRequest) -> Any:
            d: Deferred[Any] = Deferred()
            reactor.callLater(0.01, d.callback, "accepted, honest")
            return d

    port = serve(factory_for([LateNonsense("late", None, "Late")]))
    response = await aio(refused(port))
    assert response.status_code == 500
    assert response.body == b"internal error: see server log\n"


# -- order ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_abstaining_custom_then_key_key_decides(serve: Serve) -> None:
    abstain = ConstantAuthenticator("abstain", None, "Abstain")
    port = serve(factory_for([abstain, KeyAuthenticator(directory())]))
    assert await aio(who(port, {"apikey": JOHN_KEY})) == "john key"
    response = await aio(refused(port, {"apikey": "not-a-key"}))
    assert response.status_code == 401
    assert challenges(response) == ["Abstain", KEY_CHALLENGE]
    assert abstain.calls == 2


@pytest_twisted.ensureDeferred
async def test_denying_custom_then_key_first_credential_decides(
    serve: Serve, captured_log: CapturedLog
) -> None:
    """
    A Deny from the first method is final: a valid key later in the list
    does not rescue it, and the key method is never asked.
    """
    denier = ConstantAuthenticator("denier", Deny("not today"), "Denier")
    key = KeyAuthenticator(directory())
    seen: list[HandshakeRequest] = []
    original = key.authenticate

    def spy(request: HandshakeRequest) -> Verdict:
        seen.append(request)
        return original(request)

    key.authenticate = spy  # type: ignore[method-assign]
    port = serve(factory_for([denier, key]))
    response = await aio(refused(port, {"apikey": JOHN_KEY}))
    assert response.status_code == 401
    assert response.body == b"authentication required\n"
    assert challenges(response) == ["Denier", KEY_CHALLENGE]
    assert seen == []
    (event,) = captured_log.matching(status=401)
    assert (event["method"], event["reason"]) == ("denier", "denier: not today")


class CoroutineAuthenticator:
    """An C{async def} method: abstains, accepts or denies after a pause."""

    name = "coro"
    challenge = "Coro"

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.calls = 0

    async def authenticate(self, request: HandshakeRequest) -> Verdict:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        self.calls += 1
        await deferLater(reactor, 0.01)
        return self.verdict


@pytest_twisted.ensureDeferred
async def test_coroutine_authenticator_accepts_and_denies(serve: Serve) -> None:
    """An C{async def authenticate} decides like any other method."""
    accepting = CoroutineAuthenticator(Accept(Principal("awaited", "coro")))
    port = serve(factory_for([accepting]))
    assert await aio(who(port)) == "awaited coro"
    denying = CoroutineAuthenticator(Deny("no"))
    port = serve(factory_for([denying, KeyAuthenticator(directory())]))
    response = await aio(refused(port, {"apikey": JOHN_KEY}))
    assert response.status_code == 401
    assert challenges(response) == ["Coro", KEY_CHALLENGE]


@pytest_twisted.ensureDeferred
async def test_waiting_abstainers_then_synchronous_methods_in_order(serve: Serve) -> None:
    """
    Methods that abstain later (a Deferred, a coroutine) hand over to the
    next ones in order, synchronous or not, and the first credential found
    decides.
    """
    deferred_abstain = DelayedAuthenticator()
    deferred_abstain.authenticate = lambda request: _later(None)  # type: ignore[method-assign]
    coroutine_abstain = CoroutineAuthenticator(None)
    sync_abstain = ConstantAuthenticator("abstain", None, "Abstain")
    key = KeyAuthenticator(directory())
    port = serve(factory_for([deferred_abstain, sync_abstain, coroutine_abstain, key]))
    assert await aio(who(port, {"apikey": JOHN_KEY})) == "john key"
    response = await aio(refused(port, {"apikey": "wrong"}))
    assert response.status_code == 401
    assert challenges(response) == ["Delayed", "Abstain", "Coro", KEY_CHALLENGE]
    response = await aio(refused(port, {}))
    assert response.status_code == 401
    assert (sync_abstain.calls, coroutine_abstain.calls) == (3, 3)


def _later(verdict: Verdict) -> Deferred[Verdict]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01, lambda: verdict)


@pytest_twisted.ensureDeferred
async def test_key_then_custom_key_decides_first(serve: Serve) -> None:
    """The order is the route's: a valid key first wins over a denier after."""
    denier = ConstantAuthenticator("denier", Deny("not today"), "Denier")
    port = serve(factory_for([KeyAuthenticator(directory()), denier]))
    assert await aio(who(port, {"apikey": JOHN_KEY})) == "john key"
    assert denier.calls == 0
    # Without a key, the denier is reached and refuses.
    assert (await aio(refused(port))).status_code == 401
    assert denier.calls == 1


# -- registration and configuration ---------------------------------------------

BUILT: list[tuple[Table, BuildContext]] = []


def build_custom(section: Table, context: BuildContext) -> TicketAuthenticator:
    """
    A builder referenced from configuration as C{test_custom_auth:build_custom}:
    reads C{ticket} (required), C{consumer} and C{header}, and checks the
    consumer against the configured ones.
    """
    BUILT.append((section, context))
    ticket = section.string("ticket", required=True)
    consumer = section.string("consumer", "john")
    header = section.string("header", "x-ticket")
    section.finish()
    if context.consumers.by_name(consumer) is None:
        raise section.error("consumer", f'unknown consumer "{consumer}"')
    authenticator = TicketAuthenticator(ticket, consumer, header=header)
    authenticator.name = section.path.rpartition(".")[2]
    return authenticator


def config_data(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "server": {"listen": ["tcp:0:interface=127.0.0.1"]},
        "consumer": [{"name": "john", "keys": [JOHN_KEY]}, {"name": "mary"}],
        "auth": {method: dict(options)},
        "route": [{"path": "/echo", "app": "echo", "auth": [method]}],
    }


@pytest_twisted.ensureDeferred
async def test_registered_builder_usable_in_config(
    serve: Serve, captured_log: CapturedLog, clean_registry: None
) -> None:
    BUILT.clear()
    txwssec.register_authenticator("custom-x", build_custom)
    assert "custom-x" in registry.registered_names()
    loaded = config.parse(
        config_data("custom-x", {"ticket": "t-123", "consumer": "mary", "header": "x-pass"})
    )
    ((section, context),) = BUILT
    assert section.path == "auth.custom-x"
    assert isinstance(context, BuildContext)
    assert context.consumers.by_name("mary") is not None

    (route,) = loaded.policy.routes
    (authenticator,) = route.authenticators
    assert isinstance(authenticator, TicketAuthenticator)
    assert authenticator.name == "custom-x"
    assert route.protocol is EchoProtocol

    factory = SecureServerFactory(loaded.policy)
    port = serve(factory)

    async def client() -> str | bytes:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers={"X-Pass": "t-123"}
        ) as ws:
            await ws.send("via config")
            return await ws.recv()

    assert await aio(client()) == "via config"
    (accepted,) = [e for e in captured_log.matching(route="/echo") if "consumer" in e]
    assert (accepted["consumer"], accepted["method"]) == ("mary", "custom-x")
    # The option was read: the ticket under the default header is not enough.
    response = await aio(refused(port, {"X-Ticket": "t-123"}))
    assert response.status_code == 401
    assert challenges(response) == ['Ticket realm="custom"']
    response = await aio(refused(port, {"X-Pass": "t-999"}))
    assert response.status_code == 401


def test_registered_builder_unknown_option_names_key_path(clean_registry: None) -> None:
    txwssec.register_authenticator("custom-x", build_custom)
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("custom-x", {"ticket": "t", "tiket": "typo"}))
    assert caught.value.path == "auth.custom-x.tiket"
    assert str(caught.value) == "auth.custom-x.tiket: unknown key"


def test_registered_builder_wrong_type_and_missing_option(clean_registry: None) -> None:
    txwssec.register_authenticator("custom-x", build_custom)
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("custom-x", {"ticket": 5}))
    assert str(caught.value) == "auth.custom-x.ticket: expected string"
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("custom-x", {}))
    assert str(caught.value) == "auth.custom-x.ticket: is required"
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("custom-x", {"ticket": "t", "consumer": "nobody"}))
    assert caught.value.path == "auth.custom-x.consumer"


def test_register_same_name_twice(clean_registry: None) -> None:
    txwssec.register_authenticator("custom-x", build_custom)
    with pytest.raises(ValueError, match="custom-x"):
        txwssec.register_authenticator("custom-x", build_custom)
    for builtin in ("key", "jwt", "basic", "anonymous"):
        with pytest.raises(ValueError, match=builtin):
            txwssec.register_authenticator(builtin, build_custom)
    # The first registration stands.
    assert registry.builder_for("custom-x") is build_custom


def test_registration_is_needed(clean_registry: None) -> None:
    """Without registration (or a builder reference) the name is unknown."""
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("custom-x", {"ticket": "t"}))
    assert caught.value.path == "route[0].auth[0]"
    assert 'unknown method "custom-x"' in str(caught.value)


def test_builder_reference_imports_this_module() -> None:
    """C{test_custom_auth} is importable by name: the reference below works."""
    import importlib

    module = importlib.import_module("test_custom_auth")
    assert module.build_custom is build_custom


@pytest_twisted.ensureDeferred
async def test_builder_reference_in_config(serve: Serve) -> None:
    """C{[auth.mine] builder = "test_custom_auth:build_custom"}, no registry."""
    assert registry.builder_for("mine") is None
    loaded = config.parse(
        config_data("mine", {"builder": "test_custom_auth:build_custom", "ticket": "m-1"})
    )
    (route,) = loaded.policy.routes
    (authenticator,) = route.authenticators
    assert authenticator.name == "mine"
    port = serve(SecureServerFactory(loaded.policy))

    async def client() -> str | bytes:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/echo", additional_headers={"X-Ticket": "m-1"}
        ) as ws:
            await ws.send("mine")
            return await ws.recv()

    assert await aio(client()) == "mine"
    response = await aio(refused(port, {"X-Ticket": "m-2"}))
    assert response.status_code == 401
    assert response.body == b"authentication required\n"


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("test_custom_auth:no_such_builder", "test_custom_auth has no no_such_builder"),
        ("no_such_module_xyz:build", "cannot import no_such_module_xyz"),
        ("test_custom_auth", 'expected "package.module:name"'),
    ],
)
def test_bad_builder_reference(reference: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(config_data("mine", {"builder": reference, "ticket": "m-1"}))
    assert caught.value.path == "auth.mine.builder"
    assert message in str(caught.value)


def test_builder_reference_unknown_option() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(
            config_data(
                "mine", {"builder": "test_custom_auth:build_custom", "ticket": "t", "x": 1}
            )
        )
    assert str(caught.value) == "auth.mine.x: unknown key"
