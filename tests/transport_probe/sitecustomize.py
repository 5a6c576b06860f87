"""
Test-only (tests/test_tls_workers_direct.py): put this folder first on
C{PYTHONPATH} and C{TXWSSEC_TRANSPORT_PROBE} to a file, and every process
of a C{twistd wssec} (the supervisor, each worker) appends a line per
accepted TCP connection that builds its transport with C{tcp.Server}'s
constructor: C{pid local-port transport-class protocol-class}. The
transport's class is what the server's subprocesses cannot otherwise show.
"""

import os

_PROBE = os.environ.get("TXWSSEC_TRANSPORT_PROBE")

if _PROBE:
    from twisted.internet import tcp

    _made = tcp.Server.__init__

    def _noted(self, sock, protocol, client, server, sessionno, reactor):  # type: ignore[no-untyped-def]
        _made(self, sock, protocol, client, server, sessionno, reactor)
        kinds = f"{type(self).__name__} {type(protocol).__name__}"
        local = sock.getsockname()
        line = f"{os.getpid()} {local[1] if isinstance(local, tuple) else 0} {kinds}\n"
        with open(_PROBE, "a") as probe:
            probe.write(line)

    tcp.Server.__init__ = _noted
