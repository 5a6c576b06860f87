"""
A lean reader for the common, well-formed upgrade request (issue 19,
"Server hot paths, round 2" in bench/RESULTS.md).

Autobahn's C{processHandshake} parses the header block, then txwssec's
pipeline parses it again (every line, duplicates kept), and Autobahn runs
C{onConnect} through C{txaio.as_future} and a Deferred's callbacks even
when it answers at once. L{UpgradeReader.readUpgrade} parses the block
once, for both, and calls C{onConnect} and C{succeedHandshake} directly
when the pipeline answers synchronously (a Deferred still gets Autobahn's
callbacks).

It only takes a request it can prove Autobahn would accept as it stands:
C{GET} of an origin-form target (no fragment, no C{;}, no C{//}) over
C{HTTP/1.1}, printable ASCII in the request line, strict C{name: value}
header lines without control characters, one C{Host} (a valid port if any),
C{Upgrade: websocket}, C{Connection: upgrade}, one C{Sec-WebSocket-Version:
13}, one valid C{Sec-WebSocket-Key}, at most one C{Origin} and
C{Sec-WebSocket-Extensions}, no repeated subprotocol. Anything else is left
to Autobahn's own reader (L{False}), which answers it exactly as before:
every status and reason of a malformed handshake comes from the same code
as without this reader.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs

from autobahn.websocket.protocol import _is_same_origin, _url_to_origin
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.logger import Logger
from twisted.python.failure import Failure

from txwssec._defer import is_deferred

_log = Logger()

#: Characters no header line may hold (tab is allowed in values), including
#: the ones str.splitlines() breaks lines on (\x0b, \x0c, \x1c-\x1e, \x85),
#: and CR or LF anywhere but together, ending a line.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\x85]|\r(?!\n)|(?<!\r)\n")

#: The same characters in a block whose CRLF pairs were removed: any CR or
#: LF left was not part of a pair (one character class: a faster search).
_CONTROL_OUTSIDE_CRLF = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85]")

#: An HTTP field name (RFC 9110 section 5.1: a token).
_FIELD_NAME = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"

#: A block of header lines, each C{name: value} and its CRLF (control
#: characters are refused before this is tried).
HEADER_BLOCK = re.compile(rf"(?:{_FIELD_NAME}:[^\r]*\r\n)*")

#: One header line's name and value.
HEADER_LINE = re.compile(rf"({_FIELD_NAME}):([^\r]*)\r\n")

#: The request line this reader takes: C{GET}, an origin-form path of
#: printable ASCII without C{#} or C{;} (which Autobahn's C{urlparse} would
#: split off) and not starting with C{//} (a network path), an optional
#: query without C{#}, C{HTTP/1.1}.
_REQUEST_LINE = re.compile(
    r"GET (/(?!/)[\x21\x22\x24-\x3a\x3c-\x3e\x40-\x7e]*)(?:\?([\x21\x22\x24-\x7e]*))? HTTP/1\.1"
)

#: A Sec-WebSocket-Key as Autobahn checks it: 22 base64 characters and "==".
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")


def _origin_of(origin: str) -> Any:
    """
    Autobahn's C{_url_to_origin}, remembered for the last L{_ORIGINS_KEPT}
    origins (a browser application's clients send the same few): L{None}
    for one it refuses.
    """
    found = _origins.get(origin, _UNKNOWN)
    if found is _UNKNOWN:
        try:
            found = _url_to_origin(origin)
        except ValueError:
            found = None
        if len(_origins) >= _ORIGINS_KEPT:
            _origins.clear()
        _origins[origin] = found
    return found


_UNKNOWN = object()
#: At most this many origins remembered (then forgotten all at once).
_ORIGINS_KEPT = 256
_origins: dict[str, Any] = {}


class UpgradeReader:
    """
    A mixin for L{txwssec.server.handshake.HandshakeIO} (before Autobahn's
    protocol in the bases): L{readUpgrade}.
    """

    #: The request's header lines (names lower-cased, values stripped), when
    #: this reader parsed them (L{None}: Autobahn did, see handshakeRequest).
    _headerLines: tuple[tuple[str, str], ...] | None = None

    # Autobahn's protocol, as this reader uses it.
    data: bytes
    factory: Any
    versions: list[int]
    maxConnections: int
    trustXForwardedFor: int
    allowedOriginsPatterns: Any
    log: Any

    def readUpgrade(self, end: int) -> bool:
        """
        Read the complete request head C{self.data[:end]} (C{end} is where
        its final CRLFCRLF starts) and answer it, as Autobahn's
        C{processHandshake} would, if it is an ordinary upgrade request.

        @return: L{False} (nothing done) for any other request: Autobahn's
            reader must read it.
        """
        protocol: Any = self
        data = self.data
        head = data[:end].decode("iso-8859-1")
        first = head.find("\r\n")
        if first < 0:
            return False  # no header line at all: no Host
        line = _REQUEST_LINE.fullmatch(head, 0, first)
        if line is None:
            return False
        block = head[first + 2 :] + "\r\n"
        if _CONTROL_OUTSIDE_CRLF.search(block.replace("\r\n", "")):
            return False

        # Autobahn's header dictionary (repeated names joined, counted) and
        # txwssec's lines (every one kept, in order), in one pass.
        headers: dict[str, str] = {}
        #: Names seen on more than one line.
        repeated: set[str] = set()
        lines = []
        # The lines found must cover the whole block (HEADER_BLOCK): each
        # match is "name:value\r\n", and findall skips what does not match.
        covered = 0
        for name, raw in HEADER_LINE.findall(block):
            covered += len(name) + len(raw) + 3
            key = name.lower()
            value = raw.strip(" \t")
            lines.append((key, value))
            if key in headers:
                headers[key] += f", {value}"
                repeated.add(key)
            else:
                headers[key] = value
        if covered != len(block):
            return False  # a line that is not "name: value"

        # Host: once, with a valid port if it has one.
        if "host" not in headers or "host" in repeated:
            return False
        host = headers["host"].strip()
        if host.find(":") >= 0 and not host.endswith("]"):
            if self.factory.externalPort:
                return False
            host, port = host.rsplit(":", 1)
            try:
                int(str(port.strip()))
            except ValueError:
                return False

        # Upgrade: websocket; Connection: upgrade; version 13, once.
        upgrade = headers.get("upgrade")
        if upgrade is None or (
            upgrade.lower() != "websocket"
            and not any(token.strip().lower() == "websocket" for token in upgrade.split(","))
        ):
            return False
        connection = headers.get("connection")
        if connection is None or (
            connection.lower() != "upgrade"
            and not any(token.strip().lower() == "upgrade" for token in connection.split(","))
        ):
            return False
        if headers.get("sec-websocket-version") != "13" or "sec-websocket-version" in repeated:
            return False
        if 13 not in self.versions:
            return False

        # Subprotocols, without a repeated one.
        protocols: list[str] = []
        offered = headers.get("sec-websocket-protocol")
        if offered is not None:
            protocols = [str(entry.strip()) for entry in offered.split(",")]
            if len(set(protocols)) != len(protocols):
                return False

        # Origin (RFC 6455): at most once, and allowed by Autobahn's own
        # patterns (txwssec's Origin policy decides in the pipeline).
        origin = ""
        if "origin" in headers:
            if "origin" in repeated:
                return False
            origin = headers["origin"].strip()
            origin_tuple = _origin_of(origin)
            if origin_tuple is None:
                return False
            factory = self.factory
            if not (origin_tuple == "null" and factory.allowNullOrigin) and not _is_same_origin(
                origin_tuple,
                "https" if factory.isSecure else "http",
                factory.externalPort or factory.port,
                self.allowedOriginsPatterns,
            ):
                return False

        # Sec-WebSocket-Key: once, 16 bytes in base64.
        if "sec-websocket-key" not in headers or "sec-websocket-key" in repeated:
            return False
        key = headers["sec-websocket-key"].strip()
        if not _KEY.fullmatch(key):
            return False

        extensions: list[Any] = []
        if "sec-websocket-extensions" in headers:
            if "sec-websocket-extensions" in repeated:
                return False
            extensions = protocol._parseExtensionsHeader(headers["sec-websocket-extensions"])

        if self.maxConnections > 0 and self.factory.countConnections > self.maxConnections:
            return False  # Autobahn's 503
        if self.trustXForwardedFor and "x-forwarded-for" in headers:
            return False  # Autobahn replaces the peer

        # Taken: the state Autobahn's reader leaves, then onConnect.
        path, query = line.group(1), line.group(2)
        self.http_request_data = data[: end + 4]
        self.http_status_line = head[:first]
        self.http_headers = headers
        self.http_request_uri = head[4 : first - 9]
        self.http_request_path = path
        self.http_request_params = parse_qs(query) if query else {}
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = protocols
        self.websocket_origin = origin
        self.websocket_extensions = extensions
        self._headerLines = tuple(lines)
        self.data = data[end + 4 :]
        self._wskey = key
        request = ConnectionRequest(
            protocol.peer,
            headers,
            host,
            path,
            self.http_request_params,
            13,
            origin,
            protocols,
            extensions,
        )
        self._callOnConnect(request)
        return True

    def _callOnConnect(self, request: ConnectionRequest) -> None:
        """
        C{onConnect}, then C{succeedHandshake} or the refusal, as Autobahn
        chains them (C{txaio.as_future}, callbacks), directly when
        C{onConnect} answers at once.
        """
        protocol: Any = self
        try:
            result = protocol.onConnect(request)
        except Exception as error:
            self._onConnectFailed(error)
            return
        if is_deferred(result):
            result.addCallbacks(protocol.succeedHandshake, self._forwardError)
            return
        try:
            protocol.succeedHandshake(result)
        except Exception:
            # Autobahn's callback chain would leave this failure in its
            # Deferred (logged as unhandled when collected): logged here.
            _log.failure("Unhandled error in the opening handshake's response")

    def _forwardError(self, failure: Failure) -> None:
        error: Any = failure.value
        self._onConnectFailed(error, failure)

    def _onConnectFailed(self, error: BaseException, failure: Failure | None = None) -> None:
        # Autobahn's forward_error.
        protocol: Any = self
        if isinstance(error, ConnectionDeny):
            protocol.failHandshake(error.reason, error.code)
            return
        if failure is None:
            failure = Failure()
        self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
        self.log.warn("{tb}", tb=failure.getTraceback())
        protocol.failHandshake(
            f"Internal server error: {error}", ConnectionDeny.INTERNAL_SERVER_ERROR
        )
