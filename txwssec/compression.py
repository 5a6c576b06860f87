"""
permessage-deflate (RFC 7692) with inflation bounded by the route's
C{max_message_size}: a compression bomb is refused with 1009 without being
inflated, and a message over the limit is never silently truncated.
"""

from __future__ import annotations

import zlib
from typing import Any

from autobahn.exception import PayloadCorruptError, PayloadExceededError
from autobahn.websocket.compress import (
    PerMessageDeflate,
    PerMessageDeflateOffer,
    PerMessageDeflateOfferAccept,
)


class BoundedDeflate(PerMessageDeflate):
    """
    Autobahn's permessage-deflate, with inflation that cannot silently
    truncate a message.

    Autobahn asks zlib for at most the remaining budget and calls leftover
    compressed input "too big"; but zlib can take all the input while
    output is still pending in its state (the end of a back-reference), and
    that output was then dropped with the message's flush trailer: a
    message of limit+1 zeros was delivered as limit bytes. Asking for one
    byte more than the budget makes any excess visible.
    """

    def decompress_message_data(self, data: bytes, max_output_len: int | None = None) -> bytes:
        if self.max_message_size is None:
            return super().decompress_message_data(data, max_output_len)  # type: ignore[no-any-return]
        budget = self.max_message_size - self._decompress_message_size
        if max_output_len is not None:
            budget = min(budget, max_output_len)
        inflater: Any = self._decompressor
        try:
            inflated: bytes = inflater.decompress(data, max(budget, 0) + 1)
        except zlib.error as e:
            raise PayloadCorruptError(f"invalid permessage-deflate data: {e}") from e
        if len(inflated) > budget:
            raise PayloadExceededError("message over max_message_size once inflated")
        self._decompress_message_size += len(inflated)
        return inflated


def deflated_bound(size: int) -> int:
    """
    The most wire bytes a deflated message of C{size} bytes can take: zlib's
    worst case for any settings (deflateBound: size/8 + size/64 + 5 more),
    plus 16 KiB for the sync-flush markers clients may end frames with.
    """
    return size + ((size + 7) >> 3) + ((size + 63) >> 6) + 5 + 16384


def accept_deflate(max_message_size: int) -> Any:
    """
    An Autobahn C{perMessageCompressionAccept} that accepts the client's
    first permessage-deflate offer, with inflation bounded by the route's
    message size.
    """

    def accept(offers: list[Any]) -> PerMessageDeflateOfferAccept | None:
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return PerMessageDeflateOfferAccept(offer, max_message_size=max_message_size)
        return None

    return accept
