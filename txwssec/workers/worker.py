"""
The worker's side of C{[server] workers}: what a C{twistd wssec} process
started by the supervisor (L{txwssec.workers.supervisor}) does differently.

The supervisor starts each worker as C{twistd -n --pidfile= wssec --config
FILE} with two environment variables: L{ROLE_ENV} (a JSON object: the
worker's index, its private socket, the ports the supervisor reserved, the
supervisor's pid) and L{TOKEN_ENV} (the private admin token, removed from
the environment as soon as it is read). The worker loads the configuration
and its TLS files itself, and then:

- listens on every service listener with C{SO_REUSEPORT}
  (L{txwssec.reuseport}), on the reserved ports;
- serves the admin API on a UNIX socket in the supervisor's private
  directory (mode 0600), behind the private token, in place of C{[admin]};
- writes its log lines itself where the supervisor's log goes
  (L{txwssec.workers.logs}: one log, in the configured format, each line
  naming its worker) and reopens the file on SIGUSR1; with C{--syslog} or
  C{--logger}, writes its log events as JSON lines on standard output,
  which the supervisor reads and logs as its own;
- stops gracefully if the supervisor dies (Linux's C{PR_SET_PDEATHSIG}).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import IO, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import ILogObserver, InvalidLogLevelError, LogEvent, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.threadable import isInIOThread
from twisted.web.server import Request
from zope.interface import implementer

from txwssec.config import Config
from txwssec.logs import on_usr1
from txwssec.ops import Metrics, token_digest
from txwssec.ops.admin import AdminResource, AdminSite, _json
from txwssec.ops.jsonlog import EVENT_KEY, FIELDS_KEY
from txwssec.reuseport import shared
from txwssec.workers.logs import line_file, observer
from txwssec.workers.revoked import apply_kept

#: The environment variable that makes C{twistd wssec} a worker.
ROLE_ENV = "TXWSSEC_WORKER"
#: The environment variable of the private admin token.
TOKEN_ENV = "TXWSSEC_WORKER_TOKEN"  # noqa: S105 (a variable name)
#: The file of the supervisor's private directory with the kept revocations.
REVOKED_FILE = "revocations.json"
#: C{prctl}'s C{PR_SET_PDEATHSIG}.
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    """
    What the supervisor told a worker.

    @ivar index: the worker's number, from 0.
    @ivar socket: the path of its private admin socket.
    @ivar ports: the port of each C{[server] listen} entry, in order.
    @ivar supervisor: the supervisor's pid.
    @ivar token: the private admin token.
    @ivar metrics: whether to keep metrics (C{[admin]} is configured).
    """

    index: int
    socket: str
    ports: tuple[int, ...]
    supervisor: int
    token: str
    metrics: bool = True
    #: Where the log goes (L{txwssec.workers.logs.destination}); L{None}:
    #: log events as JSON lines to the supervisor (L{LogLines}).
    log: str | None = None

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None
    ) -> WorkerRole | None:
        """The role in C{environ} (L{os.environ}), or L{None}: not a worker."""
        environ = os.environ if environ is None else environ
        text = environ.get(ROLE_ENV)
        if text is None:
            return None
        role: Mapping[str, Any] = json.loads(text)
        return cls(
            index=int(role["index"]),
            socket=str(role["socket"]),
            ports=tuple(int(port) for port in role["ports"]),
            supervisor=int(role["supervisor"]),
            metrics=bool(role.get("metrics", True)),
            log=role.get("log"),
            token=environ.pop(TOKEN_ENV, ""),
        )

    def to_environment(self) -> dict[str, str]:
        """The environment variables that give this role to a worker."""
        role = {
            "index": self.index,
            "socket": self.socket,
            "ports": list(self.ports),
            "supervisor": self.supervisor,
            "metrics": self.metrics,
            "log": self.log,
        }
        return {ROLE_ENV: json.dumps(role), TOKEN_ENV: self.token}

    def endpoints(self, config: Config, reactor: Any) -> list[IStreamServerEndpoint]:
        """The service listeners, shared with the other workers."""
        endpoints = config.endpoints(reactor)
        return [
            shared(endpoint, reactor, port)
            for endpoint, port in zip(endpoints, self.ports, strict=True)
        ]

    def install(self, service: IServiceCollection, factory: Any, reactor: Any) -> None:
        """
        Apply the kept revocations (L{txwssec.workers.revoked}); serve
        C{factory}'s admin API on the private socket, under C{service};
        ignore SIGUSR1; stop when the supervisor dies.
        """
        # Before listening: the revocations made before this worker started.
        apply_kept(os.path.join(os.path.dirname(self.socket), REVOKED_FILE), factory.revocations)
        # Metrics cost per event: only when the supervisor serves /metrics.
        registry = Metrics(factory).registry if self.metrics else None
        site = AdminSite(WorkerAdmin(factory, registry, token_digest(self.token)))
        site.displayTracebacks = False
        endpoint = UNIXServerEndpoint(reactor, self.socket, mode=0o600)
        StreamServerEndpointService(endpoint, site).setServiceParent(service)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        _die_with(self.supervisor)

    def log_observer(self, format: str = "text", events: Any = None) -> ILogObserver:
        """
        The worker's log: written by the worker itself where the
        supervisor's goes (L{txwssec.workers.logs}), its file reopened on
        SIGUSR1; else (C{log} is L{None}) JSON lines on standard output,
        for the supervisor.
        """
        if self.log is None:
            return LogLines(sys.__stdout__)
        out = line_file(self.log)
        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, on_usr1(out, rotate=False))
        pid = os.getpid()
        return observer(
            format, out, events, f" worker={self.index} pid={pid}", {"worker_pid": pid}
        )


#: The private request header that asks a worker to close its own sessions
#: only, without telling the other nodes (L{WorkerAdmin}).
LOCAL_HEADER = b"x-txwssec-local"


class WorkerAdmin(AdminResource):
    """
    A worker's private admin API (behind the private token): one process's,
    with two differences for the supervisor (L{txwssec.workers.admin}).

    - C{DELETE /sessions}, C{POST /revocations} with L{LOCAL_HEADER}: close
      this worker's sessions only, without publishing the close to the
      other nodes of a shared store (the supervisor asks every worker so,
      then one worker without the header, so that each session closed is
      counted once, by the worker that held it).
    - C{GET /sessions}: C{{"node": ID, "sessions": [...]}}, the records
      with the node that holds each (C{null} with the memory store) and this
      worker's node id, so that the supervisor lists each session once.
    """

    def _tells_others(self, request: Request) -> bool:
        return request.getHeader(LOCAL_HEADER) is None

    def _sessions(self, request: Request) -> bytes | Deferred[bytes]:
        store = self.factory.admission.store
        node = getattr(store, "node", None)

        def listed(records: list[Mapping[str, Any]]) -> bytes:
            return _json(request, {"node": node, "sessions": records})

        records = store.sessions()
        if isinstance(records, Deferred):
            return records.addCallback(listed)
        return listed(records)


@implementer(ILogObserver)
class LogLines:
    """
    Writes each log event as one JSON line for the supervisor (see
    L{relayed}): its time, level, namespace and
    text (formatted here, with its failure's traceback if any), and a
    txwssec event's name and fields for the JSON log. Cheaper than
    Twisted's C{eventAsJSON}, which keeps every field of every event.

    While the reactor runs, the lines are flushed once per turn of the
    reactor (a burst of sessions is one write, and one wake-up of the
    supervisor); otherwise (start-up, shutdown, another thread) at once.
    """

    def __init__(self, out: IO[str] | Any, reactor: Any = None) -> None:
        self._out = out
        self._reactor = reactor
        self._pending = False

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        record: dict[str, Any] = {
            "time": event.get("log_time"),
            "level": getattr(level, "name", "info"),
            "namespace": event.get("log_namespace", "-"),
            "text": formatEvent(event),
        }
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            record["text"] += "\n" + failure.getTraceback()
        name = event.get(EVENT_KEY)
        if isinstance(name, str):
            record["event"], record["fields"] = name, event.get(FIELDS_KEY)
        self._out.write(_dumps(record) + "\n")
        if self._pending:
            return
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        if reactor.running and isInIOThread():
            self._pending = True
            reactor.callLater(0, self._flush)
        else:
            self._out.flush()

    def _flush(self) -> None:
        self._pending = False
        self._out.flush()


def relayed(line: str, index: int, pid: int | None) -> LogEvent | None:
    """
    The log event of a worker's line (L{LogLines}), for the supervisor,
    with C{worker=INDEX pid=PID} as its system, or None if it is not one.
    """
    try:
        record = json.loads(line)
        level = LogLevel.levelWithName(record["level"])
        text, namespace = str(record["text"]), str(record["namespace"])
        when = float(record["time"])
    except (ValueError, KeyError, TypeError, InvalidLogLevelError):
        return None
    event: LogEvent = {
        "log_time": when,
        "log_level": level,
        "log_namespace": namespace,
        "log_system": f"{namespace}#{level.name} worker={index} pid={pid}",
        "log_format": "{log_text}",
        "log_text": text,
    }
    name, fields = record.get("event"), record.get("fields")
    if isinstance(name, str) and isinstance(fields, dict):
        event[EVENT_KEY], event[FIELDS_KEY] = name, {**fields, "worker_pid": pid}
    return event


_dumps = json.JSONEncoder(default=str, ensure_ascii=False, separators=(",", ":")).encode


def _die_with(parent: int) -> None:
    """Get SIGTERM (a graceful stop) when the supervisor dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)
