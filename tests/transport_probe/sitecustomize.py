"""
Test-only (tests/test_tls_workers_direct.py): put this folder first on
C{PYTHONPATH} and C{TXWSSEC_TRANSPORT_PROBE} to a file, and every process
of a C{twistd wssec} (the supervisor, each worker) appends a line per
accepted TCP connection: C{pid local-port transport-class protocol-class}.
The transport's class is what the server's subprocesses cannot otherwise
show.

An accepted transport starts reading once it is made, whether Twisted's
C{tcp.Server} constructor made it or txwssec's lean accept loops
(L{txwssec._tcpport.server_transport}, L{txwssec._tlsport}), so the
probe notes each C{tcp.Server} the first time it starts reading.
"""

import os

_PROBE = os.environ.get("TXWSSEC_TRANSPORT_PROBE")

if _PROBE:
    from twisted.internet import abstract, tcp

    _start = abstract.FileDescriptor.startReading

    def _noted(self):  # type: ignore[no-untyped-def]
        if isinstance(self, tcp.Server) and not getattr(self, "_probeNoted", False):
            self._probeNoted = True
            kinds = f"{type(self).__name__} {type(self.protocol).__name__}"
            local = self.socket.getsockname()
            line = f"{os.getpid()} {local[1] if isinstance(local, tuple) else 0} {kinds}\n"
            with open(_PROBE, "a") as probe:
                probe.write(line)
        return _start(self)

    abstract.FileDescriptor.startReading = _noted
