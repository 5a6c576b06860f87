"""
Policies: everything a route and a server enforce, with safe defaults.

This is the values layer (see docs/architecture.md): it names no protocol.
A route refers to its application by a value, a class or an import string
(C{"package.module.Class"}), that the server factory resolves and checks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from txwssec.credentials import credential_headers, credential_markers
from txwssec.errors import RouteNotFound
from txwssec.interfaces import Authenticator
from txwssec.logs import bounded
from txwssec.origin import OriginPolicy, parse_origin

#: A trusted proxy's network (a single address is a /32 or /128).
ProxyNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: How a route names its application: a protocol class, or the import
#: string of one (C{"package.module.Class"}), resolved by the server factory.
ProtocolRef = type[Any] | str

#: Default largest message, after decompression (1 MiB).
DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


#: Default cap on unsent bytes to a peer that stopped reading (4 MiB).
DEFAULT_MAX_BUFFERED_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RouteLimits:
    """
    Traffic limits of a route. 0 turns a limit off.

    @ivar messages_per_second: per-connection token bucket on messages;
        pings and pongs count as messages. Beyond the burst: close 1008.
    @ivar burst: bucket size in messages (0: one second's worth).
    @ivar bytes_per_second: per-connection token bucket on frame payload
        bytes as received. The bucket holds one second's worth, and never
        less than the route's C{max_message_size}. Beyond: close 1008.
    @ivar consumer_messages_per_second: like C{messages_per_second}, shared
        by all of one consumer's connections on the route (same burst rule).
    @ivar consumer_bytes_per_second: like C{bytes_per_second}, shared by all
        of one consumer's connections on the route.
    @ivar connections_per_consumer: open connections per consumer on the
        route; beyond gives 429 at the handshake.
    @ivar max_buffered_bytes: unsent bytes allowed to pile up for a peer that
        does not read, on top of the transport's own buffer; beyond: close
        1013 and the connection is aborted.
    @ivar max_fragments: frames in one message; beyond: close 1008.
    @ivar max_pending_control_frames: pings and pongs received while writes
        to the peer are blocked; beyond: close 1008.
    """

    messages_per_second: float = 0
    burst: int = 0
    bytes_per_second: float = 0
    consumer_messages_per_second: float = 0
    consumer_bytes_per_second: float = 0
    connections_per_consumer: int = 0
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    max_fragments: int = 1024
    max_pending_control_frames: int = 32

    def message_burst(self, rate: float) -> float:
        """The message bucket size for C{rate}."""
        return float(self.burst) if self.burst else max(1.0, rate)

    @staticmethod
    def byte_burst(rate: float, max_message_size: int) -> float:
        """The byte bucket size for C{rate}."""
        return max(rate, float(max_message_size))


#: The values of L{MessageRules.text} and L{MessageRules.binary}.
TEXT_RULES = ("any", "json", "none")
BINARY_RULES = ("any", "none")


@dataclass(frozen=True)
class MessageRules:
    """
    What a route accepts in each message (see
    L{txwssec.messages.validation}), checked before the application's
    C{onMessage} (or, on a gateway route, before the message is relayed).
    The defaults check nothing.

    @ivar text: C{"any"}, C{"json"} (each text message must be one JSON
        value; else close 1007) or C{"none"} (a text message closes 1003).
    @ivar binary: C{"any"} or C{"none"} (a binary message closes 1003).
    @ivar schema: a JSON Schema (draft 2020-12) that every client->server
        text message must match (else 1007): a file (a L{Path} or a string)
        or the schema itself (a mapping). It implies C{text = "json"}.
    @ivar upstream_schema: gateway routes: a JSON Schema for the
        upstream->client text messages; one that does not match closes the
        client with 1014 and the upstream with 1007.
    @ivar max_json_depth: nesting of arrays and objects allowed in a JSON
        message, checked before it is parsed; deeper closes 1007.

    The schemas are compiled once, the first time the rules are used (by the
    configuration loader, or when a server factory is made).
    """

    text: str = "any"
    binary: str = "any"
    schema: Path | str | Mapping[str, Any] | None = None
    upstream_schema: Path | str | Mapping[str, Any] | None = None
    max_json_depth: int = 32
    #: The compiled validator (see L{txwssec.messages.validation.validator_for}).
    _compiled: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.text not in TEXT_RULES:
            raise ValueError(f"text must be one of {', '.join(TEXT_RULES)}: {self.text!r}")
        if self.binary not in BINARY_RULES:
            raise ValueError(f"binary must be one of {', '.join(BINARY_RULES)}: {self.binary!r}")
        if isinstance(self.max_json_depth, bool) or not isinstance(self.max_json_depth, int):
            raise ValueError("max_json_depth must be an integer")
        if self.max_json_depth < 1:
            raise ValueError("max_json_depth must be at least 1")
        if self.schema is not None and self.text == "none":
            raise ValueError('a schema checks text messages, but text = "none"')

    @property
    def requires_json(self) -> bool:
        """Whether client->server text messages must be JSON."""
        return self.text == "json" or self.schema is not None

    @property
    def active(self) -> bool:
        """Whether anything is checked, in either direction."""
        return (
            self.text != "any"
            or self.binary != "any"
            or self.schema is not None
            or self.upstream_schema is not None
        )


@dataclass(frozen=True)
class Upstream:
    """
    Where a gateway route relays to.

    @ivar urls: C{ws://} or C{wss://} URLs, used round-robin.
    @ivar ca_file: CA bundle for C{wss://} upstreams (default: the system's),
        read at the first connection to each URL.
    @ivar timeout: seconds for the upstream's TCP, TLS and WebSocket
        handshakes together; beyond gives 504.
    @ivar cooldown: seconds an upstream that failed is tried only after the
        healthy ones (passive failure marking).
    """

    urls: tuple[str, ...]
    ca_file: Path | None = None
    timeout: float = 5.0
    cooldown: float = 10.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an upstream needs at least one URL")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(f"upstream {url!r} is not a ws:// or wss:// URL")
            if parts.username or parts.password or parts.fragment:
                raise ValueError(f"upstream {url!r} must not carry user info or a fragment")


#: The values of C{Sealing.mode} and C{Sealing.upstream}.
SEALED_MODES = ("off", "optional", "required")
SEALED_UPSTREAM = ("unseal", "passthrough")


@dataclass(frozen=True)
class Sealing:
    """
    Sealed payloads on a route (C{wssec.sealed.v1}, docs/sealed-v1.md).

    @ivar mode: C{"off"} (the subprotocol is never answered), C{"optional"}
        (sealed when the client offers it), C{"required"} (a client that
        does not offer it gets 403).
    @ivar upstream: on a gateway route, C{"unseal"} (the gateway opens the
        client's messages and relays plaintext) or C{"passthrough"} (the
        offer goes to the upstream, which seals; frames pass untouched).
    @ivar keys: each consumer's secrets (32 bytes each), newest first; never
        shown by C{repr}.
    """

    mode: str = "off"
    upstream: str = "unseal"
    keys: Mapping[str, tuple[bytes, ...]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in SEALED_MODES:
            raise ValueError(f"sealed must be one of {', '.join(SEALED_MODES)}")
        if self.upstream not in SEALED_UPSTREAM:
            raise ValueError(f"sealed_upstream must be one of {', '.join(SEALED_UPSTREAM)}")
        for consumer, keys in self.keys.items():
            if any(len(key) != 32 for key in keys):
                raise ValueError(f"seal keys of {consumer!r} must be 32 bytes each")


@dataclass(frozen=True)
class RoutePolicy:
    """
    What one path enforces.

    @ivar path: the exact request path (no trailing-slash folding).
    @ivar authenticators: methods tried in order; the first that finds its
        credential decides. Must not be empty: use
        L{txwssec.auth.AnonymousAuthenticator} to allow anyone, explicitly.
    @ivar origins: the Origin policy (default: same-origin only).
    @ivar subprotocols: application subprotocols in server preference order.
    @ivar consumers: when set, only these consumers may use the route (403).
    @ivar max_message_size: bytes per message and per frame; bigger closes 1009.
    @ivar max_lifetime: seconds a session may last (0: until its credential
        expires); reaching it closes 3000.
    @ivar idle_timeout: seconds without a data message from the peer before
        closing 3008 (0: off). Pings and pongs do not count as activity.
    @ivar protocol: the L{txwssec.server.SecureServerProtocol} subclass
        serving this route, as a class or an import string
        (C{"myapp.protocols.Chat"}), or L{None} for the factory's
        C{protocol}. The factory resolves and checks it (L{TypeError}).
    @ivar limits: traffic limits (L{RouteLimits}).
    @ivar compression: accept C{permessage-deflate}. Off by default; when on,
        inflation stops at C{max_message_size} (a compression bomb closes
        1009 without being inflated).
    @ivar upstream: relay to this upstream (gateway route) instead of
        running an application; the protocol then defaults to
        L{txwssec.gateway.GatewayProtocol}.
    @ivar forward_cookie: a gateway route forwards the client's C{Cookie}
        header (stripped by default).
    @ivar forward_authorization: a gateway route forwards the client's
        C{Authorization} header (stripped by default). Not allowed when a
        method of the route reads its credential from C{Authorization}: a
        consumed credential is never forwarded.
    @ivar sealing: sealed payloads (L{Sealing}; off by default).
    @ivar messages: what each message must be (L{MessageRules}); by
        default anything within the limits.
    """

    path: str
    authenticators: Sequence[Authenticator]
    origins: OriginPolicy = field(default_factory=OriginPolicy)
    subprotocols: tuple[str, ...] = ()
    consumers: frozenset[str] | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_lifetime: float = 0
    idle_timeout: float = 0
    protocol: ProtocolRef | None = None
    limits: RouteLimits = field(default_factory=RouteLimits)
    compression: bool = False
    upstream: Upstream | None = None
    forward_cookie: bool = False
    forward_authorization: bool = False
    sealing: Sealing = field(default_factory=Sealing)
    messages: MessageRules = field(default_factory=MessageRules)
    refresh: bool = False
    refresh_notice: float = 30
    tickets: bool = False
    ticket_ttl: float = 30

    def __post_init__(self) -> None:
        if self.messages.upstream_schema is not None and self.upstream is None:
            raise ValueError("messages.upstream_schema only applies to routes with an upstream")
        if (
            self.upstream is not None
            and self.sealing.mode != "off"
            and self.sealing.upstream == "passthrough"
            and self.messages.active
        ):
            # The gateway holds no key: it would check ciphertext.
            raise ValueError(
                'messages rules cannot check what sealed_upstream = "passthrough" '
                'passes through sealed (use sealed_upstream = "unseal")'
            )
        if not self.path.startswith("/"):
            raise ValueError(f"route path must start with '/': {self.path!r}")
        if not self.authenticators:
            raise ValueError(f"route {self.path} has no authentication method")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        clash = credential_markers(self.authenticators) & set(self.subprotocols)
        if clash:
            raise ValueError(f"subprotocol {sorted(clash)[0]!r} is a credential marker")
        read = credential_headers(self.authenticators)
        for header, forwarded in (
            ("authorization", self.forward_authorization),
            ("cookie", self.forward_cookie),
        ):
            if forwarded and header in read:
                raise ValueError(
                    f"forward_{header} = true, but a method of the route reads its "
                    f"credential from {header.capitalize()}"
                )


@dataclass(frozen=True)
class ServerPolicy:
    """
    What a listener enforces before and around its routes.

    @ivar routes: the routes, looked up by exact path.
    @ivar handshake_timeout: seconds to complete the opening handshake.
    @ivar close_timeout: seconds to wait for the peer's close frame.
    @ivar max_connections: connections at once; beyond gives 503 (0: off).
    @ivar max_connections_per_ip: connections at once per client address;
        beyond gives 429 (0: off).
    @ivar trust_forwarded_for: X-Forwarded-For hops to believe (0: none),
        each only from a peer in C{trusted_proxies} (see
        L{txwssec.admission.client_address}).
    @ivar trusted_proxies: the proxies whose X-Forwarded-For is believed
        (networks; strings are parsed). Required when
        C{trust_forwarded_for} is set.
    @ivar public_origins: the origins this server is published as (for
        example C{https://app.example.com}): allowed by routes without
        C{allowed_origins} (see L{txwssec.origin}).
    @ivar auth_failures_per_minute: failed authentications per client
        address per minute; beyond gives 429 with C{Retry-After} (0: off).
    @ivar ping_interval: seconds between automatic pings to each peer (0:
        off); a peer that does not answer within C{ping_timeout} is closed
        with 3008.
    @ivar ping_timeout: seconds to wait for the pong.
    @ivar max_header_bytes: size of the handshake's header block; beyond
        gives 431.
    @ivar max_headers: header lines in the handshake; beyond gives 431.
    """

    routes: Sequence[RoutePolicy]
    handshake_timeout: float = 5
    close_timeout: float = 1
    max_connections: int = 10000
    max_connections_per_ip: int = 0
    trust_forwarded_for: int = 0
    trusted_proxies: Sequence[ProxyNetwork] = ()
    public_origins: Sequence[str] = ()
    auth_failures_per_minute: int = 10
    ping_interval: float = 30
    ping_timeout: float = 10
    max_header_bytes: int = 16384
    max_headers: int = 100
    #: A plain GET (no Upgrade) of this path answers 200 "ok" ("": off).
    health_path: str = ""
    _by_path: dict[str, RoutePolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_path: dict[str, RoutePolicy] = {}
        for route in self.routes:
            if route.path in by_path:
                raise ValueError(f"two routes for path {route.path}")
            by_path[route.path] = route
        object.__setattr__(self, "_by_path", by_path)
        object.__setattr__(
            self,
            "trusted_proxies",
            tuple(ipaddress.ip_network(network) for network in self.trusted_proxies),
        )
        for origin in self.public_origins:
            if parse_origin(origin) == "null":
                raise ValueError("public_origins cannot hold null")
        object.__setattr__(self, "public_origins", tuple(self.public_origins))
        if self.trust_forwarded_for and not self.trusted_proxies:
            raise ValueError(
                "trust_forwarded_for needs trusted_proxies (the proxies whose "
                "X-Forwarded-For is believed)"
            )

    @classmethod
    def single(cls, route: RoutePolicy, **options: Any) -> ServerPolicy:
        """A server policy with one route."""
        return cls(routes=(route,), **options)

    def route_for(self, path: str) -> RoutePolicy:
        """
        The route serving C{path}.

        @raise RouteNotFound: if none does.
        """
        try:
            return self._by_path[path]
        except KeyError:
            raise RouteNotFound(f"no route for path {bounded(path)!r}") from None

    def protocol_options(self) -> dict[str, Any]:
        """
        Keyword arguments for Autobahn's C{setProtocolOptions}: txwssec's
        safe defaults in place of Autobahn's (no status page, a handshake
        timeout, bounded frames and messages, masked client frames).
        """
        smallest = min(r.max_message_size for r in self.routes)
        return {
            "webStatus": False,
            # RFC 6455 only: version 8 (hybi-10) carries the origin in
            # Sec-WebSocket-Origin, which the Origin policy does not read.
            "versions": [13],
            "openHandshakeTimeout": self.handshake_timeout,
            "closeHandshakeTimeout": self.close_timeout,
            "maxFramePayloadSize": smallest,
            "maxMessagePayloadSize": smallest,
            "requireMaskedClientFrames": True,
            "utf8validateIncoming": True,
            # Send the close code (1002, 1007, 1008, 1009...) before closing,
            # so clients learn why; the close timeout still bounds the wait.
            "failByDrop": False,
            "autoPingInterval": self.ping_interval,
            "autoPingTimeout": self.ping_timeout,
            "echoCloseCodeReason": False,
            # txwssec derives the client address itself, from trusted proxies
            # only (see txwssec.admission.client_address): Autobahn would put
            # any client-sent X-Forwarded-For value in its peer string.
            "trustXForwardedFor": 0,
            # txwssec checks Origin itself, exactly (see txwssec.origin).
            "allowedOrigins": ["*"],
            # Autobahn refuses Origin: null with 400 unless told otherwise;
            # OriginPolicy decides on it (403 unless listed).
            "allowNullOrigin": True,
            # txwssec counts connections itself (see txwssec.limits).
            "maxConnections": 0,
        }
