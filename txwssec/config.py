"""
The TOML configuration (docs/configuration.rst) read into
typed values, with errors that name the key path.

About 500 lines: the whole schema in one place (the composition root of the
top layer, see docs/architecture.md); to be split by section (auth, routes,
TLS) once the work in progress on [auth.*] has landed.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint

from txwssec._schema import Table
from txwssec.apps import BUILTIN_APPS
from txwssec.auth.context import BuildContext
from txwssec.auth.credentials import credential_headers, credential_markers
from txwssec.auth.registry import builder_for, registered_names
from txwssec.collector import DEFAULT_YOUNG_THRESHOLD
from txwssec.consumers import (
    Consumer,
    ConsumerDirectory,
    normalise_subject,
    parse_fingerprint,
    parse_stored_key,
)
from txwssec.errors import ConfigError
from txwssec.interfaces import Authenticator
from txwssec.listen import Description, resolve_files, server_endpoint
from txwssec.messages.sealing import parse_key
from txwssec.messages.validation import read_rules
from txwssec.ops.settings import (
    DEFAULT_LOG,
    AdminSettings,
    LogSettings,
    admin_settings,
    log_settings,
)
from txwssec.ops.settings import health_path as _health_path
from txwssec.origin import OriginPolicy, parse_origin
from txwssec.passwords import check_password_hash
from txwssec.policy import (
    SEALED_MODES,
    SEALED_UPSTREAM,
    ProxyNetwork,
    RouteLimits,
    RoutePolicy,
    Sealing,
    ServerPolicy,
)
from txwssec.proxy import Upstream
from txwssec.reuseport import unshareable
from txwssec.server import SecureServerProtocol
from txwssec.store.settings import DEFAULT_STATE, StateSettings, state_settings
from txwssec.tickets import MAX_TICKET_TTL
from txwssec.tls import (
    ReloadingContextFactory,
    TLSSettings,
    TLSSettingsError,
    load_certificates,
)


@dataclass(frozen=True)
class Config:
    """
    A loaded configuration.

    @ivar listen: listen descriptions (see L{txwssec.listen}).
    @ivar policy: the server policy with its routes.
    @ivar consumers: the consumers.
    @ivar tls: the context factory of the C{[tls]} table, if any.
    @ivar gc_young_threshold: the cycle collector's young-generation
        threshold C{twistd wssec} sets (see L{txwssec.collector}); 0 leaves
        the collector as Python set it.
    @ivar shutdown_timeout: seconds a graceful stop waits for the sessions'
        close handshakes (see L{txwssec.lifecycle}).
    """

    listen: tuple[str, ...]
    policy: ServerPolicy
    consumers: ConsumerDirectory
    tls: ReloadingContextFactory | None = None
    gc_young_threshold: int = DEFAULT_YOUNG_THRESHOLD
    #: C{[admin]}, if present (see L{txwssec.ops}).
    admin: AdminSettings | None = None
    #: C{[log]} (see L{txwssec.ops}).
    log: LogSettings = DEFAULT_LOG
    shutdown_timeout: float = 10.0
    #: C{[server] workers}: processes sharing the listeners (see
    #: L{txwssec.workers}); C{"auto"} is resolved to the CPU count.
    workers: int = 1
    #: C{[state]}: where the state store lives (see L{txwssec.store.settings}).
    state: StateSettings = DEFAULT_STATE

    def endpoints(self, reactor: Any) -> list[IStreamServerEndpoint]:
        """One server endpoint per listen description."""
        return [server_endpoint(reactor, description, self.tls) for description in self.listen]


def load(path: str | Path) -> Config:
    """
    Read and validate the configuration file at C{path}.

    @raise ConfigError: naming the key path of the first problem. Like
        every message, one about the file itself (unreadable, not UTF-8,
        not TOML) does not repeat the file name: callers prefix it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("", f"cannot read: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", "not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("", f"invalid TOML: {error}") from None
    return parse(data, base_dir=path.parent)


def parse(data: Mapping[str, Any], base_dir: Path = Path()) -> Config:
    """
    Validate already-decoded TOML C{data}; relative file names are resolved
    against C{base_dir}.

    @raise ConfigError: naming the key path of the first problem.
    """
    root = Table(data, "")
    server = root.table("server")
    listen = tuple(
        resolve_files(text, base_dir)
        for text in server.strings("listen", ("tcp:9080:interface=127.0.0.1",))
    )
    if not listen:
        raise server.error("listen", "needs at least one endpoint")
    allow_plaintext = server.boolean("allow_plaintext", False)
    handshake_timeout = server.number("handshake_timeout", 5, minimum=0.1)
    server_options = {
        "handshake_timeout": handshake_timeout,
        "max_connections": server.integer("max_connections", 10000),
        "max_connections_per_ip": server.integer("max_connections_per_ip", 0),
        "trust_forwarded_for": server.integer("trust_forwarded_for", 0),
        "auth_failures_per_minute": server.integer("auth_failures_per_minute", 10),
        "ping_interval": server.number("ping_interval", 30),
        "ping_timeout": server.number("ping_timeout", 10, minimum=0.1),
        "max_header_bytes": server.integer("max_header_bytes", 16384, minimum=1024),
        "max_headers": server.integer("max_headers", 100, minimum=10),
        "health_path": _health_path(server),
    }
    trusted_proxies = _trusted_proxies(server, server_options)
    public_origins = server.strings("public_origins")
    for index, origin in enumerate(public_origins):
        try:
            if parse_origin(origin) == "null":
                raise ValueError("null is not a public origin")
        except ValueError as error:
            raise ConfigError(
                f"{server.key_path('public_origins')}[{index}]", str(error)
            ) from None
    gc_young_threshold = server.integer("gc_young_threshold", DEFAULT_YOUNG_THRESHOLD)
    shutdown_timeout = server.number("shutdown_timeout", 10)
    workers = _workers(server, listen)
    server.finish()
    tls = _tls(root.table("tls"), base_dir) if root.has("tls") else None
    _check_listeners(listen, allow_plaintext, tls)
    admin = None
    if root.has("admin"):
        admin = admin_settings(
            root.table("admin"),
            lambda text: server_endpoint(_NoReactor(), text, tls),
            lambda text: resolve_files(text, base_dir),
        )
    log = log_settings(root.table("log"))
    state = state_settings(root.table("state"))

    consumers = _consumers(root.tables("consumer"))
    context = BuildContext(consumers=consumers, base_dir=base_dir)
    auth_tables = root.table("auth")
    routes_tables = root.tables("route")
    if not routes_tables:
        raise ConfigError("route", "at least one [[route]] is required")
    authenticators = _Authenticators(auth_tables, context)
    routes: list[RoutePolicy] = []
    seen: dict[str, str] = {}
    client_certificates = tls is not None and tls.settings.client_cert != "none"
    for table in routes_tables:
        route = _route(table, authenticators, consumers, client_certificates, base_dir)
        if route.path in seen:
            raise table.error("path", f"duplicate path {route.path} (also {seen[route.path]})")
        seen[route.path] = table.path
        _check_upstream_timeout(table, route, server, handshake_timeout)
        routes.append(route)
    authenticators.finish()
    root.finish()
    try:
        policy = ServerPolicy(
            routes=routes,
            trusted_proxies=trusted_proxies,
            public_origins=public_origins,
            **server_options,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise ConfigError("route", str(error)) from None
    return Config(
        listen=listen,
        policy=policy,
        consumers=consumers,
        tls=tls,
        gc_young_threshold=gc_young_threshold,
        admin=admin,
        log=log,
        shutdown_timeout=shutdown_timeout,
        workers=workers,
        state=state,
    )


def _workers(server: Table, listen: tuple[str, ...]) -> int:
    """C{[server] workers}: an integer from 1, or C{"auto"} (the CPU count)."""
    value = server.data.get("workers", 1) if server.has("workers") else 1
    if value == "auto":
        value = os.cpu_count() or 1
    elif isinstance(value, bool) or not isinstance(value, int):
        raise server.error("workers", 'expected an integer or "auto"')
    elif value < 1:
        raise server.error("workers", "must be at least 1")
    if value > 1 and (found := unshareable(listen)) is not None:
        raise server.error(
            "workers",
            f"workers share tcp:, tls:, ssl: and wss: listeners only, not"
            f" server.listen[{found[0]}] {found[1]!r} (or set workers = 1)",
        )
    return int(value)


def _check_upstream_timeout(
    table: Table, route: RoutePolicy, server: Table, handshake_timeout: float
) -> None:
    """
    A gateway route's C{upstream_timeout} must fit in the client's
    C{handshake_timeout}: the client would be answered 504 at its own
    timeout anyway (see L{txwssec.gateway.GatewayProtocol.handshakeTimedOut}).
    """
    if route.upstream is not None and route.upstream.timeout > handshake_timeout:
        raise table.error(
            "upstream_timeout",
            f"{route.upstream.timeout:g} s is longer than "
            f"{server.key_path('handshake_timeout')} ({handshake_timeout:g} s): the "
            "client's handshake would time out first",
        )


def _trusted_proxies(server: Table, options: Mapping[str, Any]) -> tuple[ProxyNetwork, ...]:
    """
    C{[server] trusted_proxies}: addresses or CIDR networks. Both it and
    C{trust_forwarded_for} are needed to believe X-Forwarded-For: either
    one alone is an error naming both.
    """
    networks: list[ProxyNetwork] = []
    for index, text in enumerate(server.strings("trusted_proxies")):
        try:
            networks.append(ipaddress.ip_network(text.strip()))
        except ValueError:
            raise ConfigError(
                f"{server.key_path('trusted_proxies')}[{index}]",
                "expected an IP address or network (CIDR, host bits zero)",
            ) from None
    hops = options["trust_forwarded_for"]
    if hops and not networks:
        raise server.error(
            "trust_forwarded_for",
            "needs server.trusted_proxies: the addresses of the proxies whose "
            "X-Forwarded-For is believed",
        )
    if networks and not hops:
        raise server.error(
            "trusted_proxies",
            "has no effect with server.trust_forwarded_for = 0 (set the hop count)",
        )
    return tuple(networks)


def _public_origins(server: Table) -> tuple[str, ...]:
    """C{[server] public_origins}: origins (C{scheme://host[:port]}), not null."""
    origins = server.strings("public_origins")
    for index, origin in enumerate(origins):
        where = f"{server.key_path('public_origins')}[{index}]"
        try:
            parsed = parse_origin(origin)
        except ValueError as error:
            raise ConfigError(where, str(error)) from None
        if parsed == "null":
            raise ConfigError(where, "null is not a public origin")
    return origins


def _tls(table: Table, base_dir: Path) -> ReloadingContextFactory:
    def path(key: str, required: bool = False) -> Path | None:
        value = table.string(key, required=required)
        return base_dir / value if value else None

    cert, key = path("cert", required=True), path("key", required=True)
    assert cert is not None and key is not None
    try:
        settings = TLSSettings(
            cert=cert,
            key=key,
            chain=path("chain"),
            min_version=table.string("min_version", "1.2"),
            client_ca=path("client_ca"),
            client_cert=table.string("client_cert", "none"),
            session_tickets=table.boolean("session_tickets", True),
        )
        table.finish()
        return ReloadingContextFactory(settings)
    except TLSSettingsError as error:
        raise table.error(error.field, error.message) from None


def _check_listeners(
    listen: tuple[str, ...], allow_plaintext: bool, tls: ReloadingContextFactory | None
) -> None:
    for index, text in enumerate(listen):
        where = f"server.listen[{index}]"
        try:
            description = Description.parse(text)
            server_endpoint(_NoReactor(), text, tls)
        except Exception as error:
            raise ConfigError(where, f"invalid endpoint {text!r}: {error}") from None
        if description.is_plaintext_off_loopback() and not allow_plaintext:
            if description.kind == "systemd":
                raise ConfigError(
                    where,
                    f"{text!r} is a plain-text socket whose address the socket unit "
                    "chooses: use tls:systemd:..., or set server.allow_plaintext = true "
                    "behind a TLS-terminating proxy",
                )
            raise ConfigError(
                where,
                f"{text!r} is plain text on a non-loopback interface: use tls:PORT, "
                "or set server.allow_plaintext = true behind a TLS-terminating proxy",
            )


class _NoReactor:
    """Stands in for a reactor while endpoint strings are only parsed."""


def _consumers(tables: list[Table]) -> ConsumerDirectory:
    directory = ConsumerDirectory()
    for table in tables:
        name = table.string("name", required=True)
        if not name or not name.isprintable():
            raise table.error("name", "must be a non-empty printable string")
        digests = []
        for index, stored in enumerate(table.strings("keys")):
            try:
                digests.append(parse_stored_key(stored))
            except ValueError as error:
                raise ConfigError(f"{table.key_path('keys')}[{index}]", str(error)) from None
        password = table.string("password") or None
        if password is not None:
            try:
                check_password_hash(password)
            except ValueError as error:
                raise table.error("password", str(error)) from None
        subjects: tuple[str, ...] = ()
        fingerprints: tuple[bytes, ...] = ()
        try:
            if table.has("tls_subject"):
                subjects = (normalise_subject(table.string("tls_subject")),)
        except ValueError as error:
            raise table.error("tls_subject", str(error)) from None
        try:
            if table.has("tls_fingerprint"):
                fingerprints = (parse_fingerprint(table.string("tls_fingerprint")),)
        except ValueError as error:
            raise table.error("tls_fingerprint", str(error)) from None
        seal_keys = []
        for index, text in enumerate(table.strings("seal_keys")):
            try:
                seal_keys.append(parse_key(text))
            except ValueError as error:
                raise ConfigError(f"{table.key_path('seal_keys')}[{index}]", str(error)) from None
        table.finish()
        directory.add(
            Consumer(name, tuple(digests), password, subjects, fingerprints, tuple(seal_keys)),
            table.path,
        )
    return directory


class _Authenticators:
    """Builds each method named by a route once, from its C{[auth.NAME]}."""

    def __init__(self, tables: Table, context: BuildContext) -> None:
        self._tables = tables
        self._context = context
        self._built: dict[str, Authenticator] = {}

    def get(self, name: str, where: str) -> Authenticator:
        if name in self._built:
            return self._built[name]
        section = self._tables.table(name)
        builder = builder_for(name)
        if section.has("builder"):
            builder = _import(section.string("builder"), section.key_path("builder"))
        if builder is None:
            known = ", ".join(registered_names())
            raise ConfigError(where, f'unknown method "{name}" (known: {known})')
        authenticator = builder(section, self._context)
        self._built[name] = authenticator
        return authenticator

    def finish(self) -> None:
        """Reject C{[auth.X]} tables that no route uses (likely a typo)."""
        for name in self._tables.data:
            if name not in self._built:
                raise self._tables.error(name, "configured but used by no route")
        self._tables.finish()


def _route(
    table: Table,
    authenticators: _Authenticators,
    consumers: ConsumerDirectory,
    client_certificates: bool,
    base_dir: Path,
) -> RoutePolicy:
    path = table.string("path", required=True)
    if not path.startswith("/"):
        raise table.error("path", "must start with /")
    app = table.string("app")
    upstream = _upstream(table, base_dir)
    if upstream is not None and app:
        raise table.error("upstream", "a route has either app or upstream, not both")
    if upstream is None and not app:
        raise table.error("app", "is required (or upstream, for a gateway route)")
    protocol = _app(app, table.key_path("app")) if app else None
    names = table.strings("auth", required=True)
    if not names:
        raise table.error("auth", 'needs at least one method (use "anonymous" to allow anyone)')
    if len(set(names)) != len(names):
        raise table.error("auth", "names a method twice")
    if "tls" in names and not client_certificates:
        raise ConfigError(
            f"{table.key_path('auth')}[{names.index('tls')}]",
            'the "tls" method needs [tls] client_ca and client_cert = "optional" or "required"',
        )
    methods = [
        authenticators.get(name, f"{table.key_path('auth')}[{index}]")
        for index, name in enumerate(names)
    ]
    origins: list[str] | None = None
    if table.has("allowed_origins"):
        origins = list(table.strings("allowed_origins"))
        for index, origin in enumerate(origins):
            if origin != "*":
                try:
                    parse_origin(origin)
                except ValueError as error:
                    raise ConfigError(
                        f"{table.key_path('allowed_origins')}[{index}]", str(error)
                    ) from None
    allowed_consumers: frozenset[str] | None = None
    if table.has("consumers"):
        allowed_consumers = frozenset(table.strings("consumers"))
        for index, name in enumerate(table.strings("consumers")):
            if consumers.by_name(name) is None and name != "anonymous":
                raise ConfigError(
                    f"{table.key_path('consumers')}[{index}]", f'unknown consumer "{name}"'
                )
    subprotocols = table.strings("subprotocols")
    markers = credential_markers(methods)
    for index, name in enumerate(subprotocols):
        if name in markers:
            raise ConfigError(
                f"{table.key_path('subprotocols')}[{index}]",
                f'"{name}" is the credential marker of an auth method',
            )
    forwarding = _forwarding(table, upstream is not None, methods)
    options = {
        **forwarding,
        "subprotocols": subprotocols,
        "max_message_size": table.integer("max_message_size", 1024 * 1024, minimum=1),
        "max_lifetime": table.number("max_lifetime", 0),
        "idle_timeout": table.number("idle_timeout", 0),
        "compression": table.boolean("compression", False),
        "limits": _limits(table.table("limits")),
        "sealing": _sealing(table, upstream is not None, consumers),
        "messages": read_rules(table.table("messages"), base_dir, upstream is not None),
        **_identity(table),
    }
    table.finish()
    try:
        return RoutePolicy(
            path=path,
            authenticators=methods,
            origins=OriginPolicy.from_list(origins),
            consumers=allowed_consumers,
            protocol=protocol,
            upstream=upstream,
            **options,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise ConfigError(table.path, str(error)) from None


def _identity(table: Table) -> dict[str, bool | float]:
    """C{refresh}, C{refresh_notice}, C{tickets}, C{ticket_ttl} (see L{txwssec.tickets})."""
    ttl = table.number("ticket_ttl", 30, minimum=1)
    if ttl > MAX_TICKET_TTL:
        raise table.error("ticket_ttl", f"must be at most {MAX_TICKET_TTL:g} seconds")
    return {
        "refresh": table.boolean("refresh", False),
        "refresh_notice": table.number("refresh_notice", 30),
        "tickets": table.boolean("tickets", False),
        "ticket_ttl": ttl,
    }


def _forwarding(table: Table, gateway: bool, methods: list[Authenticator]) -> dict[str, bool]:
    """C{forward_cookie} and C{forward_authorization} of a gateway route."""
    read = credential_headers(methods)
    options: dict[str, bool] = {}
    for header in ("cookie", "authorization"):
        key = f"forward_{header}"
        options[key] = table.boolean(key, False)
        if key in table.data and not gateway:
            raise table.error(key, "only applies to routes with an upstream")
        if options[key] and header in read:
            raise table.error(
                key,
                f"a method of this route reads its credential from {header.capitalize()}, "
                "which is never forwarded",
            )
    return options


def _sealing(table: Table, gateway: bool, consumers: ConsumerDirectory) -> Sealing:
    """C{sealed} and C{sealed_upstream} of a route (docs/sealed-v1.md)."""
    mode = table.string("sealed", "off")
    if mode not in SEALED_MODES:
        raise table.error("sealed", "expected one of " + _quoted(SEALED_MODES))
    upstream = table.string("sealed_upstream", "unseal")
    if upstream not in SEALED_UPSTREAM:
        raise table.error("sealed_upstream", "expected one of " + _quoted(SEALED_UPSTREAM))
    if "sealed_upstream" in table.data and not gateway:
        raise table.error("sealed_upstream", "only applies to routes with an upstream")
    keys = consumers.seal_keys()
    if mode != "off" and upstream == "unseal" and not keys:
        raise table.error("sealed", "no [[consumer]] has seal_keys")
    return Sealing(mode, upstream, keys)


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _upstream(table: Table, base_dir: Path) -> Upstream | None:
    """C{upstream} (a URL or a list of URLs) with C{upstream_ca} and C{upstream_timeout}."""
    urls: tuple[str, ...] = ()
    if table.has("upstream"):
        if isinstance(table.data["upstream"], str):
            urls = (table.string("upstream"),)
        else:
            urls = table.strings("upstream")
        if not urls:
            raise table.error("upstream", "needs at least one URL")
    ca = table.string("upstream_ca")
    timeout = table.number("upstream_timeout", 5, minimum=0.1)
    cooldown = table.number("upstream_cooldown", 10)
    if not urls:
        for key in ("upstream_ca", "upstream_timeout", "upstream_cooldown"):
            if key in table.data:
                raise table.error(key, "only applies to routes with an upstream")
        return None
    for index, url in enumerate(urls):
        try:
            Upstream((url,))
        except ValueError as error:
            where = table.key_path("upstream")
            if not isinstance(table.data["upstream"], str):
                where += f"[{index}]"
            raise ConfigError(where, str(error)) from None
    ca_file = base_dir / ca if ca else None
    if ca_file is not None:
        try:
            load_certificates(ca_file, "upstream_ca")
        except TLSSettingsError as error:
            raise table.error("upstream_ca", error.message) from None
    return Upstream(urls, ca_file=ca_file, timeout=timeout, cooldown=cooldown)


def _limits(table: Table) -> RouteLimits:
    defaults = RouteLimits()
    limits = RouteLimits(
        messages_per_second=table.number("messages_per_second", 0),
        burst=table.integer("burst", 0),
        bytes_per_second=table.number("bytes_per_second", 0),
        consumer_messages_per_second=table.number("consumer_messages_per_second", 0),
        consumer_bytes_per_second=table.number("consumer_bytes_per_second", 0),
        connections_per_consumer=table.integer("connections_per_consumer", 0),
        max_buffered_bytes=table.integer("max_buffered_bytes", defaults.max_buffered_bytes),
        max_fragments=table.integer("max_fragments", defaults.max_fragments),
        max_pending_control_frames=table.integer(
            "max_pending_control_frames", defaults.max_pending_control_frames
        ),
    )
    table.finish()
    return limits


def _app(name: str, where: str) -> type[SecureServerProtocol]:
    if name in BUILTIN_APPS:
        return BUILTIN_APPS[name]
    if ":" not in name:
        known = ", ".join(sorted(BUILTIN_APPS))
        raise ConfigError(where, f'unknown app "{name}" (built-in: {known}; or "module:Class")')
    protocol = _import(name, where)
    if not (isinstance(protocol, type) and issubclass(protocol, SecureServerProtocol)):
        raise ConfigError(where, f'"{name}" is not a SecureServerProtocol subclass')
    return protocol


def _import(reference: str, where: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(where, 'expected "package.module:name"')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(where, f"cannot import {module_name}: {error}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(where, f"{module_name} has no {attribute}") from None
