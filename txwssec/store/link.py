"""
The Redis state store's connections (L{txwssec.store.redis}): one for
commands, one subscribed to the nodes' channel, both made again by
txredisapi (Twisted's L{ClientService}) whenever they are lost, quickly
(backing off to at most L{MAX_DELAY} seconds).

The link is I{ready} once both are up and the store has synchronised
(loaded its revocation replica, written its leases again); it stops being
ready as soon as either is lost. Each change is logged once, in the
namespace C{txwssec.state}: "lost" with the reason, "ready" when it is
back; failed attempts in between are not logged again (nor the
"Scheduling retry ..." lines of txredisapi's L{ClientService}s, see
L{_QuietClientService}). The URL's password
never appears: only L{StateSettings.location}.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import txredisapi  # type: ignore[import-untyped]
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger, LogPublisher
from twisted.python.failure import Failure

from txwssec.logs import bounded
from txwssec.store.settings import StateSettings

log = Logger(namespace="txwssec.state")

#: Seconds before the first attempt to connect again, and the most between two.
INITIAL_DELAY = 0.2
MAX_DELAY = 2.0


class _QuietClientService(ClientService):
    """
    A L{ClientService} that does not log its "Scheduling retry N to connect
    ..." line (once a second per connection while Redis is down): the link
    logs each change of state once instead.
    """

    _log = Logger(namespace="txwssec.state", observer=LogPublisher())


class _Quiet:
    """
    Makes a txredisapi factory connect through L{_QuietClientService}s, tell
    its link when it cannot connect, and never give up.
    """

    link: RedisLink
    initialDelay = INITIAL_DELAY
    maxDelay = MAX_DELAY

    def startConnecting(self, endpoint: IStreamClientEndpoint) -> None:
        # txredisapi's pool slots make their ClientService by this module
        # name, each in this call (none is made later).
        original = txredisapi.ClientService
        txredisapi.ClientService = _QuietClientService
        try:
            super().startConnecting(endpoint)  # type: ignore[misc]
        finally:
            txredisapi.ClientService = original

    def retryDelay(self, attempt: int) -> float:
        self.link._down(None, "cannot connect")
        delay: float = super().retryDelay(attempt)  # type: ignore[misc]
        return delay

    def stopTrying(self) -> Any:
        # txredisapi stops for good when AUTH or SELECT fails; a Redis that
        # restarts (or whose ACL is being changed) must not stop the node
        # for good: it keeps trying, backing off (the link says why).
        self.link._down(None, "AUTH or SELECT refused")
        return None


class _Commands(_Quiet, txredisapi.RedisFactory):  # type: ignore[misc]
    """txredisapi's factory, telling the link when a connection comes and goes."""

    def __init__(self, link: RedisLink, settings: StateSettings) -> None:
        super().__init__(
            settings.location,
            settings.db,
            1,
            isLazy=True,
            password=settings.password,
            replyTimeout=settings.timeout,
            convertNumbers=False,
            username=settings.username,
        )
        self.link = link

    def addConnection(self, connection: Any) -> None:
        super().addConnection(connection)
        if connection in self.pool:
            self.link._commandsUp(connection)

    def delConnection(self, connection: Any) -> None:
        super().delConnection(connection)
        self.link._down(connection, "connection lost")


class _SubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.factory.link._received(message)


class _Subscriber(_Quiet, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = _SubscriberProtocol

    def __init__(self, link: RedisLink, settings: StateSettings) -> None:
        super().__init__(isLazy=True)
        self.password = settings.password
        self.username = settings.username
        self.replyTimeout = settings.timeout
        self.link = link

    def addConnection(self, connection: Any) -> None:
        super().addConnection(connection)
        if connection in self.pool:
            self.link._subscriberUp(connection)

    def delConnection(self, connection: Any) -> None:
        super().delConnection(connection)
        self.link._down(connection, "subscription lost")


class RedisLink:
    """
    The connections to Redis of one store.

    @param sync: called when both connections are up; its L{Deferred}
        fires when the store is in step (then the link is ready).
    @param received: called with each message on the channel.
    @param synced: called each time the link becomes ready again after a loss.
    @param reactor: the reactor to connect with.
    @ivar connection: the command connection (a txredisapi protocol), or L{None}.
    @ivar reason: why the link is not ready (for C{/readyz}).
    """

    def __init__(
        self,
        settings: StateSettings,
        channel: str,
        sync: Callable[[], Deferred[None]],
        received: Callable[[str], None],
        synced: Callable[[], None] = lambda: None,
        *,
        reactor: Any,
    ) -> None:
        self.settings = settings
        self.reactor = reactor
        self.channel = channel
        self._sync = sync
        self._received_callback = received
        self._synced = synced
        self.connection: Any = None
        self._subscriber: Any = None
        self._subscribed = False
        self.ready = False
        self.reason = "redis: not connected yet"
        self._generation = 0
        self._lost = False
        self._factories: list[Any] = []

    def endpoint(self) -> IStreamClientEndpoint:
        """Where Redis is (TLS for C{rediss://})."""
        settings = self.settings
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, settings.host, settings.port, timeout=max(1, int(settings.timeout))
        )
        if settings.tls:
            endpoint = wrapClientTLS(optionsForClientTLS(settings.host), endpoint)
        return endpoint

    def start(self) -> None:
        """Connect both, and keep them connected."""
        log.info("wssec state store: redis at {location}", location=self.settings.location)
        self._factories = [_Commands(self, self.settings), _Subscriber(self, self.settings)]
        for factory in self._factories:
            factory.startConnecting(self.endpoint())

    def stop(self) -> Deferred[None]:
        """Close both (what was written is sent first) and stop connecting."""
        self.ready = False
        self.reason = "redis: stopped"
        factories, self._factories = self._factories, []
        stopped: Deferred[Any] = gatherResults(
            [factory.disconnect() for factory in factories], consumeErrors=True
        )
        return stopped.addBoth(lambda _: None)

    # -- the factories' news ---------------------------------------------------------

    def _commandsUp(self, connection: Any) -> None:
        if not self._factories:
            return
        self.connection = connection
        self._maybeSync()

    def _subscriberUp(self, connection: Any) -> None:
        if not self._factories:
            return
        self._subscriber = connection

        def subscribed(_: Any) -> None:
            # This connection's subscription, whatever happened to the
            # command connection meanwhile (a loss there must not leave the
            # link waiting for a subscription that was made).
            if self._subscriber is connection:
                self._subscribed = True
                self._maybeSync()

        def failed(failure: Failure) -> None:
            connection.transport.loseConnection()

        connection.subscribe(self.channel).addCallbacks(subscribed, failed)

    def _received(self, message: Any) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if isinstance(message, str):
            self._received_callback(message)

    def _maybeSync(self) -> None:
        if self.ready or self.connection is None or not self._subscribed:
            return
        generation = self._generation
        connection = self.connection

        def done(_: None) -> None:
            if generation != self._generation or not self._factories:
                return
            self.ready = True
            self.reason = ""
            if self._lost:
                self._lost = False
                log.info(
                    "wssec state store restored: redis at {location}",
                    location=self.settings.location,
                )
                self._synced()
            else:
                log.info(
                    "wssec state store ready: redis at {location}",
                    location=self.settings.location,
                )

        def failed(failure: Failure) -> None:
            if generation == self._generation:
                self._down(connection, f"sync failed ({type(failure.value).__name__})")
                connection.transport.loseConnection()

        try:
            synced = self._sync()
        except Exception:
            synced = Deferred()
            synced.errback(Failure())
        synced.addCallbacks(done, failed)

    def _down(self, connection: Any, reason: str) -> None:
        """A connection was lost, or an attempt failed: not ready, logged once."""
        if connection is not None:
            if connection is self.connection:
                self.connection = None
            elif connection is self._subscriber:
                self._subscriber = None
                self._subscribed = False
            else:
                return
        self._generation += 1
        if not self._factories:
            return
        was_ready = self.ready
        self.ready = False
        self.reason = f"redis: {reason}"
        if was_ready or not self._lost:
            self._lost = True
            log.warn(
                "wssec state store lost: redis at {location}: {reason}; new handshakes get 503"
                " until it is back",
                location=self.settings.location,
                reason=bounded(reason),
            )
