"""
txwssec.config: the TOML contract of DESIGN.md read into policies, and every
mistake reported as a ConfigError that names its key path.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from txwssec.apps.echo import EchoProtocol
from txwssec.auth import BasicAuthenticator, JWTAuthenticator, KeyAuthenticator
from txwssec.config import Config, load, parse
from txwssec.consumers import key_digest
from txwssec.errors import ConfigError
from txwssec.origin import OriginPolicy
from txwssec.passwords import hash_password
from txwssec.server import SecureServerProtocol

JWT_SECRET = "s" * 32


def minimal() -> dict[str, Any]:
    """A valid configuration: one key-protected echo route."""
    return {
        "auth": {"key": {}},
        "consumer": [{"name": "john", "keys": ["john-key"]}],
        "route": [{"path": "/echo", "app": "echo", "auth": ["key"]}],
    }


def config_error(change: Callable[[dict[str, Any]], object]) -> str:
    """Apply C{change} to L{minimal} and return the ConfigError text."""
    data = minimal()
    change(data)
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return str(caught.value)


def test_minimal_is_valid() -> None:
    config = parse(minimal())
    assert config.listen == ("tcp:9080:interface=127.0.0.1",)
    (route,) = config.policy.routes
    assert route.path == "/echo"
    assert route.protocol is EchoProtocol
    assert route.origins == OriginPolicy()  # no list: same-origin only
    assert route.consumers is None
    assert route.max_message_size == 1024 * 1024
    assert (route.max_lifetime, route.idle_timeout) == (0, 0)


# -- unknown keys ---------------------------------------------------------------


def _second_route(data: dict[str, Any]) -> None:
    data["route"].append({"path": "/other", "app": "echo", "auth": ["key"], "bogus": 1})


def _with_jwt(**options: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["auth"]["jwt"] = options
        data["route"][0]["auth"] = ["key", "jwt"]

    return change


def _with_basic(**options: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["auth"]["basic"] = options
        data["route"][0]["auth"] = ["basic"]
        del data["auth"]["key"]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(bogus=1), "bogus: unknown key"),
        (lambda d: d.update(server={"bogus": 1}), "server.bogus: unknown key"),
        (lambda d: d["auth"]["key"].update(bogus=1), "auth.key.bogus: unknown key"),
        (_with_jwt(secret=JWT_SECRET, bogus=1), "auth.jwt.bogus: unknown key"),
        (_with_basic(bogus=1), "auth.basic.bogus: unknown key"),
        (lambda d: d["consumer"][0].update(bogus=1), "consumer[0].bogus: unknown key"),
        (lambda d: d["route"][0].update(bogus=1), "route[0].bogus: unknown key"),
        (_second_route, "route[1].bogus: unknown key"),
        # a contract key of another section is still unknown here
        (lambda d: d["route"][0].update(listen=["tcp:1"]), "route[0].listen: unknown key"),
    ],
    ids=[
        "top",
        "server",
        "auth.key",
        "auth.jwt",
        "auth.basic",
        "consumer",
        "route0",
        "route1",
        "misplaced",
    ],
)
def test_unknown_key(change: Callable[[dict[str, Any]], object], message: str) -> None:
    assert config_error(change) == message


# -- wrong types and values -------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(server={"listen": "tcp:9080"}),
            "server.listen: expected array",
        ),
        (lambda d: d.update(server={"listen": [9080]}), "server.listen[0]: expected string"),
        (lambda d: d.update(server={"listen": []}), "server.listen: needs at least one endpoint"),
        (
            lambda d: d.update(server={"handshake_timeout": -1}),
            "server.handshake_timeout: must be at least 0.1",
        ),
        (
            lambda d: d.update(server={"handshake_timeout": "5"}),
            "server.handshake_timeout: expected number",
        ),
        (
            lambda d: d.update(server={"max_connections": 1.5}),
            "server.max_connections: expected integer",
        ),
        (
            lambda d: d.update(server={"max_connections_per_ip": True}),
            "server.max_connections_per_ip: expected integer",
        ),
        (
            lambda d: d.update(server={"trust_forwarded_for": -1}),
            "server.trust_forwarded_for: must be at least 0",
        ),
        (lambda d: d.update(server="x"), "server: expected a table"),
        (lambda d: d.update(auth="key"), "auth: expected a table"),
        (lambda d: d["route"][0].update(auth="key"), "route[0].auth: expected array"),
        (lambda d: d["route"][0].update(auth=[1]), "route[0].auth[0]: expected string"),
        (
            lambda d: d["route"][0].update(max_message_size="1048576"),
            "route[0].max_message_size: expected integer",
        ),
        (
            lambda d: d["route"][0].update(max_message_size=0),
            "route[0].max_message_size: must be at least 1",
        ),
        (
            lambda d: d["route"][0].update(max_lifetime=-1),
            "route[0].max_lifetime: must be at least 0",
        ),
        (
            lambda d: d["route"][0].update(idle_timeout="10"),
            "route[0].idle_timeout: expected number",
        ),
        (
            lambda d: d["route"][0].update(subprotocols="chat.v1"),
            "route[0].subprotocols: expected array",
        ),
        (lambda d: d["route"][0].update(path="echo"), "route[0].path: must start with /"),
        (lambda d: d["route"][0].pop("path"), "route[0].path: is required"),
        (
            lambda d: d["route"][0].pop("app"),
            "route[0].app: is required (or upstream, for a gateway route)",
        ),
        (lambda d: d.update(route={"path": "/x"}), "route: expected an array of tables"),
        (lambda d: d.update(route=[]), "route: at least one [[route]] is required"),
        (lambda d: d.pop("route"), "route: at least one [[route]] is required"),
        (lambda d: d["consumer"][0].update(keys="john-key"), "consumer[0].keys: expected array"),
        (
            lambda d: d["consumer"][0].update(name=""),
            "consumer[0].name: must be a non-empty printable string",
        ),
        (lambda d: d["consumer"][0].pop("name"), "consumer[0].name: is required"),
        (
            lambda d: d["consumer"][0].update(keys=[""]),
            "consumer[0].keys[0]: key must not be empty",
        ),
    ],
)
def test_wrong_type_or_value(change: Callable[[dict[str, Any]], object], message: str) -> None:
    assert config_error(change) == message


# -- authentication methods -------------------------------------------------------


def test_unknown_auth_method_names_its_index() -> None:
    message = config_error(lambda d: d["route"][0].update(auth=["key", "kerberos"]))
    assert message == (
        'route[0].auth[1]: unknown method "kerberos"'
        " (known: anonymous, basic, introspect, jwt, key, tls)"
    )


def test_route_without_auth() -> None:
    assert config_error(lambda d: d["route"][0].pop("auth")) == "route[0].auth: is required"


def test_route_with_empty_auth() -> None:
    assert config_error(lambda d: d["route"][0].update(auth=[])) == (
        'route[0].auth: needs at least one method (use "anonymous" to allow anyone)'
    )


def test_method_named_twice() -> None:
    message = config_error(lambda d: d["route"][0].update(auth=["key", "key"]))
    assert message == "route[0].auth: names a method twice"


@pytest.mark.parametrize("method", ["jwt", "basic", "anonymous", "kerberos"])
def test_auth_section_used_by_no_route(method: str) -> None:
    """An [auth.X] table no route names is most likely a typo: refused."""
    message = config_error(lambda d: d["auth"].update({method: {}}))
    assert message == f"auth.{method}: configured but used by no route"


def test_auth_section_unused_is_reported_even_when_misspelt_inside() -> None:
    """The unused table is reported, not its contents."""
    message = config_error(lambda d: d["auth"].update(jwt={"bogus": 1}))
    assert message == "auth.jwt: configured but used by no route"


def test_key_method_with_every_source_off() -> None:
    message = config_error(lambda d: d["auth"].update(key={"header": "", "subprotocol": ""}))
    assert message == "auth.key.header: header, subprotocol and query are all off"


def test_basic_realm_with_quote() -> None:
    message = config_error(_with_basic(realm='a"b'))
    assert message == "auth.basic.realm: must be printable and contain no quotes or backslashes"


def test_application_subprotocol_equal_to_a_credential_marker() -> None:
    message = config_error(lambda d: d["route"][0].update(subprotocols=["chat.v1", "token"]))
    assert message == (
        'route[0].subprotocols[1]: "token" is the credential marker of an auth method'
    )


# -- [auth.jwt] -------------------------------------------------------------------


def _ed25519_pem() -> bytes:
    key = ed25519.Ed25519PrivateKey.generate().public_key()
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def test_jwt_with_secret_and_public_key() -> None:
    message = config_error(_with_jwt(secret=JWT_SECRET, public_key="jwt.pem"))
    assert message == (
        "auth.jwt.secret: set exactly one of secret, public_key, jwks_url and discovery"
    )


def test_jwt_with_neither_secret_nor_public_key() -> None:
    message = config_error(_with_jwt())
    assert message == (
        "auth.jwt.secret: set exactly one of secret, public_key, jwks_url and discovery"
    )


def test_jwt_secret_too_short() -> None:
    message = config_error(_with_jwt(secret="s" * 31))
    assert message == "auth.jwt.secret: HMAC secret must be at least 32 bytes"


def test_jwt_public_key_file_missing(tmp_path: Path) -> None:
    data = minimal()
    _with_jwt(public_key="missing.pem", algorithms=["EdDSA"])(data)
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir=tmp_path)
    assert str(caught.value) == "auth.jwt.public_key: cannot read: No such file or directory"


def test_jwt_public_key_is_not_pem(tmp_path: Path) -> None:
    (tmp_path / "jwt.pem").write_text("not a key\n")
    data = minimal()
    _with_jwt(public_key="jwt.pem", algorithms=["EdDSA"])(data)
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir=tmp_path)
    assert str(caught.value) == "auth.jwt.public_key: public key is not a PEM public key"


def test_jwt_public_key_of_the_wrong_family(tmp_path: Path) -> None:
    (tmp_path / "jwt.pem").write_bytes(_ed25519_pem())
    data = minimal()
    _with_jwt(public_key="jwt.pem", algorithms=["RS256"])(data)
    with pytest.raises(ConfigError) as caught:
        parse(data, base_dir=tmp_path)
    assert str(caught.value) == "auth.jwt.public_key: public key does not suit RS256"


@pytest.mark.parametrize("algorithm", ["none", "None", "HS1"])
def test_jwt_algorithm_none_or_unknown(algorithm: str) -> None:
    message = config_error(_with_jwt(secret=JWT_SECRET, algorithms=[algorithm]))
    assert message == (
        f"auth.jwt.algorithms: unsupported algorithm {algorithm!r} (none is never allowed)"
    )


def test_jwt_no_algorithms() -> None:
    message = config_error(_with_jwt(secret=JWT_SECRET, algorithms=[]))
    assert message == "auth.jwt.algorithms: at least one algorithm is required"


def test_jwt_hmac_mixed_with_public_key_algorithms() -> None:
    message = config_error(_with_jwt(secret=JWT_SECRET, algorithms=["HS256", "RS256"]))
    assert message == (
        "auth.jwt.algorithms: HS* algorithms cannot be mixed with public-key algorithms"
    )


def test_jwt_public_key_given_as_hmac_secret() -> None:
    """HS/RS key confusion is refused at load time."""
    message = config_error(_with_jwt(secret=_ed25519_pem().decode()))
    assert message == "auth.jwt.secret: HS* algorithms need a shared secret, not a public key"


def test_jwt_leeway_negative() -> None:
    message = config_error(_with_jwt(secret=JWT_SECRET, leeway=-1))
    assert message == "auth.jwt.leeway: must be at least 0"


# -- consumers --------------------------------------------------------------------


def test_consumer_key_reused_across_consumers() -> None:
    message = config_error(lambda d: d["consumer"].append({"name": "jane", "keys": ["john-key"]}))
    assert message == 'consumer[1].keys[0]: key already belongs to consumer "john"'


def test_consumer_key_reused_as_sha256() -> None:
    """The same key stored once plain and once hashed is still the same key."""
    hashed = "sha256:" + hashlib.sha256(b"john-key").hexdigest()
    message = config_error(
        lambda d: d["consumer"].append({"name": "jane", "keys": ["jane-key", hashed]})
    )
    assert message == 'consumer[1].keys[1]: key already belongs to consumer "john"'


def test_duplicate_consumer_name() -> None:
    message = config_error(lambda d: d["consumer"].append({"name": "john", "keys": ["other"]}))
    assert message == 'consumer[1].name: duplicate consumer name "john"'


@pytest.mark.parametrize("stored", ["sha256:abcd", "sha256:" + "0" * 66, "sha256:" + "zz" * 32])
def test_malformed_sha256_key(stored: str) -> None:
    message = config_error(lambda d: d["consumer"][0].update(keys=["fine", stored]))
    assert message == "consumer[0].keys[1]: sha256: digest must be 64 hex digits"


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        ("hunter2", 'unknown password scheme (expected "scrypt:" or "pbkdf2-sha256:")'),
        ("scrypt:15:8:1:AAAA", "scrypt hash must be scrypt:<log2 N>:<r>:<p>:<salt>:<hash>"),
        (
            "scrypt:30:8:1:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==",
            "scrypt parameters out of range (log2 N 10-17, r 1-16, p 1-4)",
        ),
        (
            "pbkdf2-sha256:10:AAAAAAAAAAAAAAAAAAAAAA==:AAAAAAAAAAAAAAAAAAAAAA==",
            "pbkdf2-sha256 iterations must be 100000-10000000",
        ),
        ("scrypt:15:8:1:!!!!:AAAAAAAAAAAAAAAAAAAAAA==", "salt and hash must be base64"),
    ],
)
def test_malformed_password_hash(stored: str, reason: str) -> None:
    message = config_error(lambda d: d["consumer"][0].update(password=stored))
    assert message == f"consumer[0].password: {reason}"


# -- routes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin", ["example.com", "https://example.com/path", "ftp://example.com", "https://"]
)
def test_bad_allowed_origin(origin: str) -> None:
    message = config_error(lambda d: d["route"][0].update(allowed_origins=[origin]))
    assert message.startswith("route[0].allowed_origins[0]: ")


def test_bad_allowed_origin_after_good_ones() -> None:
    message = config_error(
        lambda d: d["route"][0].update(allowed_origins=["*", "null", "https://a.example", "a.b"])
    )
    assert message == "route[0].allowed_origins[3]: origin scheme must be http, https, ws or wss"


def test_unknown_app() -> None:
    message = config_error(lambda d: d["route"][0].update(app="chat"))
    assert message == 'route[0].app: unknown app "chat" (built-in: echo; or "module:Class")'


def test_app_that_is_not_a_secure_server_protocol() -> None:
    message = config_error(lambda d: d["route"][0].update(app="txwssec.consumers:Consumer"))
    assert message == (
        'route[0].app: "txwssec.consumers:Consumer" is not a SecureServerProtocol subclass'
    )


def test_app_plain_autobahn_protocol() -> None:
    reference = "autobahn.twisted.websocket:WebSocketServerProtocol"
    message = config_error(lambda d: d["route"][0].update(app=reference))
    assert message == f'route[0].app: "{reference}" is not a SecureServerProtocol subclass'


def test_app_module_missing() -> None:
    message = config_error(lambda d: d["route"][0].update(app="no_such_module_xyz:App"))
    assert message == (
        "route[0].app: cannot import no_such_module_xyz: No module named 'no_such_module_xyz'"
    )


def test_app_attribute_missing() -> None:
    message = config_error(lambda d: d["route"][0].update(app="txwssec.server:Nope"))
    assert message == "route[0].app: txwssec.server has no Nope"


def test_app_custom_class() -> None:
    data = minimal()
    data["route"][0]["app"] = "txwssec.server:SecureServerProtocol"
    assert parse(data).policy.routes[0].protocol is SecureServerProtocol


def test_route_has_app_or_upstream_not_both() -> None:
    message = config_error(lambda d: d["route"][0].update(upstream="ws://127.0.0.1:8080/"))
    assert message == "route[0].upstream: a route has either app or upstream, not both"


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        (
            "http://127.0.0.1:8080/",
            "route[0].upstream: upstream 'http://127.0.0.1:8080/' is not a ws:// or wss:// URL",
        ),
        (
            ["ws://a:1/", "ftp://b/"],
            "route[0].upstream[1]: upstream 'ftp://b/' is not a ws:// or wss:// URL",
        ),
        (
            "ws://user:pw@a:1/",
            "route[0].upstream: upstream 'ws://user:pw@a:1/' "
            "must not carry user info or a fragment",
        ),
        ([], "route[0].upstream: needs at least one URL"),
    ],
)
def test_bad_upstream_names_its_path(upstream: Any, message: str) -> None:
    def change(data: dict[str, Any]) -> None:
        del data["route"][0]["app"]
        data["route"][0]["upstream"] = upstream

    assert config_error(change) == message


def test_upstream_options_need_an_upstream() -> None:
    message = config_error(lambda d: d["route"][0].update(upstream_timeout=3))
    assert message == "route[0].upstream_timeout: only applies to routes with an upstream"


def test_gateway_route_parses(tmp_path: Path) -> None:
    from txwssec.devcert import make_ca

    (tmp_path / "ca.pem").write_bytes(make_ca().cert_pem())

    def change(data: dict[str, Any]) -> None:
        del data["route"][0]["app"]
        data["route"][0].update(
            upstream=["ws://127.0.0.1:8080/", "wss://up.example:443/feed"],
            upstream_ca="ca.pem",
            upstream_timeout=2.5,
            upstream_cooldown=30,
        )

    data = minimal()
    change(data)
    route = parse(data, base_dir=tmp_path).policy.routes[0]
    assert route.upstream is not None
    assert route.upstream.urls == ("ws://127.0.0.1:8080/", "wss://up.example:443/feed")
    assert route.upstream.ca_file == tmp_path / "ca.pem"
    assert (route.upstream.timeout, route.upstream.cooldown) == (2.5, 30)
    assert route.protocol is None


def test_duplicate_route_path() -> None:
    def change(data: dict[str, Any]) -> None:
        data["route"].append({"path": "/other", "app": "echo", "auth": ["key"]})
        data["route"].append({"path": "/echo", "app": "echo", "auth": ["key"]})

    assert config_error(change) == "route[2].path: duplicate path /echo (also route[0])"


def test_route_consumers_unknown() -> None:
    message = config_error(lambda d: d["route"][0].update(consumers=["john", "jane"]))
    assert message == 'route[0].consumers[1]: unknown consumer "jane"'


# -- files ------------------------------------------------------------------------


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[server\nlisten = 1\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value).startswith("invalid TOML: ")
    assert caught.value.path == ""


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes('[[consumer]]\nname = "jos\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "not UTF-8"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "cannot read: No such file or directory"


def test_load_reports_key_path(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nlisten = "tcp:9080"\n')
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert str(caught.value) == "server.listen: expected array"
    assert caught.value.path == "server.listen"


# -- the full contract ------------------------------------------------------------

FULL = """
[server]
listen = ["tcp:9080:interface=127.0.0.1", 'tcp6:9443:interface=\\:\\:1']
trust_forwarded_for = 1
trusted_proxies = ["127.0.0.1", "10.0.0.0/8", "fd00::/8"]
handshake_timeout = 2.5
max_connections = 100
max_connections_per_ip = 5

[auth.key]
header = "x-api-key"
query = "apikey"
subprotocol = "key"

[auth.jwt]
algorithms = ["EdDSA"]
public_key = "keys/jwt.pem"
issuer = "https://issuer.example"
audience = "wssec"
leeway = 3
header = "X-Token"
query = "jwt"
subprotocol = "jwt"
consumer_claim = "client"

[auth.basic]
realm = "chat"

[[consumer]]
name = "john"
keys = ["john-key", "sha256:{jane_digest}"]
password = "{password}"

[[consumer]]
name = "svc"
keys = ["svc-key"]

[[route]]
path = "/chat"
app = "txwssec.apps.echo:EchoProtocol"
auth = ["jwt", "key", "basic"]
allowed_origins = ["https://app.example.com", "http://localhost:8000"]
subprotocols = ["chat.v2", "chat.v1"]
max_message_size = 65536
max_lifetime = 3600
idle_timeout = 30.5
consumers = ["john"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key", "anonymous"]
allowed_origins = ["*"]
"""


@pytest.fixture
def full_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Config, str]:
    """
    The full contract written to a file in a folder other than the working
    directory, with the JWT public key beside it in keys/.
    """
    folder = tmp_path / "etc"
    (folder / "keys").mkdir(parents=True)
    (folder / "keys" / "jwt.pem").write_bytes(_ed25519_pem())
    password = hash_password("s3cret")
    text = FULL.replace("{jane_digest}", hashlib.sha256(b"jane-key").hexdigest()).replace(
        "{password}", password
    )
    (folder / "wssec.toml").write_text(text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return load(folder / "wssec.toml"), password


def test_full_server(full_config: tuple[Config, str]) -> None:
    config, _ = full_config
    assert config.listen == ("tcp:9080:interface=127.0.0.1", r"tcp6:9443:interface=\:\:1")
    policy = config.policy
    assert policy.trust_forwarded_for == 1
    assert [str(n) for n in policy.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8", "fd00::/8"]
    assert policy.handshake_timeout == 2.5
    assert policy.max_connections == 100
    assert policy.max_connections_per_ip == 5
    assert [route.path for route in policy.routes] == ["/chat", "/echo"]


def test_full_consumers(full_config: tuple[Config, str]) -> None:
    config, password = full_config
    assert len(config.consumers) == 2
    john = config.consumers.by_name("john")
    assert john is not None
    assert john.key_digests == (key_digest("john-key"), key_digest("jane-key"))
    assert john.password == password
    assert config.consumers.by_key("jane-key") is john
    assert config.consumers.by_key("svc-key") is config.consumers.by_name("svc")
    assert config.consumers.by_key("sha256:" + hashlib.sha256(b"jane-key").hexdigest()) is None


def test_full_chat_route(full_config: tuple[Config, str]) -> None:
    config, _ = full_config
    route = config.policy.route_for("/chat")
    assert route.protocol is EchoProtocol
    assert route.origins == OriginPolicy.from_list(
        ["https://app.example.com", "http://localhost:8000"]
    )
    assert route.origins.allows("https://app.example.com:443")
    assert not route.origins.allows("https://evil.example")
    assert route.subprotocols == ("chat.v2", "chat.v1")
    assert route.max_message_size == 65536
    assert route.max_lifetime == 3600
    assert route.idle_timeout == 30.5
    assert route.consumers == frozenset({"john"})

    jwt_auth, key_auth, basic_auth = route.authenticators
    assert isinstance(jwt_auth, JWTAuthenticator)
    assert jwt_auth.algorithms == ["EdDSA"]
    assert (jwt_auth.issuer, jwt_auth.audience, jwt_auth.leeway) == (
        "https://issuer.example",
        "wssec",
        3,
    )
    assert (jwt_auth.header, jwt_auth.query, jwt_auth.subprotocol) == ("X-Token", "jwt", "jwt")
    assert jwt_auth.consumer_claim == "client"
    assert isinstance(key_auth, KeyAuthenticator)
    assert (key_auth.header, key_auth.query, key_auth.subprotocol) == (
        "x-api-key",
        "apikey",
        "key",
    )
    assert isinstance(basic_auth, BasicAuthenticator)
    assert basic_auth.realm == "chat"
    assert basic_auth.consumers is config.consumers


def test_full_echo_route(full_config: tuple[Config, str]) -> None:
    config, _ = full_config
    chat = config.policy.route_for("/chat")
    route = config.policy.route_for("/echo")
    assert route.protocol is EchoProtocol
    assert route.origins.any_origin
    assert route.subprotocols == ()
    assert route.consumers is None
    assert route.max_message_size == 1024 * 1024
    key_auth, anonymous = route.authenticators
    # each method is built once and shared by the routes that name it
    assert key_auth is chat.authenticators[1]
    assert anonymous.name == "anonymous"


def test_defaults() -> None:
    config = parse(minimal())
    policy = config.policy
    assert policy.handshake_timeout == 5
    assert policy.max_connections == 10000
    assert policy.max_connections_per_ip == 0
    assert policy.trust_forwarded_for == 0
    (key_auth,) = policy.routes[0].authenticators
    assert isinstance(key_auth, KeyAuthenticator)
    assert (key_auth.header, key_auth.query, key_auth.subprotocol) == ("apikey", "", "token")


def test_jwt_secret_defaults() -> None:
    data = minimal()
    _with_jwt(secret=JWT_SECRET)(data)
    jwt_auth = parse(data).policy.routes[0].authenticators[1]
    assert isinstance(jwt_auth, JWTAuthenticator)
    assert jwt_auth.algorithms == ["HS256"]
    assert (jwt_auth.header, jwt_auth.query, jwt_auth.subprotocol) == (
        "Authorization",
        "",
        "bearer",
    )
    assert (jwt_auth.issuer, jwt_auth.audience, jwt_auth.leeway) == ("", "", 0)
    assert jwt_auth.consumer_claim == "sub"


def test_quickstart_example_is_valid() -> None:
    config = load(Path(__file__).parent.parent / "examples" / "quickstart.toml")
    assert config.listen == ("tcp:9080:interface=127.0.0.1", "tls:9443:interface=127.0.0.1")
    assert config.tls is not None
    assert config.tls.settings.min_version == "1.2"
    assert [route.path for route in config.policy.routes] == ["/echo"]


def test_parse_does_not_mutate_its_input() -> None:
    """parse() does not modify the data it is given."""
    data = minimal()
    before = copy.deepcopy(data)
    parse(data)
    assert data == before
