"""
How this folder's servers start: listen on 127.0.0.1 and print
``LISTENING <port>``, the line ``runner.start_python`` waits for.

The servers run as scripts (``python conformance/relay.py``), so this
folder is first on their path and they import it as ``listening``.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.python.failure import Failure


def serve(reactor: Any, factory: Any, port: int) -> None:
    """
    Listen with C{factory} on 127.0.0.1:C{port} (0: any), report the port,
    and run the reactor. A port that cannot be listened on is reported on
    standard error, and the process exits with status 1.
    """
    failures: list[Failure] = []

    def listening(listeningPort: Any) -> None:
        print(f"LISTENING {listeningPort.getHost().port}", flush=True)

    def failed(failure: Failure) -> None:
        print(f"cannot listen: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        failures.append(failure)
        # The listen may fail before the reactor runs: stop it once it does.
        reactor.callWhenRunning(reactor.stop)

    endpoint = TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    endpoint.listen(factory).addCallbacks(listening, failed)
    reactor.run()
    if failures:
        sys.exit(1)
