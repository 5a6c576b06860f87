"""
The Origin allow-list that stops cross-site WebSocket hijacking (CSWSH).

Origins are compared exactly on scheme, host and port (default ports made
explicit). A request without an Origin header (a non-browser client) is
allowed. C{null} is refused unless listed. C{"*"} allows every origin.

With no list at all, the Origin is compared with what the operator
configured, never with what the client claims (its C{Host} header, which a
DNS-rebinding page controls). It is allowed when it is

  1. one of the server's C{public_origins}; or
  2. on a TLS listener, C{https://NAME[:PORT]} where NAME is a DNS name (or
     IP address) of the listener's certificate (a wildcard covers one
     label, RFC 6125) and PORT the listener's port; or
  3. on a listener bound to a loopback address, C{http(s)://HOST[:PORT]}
     where HOST is a loopback name or address (C{localhost},
     C{*.localhost}, 127.0.0.0/8, C{::1}), the scheme is the listener's
     (https on TLS) and PORT the listener's port;

and refused otherwise (403).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from cryptography import x509
from twisted.internet.interfaces import ISSLTransport

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

Origin = tuple[str, str, int] | str  # (scheme, host, port), or "null"


#: RFC 6454 serialization: scheme "://" host [":" port], nothing else. The
#: port has no leading zero; the host is checked by L{_valid_host}.
_ORIGIN = re.compile(r"([A-Za-z]+)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::([1-9][0-9]{0,4}))?")
#: A DNS label: letters, digits and hyphens, not starting or ending with one.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def parse_origin(text: str) -> Origin:
    """
    Normalise an origin (C{scheme://host[:port]}, or C{null}).

    The form is exactly RFC 6454's serialization (letter case aside, and a
    default port may be written): no path (not even C{/}), user info, query
    or fragment; the port digits without a leading zero, 1-65535; the host
    a DNS name of letter-digit-hyphen labels (no empty label, no C{*}) or an
    IP literal (IPv6 in brackets, without a zone id).

    @raise ValueError: if C{text} is not such an origin.
    """
    text = text.strip()
    if text == "null":
        return "null"
    scheme = text.partition("://")[0].lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("origin scheme must be http, https, ws or wss")
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise ValueError("an origin is scheme://host[:port] only")
    _, host, port_text = match.groups()
    host = host.lower()
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("origin host is not an IPv6 address") from None
        host = host[1:-1]
    elif not _valid_host(host):
        raise ValueError("origin host is not a DNS name or IPv4 address")
    port = int(port_text) if port_text else _DEFAULT_PORTS[scheme]
    if port > 65535:
        raise ValueError("origin port out of range")
    return (scheme, host, port)


def _valid_host(host: str) -> bool:
    """A DNS name of LDH labels (no empty label, no trailing dot)."""
    labels = host.split(".")
    return len(host) <= 253 and all(_LABEL.fullmatch(label) for label in labels)


@dataclass(frozen=True)
class OriginPolicy:
    """
    Which browser origins may open a connection.

    @ivar allowed: normalised allowed origins.
    @ivar any_origin: C{"*"} was listed.
    @ivar same_origin_only: no list was given.
    """

    allowed: frozenset[Origin] = frozenset()
    any_origin: bool = False
    same_origin_only: bool = True
    #: Header values accepted as written, without parsing (the configured
    #: texts, already normalised: a browser sends exactly these).
    allowed_texts: frozenset[str] = frozenset()

    @classmethod
    def from_list(cls, origins: Iterable[str] | None) -> OriginPolicy:
        """
        Build from configured origin texts; L{None} means same-origin only.

        @raise ValueError: for an entry that is not an origin.
        """
        if origins is None:
            return cls()
        entries = list(origins)
        allowed = frozenset(parse_origin(o) for o in entries if o != "*")
        return cls(
            allowed=allowed,
            any_origin="*" in entries,
            same_origin_only=False,
            allowed_texts=frozenset(_browser_form(o) for o in allowed if o != "null"),
        )

    def allows(self, origin_header: str | None, listener: Listener | None = None) -> bool:
        """
        Whether a request with this Origin header (L{None} when absent) may
        connect. With no list, C{listener} (the listener the connection
        arrived on) defines the allowed origins (see the module docstring);
        without it, no browser origin is allowed.
        """
        if origin_header is None:
            return True
        if self.any_origin or origin_header in self.allowed_texts:
            return True
        try:
            origin = parse_origin(origin_header)
        except ValueError:
            return False
        if self.same_origin_only:
            return listener is not None and listener.allows(origin)
        return origin in self.allowed


@dataclass(frozen=True)
class Listener:
    """
    The listener a connection arrived on, as the default Origin rule (no
    C{allowed_origins}) sees it.

    @ivar secure: a TLS listener.
    @ivar host: the local address the connection arrived on.
    @ivar port: the local port.
    @ivar public_origins: the server's C{public_origins}, normalised.
    @ivar certificate: returns the listener's own certificate (read only
        when needed), or L{None}.
    """

    secure: bool = False
    host: str = ""
    port: int = 0
    public_origins: frozenset[Origin] = frozenset()
    certificate: Callable[[], x509.Certificate | None] = field(default=lambda: None)

    def allows(self, origin: Origin) -> bool:
        """The default rule for a parsed Origin (never C{null})."""
        if isinstance(origin, str):
            return False
        if origin in self.public_origins:
            return True
        scheme, host, port = origin
        scheme = _HTTP_SCHEMES[scheme]
        if port != self.port or scheme != ("https" if self.secure else "http"):
            return False
        if _is_loopback_address(self.host) and _is_loopback_name(host):
            return True
        if self.secure:
            certificate = self.certificate()
            if certificate is not None:
                dns, ips = _certificate_names_by_type(certificate)
                address = _ip(host)
                if address is not None:
                    return address in ips
                return any(_name_matches(name, host) for name in dns)
        return False


def listener_for(transport: Any, public_origins: Iterable[str] = ()) -> Listener:
    """The L{Listener} a server C{transport}'s connection arrived on."""
    local = transport.getHost()
    secure = ISSLTransport.providedBy(transport)

    def certificate() -> x509.Certificate | None:
        handle = transport.getHandle() if secure else None
        own = getattr(handle, "get_certificate", lambda: None)()
        return own.to_cryptography() if own is not None else None

    return Listener(
        secure=bool(secure),
        host=str(getattr(local, "host", "")),
        port=int(getattr(local, "port", 0)),
        public_origins=_normalised(tuple(public_origins)),
        certificate=certificate,
    )


@lru_cache(maxsize=16)
def _normalised(origins: tuple[str, ...]) -> frozenset[Origin]:
    return frozenset(parse_origin(text) for text in origins)


@lru_cache(maxsize=16)
def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names and IP addresses of C{certificate}'s subjectAltName."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = [name.lower().rstrip(".") for name in names.get_values_for_type(x509.DNSName)]
    ips = [str(address) for address in names.get_values_for_type(x509.IPAddress)]
    return (*dns, *ips)


@lru_cache(maxsize=16)
def _certificate_names_by_type(
    certificate: x509.Certificate,
) -> tuple[tuple[str, ...], frozenset[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """C{certificate}'s subjectAltName DNS names and IP addresses, apart."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), frozenset()
    dns = tuple(name.lower().rstrip(".") for name in names.get_values_for_type(x509.DNSName))
    ips = names.get_values_for_type(x509.IPAddress)
    return dns, frozenset(
        ip for ip in ips if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    )


def _name_matches(pattern: str, host: str) -> bool:
    """
    A certificate DNS name against an origin's DNS host, as RFC 6125 (and
    service_identity) match them: a wildcard only as the whole left-most
    label of a pattern of at least three labels, covering exactly one
    label; C{*} anywhere else matches nothing. (An IP address host is
    matched against the certificate's IP addresses only.)
    """
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest or rest.count(".") < 1 or not _valid_host(rest):
            return False
        label, dot, host_rest = host.partition(".")
        return bool(label) and bool(dot) and host_rest == rest
    return "*" not in pattern and pattern == host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    return _is_loopback_address(host.strip("[]"))


def _is_loopback_address(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


_HTTP_SCHEMES = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def _browser_form(origin: Origin) -> str:
    """
    The Origin header a browser sends for C{origin} (RFC 6454 section 6.1:
    lower-case scheme and host, the port only when not the default).
    """
    if isinstance(origin, str):
        return origin
    scheme, host, port = origin
    if ":" in host:
        host = f"[{host}]"
    if port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"
