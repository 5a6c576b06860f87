"""
The supervisor of C{[server] workers = N} (N > 1): the C{twistd wssec}
process itself, which serves no WebSocket connection but runs N workers
that all serve every service listener (docs/deployment.rst).

- Before the workers start, it binds each service listener's address with
  C{SO_REUSEPORT}, without listening (L{txwssec.reuseport.reserve}), in
  C{startService}: after twistd's C{--uid}/C{--gid}, as the workers'
  user (Linux shares a port only between sockets of one user). A
  taken address fails the start as with one process, port 0 becomes a
  concrete port, logged as C{wssec reserved ... for N workers}.
- Each worker is C{twistd -n --pidfile= wssec --config FILE} of the same
  Python, told its role through its environment
  (L{txwssec.workers.worker}). It loads the configuration and TLS files
  itself, and writes its log lines itself where the supervisor's go
  (L{txwssec.workers.logs}), with C{worker=INDEX pid=PID} in their system
  (or, with C{--syslog} or C{--logger}, as JSON lines on its standard
  output, logged here).
- A worker that ends is logged (pid and exit status) and started again: at
  once if it ran for L{STEADY} seconds, else after a delay that doubles
  from L{FIRST_DELAY} up to L{MAX_DELAY} (a worker that cannot start does
  not spin).
- SIGHUP: the supervisor loads the file first; an invalid one is refused
  here, in one log line, and the workers keep theirs; a valid one is
  reloaded by each worker (SIGHUP passed on).
- SIGTERM, SIGINT: each worker stops gracefully (its sessions close with
  1001, at most C{shutdown_timeout}); a worker still running
  L{STOP_MARGIN} seconds later is killed.
- SIGUSR1: the supervisor reopens C{[log] file} (or rotates twistd's
  C{--logfile}), then each worker reopens it.
- C{[admin]}: served here, from every worker (L{txwssec.workers.admin}).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.server import Site

from txwssec import events
from txwssec.config import Config, load
from txwssec.errors import ConfigError
from txwssec.events import Events
from txwssec.logs import on_usr1
from txwssec.observers import TextLogObserver
from txwssec.ops import JSONEventObserver
from txwssec.reuseport import SUPPORTED, reserve, shared
from txwssec.workers.admin import WorkerClient, supervisor_site
from txwssec.workers.logs import STDOUT, line_file, observer
from txwssec.workers.revoked import KeptRevocations
from txwssec.workers.worker import REVOKED_FILE, WorkerRole, relayed

log = Logger(namespace="txwssec.server")

#: A worker that ran this long (seconds) is restarted at once.
STEADY = 5.0
#: The first delay before restarting a worker that died early (seconds).
FIRST_DELAY = 0.5
#: The longest delay before a restart (seconds).
MAX_DELAY = 30.0
#: How long after C{shutdown_timeout} a stopping worker is killed (seconds).
STOP_MARGIN = 5.0
#: How often the supervisor asks a starting worker whether it is ready.
READY_POLL = 0.1

#: The command that runs twistd with this Python.
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")


class SupervisorFailed(SystemExit, Exception):
    """
    The supervisor cannot start (an address taken, a platform without
    C{SO_REUSEPORT} balancing): exit status 1, as L{txwssec.tap.ListenFailed}.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


class WorkerProcess(ProcessProtocol):
    """One worker slot: the process running in it, its output, its ends."""

    def __init__(self, supervisor: Supervisor, index: int, socket: str) -> None:
        self.supervisor = supervisor
        self.index = index
        self.socket = socket
        #: The pid while the process runs.
        self.pid: int | None = None
        #: Whether it answered ready since it started.
        self.ready = False
        self.started = 0.0
        #: Restarts in a row of a worker that died early.
        self.failures = 0
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._partial[childFD] = (self._partial.get(childFD, b"") + data).split(b"\n")
        for line in lines:
            self.supervisor.relay(self, childFD, line)

    def processEnded(self, reason: Failure) -> None:
        pid, self.pid, self.ready = self.pid, None, False
        self.supervisor.ended(self, pid, reason)


class Supervisor(Service):
    """
    Runs C{config.workers} workers of the configuration file at C{path}
    (see the module docstring). Add it to C{twistd wssec}'s service tree
    in place of the listeners; L{admin} is the C{[admin]} site, if any.
    """

    def __init__(
        self, path: str | Path, config: Config, reactor: Any, log: str | None = None
    ) -> None:
        self.path = str(Path(path).resolve())
        #: Where the log goes, written by every worker too
        #: (L{txwssec.workers.logs}); L{None}: the workers' lines are relayed.
        self.log = log
        self._log_file = line_file(log) if log is not None else None
        self.config = config
        self.reactor = reactor
        self.count = config.workers
        self.token = secrets.token_urlsafe(32)
        self.ports: list[int] = []
        self.workers: list[WorkerProcess] = []
        self.stopping = False
        self._reserved: list[socket.socket] = []
        self._directory = ""
        self._restarts: dict[int, Any] = {}
        self._stopped: Deferred[None] | None = None
        self._json_events = JSONEventObserver() if config.log.format == "json" else None
        self.events = Events([self._json_events or TextLogObserver()])
        self.registry = CollectorRegistry(auto_describe=True)
        self._running = Gauge(
            "wssec_workers_running", "Worker processes running.", registry=self.registry
        )
        self._restarted = Counter(
            "wssec_worker_restarts",
            "Worker processes started again after they ended.",
            registry=self.registry,
        )
        self.client = WorkerClient(reactor, self.token, lambda: self.workers)
        #: The revocations made through the admin API, for new workers.
        self.kept = KeptRevocations()
        #: The C{[admin]} site, if C{[admin]} is configured.
        self.admin: Site | None = None
        if config.admin is not None:
            self.admin = supervisor_site(
                self.client, self.registry, config.admin.token_digest, self.kept
            )

    def log_observer(self) -> ILogObserver | None:
        """
        The supervisor's log, when the workers write it too (L{log}); its
        SIGUSR1 (reopen C{[log] file}, or rotate twistd's C{--logfile}) is
        passed on to the workers, which reopen it.
        """
        if self._log_file is None:
            return None
        if hasattr(signal, "SIGUSR1"):
            rotate = self.config.log.file == "-"
            handler = on_usr1(self._log_file, rotate, self._reopened)
            signal.signal(signal.SIGUSR1, handler)
        return observer(self.config.log.format, self._log_file, self._json_events)

    def _reopened(self) -> None:
        for worker in self.workers:
            self._signal(worker, signal.SIGUSR1)

    # -- start ---------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if not SUPPORTED:
            raise SupervisorFailed(
                f"server.workers = {self.count} needs SO_REUSEPORT load balancing, which only"
                " Linux has: run one process (workers = 1) per port"
            )
        signal.signal(signal.SIGHUP, self._onHangup)

    def startService(self) -> None:
        super().startService()
        # Here, not in privilegedStartService: twistd calls this after it
        # drops privileges (--uid/--gid), so the reservation is the workers'
        # user's, as Linux wants of sockets sharing a port with SO_REUSEPORT
        # (a root-owned one is passed over only through SO_REUSEADDR's
        # exception for sockets that do not listen). A raise here still ends
        # twistd with status 1.
        self._reserve()
        # Here, not before: a listener that fails to start leaves nothing behind.
        self._directory = tempfile.mkdtemp(prefix="txwssec-workers-")
        self.kept.path = os.path.join(self._directory, REVOKED_FILE)
        self.workers = [
            WorkerProcess(self, index, os.path.join(self._directory, f"worker-{index}.sock"))
            for index in range(self.count)
        ]
        if self.config.state.backend == "memory":
            log.warn(
                "wssec {count} workers with the memory state backend: connection caps per IP"
                " and per consumer, rates, the failed-login lockout and one-time tickets are"
                " counted per worker (admin closes and revocations reach every worker)",
                count=self.count,
            )
        for worker in self.workers:
            self._spawn(worker)

    def _reserve(self) -> None:
        """Bind each service listener's address for the workers (or fail the start)."""
        for description, endpoint in zip(
            self.config.listen, self.config.endpoints(self.reactor), strict=True
        ):
            try:
                sock = reserve(shared(endpoint, self.reactor))
            except (OSError, ValueError) as error:
                log.critical(
                    "wssec cannot listen on {endpoint}: {reason}",
                    endpoint=description,
                    reason=error,
                )
                for taken in self._reserved:
                    taken.close()
                self._reserved.clear()
                raise SupervisorFailed(f"cannot listen on {description}: {error}") from None
            self._reserved.append(sock)
            host, port = sock.getsockname()[:2]
            self.ports.append(port)
            log.info(
                "wssec reserved {endpoint} ({host}:{port}) for {count} workers",
                endpoint=description,
                host=host,
                port=port,
                count=self.count,
            )

    def _spawn(self, worker: WorkerProcess) -> None:
        self._restarts.pop(worker.index, None)
        if self.stopping:
            return
        with suppress(FileNotFoundError):
            os.unlink(worker.socket)
        role = WorkerRole(
            worker.index,
            worker.socket,
            tuple(self.ports),
            os.getpid(),
            self.token,
            metrics=self.config.admin is not None,
            log=self.log,
        )
        env = {**os.environ, **role.to_environment()}
        args = [sys.executable, *TWISTD, "-n", "--pidfile=", "wssec", "--config", self.path]
        transport = self.reactor.spawnProcess(
            worker,
            sys.executable,
            args,
            env=env,
            path=os.getcwd(),
            # Writing the supervisor's standard output itself, or told on it.
            childFDs={0: "w", 1: 1 if self.log == STDOUT else "r", 2: "r"},
        )
        worker.pid, worker.ready, worker.started = transport.pid, False, self.reactor.seconds()
        self._running.set(sum(w.pid is not None for w in self.workers))
        log.info("wssec worker {index} started (pid {pid})", index=worker.index, pid=worker.pid)
        self.reactor.callLater(READY_POLL, self._poll, worker, worker.pid)

    def _poll(self, worker: WorkerProcess, pid: int) -> None:
        """Ask a started worker whether it is ready, until it is."""
        if worker.pid != pid or self.stopping:
            return
        asked = self.client.ask(worker, b"GET", b"/readyz")

        def answered(got: Any) -> None:
            if worker.pid != pid:
                return
            if got is None or got[0] != 200:
                waited = self.reactor.seconds() - worker.started
                self.reactor.callLater(
                    READY_POLL if waited < STEADY else 1.0, self._poll, worker, pid
                )
                return
            worker.ready = True
            log.info("wssec worker {index} (pid {pid}) serving", index=worker.index, pid=pid)
            if all(w.ready for w in self.workers):
                log.info("wssec {count} workers serving", count=self.count)

        asked.addCallback(answered)

    # -- the workers' output and ends -------------------------------------------------

    def relay(self, worker: WorkerProcess, fd: int, line: bytes) -> None:
        """Log a line of a worker's output: its log events, or plain text."""
        text = line.decode("utf-8", "replace").strip()
        if not text:
            return
        if fd == 1 and text.startswith("{"):
            event = relayed(text, worker.index, worker.pid)
            if event is not None:
                globalLogPublisher(event)
                return
        log.warn(
            "wssec worker {index} (pid {pid}): {line}",
            index=worker.index,
            pid=worker.pid,
            line=text,
        )

    def ended(self, worker: WorkerProcess, pid: int | None, reason: Failure) -> None:
        """A worker's process ended: log it, and start it again unless stopping."""
        self._running.set(sum(w.pid is not None for w in self.workers))
        status = _status(reason)
        if self.stopping:
            log.info(
                "wssec worker {index} (pid {pid}) stopped: {status}",
                index=worker.index,
                pid=pid,
                status=status,
            )
            if self._stopped is not None and all(w.pid is None for w in self.workers):
                stopped, self._stopped = self._stopped, None
                stopped.callback(None)
            return
        lived = self.reactor.seconds() - worker.started
        if lived >= STEADY:
            worker.failures = 0
            delay = 0.0
        else:
            delay = min(FIRST_DELAY * 2**worker.failures, MAX_DELAY)
            worker.failures += 1
        log.error(
            "wssec worker {index} (pid {pid}) ended: {status}; starting it again in {delay}s",
            index=worker.index,
            pid=pid,
            status=status,
            delay=delay,
        )
        self._restarted.inc()
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker)

    # -- signals -------------------------------------------------------------------

    def _onHangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        """SIGHUP: check the file, then have every worker reload it."""
        if self.stopping:
            return
        try:
            new = load(self.path)
        except (ConfigError, TypeError) as error:
            self.events.emit(events.CONFIG_RELOAD_FAILED, path=self.path, error=str(error))
            return
        if new.workers != self.count:
            log.warn(
                "wssec server.workers changed in {path}: still {count} workers until a restart",
                path=self.path,
                count=self.count,
            )
        for worker in self.workers:
            if worker.pid is not None:
                with suppress(OSError):
                    os.kill(worker.pid, signal.SIGHUP)

    # -- stop ----------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.stopping = True
        with suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            # As GracefulStop: a second SIGTERM or SIGINT is said once, not
            # a ReactorNotRunning traceback (SIGKILL forces).
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, self._again)
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        running = [w for w in self.workers if w.pid is not None]
        log.info(
            "wssec stopping {count} workers, waiting up to {timeout}s",
            count=len(running),
            timeout=self.config.shutdown_timeout + STOP_MARGIN,
        )
        done: Deferred[None] = succeed(None)
        if running:
            done = self._stopped = Deferred()
            for worker in running:
                self._signal(worker, signal.SIGTERM)
            kill = self.reactor.callLater(
                self.config.shutdown_timeout + STOP_MARGIN, self._kill, running
            )
            done.addBoth(lambda result: (kill.active() and kill.cancel(), result)[1])
        return done.addCallback(self._cleanUp)

    def _again(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(
            log.info,
            "wssec already stopping (signal {signum}): waiting for the workers to stop",
            signum=signum,
        )

    def _signal(self, worker: WorkerProcess, signum: int) -> None:
        if worker.pid is not None:
            with suppress(OSError):
                os.kill(worker.pid, signum)

    def _kill(self, workers: list[WorkerProcess]) -> None:
        for worker in workers:
            if worker.pid is not None:
                log.warn(
                    "wssec worker {index} (pid {pid}) still running: killed",
                    index=worker.index,
                    pid=worker.pid,
                )
                self._signal(worker, signal.SIGKILL)

    def _cleanUp(self, ignored: None) -> Deferred[None]:
        for sock in self._reserved:
            sock.close()
        if self._directory:
            shutil.rmtree(self._directory, ignore_errors=True)
        # As GracefulStop: a stop that ended every worker is a clean exit.
        if getattr(self.reactor, "_exitSignal", None) in (signal.SIGTERM, signal.SIGINT):
            self.reactor._exitSignal = None
        closed: Deferred[None] = self.client.pool.closeCachedConnections()
        return closed


def _status(reason: Failure) -> str:
    """A process's end, for the log: its exit status or its signal."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        return f"killed by signal {value.signal}"
    if isinstance(value, ProcessDone | ProcessTerminated):
        return f"exit status {value.exitCode}"
    return str(value)
