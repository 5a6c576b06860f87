"""
The secure client: an Autobahn client factory and protocol that attach
credentials the way a txwssec server expects them, verify wss:// servers
with service_identity, and report expired credentials as their own event.

    factory = SecureClientFactory(
        "wss://ws.example.com/echo",
        credentials=ApiKey("my-key"),
        tls=ClientTLS(ca_file="ca.pem"),
    )
    factory.protocol = MyProtocol
    protocol = await factory.connect()
    await protocol.opened

About 500 lines: the credentials helpers, one protocol (with its in-band
refresh, see L{SecureClientFactory}'s C{refresh}) and its factory, which
read best together.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from inspect import iscoroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import txaio
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.protocol import WebSocketProtocol
from autobahn.websocket.types import ConnectingRequest, ConnectionResponse
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from txwssec._autobahn import (
    cancel_close_timer,
    connection_lost_quietly,
    copy_options_at_once,
)
from txwssec._cycles import FiredWithProtocol
from txwssec._hooks import OpenOnly, run_hook, transport_details
from txwssec._reactor import default_reactor
from txwssec._timers import ExactTimers
from txwssec._wire import set_no_delay
from txwssec.errors import CloseCode
from txwssec.messages import sealing
from txwssec.policy import DEFAULT_MAX_MESSAGE_SIZE
from txwssec.refresh import MIN_INTERVAL, REASONS, is_notice
from txwssec.tls import (
    HTTP_1_1,
    ChainVerificationError,
    VerifyingClientTLS,
    chain_failure,
    restrict_groups,
)

#: The client's own events. A module-level logger: a L{Logger} class
#: attribute would take the (sub)class's name as its namespace instead.
log = Logger(namespace="txwssec.client")


@dataclass(frozen=True)
class Credentials:
    """
    What a client sends to authenticate: headers, C{Sec-WebSocket-Protocol}
    entries (after the application's), and query parameters.
    """

    headers: tuple[tuple[str, str], ...] = ()
    subprotocols: tuple[str, ...] = ()
    query: tuple[tuple[str, str], ...] = ()


def ApiKey(
    key: str,
    *,
    via: str = "header",
    header: str = "apikey",
    marker: str = "token",
    parameter: str = "apikey",
) -> Credentials:
    """
    An API key, sent in a header (default), in C{Sec-WebSocket-Protocol}
    as C{token, <key>} (C{via="subprotocol"}, as a browser would), or in the
    query string (C{via="query"}; only if the server enabled it).
    """
    return _carried(key, via, header, key, marker, parameter)


def BearerToken(
    token: str,
    *,
    via: str = "header",
    header: str = "Authorization",
    marker: str = "bearer",
    parameter: str = "access_token",
) -> Credentials:
    """
    A JWT (or other bearer token): C{Authorization: Bearer <token>} by
    default, or C{Sec-WebSocket-Protocol: bearer, <token>}, or a query
    parameter.
    """
    value = f"Bearer {token}" if header.lower() == "authorization" else token
    return _carried(token, via, header, value, marker, parameter)


def BasicCredentials(user: str, password: str) -> Credentials:
    """HTTP Basic credentials."""
    encoded = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return Credentials(headers=(("Authorization", f"Basic {encoded}"),))


def _carried(
    secret: str, via: str, header: str, header_value: str, marker: str, parameter: str
) -> Credentials:
    if via == "header":
        return Credentials(headers=((header, header_value),))
    if via == "subprotocol":
        return Credentials(subprotocols=(marker, secret))
    if via == "query":
        return Credentials(query=((parameter, secret),))
    raise ValueError(f'via must be "header", "subprotocol" or "query", not {via!r}')


class ResponseHeadTooLarge(ConnectionError):
    """
    The server's handshake response head (status line and headers) is over
    the factory's C{max_header_bytes}: the connection was dropped unread.
    """


@dataclass(frozen=True)
class ClientTLS:
    """
    How to check a wss:// server, and the client certificate to present.

    @ivar ca_file: PEM bundle of CAs to trust instead of the system's.
    @ivar client_cert: PEM file with the client certificate (mutual TLS).
    @ivar client_key: PEM file with its private key (may be C{client_cert}).
    @ivar hostname: the name to verify, when it differs from the URL's host.
    @ivar insecure: skip verification. Never the default; logged as a
        warning on every connection.
    """

    ca_file: Path | str | None = None
    client_cert: Path | str | None = None
    client_key: Path | str | None = None
    hostname: str | None = None
    insecure: bool = False


# (mypy: Autobahn's own bases disagree on two names, seen with a second base.)
class SecureClientProtocol(OpenOnly, WebSocketClientProtocol):  # type: ignore[misc]
    """
    A WebSocket client protocol with two Deferreds and an expiry hook:

      - C{opened} fires (with the protocol) when the WebSocket is open;
      - C{closed} fires with C{(wasClean, code, reason)} when it ends;
      - L{onCredentialsExpired} is called when the server closes with 3000.

    Override C{onOpen}, C{onMessage} and C{onClose} as usual.
    """

    factory: SecureClientFactory
    _lostReason: Failure | None = None
    #: Autobahn's logger pinned at "info": its debug lines quote the
    #: handshake this client sends, credentials included.
    log = txaio.make_logger(level="info")  # type: ignore[attr-defined]
    #: Empty: the options are copied by L{_connectionMade} (see copy_options_at_once).
    CONFIG_ATTRS: list[str] = []
    _closeReceived: bool = False
    #: How much of the response head was searched for its end already.
    _headSearched: int = 0
    #: Why the WebSocket never opened, when txwssec decided it.
    _openingFailure: ConnectionError | None = None
    #: The credential of the last refresh sent (retried once if rate-limited).
    _refreshSent: str | None = None
    #: Deferreds that fire with this protocol, forgotten once fired and the
    #: connection is lost (see L{txwssec._cycles}).
    opened = FiredWithProtocol()
    is_closed = FiredWithProtocol()
    #: A sealed session (C{seal_key}): the handshake until the server's
    #: hello, then the session (see L{txwssec.messages.sealing}).
    _sealHandshake: sealing.ClientHandshake | None = None
    _seal: sealing.SealedSession | None = None

    def __init__(self) -> None:
        super().__init__()
        self.opened = Deferred()
        self.closed: Deferred[tuple[bool, int | None, str | None]] = Deferred()

    def _connectionMade(self) -> None:
        copy_options_at_once(self, WebSocketClientProtocol.CONFIG_ATTRS)
        # Autobahn's connectionMade sets it before the options are copied
        # (an AttributeError it ignores): see _wire.no_delay.
        set_no_delay(self)
        super()._connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        cancel_close_timer(self)
        if isinstance(reason.value, SSL.Error):
            # OpenSSL's error says only "certificate verify failed": say why.
            handle = getattr(self.transport, "getHandle", lambda: None)()
            why = chain_failure(handle)
            if why is not None:
                why.__cause__ = reason.value
                reason = Failure(why)
        self._lostReason = reason
        connection_lost_quietly(self, reason, WebSocketClientProtocol)
        SecureClientProtocol.opened.release(self)
        SecureClientProtocol.is_closed.release(self)

    def _connectionLost(self, reason: Any) -> None:
        # Autobahn's client _connectionLost without its debug line, which
        # formats the failure's traceback (hlval(reason)) whatever the level.
        WebSocketProtocol._connectionLost(self, reason)

    def dataReceived(self, data: bytes) -> None:
        # Autobahn's dataReceived formats its debug line's arguments (hltype,
        # hlval) on every read, whatever the log level, then does this.
        try:
            self._dataReceived(data)
        except Exception:
            self._applicationFailed("dataReceived", Failure())

    def onConnecting(self, transport_details: Any) -> ConnectingRequest | None:
        """
        The request's options: with C{seal_key}, a fresh offer (key id and
        nonce) after C{wssec.sealed.v1} for each connection.
        """
        factory = self.factory
        if factory.seal_key is None:
            return None
        self._sealHandshake = handshake = sealing.ClientHandshake(
            factory.seal_key, urlsplit(factory.url).path or "/"
        )
        # sendMessage sends nothing until the server's hello is checked.
        self._outgoing = _unsent
        protocols = list(factory.protocols)
        protocols.insert(protocols.index(sealing.PROTOCOL) + 1, handshake.offer)
        return ConnectingRequest(
            host=factory.host,
            port=factory.port,
            resource=factory.resource,
            headers=factory.headers,
            useragent=factory.useragent,
            origin=factory.origin,
            protocols=protocols,
        )

    def processHandshake(self) -> None:
        """
        Wait for the server's whole response head, searching only the bytes
        that are new, and at most C{factory.max_header_bytes} of it: a server
        that sends an endless head fails the connection with
        L{ResponseHeadTooLarge} instead of filling memory until the timeout.
        """
        data = self.data
        limit = self.factory.max_header_bytes
        end = data.find(b"\r\n\r\n", max(0, self._headSearched - 3))
        if end < 0:
            self._headSearched = len(data)
            if len(data) <= limit + 3:
                return
            end = len(data)
        if end > limit:
            error = ResponseHeadTooLarge(f"response head over {limit} bytes (max_header_bytes)")
            self._openingFailure = error
            self.failHandshake(str(error))
            return
        super().processHandshake()

    def _onOpen(self) -> None:
        if self._sealHandshake is not None:
            if self.websocket_protocol_in_use != sealing.PROTOCOL:
                log.warn("server did not answer {protocol}: closing", protocol=sealing.PROTOCOL)
                self._failSealed(_PROTOCOL_ERROR, "sealing refused")
            return  # opened once the server's hello is checked (_onMessage)
        self._opened()

    def _opened(self) -> None:
        transport_details(self)
        run_hook(self, "onOpen", self.onOpen)
        if not self.opened.called:
            self.opened.callback(self)

    def _onPing(self, payload: bytes) -> None:
        run_hook(self, "onPing", self.onPing, payload)

    def _onPong(self, payload: bytes) -> None:
        run_hook(self, "onPong", self.onPong, payload)

    def _applicationFailed(self, hook: str, failure: Failure) -> None:
        """
        The application's C{hook} raised, or its coroutine or L{Deferred}
        failed: log it once, with the traceback, and close this connection
        with 1011 (an error in C{onClose} or C{onCredentialsExpired}, which
        run once it is closed, is only logged).
        """
        log.failure(
            "error in {hook} on {route} for {peer}",
            failure,
            hook=hook,
            route=urlsplit(self.factory.url).path or "/",
            peer=self.peer,
        )
        if hook in ("onClose", "onCredentialsExpired"):
            return
        self._internalError()

    def onCloseFrame(self, code: Any, reasonRaw: Any) -> bool:
        self._closeReceived = True
        return bool(super().onCloseFrame(code, reasonRaw))

    def _onMessage(self, payload: bytes, isBinary: bool) -> None:
        # The server's Close is its last frame (RFC 6455 section 5.5.1): a
        # message after it is ignored (Autobahn case 7.1.4). Autobahn would
        # deliver it, and an onMessage that answers raises Disconnected,
        # which drops the connection before the close reply is written.
        if self._closeReceived:
            return
        handshake = self._sealHandshake
        if handshake is _SEAL_FAILED:
            return
        if handshake is not None:
            try:
                if self._seal is None:
                    self._seal = handshake.accept_hello(payload, isBinary)
                    self._outgoing = self._seal.outgoing
                    self._opened()
                    return
                payload, isBinary = self._seal.unseal(payload, isBinary)
            except sealing.SealError as error:
                log.warn("sealed message rejected: {check}", check=str(error))
                self._failSealed(sealing.CLOSE_CODE, sealing.CLOSE_REASON)
                return
        if self.factory.refresh is not None and not isBinary and is_notice(payload):
            # The server's refresh messages, when this client refreshes.
            run_hook(self, "refresh", self._refreshNotice, payload)
            return
        run_hook(self, "onMessage", self.onMessage, payload, isBinary)

    def _failSealed(self, code: int, reason: str) -> None:
        # Nothing more is opened or sent: the session's keys are forgotten.
        self._sealHandshake = _SEAL_FAILED
        self._seal = None
        self._outgoing = _unsent
        self._fail_connection(code, reason)

    async def _refreshNotice(self, payload: bytes) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            message = {}
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "wssec.expiring":
            callback: Any = self.factory.refresh
            try:
                credential = callback()
                if isinstance(credential, Deferred) or iscoroutine(credential):
                    credential = await credential
            except Exception:
                # The session goes on until it expires (3000).
                log.failure("the refresh callback failed")
                return
            self.refresh(credential)
        elif kind == "wssec.refreshed":
            self.onRefreshed(message.get("expires_at"))
        elif kind == "wssec.refresh_rejected":
            reason = str(message.get("reason"))
            credential = self._refreshSent
            if reason == REASONS["rate_limited"] and credential is not None:
                # Sent within a second of the last one: once more, later.
                self._refreshSent = None
                self.factory.reactor.callLater(MIN_INTERVAL, self.refresh, credential)
                return
            self.onRefreshRejected(reason)

    def refresh(self, credential: str) -> bool:
        """
        Send C{credential} to the server in a C{wssec.refresh} message (a
        route with C{refresh = true}); the answer arrives as
        L{onRefreshed} or L{onRefreshRejected} when the factory has a
        C{refresh} callback, else as an ordinary message.

        @return: whether it was sent (the connection was open).
        """
        self._refreshSent = credential
        message = json.dumps({"type": "wssec.refresh", "token": credential})
        return self.sendMessage(message.encode())

    def onRefreshed(self, expires_at: float | None) -> None:
        """The server accepted a refresh: the session now ends at C{expires_at}."""
        log.info("session refreshed until {expires_at}", expires_at=expires_at)

    def onRefreshRejected(self, reason: str) -> None:
        """The server rejected a refresh (C{reason}: its fixed text); the session is as it was."""
        log.warn("refresh rejected: {reason}", reason=reason)

    def _onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        try:
            if code == CloseCode.CREDENTIALS_EXPIRED:
                run_hook(self, "onCredentialsExpired", self.onCredentialsExpired)
            run_hook(self, "onClose", self.onClose, wasClean, code, reason)
        finally:
            if not self.opened.called:
                self.opened.errback(Failure(self._openingError(reason)))
            if not self.closed.called:
                self.closed.callback((wasClean, code, reason))

    def _openingError(self, reason: str | None) -> ConnectionError:
        """
        Why the WebSocket never opened. A failed TLS verification is named as
        such (Autobahn would say the peer dropped the connection) and is the
        error's C{__cause__}.
        """
        if self._openingFailure is not None:
            return self._openingFailure
        cause = self._lostReason.value if self._lostReason is not None else None
        if isinstance(cause, (VerificationError, CertificateError)):
            reason = (
                "TLS verification failed: the server certificate is not valid for "
                f"{self.factory.tls.hostname or self.factory.host} ({cause})"
            )
        elif isinstance(cause, ChainVerificationError):
            reason = f"TLS verification failed: certificate verify failed: {cause}"
        error = ConnectionError(f"connection closed before opening: {reason}")
        if isinstance(cause, (VerificationError, CertificateError, SSL.Error)):
            error.__cause__ = cause
        return error

    def onCredentialsExpired(self) -> None:
        """
        The server ended the session because its credentials expired (3000).
        By default this calls the factory's C{on_credentials_expired}, if
        any; override it to fetch a new token and reconnect.
        """
        callback = self.factory.on_credentials_expired
        if callback is not None:
            callback(self)

    def onConnect(self, response: ConnectionResponse) -> None:
        """Remember the server's answer (subprotocol, headers)."""
        self.response = response


class SecureClientFactory(WebSocketClientFactory):
    """
    A WebSocket client factory for txwssec (or any secure) servers.

    @param url: C{ws://} or C{wss://} URL.
    @param credentials: from L{ApiKey}, L{BearerToken}, L{BasicCredentials}.
    @param subprotocols: application subprotocols, preferred first; a
        credential carried in C{Sec-WebSocket-Protocol} comes after them.
    @param tls: server verification and client certificate for wss://.
    @param max_message_size: largest message accepted from the server.
    @param max_header_bytes: largest handshake response head (status line
        and headers) accepted from the server; beyond, the connection fails
        with L{ResponseHeadTooLarge}.
    @param on_credentials_expired: called with the protocol on close 3000.
    @param seal_key: a consumer's seal key (32 bytes, or C{"base64:..."}):
        offer C{wssec.sealed.v1} and seal every message (docs/sealed-v1.md).
        The connection opens once the server's hello is checked; a server
        that does not answer C{wssec.sealed.v1} is closed with 1002, a
        message that does not open with 1007.
    @param refresh: called with no argument when the server sends
        C{wssec.expiring} (a route with C{refresh = true}); returns the new
        credential (a C{str}, or a coroutine or L{Deferred} of one), which
        the protocol sends in a C{wssec.refresh} message. The server's
        answers then go to L{SecureClientProtocol.onRefreshed} and
        L{SecureClientProtocol.onRefreshRejected}, not to C{onMessage}.
    """

    protocol = SecureClientProtocol  # type: ignore[assignment]
    #: Seconds after which whoever made the connection abandons it if the
    #: WebSocket is not open yet (the gateway's upstream attempt sets it:
    #: L{txwssec.gateway.upstream.open_upstream}); L{None}: nobody does. A
    #: protocol may then leave out an opening-handshake timer that could
    #: never fire first.
    attemptTimeout: float | None = None

    def __init__(
        self,
        url: str,
        credentials: Credentials | None = None,
        *,
        subprotocols: Sequence[str] = (),
        tls: ClientTLS | None = None,
        origin: str | None = None,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        handshake_timeout: float = 10,
        max_header_bytes: int = 16384,
        on_credentials_expired: Any = None,
        seal_key: bytes | str | None = None,
        refresh: Callable[[], Any] | None = None,
        reactor: Any = None,
    ) -> None:
        credentials = credentials or Credentials()
        url = _with_query(url, credentials.query)
        if isinstance(seal_key, str):
            seal_key = sealing.parse_key(seal_key)
        if seal_key is not None and len(seal_key) != sealing.KEY_BYTES:
            raise ValueError(f"seal_key must be {sealing.KEY_BYTES} bytes")
        #: The seal key, if any (never shown).
        self.seal_key: bytes | None = seal_key
        sealed = [sealing.PROTOCOL] if seal_key is not None else []
        super().__init__(
            url,
            origin=origin,
            protocols=[*subprotocols, *sealed, *credentials.subprotocols],
            headers=dict(credentials.headers),
            reactor=reactor or default_reactor(),
        )
        self.setProtocolOptions(
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            openHandshakeTimeout=handshake_timeout,
            closeHandshakeTimeout=1,
            failByDrop=False,
        )
        # Exact handshake timeouts (txaio's batched timer rounds to seconds).
        self._batched_timer = ExactTimers()
        self.tls = tls or ClientTLS()
        self.max_header_bytes = max_header_bytes
        self.on_credentials_expired = on_credentials_expired
        self.refresh = refresh

    def endpoint(self) -> IStreamClientEndpoint:
        """The client endpoint: TCP, wrapped in verified TLS for wss://."""
        tcp: IStreamClientEndpoint
        if isIPAddress(self.host):
            # No name to resolve (HostnameEndpoint would still use a thread).
            tcp = TCP4ClientEndpoint(self.reactor, self.host, self.port)
        elif isIPv6Address(self.host):
            tcp = TCP6ClientEndpoint(self.reactor, self.host, self.port)
        else:
            tcp = HostnameEndpoint(self.reactor, self.host, self.port)
        if not self.isSecure:
            return tcp
        return wrapClientTLS(self.tls_options(), tcp)

    def tls_options(self) -> Any:
        """
        Client TLS options: hostname or IP address verified with
        service_identity against the system's CAs or C{tls.ca_file}, any
        failure failing the handshake (see L{VerifyingClientTLS}); ALPN
        offers C{http/1.1} only (a WebSocket is an HTTP/1.1 upgrade).
        """
        tls = self.tls
        client_certificate = None
        if tls.client_cert is not None:
            cert_pem = Path(tls.client_cert).read_bytes()
            key_pem = Path(tls.client_key or tls.client_cert).read_bytes()
            client_certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        if tls.insecure:
            log.warn(
                "TLS verification is OFF for {url}: anyone on the path can read and "
                "change this connection",
                url=urlsplit(self.url)._replace(query="").geturl(),
            )
            extra: dict[str, Any] = {}
            if client_certificate is not None:
                extra = {
                    "privateKey": client_certificate.privateKey.original,
                    "certificate": client_certificate.original,
                }
            options = ssl.CertificateOptions(verify=False, acceptableProtocols=[HTTP_1_1], **extra)
            restrict_groups(options.getContext())
            return options
        trust_root: Any = None
        if tls.ca_file is not None:
            trust_root = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(pem) for pem in _pem_blocks(Path(tls.ca_file))]
            )
        return VerifyingClientTLS(tls.hostname or self.host, trust_root, client_certificate)

    def connect(self) -> Deferred[SecureClientProtocol]:
        """
        Connect; fires with the protocol once TCP (and TLS) is up. Wait on
        C{protocol.opened} for the WebSocket handshake.
        """
        return self.endpoint().connect(self)  # type: ignore[return-value]


def _unsent(payload: bytes, isBinary: bool) -> None:
    """The C{_outgoing} hook of a sealed session that cannot send (yet)."""
    return None


#: After a sealed message failed to open: nothing more is opened.
_SEAL_FAILED = sealing.ClientHandshake(bytes(sealing.KEY_BYTES), "/")
#: RFC 6455's close code for a protocol error.
_PROTOCOL_ERROR = 1002


def _with_query(url: str, query: tuple[tuple[str, str], ...]) -> str:
    if not query:
        return url
    parts = urlsplit(url)
    extra = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in query)
    joined = f"{parts.query}&{extra}" if parts.query else extra
    return parts._replace(query=joined).geturl()


def _pem_blocks(path: Path) -> list[bytes]:
    text = path.read_bytes()
    marker = b"-----END CERTIFICATE-----"
    return [block + marker for block in text.split(marker) if b"-----BEGIN" in block]


__all__ = [
    "ApiKey",
    "BasicCredentials",
    "BearerToken",
    "ClientTLS",
    "Credentials",
    "ResponseHeadTooLarge",
    "SecureClientFactory",
    "SecureClientProtocol",
]
