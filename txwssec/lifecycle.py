"""
Operations on a running server: the graceful stop (L{drain}, L{GracefulStop})
and the live reload of the configuration file (L{reload}, L{ConfigReloader}).
C{twistd wssec} runs both services: SIGTERM and SIGINT stop gracefully,
SIGHUP reloads (docs/operations.rst).

A graceful stop: the listeners stop accepting (they stop before this
service, see L{GracefulStop}), every handshake still running gets 503,
every open session is closed with 1001 (a gateway session: both legs),
and the stop waits for the close handshakes, at most C{shutdown_timeout}
seconds; connections still open then are cut.

A reload reads and checks the whole file. If it is valid, new handshakes use
its routes, consumers, keys, JWT settings and TLS certificate (one swap, with
nothing left half-applied), and the open sessions whose consumer, API key or
JWT verification key is gone close with 3003; every other session stays
open. If it is not, one log line names the key path and nothing changes.
Listen addresses cannot change without a restart: a reload that changes
C{[server] listen} keeps the old listeners and says so.
"""

from __future__ import annotations

import hmac
import signal
import weakref
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txwssec import events
from txwssec.config import Config, load
from txwssec.consumers import ConsumerDirectory, key_digest
from txwssec.errors import ConfigError
from txwssec.messages.sealing import find_key
from txwssec.server import SecureServerFactory
from txwssec.tls import ReloadingContextFactory, TLSSettingsError
from txwssec.types import Principal

log = Logger(namespace="txwssec.server")

#: How often a stop looks whether every connection has ended (seconds).
DRAIN_POLL = 0.05


def drain(
    factories: Iterable[SecureServerFactory], timeout: float, clock: IReactorTime
) -> Deferred[None]:
    """
    Stop C{factories}' sessions gracefully: handshakes get 503 from now on,
    every open session is closed with 1001, and the result fires once every
    connection has ended, or after C{timeout} seconds, when the sessions
    still connected are cut (their connections aborted). Stop the
    listeners first (C{port.stopListening()}).

    @return: fires with L{None}; it never fails.
    """
    factories = list(factories)
    closing = 0
    for factory in factories:
        factory.stopping = True
        for protocol in factory.registry.open():
            protocol.goAway()  # type: ignore[attr-defined]
            closing += 1
    log.info(
        "wssec stopping: {count} sessions closed with 1001, waiting up to {timeout}s",
        count=closing,
        timeout=timeout,
    )
    done: Deferred[None] = Deferred()
    deadline = clock.seconds() + timeout

    def check() -> None:
        left = sum(factory.countConnections for factory in factories)
        if left and clock.seconds() < deadline:
            clock.callLater(min(DRAIN_POLL, max(0.0, deadline - clock.seconds())), check)
            return
        for factory in factories:
            for protocol in factory.registry:
                transport: Any = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abortConnection()
        if left:
            log.warn(
                "wssec shutdown_timeout ({timeout}s) reached: {count} connections cut",
                timeout=timeout,
                count=left,
            )
        else:
            log.info("wssec stopped: every connection closed")
        done.callback(None)

    check()
    return done


class GracefulStop(Service):
    """
    Stops C{factories} gracefully (L{drain}) when the service tree stops:
    twistd stops it on SIGTERM and SIGINT, and waits for its L{Deferred}
    before the reactor stops.

    Add it to the tree I{before} the listening services: a L{MultiService}
    stops its children in reverse order, so the listeners stop accepting
    first.
    """

    def __init__(
        self, factories: Sequence[SecureServerFactory], timeout: float, clock: IReactorTime
    ) -> None:
        self.factories = factories
        self.timeout = timeout
        self.clock = clock

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # A second SIGTERM or SIGINT would make the reactor's handler log a
        # ReactorNotRunning traceback: say it once instead (SIGKILL forces).
        for signum in (signal.SIGTERM, signal.SIGINT):
            with suppress(ValueError):  # not the main thread
                signal.signal(signum, self._again)
        return drain(self.factories, self.timeout, self.clock).addCallback(self._stopped)

    def _again(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(  # type: ignore[attr-defined]
            log.info,
            "wssec already stopping (signal {signum}): waiting for the sessions to close",
            signum=signum,
        )

    def _stopped(self, ignored: None) -> None:
        # twistd exits by the signal that stopped it (status -15 under a
        # shell, "killed by SIGTERM" for a service manager) unless told
        # otherwise: a stop that closed every session is a clean exit, 0.
        if getattr(self.clock, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.clock._exitSignal = None  # type: ignore[attr-defined]


def reload(
    path: str | Path,
    factories: Sequence[SecureServerFactory],
    current: Config,
    listeners: Mapping[str, ReloadingContextFactory] | None = None,
) -> Config:
    """
    Read the configuration file at C{path} again and apply it to
    C{factories}, which serve C{current}: see this module's docstring.
    The events C{config.reloaded} (with C{revoked}, the sessions closed) or
    C{config.reload_failed} (with C{error}, naming the key path) go to each
    factory's observers.

    @param listeners: the TLS contexts of listeners that carry their own
        certificate (a C{wss:} description's C{cert=} and C{key=}), by
        description: the files of those the new file still lists are read
        again too, and a file that cannot be used fails the whole reload,
        as a broken C{[tls]} file does. A listener whose description
        changed keeps its certificate, as its other settings, until a
        restart.
    @return: the configuration now in use (C{current} if the file is not
        valid).
    """
    try:
        new = load(path)
        reread = _reread(listeners or {}, new.listen)
        for factory in factories:
            factory.usePolicy(new.policy)
    except (ConfigError, TypeError) as error:
        for factory in factories:
            factory.events.emit(events.CONFIG_RELOAD_FAILED, path=str(path), error=str(error))
        return current
    if current.tls is not None and new.tls is not None:
        current.tls.replace(new.tls)
        new = _keep_tls(new, current)
        log.info("certificate reloaded from {cert}", cert=str(current.tls.settings.cert))
    for context, fresh in reread:
        context.replace(fresh)
        log.info("certificate reloaded from {cert}", cert=str(context.settings.cert))
    listen_changed = new.listen != current.listen
    keys = _verification_keys(new)
    revoked = 0
    for factory in factories:
        _LateSessions.watch(factory, current, new.consumers, keys)
        for protocol in factory.registry.open():
            session = protocol.session
            if session is not None and (
                _revoked(session.principal, current.consumers, new.consumers, keys)
                or _seal_key_removed(protocol, new.consumers)
            ):
                protocol.revoke()
                revoked += 1
    for factory in factories:
        factory.events.emit(
            events.CONFIG_RELOADED,
            path=str(path),
            routes=len(new.policy.routes),
            consumers=len(new.consumers),
            revoked=revoked,
            listen_changed=listen_changed,
        )
    return new


class _LateSessions:
    """
    A reload's rule for the sessions whose handshake started before it (a
    gateway waiting for its upstream, a password being checked) and that
    open after it, with the configuration they started with: checked as
    they open (an observer of C{session.opened}), against the latest
    configuration, until the old configuration's handshakes have timed out.
    """

    #: The watchers of each factory, one per configuration a reload replaced.
    _watching: weakref.WeakKeyDictionary[SecureServerFactory, list[_LateSessions]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(
        self,
        factory: SecureServerFactory,
        old: Config,
        new: ConsumerDirectory,
        keys: frozenset[bytes],
    ) -> None:
        self.factory = factory
        self.old = old
        self.new = new
        self.keys = keys

    @classmethod
    def watch(
        cls,
        factory: SecureServerFactory,
        old: Config,
        new: ConsumerDirectory,
        keys: frozenset[bytes],
    ) -> None:
        """Watch the late sessions of C{old}; earlier watchers now check against C{new}."""
        watchers = cls._watching.setdefault(factory, [])
        for watcher in watchers:
            watcher.new, watcher.keys = new, keys
        watcher = cls(factory, old, new, keys)
        watchers.append(watcher)
        factory.events.add(watcher)
        # Autobahn drops a handshake that takes longer than this.
        factory.clock.callLater(old.policy.handshake_timeout + 1, watcher.stop)

    def stop(self) -> None:
        """Stop watching."""
        self.factory.events.remove(self)
        self._watching.get(self.factory, []).remove(self)

    def __call__(self, event: str, fields: Mapping[str, Any]) -> None:
        if event != events.SESSION_OPENED:
            return
        protocol: Any = self.factory.registry.get(fields["id"])
        if protocol is None or protocol.handshakePolicy is not self.old.policy:
            return
        session = protocol.session
        if session is not None and _revoked(
            session.principal, self.old.consumers, self.new, self.keys
        ):
            # After the application's onOpen, as for any open session.
            self.factory.clock.callLater(0, _revokeIfOpen, protocol)


def _revokeIfOpen(protocol: Any) -> None:
    if protocol.state == protocol.STATE_OPEN:
        protocol.revoke()


def _reread(
    listeners: Mapping[str, ReloadingContextFactory], listen: Sequence[str]
) -> list[tuple[ReloadingContextFactory, ReloadingContextFactory]]:
    """
    The context of each listener whose description C{listen} (the new
    file's) still has, with a new one read from the same files, none of
    them in use yet.

    @raise ConfigError: naming the listener (C{server.listen[N]} in the
        new file) and the file.
    """
    reread = []
    for description, context in listeners.items():
        if description not in listen:
            continue  # changed: as it is until a restart (listen_changed)
        try:
            reread.append((context, ReloadingContextFactory(context.settings)))
        except TLSSettingsError as error:
            where = f"server.listen[{listen.index(description)}]"
            raise ConfigError(where, str(error)) from None
    return reread


def _keep_tls(new: Config, current: Config) -> Config:
    """C{new}, with the context factory the listeners use (now updated)."""
    from dataclasses import replace

    return replace(new, tls=current.tls)


def _verification_keys(config: Config) -> frozenset[bytes]:
    """The digests of the verification keys of C{config}'s methods (JWT)."""
    return frozenset(
        digest
        for route in config.policy.routes
        for method in route.authenticators
        if isinstance(digest := getattr(method, "key_digest", None), bytes)
    )


def _revoked(
    principal: Principal,
    old: ConsumerDirectory,
    new: ConsumerDirectory,
    verification_keys: frozenset[bytes],
) -> bool:
    """
    Whether a session of C{principal} must close after a reload from the
    consumers C{old} to C{new}: its consumer was removed, or the key that
    accepted its credential (L{Principal.key}) was: the API key (C{key}),
    the password (C{basic}: its hash changed), the JWT verification key;
    for a ticket's session, the key of the credential it was issued to.
    """
    name = principal.consumer
    if old.by_name(name) is not None and new.by_name(name) is None:
        return True
    if principal.key is None:
        return False
    # A session opened with a one-time ticket is one of its issuing credential.
    method = principal.issued_by or principal.method
    if method == "key":
        consumer = new.by_name(name)
        return consumer is None or principal.key not in consumer.key_digests
    if method == "basic":
        consumer = new.by_name(name)
        password = consumer.password if consumer is not None else None
        return password is None or not hmac.compare_digest(principal.key, key_digest(password))
    return principal.key not in verification_keys


def _seal_key_removed(protocol: Any, new: ConsumerDirectory) -> bool:
    """
    Whether C{protocol}'s session is sealed under a key that its consumer
    no longer has (see L{txwssec.messages.sealing}).
    """
    sealed = getattr(protocol, "_seal", None)
    kid = getattr(sealed, "kid", b"")
    session = protocol.session
    if not kid or session is None:
        return False
    consumer = new.by_name(session.consumer)
    return find_key(consumer.seal_keys if consumer is not None else (), kid) is None


class ConfigReloader(Service):
    """
    Reloads the configuration file on SIGHUP (see L{reload}), for
    C{twistd wssec}: always installed, TLS or not.

    @ivar config: the configuration in use.
    @ivar listeners: the contexts of the listeners with their own
        certificate, by description (see L{reload}); set once they are made.
    """

    listeners: Mapping[str, ReloadingContextFactory] = {}

    def __init__(
        self,
        path: str | Path,
        factories: Sequence[SecureServerFactory],
        config: Config,
        reactor: Any,
    ) -> None:
        self.path = path
        self.factories = factories
        self.config = config
        self._reactor = reactor
        self._installed = False

    def privilegedStartService(self) -> None:
        # Before the listeners start (add this service before them): once
        # "listening" is logged, SIGHUP reloads, it never kills.
        super().privilegedStartService()
        if not self._installed:
            signal.signal(signal.SIGHUP, self._onSignal)
            self._installed = True

    def stopService(self) -> None:
        # While the server stops (a drain may take shutdown_timeout), SIGHUP
        # is ignored rather than given back to a default that would kill.
        if self._installed:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            self._installed = False
        super().stopService()

    def _onSignal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """Reload now (what SIGHUP does)."""
        if any(factory.stopping for factory in self.factories):
            return
        self.config = reload(self.path, self.factories, self.config, self.listeners)
