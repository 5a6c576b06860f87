"""
The supervisor's admin API: the C{[admin]} listener of C{twistd wssec}
with C{workers > 1}. The same endpoints, token check and answers as one
process's (L{txwssec.ops.admin.AdminResource}), each answered from every
worker: the supervisor asks each worker's private admin API (a UNIX socket
in its private directory, behind a private token; see
L{txwssec.workers.worker}) and combines the answers.

- C{GET /healthz}: 200 while the supervisor runs.
- C{GET /readyz}: 200 when every worker runs and answers ready; else 503
  with the reasons, each prefixed with the worker (C{"worker 1: not
  running"}, C{"worker 0: listeners: ..."}).
- C{GET /metrics}: the workers' metrics added up (L{txwssec.workers.merge}),
  then the supervisor's own (C{wssec_workers_running},
  C{wssec_worker_restarts_total}).
- C{GET /sessions}: every worker's sessions, each with C{worker} (its pid),
  each once. With a shared store (C{backend = "redis"}) every worker reads
  the same list of every node's sessions: a session of this supervisor's
  workers is taken from the answer of the worker that holds it, a session
  of another node once, with C{"worker": null}.
- C{DELETE /sessions}, C{POST /revocations}: sent to every worker but one
  as "this worker only" (L{txwssec.workers.worker.LOCAL_HEADER}: no
  PUB/SUB message), then, once they answered, to the last one as to one
  process (which also tells the other nodes). C{{"closed": N}} is the sum:
  each session closed counted once, by the worker that held it; as with one
  process, sessions of other nodes are closed but not counted. (Told to
  every worker at once, a worker could hear another's PUB/SUB message
  first and close its sessions uncounted.) A worker that does not answer
  makes it a 503 (C{{"closed": N, "error": "not every worker answered"}}):
  a revocation that some worker may not enforce is not reported as done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from io import BytesIO
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from txwssec.ops.admin import MAX_BODY, AdminResource, AdminSite, _error, _json
from txwssec.workers.merge import Scrapes, merged_text
from txwssec.workers.revoked import KeptRevocations
from txwssec.workers.worker import LOCAL_HEADER

#: How long the supervisor waits for a worker's answer (seconds).
WORKER_TIMEOUT = 5.0

#: A worker's answer: its HTTP status and body, or None when it did not answer.
Answer = tuple[int, bytes] | None


class Worker(Protocol):
    """What the admin API needs of a supervised worker."""

    index: int
    #: Its pid while it runs, else None.
    pid: int | None
    #: Its private admin socket.
    socket: str


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory, without a log line per connection."""

    noisy = False


@implementer(IAgentEndpointFactory)
class _Sockets:
    """Connects an HTTP client to a worker's socket, named as the URL's host."""

    def __init__(self, reactor: Any, sockets: Callable[[str], str]) -> None:
        self._reactor = reactor
        self._sockets = sockets

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(self._reactor, self._sockets(uri.host.decode("ascii")))


class WorkerClient:
    """
    Asks the workers' private admin APIs: an HTTP client over their UNIX
    sockets, with the private token.

    @param workers: the supervisor's workers (read at each request).
    """

    def __init__(
        self, reactor: Any, private_token: str, workers: Callable[[], Sequence[Worker]]
    ) -> None:
        self.workers = workers
        self._reactor = reactor
        self._auth = f"Bearer {private_token}".encode("ascii")
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietClientFactory
        self._agent = Agent.usingEndpointFactory(
            reactor, _Sockets(reactor, self._socket), pool=self.pool
        )

    def _socket(self, host: str) -> str:
        index = int(host.removeprefix("worker-"))
        return next(w.socket for w in self.workers() if w.index == index)

    def ask_all(
        self, method: bytes, path: bytes, body: bytes | None = None
    ) -> Deferred[list[Answer]]:
        """Send a request to every worker; the answers, in worker order."""
        asked: list[Deferred[Answer]] = []
        for worker in self.workers():
            if worker.pid is None:
                asked.append(succeed(None))
            else:
                asked.append(self.ask(worker, method, path, body))
        done: Deferred[Any] = DeferredList(asked, consumeErrors=True)
        return done.addCallback(lambda results: [answer for _, answer in results])

    def ask(
        self,
        worker: Worker,
        method: bytes,
        path: bytes,
        body: bytes | None = None,
        *,
        local: bool = False,
    ) -> Deferred[Answer]:
        """
        Send a request to C{worker}: its answer, or None (never fails).
        C{local}: a close for this worker's sessions only (L{LOCAL_HEADER}).
        """
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        headers = Headers({b"authorization": [self._auth]})
        if local:
            headers.setRawHeaders(LOCAL_HEADER, [b"1"])
        url = b"http://worker-%d%s" % (worker.index, path)
        requested = self._agent.request(method, url, headers, producer)

        def read(response: IResponse) -> Deferred[Answer]:
            return readBody(response).addCallback(lambda data: (response.code, data))

        answer: Deferred[Answer] = requested.addCallback(read)
        answer.addTimeout(WORKER_TIMEOUT, self._reactor)
        return answer.addErrback(lambda failure: None)


class SupervisorAdmin(AdminResource):
    """
    The admin API of a supervisor (see the module docstring).

    @param client: asks the workers.
    @param registry: the supervisor's own metrics.
    @param token_digest: the SHA-256 digest of C{[admin] token}, or None.
    @param kept: where the revocations accepted are kept for new workers.
    """

    def __init__(
        self,
        client: WorkerClient,
        registry: CollectorRegistry,
        token_digest: bytes | None,
        kept: KeptRevocations,
    ) -> None:
        super().__init__(None, registry, token_digest)
        self._kept = kept
        self._client = client
        self._workers = client.workers
        self._registry = registry
        self._ask = client.ask_all
        #: The workers' last counters, kept when they end (monotonic sums).
        self._scrapes = Scrapes()

    def _later(
        self,
        request: Request,
        asked: Deferred[list[Answer]],
        answer: Callable[[list[Answer]], bytes],
    ) -> bytes:
        """Finish C{request} with C{answer}(the workers' answers)."""

        def finish(answers: list[Answer]) -> None:
            if request._disconnected:
                return
            request.write(answer(answers))
            request.finish()

        asked.addCallback(finish)
        # AdminResource's handlers answer bytes; this one answers later.
        return cast(bytes, NOT_DONE_YET)

    # -- the endpoints -------------------------------------------------------------

    def _readyz(self, request: Request) -> bytes:
        workers = list(self._workers())

        def answer(answers: list[Answer]) -> bytes:
            reasons = []
            for worker, got in zip(workers, answers, strict=True):
                if worker.pid is None:
                    reasons.append(f"worker {worker.index}: not running")
                elif got is None:
                    reasons.append(f"worker {worker.index}: not answering")
                elif got[0] != 200:
                    found = _loads(got[1]).get("reasons", ["not ready"])
                    reasons.extend(f"worker {worker.index}: {reason}" for reason in found)
            if reasons:
                request.setResponseCode(503)
            return _json(request, {"ready": not reasons, "reasons": reasons})

        return self._later(request, self._ask(b"GET", b"/readyz"), answer)

    def _metrics(self, request: Request) -> bytes:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST

        asked = [(worker.index, worker.pid) for worker in self._workers()]

        def answer(answers: list[Answer]) -> bytes:
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
            texts = self._scrapes.texts(
                (index, pid, got[1].decode("utf-8") if got is not None and got[0] == 200 else None)
                for (index, pid), got in zip(asked, answers, strict=True)
            )
            return merged_text(texts, self._registry)

        return self._later(request, self._ask(b"GET", b"/metrics"), answer)

    def _sessions(self, request: Request) -> bytes:
        workers = list(self._workers())

        def answer(answers: list[Answer]) -> bytes:
            listings = [
                (worker.pid, _loads(got[1]))
                for worker, got in zip(workers, answers, strict=True)
                if got is not None and got[0] == 200
            ]
            # The store's node id of each worker (None: the memory store).
            ours = {listing.get("node"): pid for pid, listing in listings}
            records, seen = [], set()
            for pid, listing in listings:
                node = listing.get("node")
                for record in listing.get("sessions", []):
                    holder = record.get("node")
                    if holder is not None and holder != node:
                        if holder in ours:
                            continue  # a sibling's: from the sibling's own answer
                        pid_of = None  # another node's
                    else:
                        pid_of = pid
                    if record["id"] in seen:
                        continue
                    seen.add(record["id"])
                    shown = {k: v for k, v in record.items() if k != "node"}
                    records.append({**shown, "worker": pid_of})
            return _json(request, sorted(records, key=lambda r: r["opened_at"]))

        return self._later(request, self._ask(b"GET", b"/sessions"), answer)

    def _close(self, request: Request) -> bytes:
        return self._closing(request, b"DELETE", request.uri, None)

    def _revoke(self, request: Request) -> bytes:
        content = request.content
        body = content.read(MAX_BODY + 1) if content is not None else b""
        if len(body) > MAX_BODY:
            return _error(request, 400)
        return self._closing(request, b"POST", b"/revocations", body)

    def _closing(self, request: Request, method: bytes, path: bytes, body: bytes | None) -> bytes:
        def answer(answers: list[Answer]) -> bytes:
            if any(got is not None and got[0] == 400 for got in answers):
                return _error(request, 400)
            if body is not None and any(got is not None and got[0] == 200 for got in answers):
                # Accepted: the workers started later get it too.
                self._kept.add(_loads(body))
            closed = sum(_loads(got[1]).get("closed", 0) for got in answers if got is not None)
            if any(got is None or got[0] != 200 for got in answers):
                request.setResponseCode(503)
                return _json(request, {"closed": closed, "error": "not every worker answered"})
            return _json(request, {"closed": closed})

        workers = list(self._workers())
        running = [w for w in workers if w.pid is not None]
        last = running[-1] if running else None
        first = [
            succeed(None) if w.pid is None else self._client.ask(w, method, path, body, local=True)
            for w in workers
            if w is not last
        ]

        def then(answers: list[tuple[bool, Answer]]) -> Deferred[list[Answer]]:
            told: Deferred[Answer] = (
                succeed(None) if last is None else self._client.ask(last, method, path, body)
            )

            def ordered(got: Answer) -> list[Answer]:
                others = iter(answer for _, answer in answers)
                return [got if w is last else next(others) for w in workers]

            return told.addCallback(ordered)

        asked: Deferred[Any] = DeferredList(first, consumeErrors=True)
        return self._later(request, asked.addCallback(then), answer)


def supervisor_site(
    client: WorkerClient,
    registry: CollectorRegistry,
    token_digest: bytes | None,
    kept: KeptRevocations,
) -> Site:
    """The supervisor's admin API as a site (no access log, as one process's)."""
    site = AdminSite(SupervisorAdmin(client, registry, token_digest, kept))
    site.displayTracebacks = False
    return site


def _loads(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
