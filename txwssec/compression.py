"""
permessage-deflate (RFC 7692) with inflation bounded by the route's
C{max_message_size}: a compression bomb is refused with 1009 without being
inflated, and a message over the limit is never silently truncated.

The client's C{Sec-WebSocket-Extensions} offers are parsed here too, strictly
(L{parse_extensions}): Autobahn's own parser splits on every comma and
semicolon, even inside a quoted string, so a quoted parameter value could
smuggle in an offer the client never made.
"""

from __future__ import annotations

import re
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


#: RFC 9110 section 5.6.2: a token.
_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
#: RFC 9110 section 5.6.4: a quoted-string (qdtext and quoted-pairs).
_QUOTED = r'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_OWS = r"[ \t]*"
_PARAM = rf"{_OWS};{_OWS}({_TCHARS})(?:{_OWS}={_OWS}({_TCHARS}|{_QUOTED}))?"
_EXTENSION = rf"{_TCHARS}(?:{_OWS};{_OWS}{_TCHARS}(?:{_OWS}={_OWS}(?:{_TCHARS}|{_QUOTED}))?)*"
#: RFC 6455 section 9.1 with the list rule of RFC 9110 section 5.6.1: one
#: extension at least; empty elements between commas are allowed.
_EXTENSION_LIST = re.compile(
    rf"{_OWS}(?:,{_OWS})*{_EXTENSION}(?:{_OWS},(?:{_OWS}{_EXTENSION})?)*{_OWS}"
)
_EXTENSION_PARTS = re.compile(rf"({_TCHARS})((?:{_PARAM})*)")
_PARAM_PARTS = re.compile(_PARAM)
_QUOTED_PAIR = re.compile(r"\\(.)")
_WHOLE_TCHARS = re.compile(_TCHARS)
#: RFC 7692 section 7.1.2: 8 to 15, decimal, no leading zero; 8 is not
#: supported (zlib's smallest window is 9).
_WINDOW_BITS = re.compile(r"9|1[0-5]")
_WINDOW_BITS_PARAMS = ("client_max_window_bits", "server_max_window_bits")

#: One parsed offer as Autobahn represents it: the extension name and, per
#: parameter name, its values (C{True} for a parameter without a value).
ExtensionOffer = tuple[str, dict[str, list[str | bool]]]


def parse_extensions(value: str) -> list[ExtensionOffer]:
    """
    Parse a C{Sec-WebSocket-Extensions} value (all its header lines joined
    with commas) the way RFC 6455 section 9.1 defines it::

        extension-list = 1#extension
        extension = token *( ";" param )
        param = token [ "=" ( token / quoted-string ) ]

    A quoted value must be a token once unquoted. Names are lower-cased, as
    Autobahn does.

    A C{permessage-deflate} offer that cannot be accepted as it is written
    is declined, as RFC 7692 section 5 says a server does: left out of the
    result, so that the next offer is considered, or none. That is an offer
    with a parameter this server does not know, one given twice, or an
    invalid or unsupported value: the window sizes
    (C{client_max_window_bits}, C{server_max_window_bits}) must be C{9} to
    C{15} written without a sign or leading zero (RFC 7692 section 7.1.2
    allows C{8}, which zlib cannot honour), and C{server_max_window_bits}
    must have one.

    @return: the offers not declined, in order, in the form of Autobahn's
        C{_parseExtensionsHeader}.
    @raise ValueError: naming what is malformed (no header value in it).
    """
    if not _EXTENSION_LIST.fullmatch(value):
        raise ValueError("Sec-WebSocket-Extensions is not a list of extensions")
    offers: list[ExtensionOffer] = []
    for extension in _EXTENSION_PARTS.finditer(value):
        name = extension.group(1).lower()
        params: dict[str, list[str | bool]] = {}
        for param in _PARAM_PARTS.finditer(extension.group(2)):
            key, raw = param.group(1).lower(), param.group(2)
            parsed: str | bool = True
            if raw is not None:
                parsed = raw
                if raw.startswith('"'):
                    parsed = _QUOTED_PAIR.sub(r"\1", raw[1:-1])
                    if not _WHOLE_TCHARS.fullmatch(parsed):
                        raise ValueError(
                            "Sec-WebSocket-Extensions has a quoted value that is not a token"
                        )
            params.setdefault(key, []).append(parsed)
        if name == "permessage-deflate" and not _deflate_offer_acceptable(params):
            continue  # declined (RFC 7692 section 5)
        offers.append((name, params))
    return offers


def _deflate_offer_acceptable(params: dict[str, list[str | bool]]) -> bool:
    """
    Whether a C{permessage-deflate} offer's parameters can be honoured:
    window sizes written plainly and supported, and whatever else Autobahn's
    own offer parser checks (known parameters, each once, valid values).
    """
    for key in _WINDOW_BITS_PARAMS:
        for parsed in params.get(key, ()):
            # client_max_window_bits may come without a value; the server's
            # size needs one (RFC 7692 section 7.1.2).
            if parsed is True:
                if key != "client_max_window_bits":
                    return False
            elif _WINDOW_BITS.fullmatch(str(parsed)) is None:
                return False
    try:
        PerMessageDeflateOffer.parse(params)
    except Exception:  # Autobahn raises Exception for every refusal
        return False
    return True
