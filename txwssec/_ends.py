"""
How a session's connection ended, for the C{session.closed} event: who
closed it, with which code, and the traffic each way, read once from
Autobahn's per-connection counters (nothing is counted per message here).
"""

from __future__ import annotations

from typing import Any

#: The initiators of a close.
SERVER = "server"
PEER = "peer"


def end_fields(protocol: Any, duration: float) -> dict[str, Any]:
    """
    The fields C{session.closed} adds to the session's own: C{code} (the
    close code the initiator sent, L{None} when the connection ended without
    one), C{initiator} (C{"server"} or C{"peer"}), C{duration_s}, and
    C{messages_in}, C{messages_out}, C{bytes_in}, C{bytes_out} (the open
    session's messages and bytes on the wire, each way).
    """
    if getattr(protocol, "closedByMe", False):
        initiator, code = SERVER, protocol.localCloseCode
    elif getattr(protocol, "remoteCloseCode", None) is not None:
        initiator, code = PEER, protocol.remoteCloseCode
    elif getattr(protocol, "droppedByMe", False):
        initiator, code = SERVER, None
    else:
        initiator, code = PEER, None
    stats = protocol.trafficStats
    return {
        "code": code,
        "initiator": initiator,
        "duration_s": round(max(duration, 0.0), 6),
        "messages_in": stats.incomingWebSocketMessages,
        "messages_out": stats.outgoingWebSocketMessages,
        "bytes_in": stats.incomingOctetsWireLevel,
        "bytes_out": stats.outgoingOctetsWireLevel,
    }
