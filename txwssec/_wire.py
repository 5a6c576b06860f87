"""
Cheaper frame reading for Autobahn protocols: the server's receive path
(issue 19, "Server hot paths" in bench/RESULTS.md).

Autobahn's own path costs, per received frame: a new NVX masker (several
CFFI allocations, about 3 us even for a 64-byte payload), a copy of the
whole buffered payload after each header (C{self.data = self.data[i:]}),
two more copies in the masker, and for text a UTF-8 validator that walks
the payload byte by byte through CFFI (about 230 us per 64 KiB).
L{FrameReader} parses the common data frame header itself and reads the
payload from an offset into the buffer; L{Masker} unmasks with one integer
XOR (small payloads) or NVX in place (large ones);
L{Utf8Validator} validates with CPython's incremental UTF-8 decoder.

Whatever is not a plain masked data frame or a well-formed control frame
(RSV bits, a fragmentation error, a reserved opcode, a long or fragmented
control frame, a non-minimal length, an unmasked frame) goes to Autobahn's
own C{processData}, which keeps its checks and its protocol violations
exactly as they are.
"""

from __future__ import annotations

import codecs
import struct
import sys
from collections import deque
from collections.abc import Callable
from errno import ENOBUFS, EWOULDBLOCK
from typing import Any, TypeVar

from autobahn.twisted.util import create_transport_details
from autobahn.wamp.types import TransportDetails
from autobahn.websocket.protocol import FrameHeader, TrafficStats, WebSocketProtocol
from autobahn.websocket.xormasker import XorMaskerNull
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _DisconnectSelectableMixin
from twisted.internet.tcp import Client as TCPClient
from twisted.internet.tcp import Server as TCPServer
from twisted.python import log

try:  # Autobahn's NVX masker, when it was built (CFFI); in place, no copies
    from autobahn.websocket import USES_NVX

    if not USES_NVX:
        raise ImportError("NVX off")
    from _nvx_xormasker import ffi as _ffi  # type: ignore[import-not-found]
    from _nvx_xormasker import lib as _lib
except ImportError:  # pragma: no cover - depends on the Autobahn build
    _ffi = _lib = None

#: From this payload size on, NVX (SSE2, in place) beats the integer XOR.
NVX_FROM = 256
_STATE_OPEN = WebSocketProtocol.STATE_OPEN
_STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING
_STATE_PROXY_CONNECTING = WebSocketProtocol.STATE_PROXY_CONNECTING
_MAX_LENGTH = 0x7FFFFFFFFFFFFFFF
#: Bytes asked of the socket per read (Twisted's C{bufferSize} is 64 KiB).
READ_SIZE = 262144
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack
#: From this payload size on, a frame's header and payload are written as
#: two buffers (gathered by sendmsg) instead of being joined first.
GATHER_FROM = 4096


def _nvx(buffer: Any, mask: bytes, size: int) -> None:
    """XOR the first C{size} bytes of C{buffer} with C{mask} repeated, in place (NVX, SSE2)."""
    masker = _lib.nvx_xormask_new(_ffi.from_buffer(mask))
    try:
        _lib.nvx_xormask_set_impl(masker, 2)  # SSE2
        _lib.nvx_xormask_process(masker, _ffi.from_buffer(buffer), size)
    finally:
        _lib.nvx_xormask_free(masker)


def _fresh_bytes_writable() -> bool:
    """
    Whether NVX can unmask a new C{bytes} object in place: on CPython,
    C{ffi.from_buffer} of a bytes object points at its own storage. Checked
    once on a probe (elsewhere the object might be a copy: then never).
    """
    if _lib is None or sys.implementation.name != "cpython":
        return False
    source = bytes(range(256)) * 2
    probe = bytes(memoryview(source))
    try:
        _nvx(probe, b"\x01\x02\x04\x08", len(probe))
    except Exception:  # pragma: no cover - a cffi that refuses read-only buffers
        return False
    expected = bytes(b ^ (1, 2, 4, 8)[i % 4] for i, b in enumerate(source))
    return probe == expected and source == bytes(range(256)) * 2


#: Unmask large payloads into one new bytes object (one copy, not two).
FRESH_BYTES = _fresh_bytes_writable()


def unmask(data: Any, mask: bytes) -> bytes:
    """
    C{data} (bytes-like) XOR the 4-byte C{mask} repeated, from its first
    byte, as a new bytes object (C{data} is never changed).

    From L{NVX_FROM} bytes on, NVX unmasks in place: into a copy of the
    payload made as a new C{bytes} object (C{bytes()} of a memoryview
    always copies), which nothing else has seen before it is returned
    (L{FRESH_BYTES}); else into a bytearray, copied again to bytes.
    """
    size = len(data)
    if size >= NVX_FROM and _lib is not None:
        if FRESH_BYTES:
            out = bytes(memoryview(data))
            _nvx(out, mask, size)
            return out
        buffer = bytearray(data)
        _nvx(buffer, mask, size)
        return bytes(buffer)
    key = mask * (size // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(key[:size], "little")).to_bytes(
        size, "little"
    )


def read_ahead(transport: Any, size: int = READ_SIZE) -> None:
    """
    Have a plain TCP C{transport} read up to C{size} (L{READ_SIZE}) bytes
    per C{recv} instead of Twisted's 64 KiB, as asyncio's and uvloop's
    transports do (256 KiB): a 64 KiB message and its neighbours arrive in
    one read, one C{dataReceived}, one write of the answers. (The TLS
    transport, L{txwssec._tlswire}, keeps Twisted's size and uses this for
    the close at the end of the read.)

    Twisted reads C{bufferSize}, which is also the size of unsent data
    from which it pauses a streaming producer (the server's backpressure):
    the read size is changed alone, by the transport's own C{doRead}
    (Twisted replaces it the same way in C{abortConnection}). Undone by
    L{stop_read_ahead}, which breaks the reference cycle.

    A L{lose_connection} while the read is handled closes the connection
    when the protocol has done with it, in the read's own event.
    """
    if type(transport) is not TCPServer:
        return
    recv = transport.socket.recv
    received = transport._dataReceived
    flags: Any = transport

    # The flags are the transport's attributes, set and read as such: not
    # through its __dict__, which CPython 3.11 would then make (a dict for
    # the transport's attributes, where every later lookup of its read and
    # write paths is slower than in its inline values).
    def doRead() -> Any:
        try:
            data = recv(size)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return CONNECTION_LOST
        flags._txwssec_reading = True
        try:
            result = received(data)
        finally:
            flags._txwssec_reading = False
        if transport.disconnecting and result is None:
            stalled = getattr(transport, _CLOSING, None)
            if stalled is not None:
                del flags._txwssec_closing
                if _may_close(transport, stalled):
                    # (in this read's event: its log context is the transport's)
                    disconnect_done(transport)
        return result

    transport.doRead = doRead  # type: ignore[method-assign]


#: An attribute of a transport, true while L{read_ahead}'s C{doRead} hands
#: it data; then L{lose_connection}'s close waits for the end of the read.
_READING = "_txwssec_reading"
#: The close L{lose_connection} left to the end of the read: its
#: C{stalled} argument, or L{_no_stalled}.
_CLOSING = "_txwssec_closing"


#: Whether a L{lose_connection} during a read closes at the end of the
#: read (tests compare it with the close at the end of the turn).
CLOSE_IN_READ = True


def _no_stalled() -> None:
    """L{lose_connection}'s caller has nothing to do if the close waits."""


#: At most this many buffers per sendmsg (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


def send_now(sock: Any, chunks: list[bytes]) -> list[bytes]:
    """
    Send C{chunks} on the non-blocking socket C{sock} in one C{sendmsg}
    (gathered: not joined first).

    @return: what the socket did not take (all of it after an error other
        than a full buffer: the transport's own write then meets the error
        and closes the connection as usual).
    """
    if len(chunks) > _IOV_MAX or not hasattr(sock, "sendmsg"):
        chunks = [b"".join(chunks)]
    try:
        sent = sock.sendmsg(chunks) if len(chunks) > 1 else sock.send(chunks[0])
    except OSError as error:
        if error.errno not in (EWOULDBLOCK, ENOBUFS):
            return chunks
        sent = 0
    for index, chunk in enumerate(chunks):
        if sent < len(chunk):
            rest = chunks[index:]
            if sent:
                rest[0] = chunk[sent:]
            return rest
        sent -= len(chunk)
    return []


_Kind = TypeVar("_Kind", bound=type)

#: The transport classes whose socket L{write_at_once} may write to itself:
#: Twisted's plain TCP ones, known by their exact type (a subclass may
#: change how it writes), and those added by L{writes_as_plain_tcp}.
_PLAIN_TCP_WRITERS: set[type] = {TCPServer, TCPClient}


def writes_as_plain_tcp(kind: _Kind) -> _Kind:
    """
    Class decorator: L{write_at_once} may write straight to the socket of
    a C{kind} transport, a subclass of Twisted's C{tcp.Connection} that
    keeps its buffers and states and their meaning (the gateway's lean
    upstream client). Returns C{kind}.
    """
    _PLAIN_TCP_WRITERS.add(kind)
    return kind


def write_at_once(transport: Any, chunks: list[bytes]) -> None:
    """
    Write C{chunks} on C{transport}: straight to a plain TCP socket whose
    transport holds nothing (L{send_now}: one C{send} or gathered
    C{sendmsg}), and what the socket does not take, or anything for another
    transport (TLS), through the transport's C{writeSequence}.
    """
    if (
        type(transport) in _PLAIN_TCP_WRITERS
        and not transport.dataBuffer
        and not transport._tempDataLen
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
    ):
        chunks = send_now(transport.socket, chunks)
        if not chunks:
            return
    transport.writeSequence(chunks)


def lose_connection(transport: Any, stalled: Callable[[], object] | None = None) -> bool:
    """
    Twisted's C{loseConnection} for a plain TCP transport that has nothing
    left to send (what the protocol held was just sent, L{send_now}):
    closed once the read being handled is (L{read_ahead}), else at the end
    of this turn, as Twisted's would be after its next poll, without asking
    epoll to report the socket writable first (two C{epoll_ctl}, an event
    and its dispatch, and an empty C{send}). The
    socket is closed as Twisted closes it (C{shutdown}, then C{close}: a
    FIN), and the protocol's C{connectionLost} gets the same
    C{ConnectionDone}, in the same log context. Used by the server
    (L{txwssec.server.flow.TrafficFlow}) and the gateway's legs.

    @param stalled: called if something is written before the close, which
        then waits for Twisted's write (the caller's close timer, say).
    @return: whether it did; L{False}: call C{loseConnection} (a TLS
        transport, bytes still buffered, a producer that is to be resumed
        first, a half-close, a close under way).
    """
    kind = type(transport)
    if (
        (kind is not TCPServer and kind is not TCPClient)
        or transport.dataBuffer
        or transport._tempDataLen
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
        or transport._writeDisconnecting
    ):
        return False
    if transport.producer is not None and (
        not transport.streamingProducer or transport.producerPaused
    ):
        return False
    transport.stopReading()
    transport.stopWriting()
    transport.disconnecting = 1
    if stalled is None:
        stalled = _no_stalled
    if CLOSE_IN_READ and getattr(transport, _READING, None):
        transport._txwssec_closing = stalled
    else:
        transport.reactor.callLater(0, _closed, transport, stalled)
    return True


def _may_close(transport: Any, stalled: Callable[[], object]) -> bool:
    """
    Whether L{lose_connection}'s close is still to be done now: not when the
    transport was aborted or lost meanwhile, nor when something was written
    since (Twisted's write sends it, then closes: C{stalled} is called).
    """
    if transport.disconnected or transport._aborting or not hasattr(transport, "socket"):
        return False
    if transport.dataBuffer or transport._tempDataLen:
        stalled()
        return False
    return True


def disconnect_done(transport: Any) -> None:
    """
    C{reactor._disconnectSelectable(transport, CONNECTION_DONE, False)}: a
    plain TCP server transport's orderly end. For Twisted's own classes,
    its steps in one function: the reactor forgets the transport,
    C{tcp.Connection.connectionLost} and C{FileDescriptor.connectionLost}
    set the same state (the reactor is not asked a second time to forget
    it, unless a producer was stopped meanwhile), the socket is shut down
    and closed (C{_closeSocket(True)}: the reason is not an abort) and the
    protocol gets the reactor's own C{ConnectionDone} failure.
    """
    reactor: Any = transport.reactor
    if (
        not LEAN_DISCONNECT
        or type(transport) is not TCPServer
        or type(reactor)._disconnectSelectable is not _DISCONNECT_SELECTABLE
        or TCPServer.connectionLost is not _CONNECTION_LOST
        or FileDescriptor.connectionLost is not _FD_CONNECTION_LOST
        or TCPServer._closeSocket is not _CLOSE_SOCKET
    ):
        reactor._disconnectSelectable(transport, CONNECTION_DONE, False)
        return
    reactor.removeReader(transport)
    reactor.removeWriter(transport)
    if not hasattr(transport, "socket"):
        return  # (tcp.Connection.connectionLost: not twice)
    transport.disconnected = 1
    transport.connected = 0
    producer = transport.producer
    if producer is not None:
        producer.stopProducing()
        transport.producer = None
        transport.stopReading()
        transport.stopWriting()
    transport._closeSocket(True)
    protocol = transport.protocol
    del transport.protocol
    del transport.socket
    del transport.fileno
    protocol.connectionLost(_DONE)


#: Whether L{disconnect_done} takes its own steps (tests compare them with
#: the reactor's).
LEAN_DISCONNECT = True
_DISCONNECT_SELECTABLE = _DisconnectSelectableMixin._disconnectSelectable
_CONNECTION_LOST = TCPServer.connectionLost
_CLOSE_SOCKET = TCPServer._closeSocket
_FD_CONNECTION_LOST = FileDescriptor.connectionLost
#: The failure the reactor gives every orderly close (its C{faildict}).
_DONE = _DISCONNECT_SELECTABLE.__defaults__[0][ConnectionDone]  # type: ignore[index]


def _closed(transport: Any, stalled: Callable[[], object]) -> None:
    if _may_close(transport, stalled):
        log.callWithLogger(transport, disconnect_done, transport)


def stop_read_ahead(transport: Any) -> None:
    """Forget L{read_ahead}'s C{doRead} (the connection is gone)."""
    if type(transport) is TCPServer and getattr(transport.doRead, "__name__", "") == "doRead":
        # (del, not __dict__.pop: see read_ahead; Twisted's own doRead is
        # the class's, which del leaves)
        try:
            del transport.doRead
        except AttributeError:
            pass


class Masker:
    """
    Autobahn's masker interface (C{process}, C{pointer}, C{reset}) over
    L{unmask}: the mask continues where the previous chunk of the same
    frame stopped.
    """

    __slots__ = ("_mask", "_ptr")

    def __init__(self, mask: bytes) -> None:
        self._mask = mask
        self._ptr = 0

    def pointer(self) -> int:
        """How many payload bytes were unmasked so far."""
        return self._ptr

    def reset(self) -> None:
        """Start again from the mask's first byte."""
        self._ptr = 0

    def process(self, data: Any) -> bytes:
        """Unmask the next chunk of the frame's payload."""
        shift = self._ptr & 3
        self._ptr += len(data)
        mask = self._mask
        if shift:
            mask = mask[shift:] + mask[:shift]
        return unmask(data, mask)


class Utf8Validator:
    """
    Autobahn's incremental UTF-8 validator interface (C{reset},
    C{validate}) over CPython's incremental UTF-8 decoder (strict: no
    surrogates, no overlong forms, nothing above U+10FFFF).

    It fails as early as Autobahn's: on the first chunk that cannot begin
    valid UTF-8, including a surrogate's first two bytes at a chunk's end
    (C{ED A0} to C{ED BF}), which CPython's decoder would hold back.

    A chunk of C{bytes} that is all ASCII while the decoder holds no bytes
    back (the message so far ends on a code point) is valid without the
    decoder: C{bytes.isascii} reads it without making a C{str} of it (for
    64 KiB of text, the decode's copy and allocation were a fifth of the
    server's instructions per echo).
    """

    __slots__ = ("_decoder", "_pending", "_total")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._total = 0
        #: Whether the decoder may hold back bytes of a code point.
        self._pending = False

    def reset(self) -> None:
        """A new message."""
        self._decoder.reset()
        self._total = 0
        self._pending = False

    def validate(self, data: Any) -> tuple[bool, bool, int, int]:
        """
        Validate the next chunk of a message.

        @return: (valid so far, ends on a code point boundary, octets of
            this chunk, octets of the message so far), as Autobahn's.
        """
        if not self._pending and type(data) is bytes and data.isascii():
            size = len(data)
            total = self._total = self._total + size
            return True, True, size, total
        self._pending = True
        decoder = self._decoder
        try:
            decoder.decode(data, False)
        except UnicodeDecodeError as error:
            # The octet Autobahn's DFA stops at (named in the close reason):
            # a bad first byte itself, else the byte that breaks the
            # sequence; the decoder counts from the bytes it held back.
            at = error.start if error.reason == "invalid start byte" else error.end
            at -= len(decoder.getstate()[0])
            return False, False, at, self._total + at
        self._total += len(data)
        pending = decoder.getstate()[0]
        if not pending:
            self._pending = False
            return True, True, len(data), self._total
        if len(pending) > 1 and pending[0] == 0xED and pending[1] >= 0xA0:
            # A surrogate: Autobahn stops at its second byte (this chunk's last).
            return False, False, len(data) - 1, self._total - 1
        return True, False, len(data), self._total


#: Where L{LazyTransportDetails} keeps a protocol's transport details.
_DETAILS = "_transport_details_made"

#: The state Autobahn's C{WebSocketProtocol._connectionMade} gives a server
#: connection, but for its timer and the per-connection objects of
#: L{open_state}.
_OPEN_STATE: dict[str, Any] = {
    "_perMessageCompress": None,
    "trackedTimings": None,
    "state": WebSocketProtocol.STATE_CONNECTING,
    "send_state": WebSocketProtocol.SEND_STATE_GROUND,
    "data": b"",
    "triggered": False,
    "wasMaxFramePayloadSizeExceeded": False,
    "wasMaxMessagePayloadSizeExceeded": False,
    "closedByMe": False,
    "failedByMe": False,
    "droppedByMe": False,
    "wasClean": False,
    "wasNotCleanReason": None,
    "wasServerConnectionDropTimeout": False,
    "wasOpenHandshakeTimeout": False,
    "wasCloseHandshakeTimeout": False,
    "wasServingFlashSocketPolicyFile": False,
    "localCloseCode": None,
    "localCloseReason": None,
    "remoteCloseCode": None,
    "remoteCloseReason": None,
    "openHandshakeTimeoutCall": None,
    "closeHandshakeTimeoutCall": None,
    "autoPingTimeoutCall": None,
    "autoPingPending": None,
    "autoPingPendingCall": None,
    "autoPingPendingSeq": 0,
    "autoPingPendingSent": None,
}


def open_state() -> dict[str, Any]:
    """
    The attributes Autobahn's C{WebSocketProtocol._connectionMade} sets on
    a new server connection (tests/test_lean_connection.py compares them
    with Autobahn's), but for C{openHandshakeTimeoutCall}'s timer and
    C{utf8validator} (the caller's). (C{trackedTimings} is L{None} there
    whatever C{trackTimings} says: C{setTrackTimings} changes nothing when
    given the current value.)
    """
    state = _OPEN_STATE.copy()
    state["trafficStats"] = TrafficStats()
    state["send_queue"] = deque()
    return state


def tcp_peer(host: str, port: int, ipv6: bool) -> str:
    """
    A TCP connection's peer as Autobahn's C{peer2str} writes it
    (C{tcp4:HOST:PORT}, C{tcp6:HOST:PORT}), without making an address
    object first.
    """
    return f"{'tcp6' if ipv6 else 'tcp4'}:{host}:{port}"


def details_later(protocol: Any) -> None:
    """
    Leave C{protocol}'s transport details (a L{LazyTransportDetails}) to be
    made when first read: on plain TCP, where there is no TLS channel
    binding or certificate to note at open.
    """
    protocol.__dict__[_DETAILS] = None


def details_pending(protocol: Any) -> bool:
    """
    Whether C{protocol}'s transport details are still to be made (see
    L{details_later}).
    """
    return protocol.__dict__.get(_DETAILS, _DETAILS) is None


class LazyTransportDetails:
    """
    A protocol's C{_transport_details} (Autobahn's C{TransportDetails}),
    made from the transport when first read on a connection whose
    C{connectionMade} left it to be made (L{details_later}); else what was
    assigned, as a plain attribute. C{is_server}: the side the details
    describe (the gateway's upstream leg is a client).
    """

    __slots__ = ("_is_server",)

    def __init__(self, is_server: bool = True) -> None:
        self._is_server = is_server

    def __get__(self, protocol: Any, owner: type | None = None) -> Any:
        if protocol is None:
            return self
        found = protocol.__dict__
        details = found.get(_DETAILS, self)
        if details is None:
            details = create_transport_details(protocol.transport, self._is_server)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            found[_DETAILS] = details
        elif details is self:
            # Before the connection (Autobahn's __init__ would have set it).
            details = found[_DETAILS] = TransportDetails()
        return details

    def __set__(self, protocol: Any, details: Any) -> None:
        protocol.__dict__[_DETAILS] = details


#: Not found (L{no_delay}).
_UNSET = object()


def no_delay(protocol: Any) -> bool:
    """
    Autobahn's C{tcpNoDelay} option of a C{protocol} (server or client) at
    C{connectionMade}: its own (instance or class) value, else its
    factory's, as C{_connectionMade} would copy it (L{False} without one).

    Without C{TCP_NODELAY} the kernel holds the last part of a write while
    the peer has not acknowledged the one before (Nagle), which costs the
    server more CPU per large message (a 64 KiB echo: about 30%, see
    bench/RESULTS.md, "Round 5: server handshake and text bulk") and delays
    it; the server gathers its writes itself (one send per read).
    """
    value = getattr(protocol, "tcpNoDelay", _UNSET)
    if value is _UNSET:
        value = getattr(protocol.factory, "tcpNoDelay", False)
    return bool(value)


def set_no_delay(protocol: Any) -> None:
    """
    C{TCP_NODELAY} on C{protocol}'s transport when its C{tcpNoDelay} option
    says so (L{no_delay}); a transport without it (a Unix socket) is left as
    it is, as Autobahn leaves it.
    """
    if no_delay(protocol):
        try:
            protocol.transport.setTcpNoDelay(True)
        except Exception:  # noqa: S110 - as Autobahn: not every transport has it
            pass


class FrameReader:
    """
    A mixin for an Autobahn server protocol (before it in the bases):
    L{processData} reads plain masked data frames, and well-formed close,
    ping and pong frames, itself and leaves every other frame to Autobahn.

    The receive buffer is C{self.data} from C{self._frameStart} on: after a
    header, the payload is read from that offset (and unmasked from a
    memoryview) instead of being copied out of the buffer first.
    """

    #: Where the unread part of C{self.data} starts (0 outside a frame).
    _frameStart: int = 0
    data: bytes
    state: int
    current_frame: Any
    current_frame_masker: Any
    inside_message: bool
    applyMask: bool
    trafficStats: Any
    logOctets: bool
    logFrames: bool
    maskServerFrames: bool
    failedByMe: bool
    message_data: Any
    message_is_binary: bool
    _listeners: Any
    trackedTimings: Any
    transport: Any
    factory: Any
    peer: Any
    tcpNoDelay: bool
    _transport_details: Any = LazyTransportDetails()

    def connectionMade(self) -> None:
        """
        Autobahn's Twisted C{connectionMade} for a server, without its debug
        line: Autobahn formats its arguments (C{hltype}, C{hlval}, colour
        codes) on every connection, whatever the log level.

        The socket gets C{TCP_NODELAY} when Autobahn's
        C{tcpNoDelay} option (default on) says so (L{no_delay}); Autobahn's
        own C{connectionMade} reads the option before its C{_connectionMade}
        copies it from the factory, so that it never set it on a server's
        socket (an C{AttributeError} it ignores).

        On plain TCP the peer string is written from the transport's client
        address as Autobahn's C{peer2str} writes it, and the transport
        details (which only C{transport_details} and the TLS channel binding
        read) are made when first read (L{LazyTransportDetails}).
        """
        transport = self.transport
        if type(transport) is TCPServer:
            client: Any = transport.client
            self.peer = tcp_peer(client[0], client[1], len(client) != 2)
            details_later(self)
        else:
            details = create_transport_details(transport, True)
            details.channel_framing = TransportDetails.CHANNEL_FRAMING_WEBSOCKET
            self._transport_details = details
            self.peer = details.peer
        set_no_delay(self)
        self._connectionMade()

    def _connectionMade(self) -> None:
        # Autobahn's server _connectionMade without its debug line (hltype)
        # and, when it has no options of its own to copy, without the rest
        # of its fixed costs (a pformat of the empty option list, an NVX
        # validator replaced at once): the same state (see open_state).
        protocol: Any = self
        if protocol.CONFIG_ATTRS:
            WebSocketProtocol._connectionMade(protocol)
        else:
            self.__dict__.update(open_state())
            timeout = protocol.openHandshakeTimeout
            if timeout > 0:
                protocol.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                    timeout, protocol.onOpenHandshakeTimeout
                )
        self.factory.countConnections += 1
        self.utf8validator = Utf8Validator()
        read_ahead(self.transport)

    def _dataReceived(self, data: bytes) -> None:
        # Autobahn's _dataReceived, with the buffer's read offset.
        state = self.state
        if state == _STATE_OPEN:
            self.trafficStats.incomingOctetsWireLevel += len(data)
        elif state == _STATE_CONNECTING or state == _STATE_PROXY_CONNECTING:
            self.trafficStats.preopenIncomingOctetsWireLevel += len(data)
        if self.logOctets:
            self.logRxOctets(data)  # type: ignore[attr-defined]
        start = self._frameStart
        if start:
            self.data = self.data[start:] + data
            self._frameStart = 0
        elif self.data:
            self.data += data
        else:
            self.data = data
        self.consumeData()  # type: ignore[attr-defined]

    def _autobahnProcessData(self) -> bool:
        start = self._frameStart
        if start:
            self.data = self.data[start:]
            self._frameStart = 0
        return WebSocketProtocol.processData(self)  # type: ignore[arg-type]

    def processData(self) -> bool:
        """
        Read what is buffered: a frame header, or payload of the current
        frame. L{True} to be called again (more buffered), as Autobahn's.
        """
        frame = self.current_frame
        data = self.data
        start = self._frameStart
        if frame is None:
            # -- a frame header: a plain masked data frame, else Autobahn
            available = len(data) - start
            if available < 2:
                return self._autobahnProcessData()
            b0 = data[start]
            b1 = data[start + 1]
            opcode = b0 & 0x0F
            length = b1 & 0x7F
            if b0 & 0x70 or not b1 & 0x80 or not self.applyMask:
                return self._autobahnProcessData()
            if opcode > 2:
                # a control frame: whole (FIN), short, close/ping/pong, and
                # a close's body is empty or holds at least a code
                if (
                    not b0 & 0x80
                    or length > 125
                    or opcode > 10
                    or opcode < 8
                    or (opcode == 8 and length == 1)
                ):
                    return self._autobahnProcessData()
            elif (opcode == 0) is not bool(self.inside_message):
                return self._autobahnProcessData()
            if length < 126:
                end = start + 6
            elif length == 126:
                end = start + 8
                if available < 8:
                    return self._autobahnProcessData()
                length = (data[start + 2] << 8) | data[start + 3]
                if length < 126:
                    return self._autobahnProcessData()  # not minimal: a violation
            else:
                end = start + 14
                if available < 14:
                    return self._autobahnProcessData()
                length = int.from_bytes(data[start + 2 : start + 10], "big")
                if length < 65536 or length > _MAX_LENGTH:
                    return self._autobahnProcessData()
            if end > len(data):
                return self._autobahnProcessData()  # need more data
            mask = data[end - 4 : end]
            self.current_frame_masker = Masker(mask) if length else XorMaskerNull()
            self.current_frame = FrameHeader(opcode, b0 & 0x80 != 0, 0, length, mask)  # type: ignore[arg-type]
            self._frameStart = end
            self.onFrameBegin()  # type: ignore[attr-defined]
            return length == 0 or len(self.data) > end

        # -- payload of the current frame, from the buffer's offset
        masker = self.current_frame_masker
        rest = frame.length - masker.pointer()
        size = len(data)
        end = start + rest
        if end >= size:
            end = size
            self.data = b""
            self._frameStart = 0
        else:
            self._frameStart = end
        if end == start:
            payload = b""
        elif start == 0 and end == size:
            payload = masker.process(data)
        elif type(masker) is Masker:
            payload = masker.process(memoryview(data)[start:end])
        else:
            payload = masker.process(data[start:end])
        if self.onFrameData(payload) is False:  # type: ignore[attr-defined]
            return False
        if masker.pointer() == frame.length and self.onFrameEnd() is False:  # type: ignore[attr-defined]
            return False
        return len(self.data) > self._frameStart

    def onMessageEnd(self) -> None:
        """
        Autobahn's C{onMessageEnd}, without its C{fire("message")} when
        nothing listens (C{protocol.on("message", ...)} was never called):
        Autobahn then still builds a Deferred and its callbacks per message.
        """
        if self._listeners is not None:
            WebSocketProtocol.onMessageEnd(self)  # type: ignore[arg-type]
            return
        if not self.failedByMe:
            if self.trackedTimings:
                self.trackedTimings.track("onMessage")
            self._onMessage(b"".join(self.message_data), self.message_is_binary)  # type: ignore[attr-defined]
        self.message_data = None

    def sendFrame(
        self,
        opcode: int,
        payload: bytes = b"",
        fin: bool = True,
        rsv: int = 0,
        mask: bytes | None = None,
        payload_len: int | None = None,
        chopsize: int | None = None,
        sync: bool = False,
    ) -> None:
        """
        Autobahn's C{sendFrame} for a server's unmasked frame: the header
        packed at once and written with the payload (Autobahn's when a mask,
        a repeated payload or frame logging is asked for).
        """
        if mask is not None or payload_len is not None or self.maskServerFrames or self.logFrames:
            protocol: Any = self
            WebSocketProtocol.sendFrame(
                protocol, opcode, payload, fin, rsv, mask, payload_len, chopsize, sync
            )
            return
        size = len(payload)
        first = (0x80 if fin else 0) | (rsv % 8) << 4 | opcode % 128
        if size <= 125:
            header = bytes((first, size))
        elif size <= 0xFFFF:
            header = _HEADER_16(first, 126, size)
        else:
            header = _HEADER_64(first, 127, size)
        if opcode <= 2:
            self.trafficStats.outgoingWebSocketFrames += 1
        if size >= GATHER_FROM:
            self._sendParts(header, payload, sync, chopsize)
        else:
            self.sendData(header + payload, sync, chopsize)  # type: ignore[attr-defined]

    def _sendParts(self, header: bytes, payload: bytes, sync: bool, chopsize: int | None) -> None:
        """
        Write a frame's C{header} and C{payload}: joined here; a protocol
        that holds its writes (L{txwssec.server.flow.TrafficFlow}) keeps
        them apart, for one gathered C{sendmsg} without a copy of the
        payload.
        """
        self.sendData(header + payload, sync, chopsize)  # type: ignore[attr-defined]
