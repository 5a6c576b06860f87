"""
Checks on the raw head of an upgrade request, made before Autobahn or the
pipeline reads it (see L{SecureServerProtocol.processHandshake}).

An upgrade request has no body. One that says otherwise (C{Content-Length}
other than a single C{0}, any C{Transfer-Encoding}) is refused: its "body"
would be read as WebSocket frames here, and as something else by a proxy in
front. C{Sec-WebSocket-Extensions} is parsed strictly, all its lines as one
list (RFC 9110 section 5.3), by L{txwssec.compression.parse_extensions}.
"""

from __future__ import annotations

from txwssec.compression import parse_extensions
from txwssec.errors import MalformedHandshake

_EXTENSIONS = "sec-websocket-extensions"


def check_request_head(data: bytes, end: int) -> bytes:
    """
    Check the request head C{data[:end]} (C{end} is where its final CRLFCRLF
    starts) for a body and for malformed extension offers.

    @return: C{data}, with several C{Sec-WebSocket-Extensions} lines joined
        into one (in the place of the first) when there were several:
        Autobahn refuses repeated lines, RFC 6455 section 9.1 allows them.
    @raise MalformedHandshake: naming the header (400).
    """
    lowered = data[:end].lower()
    if b"content-length" not in lowered and b"transfer-encoding" not in lowered:
        if b"sec-websocket-extensions" not in lowered:
            return data  # none of the headers checked here (the common case)
    request_line, *lines = data[:end].decode("iso-8859-1").split("\r\n")
    lengths: list[str] = []
    extensions: list[str] = []
    for line in lines:
        name, _, value = line.partition(":")
        name = name.lower()
        if name == "transfer-encoding":
            raise MalformedHandshake("Transfer-Encoding on an upgrade request (it has no body)")
        if name == "content-length":
            lengths.append(value.strip(" \t"))
        elif name == _EXTENSIONS:
            extensions.append(value.strip(" \t"))
    if len(lengths) > 1:
        raise MalformedHandshake("Content-Length sent more than once on an upgrade request")
    if lengths and lengths[0] != "0":
        raise MalformedHandshake("Content-Length other than 0 on an upgrade request")
    if not extensions:
        return data
    joined = ", ".join(extensions)
    try:
        parse_extensions(joined)
    except ValueError as error:
        raise MalformedHandshake(str(error)) from None
    if len(extensions) == 1:
        return data
    head = [request_line]
    for line in lines:
        if line.partition(":")[0].lower() != _EXTENSIONS:
            head.append(line)
        elif joined:
            head.append(f"Sec-WebSocket-Extensions: {joined}")
            joined = ""
    return "\r\n".join(head).encode("iso-8859-1") + data[end:]
