"""
Sealed payloads, C{wssec.sealed.v1} (specified in docs/sealed-v1.md): every
message AES-256-GCM encrypted under per-session, per-direction keys derived
with HKDF-SHA256 from a per-consumer secret and a nonce from each side of the
handshake; the AEAD nonce is a per-direction counter, so a replayed,
reordered, dropped, truncated or altered message fails to open.

This module holds the wire format and the key schedule, shared by the
server, the gateway and the Python client; it does no I/O and never logs.
Keys live only in L{Direction} objects and in the configuration, and no
repr shows them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: The subprotocol name, offered by the client and answered by the server.
PROTOCOL = "wssec.sealed.v1"
#: The prefix of the client's offer entry: C{wssec.seal.<base64url(kid || nonce)>}.
OFFER_PREFIX = "wssec.seal."
#: Bytes of a secret (AES-256).
KEY_BYTES = 32
#: Bytes of a key id, and of each side's handshake nonce.
KID_BYTES = 8
NONCE_BYTES = 16
#: Message kinds (the first byte of every sealed message, authenticated).
HELLO, TEXT, BINARY = 0, 1, 2
#: kind (1 byte) and counter (8 bytes, big-endian).
HEADER_BYTES = 9
TAG_BYTES = 16
#: The close code for a message that does not open (see docs/sealed-v1.md).
CLOSE_CODE = 1007
#: The fixed reason sent to the peer with L{CLOSE_CODE}.
CLOSE_REASON = "sealed message rejected"
#: Counters stop here: a session sends at most 2**32 messages each way
#: (then it is closed; reconnect for fresh keys).
MAX_COUNTER = 2**32

_KID_LABEL = b"wssec.sealed.v1 key id"
_C2S, _S2C = b"c2s", b"s2c"
_NONCE_PREFIX = {_C2S: b"\x00\x00\x00\x00", _S2C: b"\x00\x00\x00\x01"}
_HEADER = struct.Struct(">BQ")
_OFFER_CHARS = 32  # base64url of 24 bytes, no padding


class SealError(Exception):
    """
    A sealed message (or the handshake's offer or hello) is not valid. The
    message names which check failed, for the operator's log only; the
    peer gets L{CLOSE_CODE} and L{CLOSE_REASON}.
    """


def parse_key(text: str) -> bytes:
    """
    A configured secret: C{"base64:<standard or url-safe base64 of 32 bytes>"}.

    @raise ValueError: for anything else (the message never quotes the value).
    """
    if not text.startswith("base64:"):
        raise ValueError('seal key must be "base64:<32 bytes in base64>"')
    encoded = text[len("base64:") :].strip()
    try:
        key = base64.b64decode(encoded.replace("-", "+").replace("_", "/"), validate=True)
    except ValueError:
        raise ValueError("seal key is not valid base64") from None
    if len(key) != KEY_BYTES:
        raise ValueError(f"seal key must be {KEY_BYTES} bytes (base64 of 32 random bytes)")
    return key


def new_key() -> str:
    """A fresh secret in the configuration's form (C{base64:...})."""
    return "base64:" + base64.b64encode(os.urandom(KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> bytes:
    """
    The 8-byte id under which a client names its key:
    HMAC-SHA256(key, "wssec.sealed.v1 key id"), first 8 bytes.
    """
    return hmac.new(key, _KID_LABEL, hashlib.sha256).digest()[:KID_BYTES]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_offer(key: bytes, client_nonce: bytes) -> str:
    """The client's C{Sec-WebSocket-Protocol} entry naming its key and nonce."""
    return OFFER_PREFIX + _b64url(key_id(key) + client_nonce)


def parse_offer(entries: Iterable[str]) -> tuple[bytes, bytes] | None:
    """
    Find the client's offer among the C{Sec-WebSocket-Protocol} entries.

    @return: C{(kid, client_nonce)}, or L{None} if no entry starts with
        L{OFFER_PREFIX}.
    @raise SealError: for a malformed entry or more than one.
    """
    found = [entry for entry in entries if entry.startswith(OFFER_PREFIX)]
    if not found:
        return None
    if len(found) > 1:
        raise SealError("more than one seal offer")
    encoded = found[0][len(OFFER_PREFIX) :]
    if len(encoded) != _OFFER_CHARS or not all(c in _B64URL for c in encoded):
        raise SealError("malformed seal offer")
    raw = base64.urlsafe_b64decode(encoded)
    return raw[:KID_BYTES], raw[KID_BYTES:]


_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def find_key(keys: Iterable[bytes], kid: bytes) -> bytes | None:
    """The key among C{keys} whose id is C{kid} (compared in constant time)."""
    match = None
    for key in keys:
        if hmac.compare_digest(key_id(key), kid):
            match = key
    return match


def derive_keys(
    key: bytes, client_nonce: bytes, server_nonce: bytes, path: str
) -> tuple[bytes, bytes]:
    """
    The session's two keys, client-to-server then server-to-client:
    HKDF-SHA256(ikm=key, salt=client_nonce || server_nonce,
    info="wssec.sealed.v1" 0x00 direction 0x00 kid path, length=32).
    """
    salt = client_nonce + server_nonce
    kid = key_id(key)
    path_bytes = path.encode("utf-8")
    derived = []
    for direction in (_C2S, _S2C):
        info = PROTOCOL.encode("ascii") + b"\x00" + direction + b"\x00" + kid + path_bytes
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info)
        derived.append(hkdf.derive(key))
    return derived[0], derived[1]


class Direction:
    """
    One direction of a sealed session: its AEAD key and counter. A sender
    seals with consecutive counters; a receiver accepts only the next one.
    """

    __slots__ = ("_aead", "_prefix", "counter")

    def __init__(self, key: bytes, direction: bytes) -> None:
        self._aead = AESGCM(key)
        self._prefix = _NONCE_PREFIX[direction]
        self.counter = 0

    def __repr__(self) -> str:
        return f"<Direction counter={self.counter}>"

    def seal(self, kind: int, payload: bytes, extra: bytes = b"") -> bytes:
        """The sealed message of C{kind} carrying C{payload}."""
        counter = self.counter
        if counter >= MAX_COUNTER:
            raise SealError("counter exhausted")
        self.counter = counter + 1
        header = _HEADER.pack(kind, counter) + extra
        nonce = self._prefix + struct.pack(">Q", counter)
        return header + self._aead.encrypt(nonce, payload, header)

    def open(self, message: bytes, extra_bytes: int = 0) -> tuple[int, bytes]:
        """
        Open the next sealed message.

        @return: its kind and plaintext.
        @raise SealError: truncated, out of order, replayed, or altered.
        """
        end = HEADER_BYTES + extra_bytes
        if len(message) < end + TAG_BYTES:
            raise SealError("truncated")
        kind, counter = _HEADER.unpack_from(message)
        if counter != self.counter:
            raise SealError(f"counter {counter}, expected {self.counter}")
        view = memoryview(message)  # no copy of the ciphertext
        try:
            plaintext = self._aead.decrypt(
                self._prefix + message[1:HEADER_BYTES], view[end:], view[:end]
            )
        except InvalidTag:
            raise SealError("authentication failed") from None
        self.counter = counter + 1
        return kind, plaintext


class SealedSession:
    """
    Both directions of one sealed session, for one side. Made by
    L{server_session} or L{ClientHandshake.accept_hello}.
    """

    __slots__ = ("_receive", "_send")

    def __init__(self, send: Direction, receive: Direction) -> None:
        self._send = send
        self._receive = receive

    def __repr__(self) -> str:
        return f"<SealedSession sent={self._send.counter} received={self._receive.counter}>"

    def seal(self, payload: bytes, is_binary: bool) -> bytes:
        """Seal an application message (sent as a binary frame)."""
        return self._send.seal(BINARY if is_binary else TEXT, payload)

    def outgoing(self, payload: bytes, is_binary: bool) -> tuple[bytes, bool]:
        """
        L{seal} as a protocol's C{_outgoing} hook (L{txwssec._hooks.OpenOnly}):
        the sealed message and its frame type (always binary).
        """
        return self._send.seal(BINARY if is_binary else TEXT, payload), True

    def unseal(self, message: bytes, is_binary: bool) -> tuple[bytes, bool]:
        """
        Open a received frame's payload.

        @return: the application's payload and whether it is binary.
        @raise SealError: for a text frame, a bad message, a kind other than
            text or binary, or a text message that is not UTF-8.
        """
        if not is_binary:
            raise SealError("sealed message in a text frame")
        kind, payload = self._receive.open(message)
        if kind == BINARY:
            return payload, True
        if kind != TEXT:
            raise SealError(f"unexpected kind {kind}")
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise SealError("text message is not UTF-8") from None
        return payload, False


def server_session(
    key: bytes, client_nonce: bytes, path: str, server_nonce: bytes | None = None
) -> tuple[SealedSession, bytes]:
    """
    The server's side of a session the client offered with C{client_nonce}.

    @return: the session and the hello to send as the first message (a
        binary frame): kind 0, counter 0, the server's nonce, the tag of
        the empty plaintext.
    """
    if server_nonce is None:
        server_nonce = os.urandom(NONCE_BYTES)
    c2s, s2c = derive_keys(key, client_nonce, server_nonce, path)
    send = Direction(s2c, _S2C)
    hello = send.seal(HELLO, b"", server_nonce)
    return SealedSession(send, Direction(c2s, _C2S)), hello


class ClientHandshake:
    """
    The client's side before the server's hello: its offer entry; then
    L{accept_hello} gives the session.
    """

    __slots__ = ("_key", "_nonce", "_path", "offer")

    def __init__(self, key: bytes, path: str, client_nonce: bytes | None = None) -> None:
        self._key = key
        self._path = path
        self._nonce = client_nonce if client_nonce is not None else os.urandom(NONCE_BYTES)
        #: The C{Sec-WebSocket-Protocol} entry to offer after L{PROTOCOL}.
        self.offer = make_offer(key, self._nonce)

    def __repr__(self) -> str:
        return f"<ClientHandshake path={self._path!r}>"

    def accept_hello(self, message: bytes, is_binary: bool) -> SealedSession:
        """
        Check the server's hello (the first message) and start the session.

        @raise SealError: not a valid hello for this key and offer.
        """
        if not is_binary or len(message) != HEADER_BYTES + NONCE_BYTES + TAG_BYTES:
            raise SealError("malformed hello")
        if message[0] != HELLO:
            raise SealError("first message is not a hello")
        server_nonce = message[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
        c2s, s2c = derive_keys(self._key, self._nonce, server_nonce, self._path)
        receive = Direction(s2c, _S2C)
        kind, _ = receive.open(message, NONCE_BYTES)
        if kind != HELLO:  # pragma: no cover - checked above, authenticated here
            raise SealError("first message is not a hello")
        return SealedSession(Direction(c2s, _C2S), receive)
