"""
The admin API: a Twisted Web resource for operators, served on its own
listener (C{[admin] listen}, loopback by default).

Open to whoever reaches the listener: C{GET /healthz} (200 while serving),
C{GET /readyz} (200, or 503 with a JSON list of reasons, from the
factory's L{txwssec.readiness.Readiness}), C{GET /metrics} (Prometheus
text). With the admin token (C{Authorization: Bearer <token>}, compared as
its SHA-256 digest in constant time): C{GET /sessions}, C{DELETE
/sessions?consumer=NAME} or C{?id=ID}, C{POST /revocations}.

Answers: a missing or wrong token, 401 with C{WWW-Authenticate: Bearer};
no token configured, 403 on the endpoints that need one (never open by
default); a body that is not the expected JSON, 400; an unknown path, 404;
another method, 405. Bodies of errors are short and fixed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from txwssec.errors import ServiceUnavailable
from txwssec.ops.cluster import close_matching, kick, revoked

_log = Logger(namespace="txwssec.admin")

#: The largest request body read (a revocation is a few dozen bytes).
MAX_BODY = 4096

_FIXED = {
    400: b"bad request\n",
    401: b"unauthorized\n",
    403: b"admin token not configured\n",
    404: b"not found\n",
    405: b"method not allowed\n",
    503: b"state store unavailable\n",
}

#: Authorization scheme the token comes with.
_BEARER = b"bearer "


class BadRequest(Exception):
    """The request's query or body is not what the endpoint takes (400)."""


#: An endpoint: the body, or (with a shared state store) a Deferred of it.
Handler = Callable[[Request], "bytes | Deferred[bytes]"]


class AdminResource(Resource):
    """
    The admin API of one server factory (see the module docstring).

    @param factory: the server factory (its C{registry}, C{revocations},
        C{readiness} and state store).
    @param metrics: the registry C{/metrics} exposes (L{None}: 404).
    @param token_digest: the SHA-256 digest of the admin token, or L{None}.
    """

    isLeaf = True

    def __init__(
        self,
        factory: Any,
        metrics: CollectorRegistry | None = None,
        token_digest: bytes | None = None,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.metrics = metrics
        self.token_digest = token_digest
        self._routes: Mapping[bytes, Mapping[bytes, tuple[bool, Handler]]] = {
            b"/healthz": {b"GET": (False, self._healthz)},
            b"/readyz": {b"GET": (False, self._readyz)},
            b"/metrics": {b"GET": (False, self._metrics)},
            b"/sessions": {b"GET": (True, self._sessions), b"DELETE": (True, self._close)},
            b"/revocations": {b"POST": (True, self._revoke)},
        }

    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"cache-control", b"no-store")
        methods = self._routes.get(request.path)
        if methods is None or (request.path == b"/metrics" and self.metrics is None):
            return _error(request, 404)
        method = request.method
        if method == b"HEAD":
            method = b"GET"
        entry = methods.get(method)
        if entry is None:
            request.setHeader(b"allow", b", ".join(sorted(methods)))
            return _error(request, 405)
        needs_token, handler = entry
        if needs_token:
            if self.token_digest is None:
                return _error(request, 403)
            if not self._authorized(request):
                request.setHeader(b"www-authenticate", b'Bearer realm="wssec-admin"')
                return _error(request, 401)
        try:
            body = handler(request)
        except BadRequest:
            return _error(request, 400)
        except ServiceUnavailable:  # a shared state store that cannot answer
            return _error(request, 503)
        if isinstance(body, Deferred):
            _deliver(request, body)
            return NOT_DONE_YET
        return body

    def _authorized(self, request: Request) -> bool:
        header = request.getHeader(b"authorization")
        if header is None or header[: len(_BEARER)].lower() != _BEARER:
            return False
        token = header[len(_BEARER) :].strip()
        digest = hashlib.sha256(token).digest()
        assert self.token_digest is not None
        return hmac.compare_digest(digest, self.token_digest)

    def _tells_others(self, request: Request) -> bool:
        """
        Whether a close or revocation is told to the other nodes (a shared
        store): always, here; a worker's private API may be asked not to
        (L{txwssec.workers.worker.WorkerAdmin}).
        """
        return True

    # -- the endpoints -------------------------------------------------------

    def _healthz(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok\n"

    def _readyz(self, request: Request) -> bytes:
        reasons = self.factory.readiness.reasons()
        if reasons:
            request.setResponseCode(503)
            return _json(request, {"ready": False, "reasons": reasons})
        return _json(request, {"ready": True, "reasons": []})

    def _metrics(self, request: Request) -> bytes:
        assert self.metrics is not None
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.metrics)

    def _sessions(self, request: Request) -> bytes | Deferred[bytes]:
        def listed(records: list[Mapping[str, Any]]) -> bytes:
            # Without the node a shared store records (an implementation detail).
            listing = [{k: v for k, v in r.items() if k != "node"} for r in records]
            return _json(request, sorted(listing, key=lambda r: r["opened_at"]))

        records = self.factory.admission.store.sessions()
        if isinstance(records, Deferred):
            return records.addCallback(listed)
        return listed(records)

    def _close(self, request: Request) -> bytes | Deferred[bytes]:
        args = request.args or {}
        consumer, session_id = _one(args, b"consumer"), _one(args, b"id")
        if (consumer is None) == (session_id is None) or set(args) - {b"consumer", b"id"}:
            raise BadRequest()
        closed = self.factory.registry.revoke(consumer=consumer, session_id=session_id)
        if not self._tells_others(request):
            return _json(request, {"closed": closed})
        # The other nodes' sessions too (a shared store); "closed" counts this node's.
        return _then(kick(self.factory.admission.store, consumer, session_id), request, closed)

    def _revoke(self, request: Request) -> bytes | Deferred[bytes]:
        body = _body(request)
        revocations = self.factory.revocations
        keys = set(body)
        if keys == {"jti", "expires_at"}:
            jti, expires_at = body["jti"], _time(body["expires_at"])
            if not isinstance(jti, str) or not jti:
                raise BadRequest()
            stored = revocations.revoke_token(jti, expires_at)
            revocation: dict[str, Any] = {"jti": jti}
        elif keys == {"consumer", "issued_before"}:
            consumer, issued_before = body["consumer"], _time(body["issued_before"])
            if not isinstance(consumer, str) or not consumer:
                raise BadRequest()
            stored = revocations.revoke_consumer(consumer, issued_before)
            revocation = {"consumer": consumer, "issued_before": issued_before}
        else:
            raise BadRequest()
        store = self.factory.admission.store

        def close(_: object = None) -> bytes | Deferred[bytes]:
            closed = close_matching(self.factory.registry, **revocation)
            if not self._tells_others(request):
                return _json(request, {"closed": closed})
            return _then(revoked(store, **revocation), request, closed)

        if isinstance(stored, Deferred):
            closing: Deferred[bytes] = stored.addCallback(close)
            return closing
        return close()


def _then(published: object, request: Request, closed: int) -> bytes | Deferred[bytes]:
    """C{{"closed": N}}, once C{published} (told to the other nodes) if it is a L{Deferred}."""
    if isinstance(published, Deferred):
        answered: Deferred[bytes] = published.addCallback(
            lambda _: _json(request, {"closed": closed})
        )
        return answered
    return _json(request, {"closed": closed})


def _deliver(request: Request, body: Deferred[bytes]) -> None:
    """Answer C{request} with C{body} once it is there: 503 if the shared store failed it."""
    gone: list[object] = []
    request.notifyFinish().addBoth(gone.append)

    def failed(failure: Failure) -> bytes:
        if not failure.check(ServiceUnavailable):
            _log.failure("admin API endpoint failed", failure)
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"internal error\n"
        return _error(request, 503)

    def answer(data: bytes) -> None:
        if not gone:
            request.write(data)
            request.finish()

    body.addErrback(failed).addCallback(answer)


def _error(request: Request, status: int) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    return _FIXED[status]


def _json(request: Request, value: Any) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, separators=(",", ":")).encode("utf-8") + b"\n"


def _one(args: Mapping[bytes, list[bytes]], name: bytes) -> str | None:
    values = args.get(name)
    if values is None:
        return None
    if len(values) != 1 or not values[0]:
        raise BadRequest()
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest() from None


def _body(request: Request) -> dict[str, Any]:
    content = request.content
    data = content.read(MAX_BODY + 1) if content is not None else b""
    if len(data) > MAX_BODY:
        raise BadRequest()
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise BadRequest() from None
    if not isinstance(value, dict):
        raise BadRequest()
    return value


def _time(value: object) -> float:
    """A POSIX time: a finite JSON number, not a boolean."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest()
    try:
        number = float(value)
    except OverflowError:
        raise BadRequest() from None
    if not math.isfinite(number):
        raise BadRequest()
    return number


class AdminSite(Site):
    """
    A L{Site} for L{AdminResource} that writes no access log line (a
    scraper every few seconds would fill the log).
    """

    noisy = False

    def log(self, request: Any) -> None:
        """No access log."""


def admin_site(
    factory: Any, metrics: CollectorRegistry | None = None, token_digest: bytes | None = None
) -> AdminSite:
    """The admin API of C{factory} as a site to listen with."""
    site = AdminSite(AdminResource(factory, metrics, token_digest))
    site.displayTracebacks = False
    return site


def token_digest(token: str) -> bytes:
    """The digest C{[admin] token} holds for C{token} (C{"sha256:" + hex})."""
    return hashlib.sha256(token.encode("utf-8")).digest()
