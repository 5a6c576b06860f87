"""
The gateway's frame relay: once a session is open and neither leg uses an
extension, each leg's incoming bytes are cut into frames by their headers
alone (2 to 14 bytes), and whole data frames are written to the other leg
as they came, still masked from the client (the upstream expects masked
frames from a client) and unmasked from the upstream.

The relay reads no payload: a text frame's UTF-8 is left to the peers, as
any proxy does (the upstream validates what the client sends and answers
invalid UTF-8 with 1007, which is relayed; the client validates what the
upstream sends). Each frame header still goes through the leg's checks
first (L{RelayLeg.relayAccount}: the route's limits on the client leg) and
Autobahn's size limits, before the payload is awaited.

Only whole frames are written, one write per read, so that a frame the
gateway sends itself (a ping, a close) always falls between two relayed
frames. Control frames, and anything a well-behaved peer does not send
(RSV bits, unknown opcodes, a continuation with nothing to continue, a wrong
mask bit, a length not minimally encoded, a frame over the size limits),
are handed to Autobahn at a frame boundary: a control frame alone
(L{RelayLeg.relayControl}), after which relaying goes on; anything else with
the rest of the stream, for good (L{RelayLeg.relayStop}), so that Autobahn
fails the connection exactly as without the relay.

Frames are relayed as they come, not whole messages: when a limit closes
the connection in the middle of a fragmented message (too many fragments,
C{max_message_size} reached by a later fragment), the message's first
frames have already reached the other leg, which then sees the close (1001
for the upstream, 1014 for the client) with the message unfinished.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from txwssec.refresh import PREFIX_BYTES, is_refresh
from txwssec.traffic import Violation

_FIN = 0x80
_RSV = 0x70
_MASK = 0x80
_CLOSE = 0x8
_PONG = 0xA
#: Largest control frame payload (RFC 6455 section 5.5).
_CONTROL_MAX = 125

#: The start of a txwssec control message (C{{"type": "wssec.<kind>"...}).
_WSSEC_MESSAGE = re.compile(
    rb'[ \t\r\n]*\{[ \t\r\n]*"type"[ \t\r\n]*:[ \t\r\n]*"(wssec\.[A-Za-z0-9_.-]{0,32})'
)


def wssec_message(payload: bytes) -> str | None:
    """
    The type of the txwssec control message (C{wssec.expiring}...) that the
    text message C{payload} is, by its first L{PREFIX_BYTES} bytes (at most
    32 characters after C{wssec.}); C{None} for any other message.
    """
    match = _WSSEC_MESSAGE.match(payload, 0, PREFIX_BYTES)
    return None if match is None else match.group(1).decode("ascii")


class RelayLeg(Protocol):
    """What a leg (an Autobahn protocol) provides to its L{FrameScanner}."""

    def relayOpen(self) -> bool:
        """Whether frames are still relayed (else Autobahn takes over)."""

    def relayAccount(self, opcode: int, length: int, starts_message: bool) -> Violation | None:
        """Account a data frame header; the limit it exceeds, if any."""

    def relayAccountMessages(self, count: int, octets: int) -> bool:
        """
        Account C{count} data frame headers that each begin a message
        (C{octets} payload bytes in all) at once, if no limit is exceeded
        by any; else account nothing and return L{False} (the scanner then
        goes through them with L{relayAccount}, one by one).
        """

    def relayLimit(self, violation: Violation) -> None:
        """Close the connection for C{violation}."""

    def relayForward(self, frames: bytes) -> None:
        """Write whole frames to the other leg."""

    def relayControl(self, frame: bytes) -> bool:
        """
        Process one whole control frame as Autobahn does; whether relaying
        may go on afterwards.
        """

    def relayRefresh(self, payload: bytes) -> None:
        """
        Take a refresh message (unmasked; the client leg), or a txwssec
        control message (the upstream leg, with C{notices}), instead of
        relaying it.
        """

    def relayStop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        """
        Hand C{rest} (which starts at a frame boundary) and what follows to
        Autobahn for good, with the state of the message in progress: one
        is open (C{inside}), C{so_far} payload bytes of it were relayed, and
        whether it is binary.
        """


class FrameScanner:
    """
    Cuts one leg's incoming bytes into frames and relays whole data frames.

    @param leg: the leg whose bytes these are.
    @param masked: whether this peer's frames must be masked (a client's).
    @param max_frame: largest frame payload (0: no limit), as Autobahn's
        C{maxFramePayloadSize}.
    @param max_message: largest message payload (0: no limit), as
        Autobahn's C{maxMessagePayloadSize}.
    @param accounted: whether data frame headers go to
        L{RelayLeg.relayAccount} (the client leg's limits).
    @param refresh: look at the start of each text message for a refresh
        message (L{txwssec.refresh.is_refresh}; a route with C{refresh =
        true}): one in a single frame goes to L{RelayLeg.relayRefresh}
        instead of the other leg. A text message in several frames whose
        first starts with C{{}, or holds only whitespace or nothing (it may
        be a refresh message in pieces), makes Autobahn take over the
        stream for good (L{RelayLeg.relayStop}), which hands whole messages
        to the same hook. Other frames are relayed as without it.
    @param notices: the same for the upstream leg of such a route, with
        L{wssec_message} instead of L{is_refresh}: the upstream's txwssec
        control messages (C{wssec.expiring}...) go to
        L{RelayLeg.relayRefresh}, never to the client.
    """

    __slots__ = (
        "_accounted",
        "_binary",
        "_counted",
        "_inside",
        "_leg",
        "_mask",
        "_max_frame",
        "_max_message",
        "_need",
        "_refresh",
        "_so_far",
        "_stash",
        "_stashed",
        "_taken",
    )

    def __init__(
        self,
        leg: RelayLeg,
        *,
        masked: bool,
        max_frame: int,
        max_message: int,
        accounted: bool,
        refresh: bool = False,
        notices: bool = False,
    ) -> None:
        self._leg = leg
        self._refresh = refresh or notices
        self._taken = _is_wssec if notices else is_refresh
        self._mask = _MASK if masked else 0
        self._max_frame = max_frame
        self._max_message = max_message
        self._accounted = accounted
        #: A fragmented message is open: its payload bytes so far, its type.
        self._inside = False
        self._so_far = 0
        self._binary = False
        #: The start of a frame whose end has not arrived: its pieces, their
        #: length, the length needed to go on, and whether its header was
        #: accounted already.
        self._stash: list[bytes] | None = None
        self._stashed = 0
        self._need = 0
        self._counted = False

    def feed(self, data: bytes) -> None:
        """Bytes received on the leg."""
        counted = False
        stash = self._stash
        if stash is not None:
            stash.append(data)
            self._stashed += len(data)
            if self._stashed < self._need:
                return
            data = b"".join(stash)
            self._stash = None
            counted = self._counted
        leg = self._leg
        if not leg.relayOpen():
            self._finish(data, counted)
            return
        mask = self._mask
        mask_length = 4 if mask else 0
        max_frame = self._max_frame
        max_message = self._max_message
        accounted = self._accounted
        refresh = self._refresh
        taken = self._taken
        inside = self._inside
        so_far = self._so_far
        binary = self._binary
        size = len(data)
        pos = start = 0
        # Frames from start to pos are relayed in one write. When the frame
        # at pos has not all arrived: the bytes it needs (0: its header is
        # not whole yet) and whether it was accounted (counted).
        need = 0
        unexpected = False
        # Data frames that begin a message are accounted together, once per
        # read (and before anything leaves: a write, a control frame, a
        # continuation, a refresh message, a hand-over): batch frames from
        # batch_at, batch_octets payload bytes, and the message state
        # before the first (see _account).
        batch = batch_octets = 0
        batch_at = 0
        batch_state = (inside, so_far, binary)
        while size - pos >= 2:
            first = data[pos]
            second = data[pos + 1]
            length = second & 0x7F
            head = pos + 2
            if length > 125:
                if length == 126:
                    if size - head < 2:
                        break
                    length = (data[head] << 8) | data[head + 1]
                    head += 2
                    unexpected = length < 126
                else:
                    if size - head < 8:
                        break
                    length = int.from_bytes(data[head : head + 8], "big")
                    head += 8
                    unexpected = length < 65536 or length >> 63 != 0
            if unexpected or (second & _MASK) != mask or first & _RSV:
                unexpected = True
                break
            end = head + mask_length + length
            opcode = first & 0x0F
            if opcode > 2:
                if not (
                    _CLOSE <= opcode <= _PONG
                    and first & _FIN
                    and length <= _CONTROL_MAX
                    and not (opcode == _CLOSE and length == 1)
                ):
                    unexpected = True
                    break
                if end > size:
                    need = end - pos
                    break
                if batch:
                    if self._account(data, start, batch_at, batch, batch_octets, batch_state):
                        return
                    batch = batch_octets = 0
                if pos > start:
                    leg.relayForward(data[start:pos])
                if not leg.relayControl(data[pos:end]):
                    self._stop(data[end:], inside, so_far, binary)
                    return
                start = pos = end
                continue
            if opcode == 0:
                starts = False
                prior = so_far
                if not inside:
                    unexpected = True
                    break
            else:
                starts = True
                prior = 0
                if inside:
                    unexpected = True
                    break
            if not counted:
                if 0 < max_frame < length or 0 < max_message < prior + length:
                    unexpected = True  # Autobahn closes 1009
                    break
                if not accounted:
                    pass
                elif starts:
                    if not batch:
                        batch_at = pos
                        batch_state = (inside, so_far, binary)
                    batch += 1
                    batch_octets += length
                else:
                    if batch:
                        if self._account(data, start, batch_at, batch, batch_octets, batch_state):
                            return
                        batch = batch_octets = 0
                    violation = leg.relayAccount(opcode, length, starts)
                    if violation is not None:
                        if pos > start:
                            leg.relayForward(data[start:pos])
                        leg.relayLimit(violation)
                        self._stop(data[pos:], inside, so_far, binary)
                        return
            if end > size:
                need = end - pos
                counted = True
                break
            counted = False
            if refresh and opcode == 1:
                key = head if mask_length else -1
                payload = head + mask_length
                prefix = _unmasked(data, payload, min(length, PREFIX_BYTES), key)
                if not first & _FIN:
                    if prefix.lstrip(b" \t\r\n")[:1] in (b"{", b""):
                        # Maybe a refresh message in pieces (an empty or
                        # blank first frame does not yet show): Autobahn
                        # reassembles it (and the rest of the stream).
                        if batch and self._account(
                            data, start, batch_at, batch, batch_octets, batch_state
                        ):
                            return
                        if pos > start:
                            leg.relayForward(data[start:pos])
                        self._stop(data[pos:], inside, so_far, binary)
                        return
                elif taken(prefix):
                    if batch:
                        if self._account(data, start, batch_at, batch, batch_octets, batch_state):
                            return
                        batch = batch_octets = 0
                    if pos > start:
                        leg.relayForward(data[start:pos])
                    leg.relayRefresh(_unmasked(data, payload, length, key))
                    start = pos = end
                    continue
            if starts:
                binary = opcode == 2
            so_far = prior + length
            inside = not first & _FIN
            pos = end
        if batch and self._account(data, start, batch_at, batch, batch_octets, batch_state):
            return
        if pos > start:
            leg.relayForward(data if start == 0 and pos == size else data[start:pos])
        if unexpected:
            self._stop(data[pos:], inside, so_far, binary)
            return
        self._inside = inside
        self._so_far = so_far
        self._binary = binary
        if pos < size:
            rest = data[pos:] if pos else data
            self._stash = [rest]
            self._stashed = len(rest)
            self._need = need or len(rest) + 1
            self._counted = counted

    def _account(
        self,
        data: bytes,
        start: int,
        at: int,
        count: int,
        octets: int,
        state: tuple[bool, int, bool],
    ) -> bool:
        """
        Account the C{count} frames from C{at} in C{data} (data frames that
        each begin a message; the last may not have all arrived) at once,
        or, when that would exceed a limit, one by one as they came: the
        frames before the one that went past it are relayed from C{start},
        and the rest of the stream goes to Autobahn from that frame on
        (C{state}: the message state before the frame at C{at}).

        @return: whether the scanner stopped (a limit was exceeded).
        """
        leg = self._leg
        if leg.relayAccountMessages(count, octets):
            return False
        inside, so_far, binary = state
        mask_length = 4 if self._mask else 0
        pos = at
        for _ in range(count):
            first = data[pos]
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                length = (data[head] << 8) | data[head + 1]
                head += 2
            elif length == 127:
                length = int.from_bytes(data[head : head + 8], "big")
                head += 8
            opcode = first & 0x0F
            violation = leg.relayAccount(opcode, length, True)
            if violation is not None:
                if pos > start:
                    leg.relayForward(data[start:pos])
                leg.relayLimit(violation)
                self._stop(data[pos:], inside, so_far, binary)
                return True
            binary = opcode == 2
            so_far = length
            inside = not first & _FIN
            pos = head + mask_length + length
        return False

    @property
    def inside(self) -> bool:
        """Whether a fragmented message's first frames went through."""
        return self._inside

    def _finish(self, data: bytes, counted: bool) -> None:
        """
        The leg stopped relaying (it is closing, or failed): a frame whose
        header was accounted is dropped (its message can no longer reach the
        other leg, as it would not through Autobahn), the rest handed over.
        """
        inside, so_far, binary = self._inside, self._so_far, self._binary
        if counted:
            first = data[0]
            frame = self._need
            length = frame - _header_length(data)
            if first & 0x0F:
                binary = first & 0x0F == 2
                so_far = 0
            so_far += length
            inside = not first & _FIN
            data = data[frame:]
        self._stop(data, inside, so_far, binary)

    def _stop(self, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
        self._stash = None
        self._leg.relayStop(rest, inside, so_far, binary)


def _is_wssec(payload: bytes) -> bool:
    return wssec_message(payload) is not None


def _unmasked(data: bytes, start: int, length: int, key: int) -> bytes:
    """C{length} payload bytes from C{start}, unmasked with the key at C{key} (-1: none)."""
    chunk = data[start : start + length]
    if key < 0 or not chunk:
        return chunk
    mask = (data[key : key + 4] * (length // 4 + 1))[:length]
    return (int.from_bytes(chunk) ^ int.from_bytes(mask)).to_bytes(length)


def _header_length(data: bytes) -> int:
    """The length of the (valid, whole) frame header at the start of C{data}."""
    length = data[1] & 0x7F
    mask = 4 if data[1] & _MASK else 0
    return 2 + mask + (2 if length == 126 else 8 if length == 127 else 0)


# -- Autobahn's side of a leg ---------------------------------------------------


def autobahn_idle(protocol: Any) -> bool:
    """Whether an Autobahn protocol's frame parser holds nothing: no frame
    begun, no bytes buffered, no message open."""
    return not protocol.data and protocol.current_frame is None and not protocol.inside_message


def autobahn_control(protocol: Any, frame: bytes) -> bool:
    """
    Have Autobahn process one whole control frame as if just received
    (its limits, ping and pong handling, close); whether it consumed it all.
    """
    protocol.data = frame
    protocol.consumeData()
    return not protocol.data and protocol.current_frame is None


def autobahn_rest(protocol: Any, rest: bytes, inside: bool, so_far: int, binary: bool) -> None:
    """
    Hand Autobahn the rest of a leg's stream, from a frame boundary, with
    the state of a message whose first frames were relayed (so that a
    continuation is one, and counts towards the message's size). If
    Autobahn is holding a frame back (a protocol error waiting for the
    upstream to close), the rest waits behind it, as it would have.
    """
    idle = not protocol.data and protocol.current_frame is None
    protocol.inside_message = inside
    if inside:
        protocol.message_is_binary = binary
        protocol.message_data = []
        protocol.message_data_total_length = so_far
        # Its first bytes went by unread: not validated (nor compressed).
        protocol.utf8validateIncomingCurrentMessage = False
        protocol._isMessageCompressed = False
    protocol.data += rest
    if idle and rest:
        protocol.consumeData()


def feed_relay(leg: Any, data: bytes) -> bool:
    """
    Give C{data} to C{leg}'s frame scanner if it relays (from the first read
    where Autobahn holds no partial frame on); L{False} when Autobahn must
    parse it. C{leg} is either leg of a gateway session (its C{_scanner} and
    C{_scanning}).
    """
    scanner = leg._scanner
    if scanner is None or not (leg._scanning or autobahn_idle(leg)):
        return False
    leg._scanning = True
    scanner.feed(data)
    return True
