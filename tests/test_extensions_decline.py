"""
A well-formed C{permessage-deflate} offer this server cannot honour (window
bits 8, a sign or leading zero, an unknown or repeated parameter...) is
declined as RFC 7692 section 5 says: the next offer is taken, or none, and
the connection opens uncompressed. It is never refused after the
authentication (Autobahn used to fail the handshake with 400 after logging
the consumer as accepted). A header that is not an extension list at all,
including an empty one (RFC 6455's C{1#extension}), is 400 up front.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from conftest import CapturedLog, aio, raw_exchange, upgrade_request
from test_hardening_handshake import (
    BAD_REQUEST,
    KEY,
    Serve,
    factory,
    negotiated,
    opened,
    refusal_events,
)

from txwssec.compression import parse_extensions

DECLINED = {
    "client-window-bits-8": "permessage-deflate; client_max_window_bits=8",
    "server-window-bits-8": "permessage-deflate; server_max_window_bits=8",
    "window-bits-leading-zero": "permessage-deflate; client_max_window_bits=09",
    "window-bits-plus": "permessage-deflate; client_max_window_bits=+9",
    "window-bits-quoted-leading-zero": 'permessage-deflate; client_max_window_bits="09"',
    "server-window-bits-leading-zero": "permessage-deflate; server_max_window_bits=09",
    "server-window-bits-plus": "permessage-deflate; server_max_window_bits=+9",
    "server-window-bits-no-value": "permessage-deflate; server_max_window_bits",
    "window-bits-exponent": "permessage-deflate; client_max_window_bits=1e1",
    "window-bits-16": "permessage-deflate; client_max_window_bits=16",
    "unknown-param": "permessage-deflate; x_unknown",
    "repeated-param": "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
    "takeover-with-value": "permessage-deflate; client_no_context_takeover=1",
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_offer_declined(name: str) -> None:
    assert parse_extensions(DECLINED[name]) == []
    assert parse_extensions(f"{DECLINED[name]}, permessage-deflate, x") == [
        ("permessage-deflate", {}),
        ("x", {}),
    ]


@pytest.mark.parametrize("name", list(DECLINED))
@pytest_twisted.ensureDeferred
async def test_declined_offer_opens_uncompressed(
    serve: Serve, captured_log: CapturedLog, name: str
) -> None:
    port = serve(factory())
    line = f"Sec-WebSocket-Extensions: {DECLINED[name]}"
    assert negotiated(await aio(opened(port, upgrade_request("/deflate", line)))) == []
    both = f"Sec-WebSocket-Extensions: {DECLINED[name]}, permessage-deflate"
    (answer,) = negotiated(await aio(opened(port, upgrade_request("/deflate", both))))
    assert answer.startswith("permessage-deflate")
    assert refusal_events(captured_log) == []


@pytest.mark.parametrize("name", ["client-window-bits-8", "server-window-bits-8"])
@pytest_twisted.ensureDeferred
async def test_window_bits_8_after_authentication(
    serve: Serve, captured_log: CapturedLog, name: str
) -> None:
    """The consumer admitted is really served (no 400 after the "accepted" line)."""
    port = serve(factory())
    request = upgrade_request(
        "/keyed", f"apikey: {KEY}", f"Sec-WebSocket-Extensions: {DECLINED[name]}"
    )
    assert negotiated(await aio(opened(port, request))) == []
    assert refusal_events(captured_log) == []


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
@pytest_twisted.ensureDeferred
async def test_empty_header_is_400(serve: Serve, captured_log: CapturedLog, value: str) -> None:
    port = serve(factory())
    request = upgrade_request("/plain", f"Sec-WebSocket-Extensions:{value}")
    assert await aio(raw_exchange(port, request)) == BAD_REQUEST
    (event,) = refusal_events(captured_log)
    assert event["status"] == 400
    assert "Sec-WebSocket-Extensions" in event["reason"]
