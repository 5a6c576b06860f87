"""
Password hashes for HTTP Basic authentication.

Formats (all base64 fields are standard base64 without newlines)::

    scrypt:<log2 N>:<r>:<p>:<salt>:<hash>
    pbkdf2-sha256:<iterations>:<salt>:<hash>

Produce them with C{python -m txwssec hash-password}.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

SCRYPT_LOG2_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
PBKDF2_ITERATIONS = 600_000
_SALT_BYTES = 16
_HASH_BYTES = 32
# scrypt needs 128 * N * r bytes; allow what our own parameters need, with room.
_SCRYPT_MAXMEM = 128 * (2**17) * 8 + 1024 * 1024


def hash_password(password: str, scheme: str = "scrypt") -> str:
    """
    Hash C{password} with a fresh random salt.

    @param scheme: C{"scrypt"} (default) or C{"pbkdf2-sha256"}.
    """
    salt = secrets.token_bytes(_SALT_BYTES)
    secret = password.encode("utf-8")
    if scheme == "scrypt":
        digest = _scrypt(secret, salt, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P)
        fields = [scheme, str(SCRYPT_LOG2_N), str(SCRYPT_R), str(SCRYPT_P)]
    elif scheme == "pbkdf2-sha256":
        digest = hashlib.pbkdf2_hmac("sha256", secret, salt, PBKDF2_ITERATIONS)
        fields = [scheme, str(PBKDF2_ITERATIONS)]
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    return ":".join([*fields, _b64(salt), _b64(digest)])


def check_password_hash(stored: str) -> None:
    """
    Validate the format of a stored hash.

    @raise ValueError: naming what is wrong (never echoing the value).
    """
    _parse(stored)


def verify_password(password: str, stored: str) -> bool:
    """
    Whether C{password} matches C{stored}, compared in constant time.

    This is deliberately slow (tens of milliseconds): call it off the reactor
    thread.
    """
    scheme, params, salt, expected = _parse(stored)
    secret = password.encode("utf-8")
    if scheme == "scrypt":
        log2_n, r, p = params
        actual = _scrypt(secret, salt, log2_n, r, p, len(expected))
    else:
        (iterations,) = params
        actual = hashlib.pbkdf2_hmac("sha256", secret, salt, iterations, len(expected))
    return hmac.compare_digest(actual, expected)


#: A valid hash of a random password, verified against when a user name is
#: unknown so that unknown and known names take the same time.
DUMMY_HASH = "scrypt:15:8:1:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="


def dummy_hash_like(stored: str) -> str:
    """
    A hash with the scheme and cost parameters of C{stored} that no password
    matches: verifying against it takes as long as verifying against
    C{stored}, so an unknown user name costs what a known one does.
    """
    scheme, params, salt, digest = _parse(stored)
    zero_salt, zero_digest = _b64(bytes(len(salt))), _b64(bytes(len(digest)))
    return ":".join([scheme, *map(str, params), zero_salt, zero_digest])


def _scrypt(
    secret: bytes, salt: bytes, log2_n: int, r: int, p: int, length: int = _HASH_BYTES
) -> bytes:
    return hashlib.scrypt(
        secret, salt=salt, n=2**log2_n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=length
    )


def _parse(stored: str) -> tuple[str, tuple[int, ...], bytes, bytes]:
    fields = stored.split(":")
    scheme = fields[0]
    if scheme == "scrypt":
        if len(fields) != 6:
            raise ValueError("scrypt hash must be scrypt:<log2 N>:<r>:<p>:<salt>:<hash>")
        params = tuple(_int(v) for v in fields[1:4])
        log2_n, r, p = params
        if not (10 <= log2_n <= 17 and 1 <= r <= 16 and 1 <= p <= 4):
            raise ValueError("scrypt parameters out of range (log2 N 10-17, r 1-16, p 1-4)")
    elif scheme == "pbkdf2-sha256":
        if len(fields) != 4:
            raise ValueError("pbkdf2-sha256 hash must be pbkdf2-sha256:<iterations>:<salt>:<hash>")
        params = (_int(fields[1]),)
        if not 100_000 <= params[0] <= 10_000_000:
            raise ValueError("pbkdf2-sha256 iterations must be 100000-10000000")
    else:
        raise ValueError('unknown password scheme (expected "scrypt:" or "pbkdf2-sha256:")')
    salt, digest = _unb64(fields[-2]), _unb64(fields[-1])
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("salt or hash too short")
    return scheme, params, salt, digest


def _int(text: str) -> int:
    if not text.isdigit():
        raise ValueError("hash parameters must be integers")
    return int(text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("salt and hash must be base64") from None
