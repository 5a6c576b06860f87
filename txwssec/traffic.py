"""
Per-connection traffic limits: what a peer may send (rates, fragments,
control frames) and what may pile up for a peer that does not read.
"""

from __future__ import annotations

from txwssec.errors import CloseCode
from txwssec.limits import TokenBucket
from txwssec.policy import RouteLimits

_CLOSE = 0x8
_CONTROL = 0x8


class Violation:
    """A limit a peer went past: the close code and a short fixed reason."""

    __slots__ = ("code", "counter", "reason")

    def __init__(self, code: int, reason: str, counter: str) -> None:
        self.code = code
        self.reason = reason
        self.counter = counter


MESSAGE_RATE = Violation(CloseCode.POLICY_VIOLATION, "message rate exceeded", "limit.message_rate")
BYTE_RATE = Violation(CloseCode.POLICY_VIOLATION, "byte rate exceeded", "limit.byte_rate")
FRAGMENTS = Violation(CloseCode.POLICY_VIOLATION, "too many fragments", "limit.fragments")
CONTROL_FRAMES = Violation(
    CloseCode.POLICY_VIOLATION, "too many control frames", "limit.control_frames"
)


class TrafficGuard:
    """
    Accounts for one connection's frames and blocked writes.

    L{frame} is called for every frame header received, before its payload
    is read; L{wrote} for every write while the transport's buffer is full.
    Consumer-wide buckets are shared objects owned by the factory.
    """

    __slots__ = (
        "_buckets_bytes",
        "_buckets_messages",
        "buffered",
        "fragments",
        "limits",
        "pending_control",
        "rated",
        "writes_blocked",
    )

    def __init__(
        self,
        limits: RouteLimits,
        max_message_size: int,
        now: float,
        consumer_buckets: tuple[TokenBucket | None, TokenBucket | None] = (None, None),
    ) -> None:
        self.limits = limits
        messages: list[TokenBucket] = []
        data: list[TokenBucket] = []
        if limits.messages_per_second:
            rate = limits.messages_per_second
            messages.append(TokenBucket(rate, limits.message_burst(rate), now))
        if limits.bytes_per_second:
            rate = limits.bytes_per_second
            data.append(TokenBucket(rate, limits.byte_burst(rate, max_message_size), now))
        consumer_messages, consumer_bytes = consumer_buckets
        if consumer_messages is not None:
            messages.append(consumer_messages)
        if consumer_bytes is not None:
            data.append(consumer_bytes)
        self._buckets_messages = tuple(messages)
        self._buckets_bytes = tuple(data)
        #: Whether any bucket needs the clock (callers skip reading it if not).
        self.rated = bool(messages or data)
        self.fragments = 0
        self.pending_control = 0
        self.writes_blocked = False
        self.buffered = 0

    def frame(
        self, opcode: int, length: int, starts_message: bool, now: float
    ) -> Violation | None:
        """
        Account a received frame header.

        @param starts_message: a data frame that begins a new message.
        @return: the limit exceeded, if any.
        """
        limits = self.limits
        if opcode >= _CONTROL:
            if opcode == _CLOSE:
                return None
            if self.writes_blocked:
                self.pending_control += 1
                if 0 < limits.max_pending_control_frames < self.pending_control:
                    return CONTROL_FRAMES
            is_message = True
        elif starts_message:
            self.fragments = 1
            is_message = True
        else:
            self.fragments += 1
            if 0 < limits.max_fragments < self.fragments:
                return FRAGMENTS
            is_message = False
        if is_message:
            for bucket in self._buckets_messages:
                if not bucket.take(1, now):
                    return MESSAGE_RATE
        if length:
            for bucket in self._buckets_bytes:
                if not bucket.take(length, now):
                    return BYTE_RATE
        return None

    def messages(self, count: int, octets: int, now: float) -> bool:
        """
        Account C{count} received data frames that each begin a message
        (C{octets} payload bytes in all), all at C{now}: the same as
        C{count} calls of L{frame}, in one go. All or nothing: when a limit
        would be exceeded by any of them, nothing is taken and L{False} is
        returned; the caller then accounts them one by one with L{frame},
        which names the frame and the limit.
        """
        for bucket in self._buckets_messages:
            if bucket.available(now) < count:
                return False
        if octets:
            for bucket in self._buckets_bytes:
                if bucket.available(now) < octets:
                    return False
        # Each take below succeeds: it leaves what count takes of one
        # token (octets of bytes) at the same now would (exactly, in floats).
        for bucket in self._buckets_messages:
            bucket.take(count, now)
        if octets:
            for bucket in self._buckets_bytes:
                bucket.take(octets, now)
        self.fragments = 1
        return True

    def blocked(self) -> None:
        """The transport's buffer is full: start counting what piles up."""
        # Twisted calls pauseProducing on every write while its buffer is
        # full, not only the first time: keep counting from the first call.
        if not self.writes_blocked:
            self.writes_blocked = True
            self.buffered = 0

    def unblocked(self) -> None:
        """The peer caught up."""
        self.writes_blocked = False
        self.buffered = 0
        self.pending_control = 0

    def wrote(self, size: int) -> bool:
        """
        Account a write of C{size} bytes.

        @return: whether the peer is now too far behind.
        """
        if not self.writes_blocked:
            return False
        self.buffered += size
        return 0 < self.limits.max_buffered_bytes < self.buffered
