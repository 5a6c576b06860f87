"""
Subprocesses for end-to-end tests: the real C{twistd wssec}, the examples,
free ports, the shipped quickstart configuration on ports of a test's own,
and the TLS context of a websockets sync client talking to them.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

from txwssec.devcert import write_dev_certificates

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
TWISTD = Path(sys.executable).parent / "twistd"
#: How long a subprocess may take to start, answer or stop.
TIMEOUT = 15.0
#: How long C{twistd wssec} with C{[server] workers = 2} may take to say
#: "wssec 2 workers serving": three Python processes start (the supervisor,
#: then its two workers side by side, sharing the CPU), each allowed
#: L{TIMEOUT}. The wait ends as soon as the line comes; on a loaded machine
#: (both cores busy with other work) the three start-ups took more than one
#: L{TIMEOUT} together.
WORKERS_STARTING = 3 * TIMEOUT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sync_tls(context: ssl.SSLContext) -> ssl.SSLContext:
    """
    C{context}, capped at TLS 1.2, for websockets' sync client. That client
    reads in a thread of its own while it writes its request, and with TLS
    1.3 the server's session tickets arrive at that moment: OpenSSL does not
    allow one connection to be used by two threads at once, and on a loaded
    machine about one handshake in 500 lost its request (the server closed
    it at its handshake_timeout). TLS 1.2 sends nothing after the handshake;
    the asyncio client (one thread) loses nothing with TLS 1.3 either.
    """
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def repo_env() -> dict[str, str]:
    """The environment with the repository first on the path (for its plugin)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def quickstart(folder: Path, port: int, tls_port: int | None = None) -> Path:
    """
    The shipped examples/quickstart.toml, copied into C{folder} with its
    own development certificates, listening on C{port} (ws) and C{tls_port}
    (wss, a free port when not given).
    """
    text = (EXAMPLES / "quickstart.toml").read_text()
    assert '"tcp:9080:interface=127.0.0.1"' in text
    assert '"tls:9443:interface=127.0.0.1"' in text
    write_dev_certificates(folder / "dev-certs")
    path = folder / "quickstart.toml"
    text = text.replace("tcp:9080:", f"tcp:{port}:")
    path.write_text(text.replace("tls:9443:", f"tls:{tls_port or free_port()}:"))
    return path


class Process:
    """A subprocess whose output (stdout and stderr) a thread collects."""

    def __init__(
        self,
        args: list[str],
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            args,
            cwd=cwd,
            env=repo_env() if env is None else env,
            pass_fds=pass_fds,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def wait_for(
        self, wanted: str | re.Pattern[str], after: int = 0, timeout: float = TIMEOUT
    ) -> re.Match[str]:
        """
        Wait for an output line, from line C{after} on, that contains
        C{wanted} (text) or matches it (a pattern); return the match. The
        process must say it within C{timeout} seconds.
        """
        pattern = wanted if isinstance(wanted, re.Pattern) else re.compile(re.escape(wanted))
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found.extend(m for m in map(pattern.search, self.lines[after:]) if m)
            return bool(found)

        with self._changed:
            if not self._changed.wait_for(seen, timeout):
                raise AssertionError(
                    f"{self.process.args} never said {pattern.pattern!r}:\n{self.output()}"
                )
        return found[0]

    def wait(self) -> int:
        """The exit status, once the process has ended and all its output is read."""
        status = self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return status

    def stop(self) -> int:
        """SIGTERM, then the exit status (all output read)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        return status

    def kill(self) -> None:
        """Make sure it is gone (after a test that may have left it running)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(TIMEOUT)

    def output(self) -> str:
        """Everything it printed so far."""
        return "".join(self.lines)


def twistd(config: Path, cwd: Path, *options: str) -> Process:
    """C{twistd -n --pidfile= [OPTIONS] wssec --config CONFIG}."""
    return Process(
        [str(TWISTD), "-n", "--pidfile=", *options, "wssec", "--config", str(config)], cwd
    )
