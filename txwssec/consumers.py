"""
Consumers: the named identities that credentials map to.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from txwssec.errors import ConfigError

_SHA256_PREFIX = "sha256:"


def key_digest(key: str) -> bytes:
    """
    The SHA-256 digest under which an API key is stored and looked up.
    """
    return hashlib.sha256(key.encode("utf-8")).digest()


def normalise_subject(subject: str) -> str:
    """
    The canonical RFC 4514 form of a distinguished name, as written in
    configuration files: C{"CN=alice,O=Example"}, C{"CN=alice, O=Example"}
    and C{"cn=alice,o=Example"} are the same name. (Spaces around the
    separators and the case of attribute names are folded; attribute
    values are kept as written.)

    @raise ValueError: if C{subject} is not a distinguished name.
    """
    if not subject.strip():
        raise ValueError("empty distinguished name")
    parts = []
    for part in _UNESCAPED_COMMA.split(subject):
        attribute, equals, value = part.strip().partition("=")
        attribute = attribute.strip()
        if not equals or not attribute:
            raise ValueError(_NOT_A_NAME)
        parts.append(f"{attribute.upper() if attribute.isalpha() else attribute}={value.strip()}")
    try:
        name = x509.Name.from_rfc4514_string(",".join(parts))
    except ValueError:
        raise ValueError(
            'not an RFC 4514 distinguished name (e.g. "CN=alice,O=Example")'
        ) from None
    return name.rfc4514_string()


_NOT_A_NAME = 'not an RFC 4514 distinguished name (e.g. "CN=alice,O=Example")'
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


def parse_fingerprint(text: str) -> bytes:
    """
    A SHA-256 certificate fingerprint from C{sha256:<hex>} (colons between
    bytes allowed, as openssl prints them).

    @raise ValueError: for anything else.
    """
    if not text.lower().startswith(_SHA256_PREFIX):
        raise ValueError('fingerprint must be "sha256:<hex>"')
    hex_digits = text[len(_SHA256_PREFIX) :].replace(":", "")
    try:
        digest = bytes.fromhex(hex_digits)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError("sha256: fingerprint must be 64 hex digits")
    return digest


def parse_stored_key(stored: str) -> bytes:
    """
    Turn a configured key (plain, or C{sha256:<hex>}) into its digest.

    @raise ValueError: for a malformed C{sha256:} value.
    """
    if stored.startswith(_SHA256_PREFIX):
        try:
            digest = bytes.fromhex(stored[len(_SHA256_PREFIX) :])
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise ValueError("sha256: digest must be 64 hex digits")
        return digest
    if not stored:
        raise ValueError("key must not be empty")
    return key_digest(stored)


@dataclass(frozen=True)
class Consumer:
    """
    A configured consumer.

    @ivar name: the consumer's name (its identity everywhere else).
    @ivar key_digests: SHA-256 digests of its API keys.
    @ivar password: its password hash for Basic auth (see L{txwssec.passwords}).
    @ivar tls_subjects: client certificate subjects (RFC 4514 strings, as
        normalised by L{normalise_subject}) that identify it.
    @ivar tls_fingerprints: SHA-256 fingerprints of client certificates that
        identify it.
    @ivar seal_keys: its secrets for sealed payloads (32 bytes each; see
        docs/sealed-v1.md), never shown by C{repr}.
    """

    name: str
    key_digests: tuple[bytes, ...] = ()
    password: str | None = None
    tls_subjects: tuple[str, ...] = ()
    tls_fingerprints: tuple[bytes, ...] = ()
    seal_keys: tuple[bytes, ...] = field(default=(), repr=False)


class ConsumerDirectory:
    """
    Looks consumers up by name and by API key.

    Keys are found through their SHA-256 digest, then the digest is confirmed
    with L{hmac.compare_digest}: the dictionary lookup can only leak timing
    about a hash of the key, never about the key itself.
    """

    def __init__(self, consumers: Iterable[Consumer] = ()) -> None:
        self._by_name: dict[str, Consumer] = {}
        self._by_digest: dict[bytes, Consumer] = {}
        self._by_subject: dict[str, Consumer] = {}
        self._by_fingerprint: dict[bytes, Consumer] = {}
        self._seal_keys: dict[bytes, str] = {}
        for consumer in consumers:
            self.add(consumer)

    def add(self, consumer: Consumer, path: str = "consumer") -> None:
        """
        Add C{consumer}; a reused name or key is a L{ConfigError} at C{path}.
        """
        if consumer.name in self._by_name:
            raise ConfigError(f"{path}.name", f'duplicate consumer name "{consumer.name}"')
        for index, digest in enumerate(consumer.key_digests):
            if digest in self._by_digest:
                raise ConfigError(
                    f"{path}.keys[{index}]",
                    f'key already belongs to consumer "{self._by_digest[digest].name}"',
                )
        for subject in consumer.tls_subjects:
            if subject in self._by_subject:
                raise ConfigError(
                    f"{path}.tls_subject",
                    f'subject already belongs to consumer "{self._by_subject[subject].name}"',
                )
        for fingerprint in consumer.tls_fingerprints:
            if fingerprint in self._by_fingerprint:
                raise ConfigError(
                    f"{path}.tls_fingerprint",
                    "fingerprint already belongs to consumer "
                    f'"{self._by_fingerprint[fingerprint].name}"',
                )
        for index, key in enumerate(consumer.seal_keys):
            owner = self._seal_keys.get(key)
            if owner is not None:
                # A key names its consumer (docs/sealed-v1.md): never shared.
                raise ConfigError(
                    f"{path}.seal_keys[{index}]", f'seal key already belongs to consumer "{owner}"'
                )
            self._seal_keys[key] = consumer.name
        self._by_name[consumer.name] = consumer
        for digest in consumer.key_digests:
            self._by_digest[digest] = consumer
        for subject in consumer.tls_subjects:
            self._by_subject[subject] = consumer
        for fingerprint in consumer.tls_fingerprints:
            self._by_fingerprint[fingerprint] = consumer

    def by_name(self, name: str) -> Consumer | None:
        """The consumer called C{name}, if any."""
        return self._by_name.get(name)

    def by_key(self, key: str) -> Consumer | None:
        """The consumer owning API key C{key}, if any (constant-time confirm)."""
        digest = key_digest(key)
        consumer = self._by_digest.get(digest)
        if consumer is None:
            return None
        for stored in consumer.key_digests:
            if hmac.compare_digest(stored, digest):
                return consumer
        return None

    def by_certificate(self, certificate: x509.Certificate) -> Consumer | None:
        """
        The consumer identified by a client certificate: by its SHA-256
        fingerprint first, then by its subject.
        """
        fingerprint = certificate.fingerprint(hashes.SHA256())
        consumer = self._by_fingerprint.get(fingerprint)
        if consumer is not None:
            return consumer
        return self._by_subject.get(certificate.subject.rfc4514_string())

    def seal_keys(self) -> dict[str, tuple[bytes, ...]]:
        """Each consumer's seal keys, for the consumers that have some."""
        return {name: c.seal_keys for name, c in self._by_name.items() if c.seal_keys}

    def names(self) -> Mapping[str, Consumer]:
        """All consumers by name."""
        return dict(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)
