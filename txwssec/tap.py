"""
C{twistd wssec}: run txwssec from a TOML configuration file.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger
from twisted.python import usage

from txwssec.auth.registry import auth_services
from txwssec.collector import tune_collector
from txwssec.config import Config, load
from txwssec.errors import ConfigError
from txwssec.lifecycle import ConfigReloader, GracefulStop
from txwssec.listen import listener_context, server_endpoint
from txwssec.ops import JSONEventObserver, admin_for, log_observer, use_json_log
from txwssec.ops.cluster import StateService, follow, state_store
from txwssec.ops.settings import LogSettings
from txwssec.server import SecureServerFactory
from txwssec.workers import Supervisor, WorkerRole
from txwssec.workers.logs import destination


class Options(usage.Options):
    """
    Options for C{twistd wssec}.
    """

    synopsis = "--config FILE"
    longdesc = (
        "Run a txwssec secure WebSocket server or gateway. The configuration "
        "is a TOML file: 'python -m txwssec config-reference' prints its "
        "reference, 'python -m txwssec check-config FILE' checks one."
    )
    optParameters = [
        ["config", "c", None, "Path to the TOML configuration file."],
    ]

    config: Config

    def opt_version(self) -> None:
        """
        Display the versions of txwssec and its main dependencies and exit.
        """
        print(version_text())
        sys.exit(0)

    def postOptions(self) -> None:
        path = self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required")
        try:
            self.config = load(path)
        except ConfigError as error:
            # Not a usage error: twistd would print its whole usage before
            # the one useful line. SystemExit with a message prints just the
            # message (on standard error) and exits with status 1, before
            # twistd daemonizes or logs anything.
            raise SystemExit(f"{path}: {error}") from None


def version_text() -> str:
    """
    What C{--version} prints: txwssec's version on the first line, then
    those of Twisted, Autobahn, Python and the OpenSSL that serves TLS (the
    key exchange groups depend on it), one per line.
    """
    import platform
    from importlib import metadata

    from cryptography import __version__ as cryptography_version
    from OpenSSL import SSL

    import twisted
    from txwssec import __version__

    openssl = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode("ascii", "replace")
    return "\n".join(
        [
            f"txwssec {__version__}",
            f"Twisted {twisted.__version__}",
            f"Autobahn {metadata.version('autobahn')}",
            f"Python {platform.python_version()}",
            f"{openssl} (cryptography {cryptography_version})",
        ]
    )


class ListenFailed(SystemExit, Exception):
    """
    A listener could not start: the process exits with status 1.

    It is an L{Exception}, so that a daemonizing twistd reports it to the
    waiting parent (which then exits 1 too) and removes its PID file, and a
    L{SystemExit}, so that the interpreter exits without a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


class ListeningService(StreamServerEndpointService):
    """
    An endpoint service that logs where it listens, and fails the whole
    process when it cannot listen (a taken port is not a warning).
    """

    log = Logger()
    #: The port, once listening.
    port: IListeningPort | None = None

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Any, description: str) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as error:
            # Not listening is fatal: one line in the log and exit status 1.
            reason = error.socketError if isinstance(error, CannotListenError) else error
            self.log.critical(
                "wssec cannot listen on {endpoint}: {reason}",
                endpoint=self.description,
                reason=reason,
            )
            raise ListenFailed(f"cannot listen on {self.description}: {reason}") from None
        assert self._waitingForPort is not None
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        self.log.info(
            "wssec listening on {endpoint} ({host}:{port})",
            endpoint=self.description,
            host=getattr(address, "host", address),
            port=getattr(address, "port", ""),
        )
        return port


class WssecService(MultiService):
    """
    The root of C{twistd wssec}'s service tree. When twistd attaches it to
    its application, it gives the application txwssec's log observer (the
    documented way for a twistd application to choose its observer), unless
    twistd's own must be used (see L{twistdLogObserver}). Before its listeners
    start, it tunes the cycle collector (see L{txwssec.collector}).
    """

    log = Logger()

    def __init__(
        self, twistdOptions: Any = None, gcYoungThreshold: int = 0, log: LogSettings | None = None
    ) -> None:
        super().__init__()
        self._twistdOptions = twistdOptions
        self._gcYoungThreshold = gcYoungThreshold
        self._log = log or LogSettings()
        #: The JSON log's event observer, if the log is JSON.
        self.jsonEvents: JSONEventObserver | None = None
        #: The log observer to use in place of C{[log]}'s (a worker's).
        self.logObserver: ILogObserver | None = None

    def privilegedStartService(self) -> None:
        # Before the listeners start: what exists now is start-up state.
        if self._gcYoungThreshold:
            frozen = tune_collector(self._gcYoungThreshold)
            self.log.info(
                "wssec garbage collector: young generation every {threshold} allocations,"
                " {frozen} start-up objects frozen",
                threshold=self._gcYoungThreshold,
                frozen=frozen,
            )
        super().privilegedStartService()

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self._twistdOptions is None or not hasattr(parent, "setComponent"):
            return
        if parent.getComponent(ILogObserver, None) is None:
            observer = self.logObserver or log_observer(
                self._log.format, self._log.file, self._twistdOptions, self.jsonEvents
            )
            if observer is not None:
                parent.setComponent(ILogObserver, observer)


def makeService(options: Options) -> IService:
    """
    Build the service tree: one listening service per C{[server] listen}
    entry, all sharing one L{SecureServerFactory}, the graceful stop
    (SIGTERM, SIGINT) and the configuration reloader (SIGHUP). With
    C{[server] workers} above 1, the supervisor of the workers instead
    (L{txwssec.workers}); a worker is this tree, on shared listeners.
    """
    from twisted.internet import reactor

    config = options.config
    service = WssecService(getattr(options, "parent", None), config.gc_young_threshold, config.log)
    worker = WorkerRole.from_environment()
    if worker is None and config.workers > 1:
        where = destination(config.log, getattr(options, "parent", None))
        supervisor = Supervisor(options["config"], config, reactor, where)
        supervisor.setServiceParent(service)
        service.logObserver = supervisor.log_observer()
        if config.admin is not None and supervisor.admin is not None:
            for description in config.admin.listen:
                endpoint = server_endpoint(reactor, description, config.tls)
                admin = ListeningService(endpoint, supervisor.admin, f"admin {description}")
                admin.setServiceParent(service)
        return service
    store = None
    if config.state.backend == "redis":
        # First of all, so that it stops after the sessions (their leases go).
        store = state_store(config.state, config.policy.auth_failures_per_minute, reactor)
        StateService(store, config.shutdown_timeout + 1, reactor).setServiceParent(service)
    factory = SecureServerFactory(config.policy, reactor=reactor, store=store)
    if store is not None:
        factory.readiness.add("state", store.not_ready)
        follow(factory)
    # First, so that it stops last: the listeners stop accepting before the
    # sessions are closed (see txwssec.lifecycle).
    GracefulStop([factory], config.shutdown_timeout, reactor).setServiceParent(service)
    # Before the listeners: SIGHUP reloads as soon as they listen.
    reloader = ConfigReloader(options["config"], [factory], config, reactor)
    reloader.setServiceParent(service)
    listeners = []
    endpoints = config.endpoints(reactor) if worker is None else worker.endpoints(config, reactor)
    # A wss: listener's own certificate: SIGHUP reads its files too.
    reloader.listeners = {
        description: context
        for description, endpoint in zip(config.listen, endpoints, strict=True)
        if (context := listener_context(endpoint)) is not None and context is not config.tls
    }
    for description, endpoint in zip(config.listen, endpoints, strict=True):
        listener = ListeningService(endpoint, factory, description)
        listener.setServiceParent(service)
        listeners.append(listener)
    for dependency in auth_services(route.authenticators for route in config.policy.routes):
        dependency.setServiceParent(service)
    if config.log.format == "json":
        service.jsonEvents = use_json_log(factory)
    if worker is not None:
        factory.readiness.add("listeners", lambda: _not_listening(listeners))
        worker.install(service, factory, reactor)
        service.logObserver = worker.log_observer(config.log.format, service.jsonEvents)
    elif config.admin is not None:
        factory.readiness.add("listeners", lambda: _not_listening(listeners))
        site = admin_for(factory, config.admin)
        for description in config.admin.listen:
            endpoint = server_endpoint(reactor, description, config.tls)
            ListeningService(endpoint, site, f"admin {description}").setServiceParent(service)
    return service


def _not_listening(listeners: list[ListeningService]) -> str | None:
    """The readiness of the service listeners: all of them listening."""
    waiting = [listener.description for listener in listeners if listener.port is None]
    return f"not listening on {', '.join(waiting)}" if waiting else None
