"""
SIGHUP and a C{wss:} listener's own certificate (C{cert=}/C{key=} in
C{[server] listen}, no C{[tls]} table): the real twistd reads its files
again, as it does C{[tls]}'s, and a file it cannot use fails the whole
reload (the old certificate and configuration stay).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import Process, free_port, twistd
from test_tls_server import TIMEOUT, ServerFiles, make_server_files, sync_serial, verifying_context
from twisted.internet.endpoints import serverFromString
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as sync_connect

from txwssec.config import load
from txwssec.listen import listener_context, resolve_files, server_endpoint
from txwssec.reuseport import shared
from txwssec.tls import ReloadingContextFactory, TLSSettings

CONFIG = """
[server]
listen = ["tcp:{plain}:interface=127.0.0.1",
          "wss:{port}:interface=127.0.0.1:cert={cert}:key={key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
"""

SECOND_ROUTE = """
[[route]]
path = "/second"
app = "echo"
auth = ["anonymous"]
"""


@pytest.fixture
def twistd_wss(tmp_path: Path) -> Iterator[tuple[Process, ServerFiles, int, Path]]:
    """twistd serving an echo route on plain TCP and on a wss: listener."""
    files = make_server_files(tmp_path / "certs")
    port = free_port()
    config = tmp_path / "wssec.toml"
    # File names relative to the configuration's folder, twistd elsewhere.
    config.write_text(
        CONFIG.format(
            plain=free_port(), port=port, cert="certs/server.pem", key="certs/server.key"
        )
    )
    assert files.cert == tmp_path / "certs/server.pem"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    running = twistd(config, elsewhere)
    try:
        running.wait_for(f"wssec listening on wss:{port}:")
        yield running, files, port, config
    finally:
        running.kill()


def test_sighup_rereads_a_wss_listeners_certificate(
    twistd_wss: tuple[Process, ServerFiles, int, Path],
) -> None:
    """
    New connections get the replaced certificate; the one opened before
    goes on echoing; the log names the file.
    """
    running, files, port, _config = twistd_wss
    url = f"wss://127.0.0.1:{port}/echo"
    context = verifying_context(files.ca_file)
    first = files.server.certificate.serial_number

    with sync_connect(url, ssl=context, open_timeout=TIMEOUT, proxy=None) as before:
        assert sync_serial(before) == first
        second = files.replace_server_certificate().certificate.serial_number
        seen = len(running.lines)
        running.process.send_signal(signal.SIGHUP)
        running.wait_for("configuration reloaded", after=seen)

        with sync_connect(url, ssl=context, open_timeout=TIMEOUT, proxy=None) as after:
            assert sync_serial(after) == second
            after.send("new")
            assert after.recv(TIMEOUT) == "new"

        before.send("still here")
        assert before.recv(TIMEOUT) == "still here"

    assert running.stop() == 0
    output = running.output()
    assert f"certificate reloaded from {files.cert}" in output
    assert "Traceback" not in output


def test_a_broken_wss_listener_certificate_fails_the_whole_reload(
    twistd_wss: tuple[Process, ServerFiles, int, Path],
) -> None:
    """
    A certificate file that cannot be used: one line names the listener's
    key path and the file, the old certificate stays, and the rest of the
    file (a new route) is not applied either. Fixed, the next SIGHUP
    applies both.
    """
    running, files, port, config = twistd_wss
    context = verifying_context(files.ca_file)
    first = files.server.certificate.serial_number
    config.write_text(config.read_text() + SECOND_ROUTE)
    files.cert.write_text("not a certificate\n")

    seen = len(running.lines)
    running.process.send_signal(signal.SIGHUP)
    line = running.wait_for("configuration reload failed", after=seen).string
    assert "server.listen[1]: " in line
    assert str(files.cert) in line
    assert "certificate reloaded" not in "".join(running.lines[seen:])

    with sync_connect(
        f"wss://127.0.0.1:{port}/echo", ssl=context, open_timeout=TIMEOUT, proxy=None
    ) as ws:
        assert sync_serial(ws) == first
    with pytest.raises(InvalidStatus) as refused:
        sync_connect(
            f"wss://127.0.0.1:{port}/second", ssl=context, open_timeout=TIMEOUT, proxy=None
        )
    assert refused.value.response.status_code == 404

    second = files.replace_server_certificate().certificate.serial_number
    seen = len(running.lines)
    running.process.send_signal(signal.SIGHUP)
    running.wait_for("configuration reloaded", after=seen)
    with sync_connect(
        f"wss://127.0.0.1:{port}/second", ssl=context, open_timeout=TIMEOUT, proxy=None
    ) as ws:
        assert sync_serial(ws) == second
        ws.send("second")
        assert ws.recv(TIMEOUT) == "second"

    assert running.stop() == 0
    assert "Traceback" not in running.output()


def test_listener_context_is_txwssecs_only(tmp_path: Path) -> None:
    """
    The contexts SIGHUP reads again: a wss: or tls: listener's (alone or
    shared by workers), not plain TCP's, a UNIX socket's or Twisted's own
    ssl: listener's.
    """
    from twisted.internet import reactor

    files = make_server_files(tmp_path)
    wss = server_endpoint(reactor, f"wss:0:cert={files.cert}:key={files.key}", None)
    found = listener_context(wss)
    assert isinstance(found, ReloadingContextFactory)
    assert found.settings.cert == files.cert
    assert listener_context(shared(wss, reactor)) is found  # [server] workers

    table = ReloadingContextFactory(TLSSettings(cert=files.cert, key=files.key))
    assert listener_context(server_endpoint(reactor, "tls:0", table)) is table

    for plain in ("tcp:0", f"unix:{tmp_path / 'socket'}"):
        assert listener_context(server_endpoint(reactor, plain, None)) is None
    twisted_ssl = serverFromString(reactor, f"ssl:0:certKey={files.cert}:privateKey={files.key}")
    assert listener_context(twisted_ssl) is None


def test_wss_file_names_are_relative_to_the_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A wss: description's cert, key, chain and clientCA, relative, are
    found next to the configuration file whatever the working directory
    ([server] listen and [admin] listen); absolute names, escaped colons
    and Twisted's own ssl: names are left as they are.
    """
    files = make_server_files(tmp_path / "certs")
    config = tmp_path / "wssec.toml"
    config.write_text(
        f"""
[server]
listen = ["wss:0:interface=127.0.0.1:cert=certs/server.pem:key={files.key}:chain=certs/ca.pem",
          "tcp:0:interface=127.0.0.1"]

[admin]
listen = ["wss:0:interface=127.0.0.1:cert=certs/server.pem:key=certs/server.key"]

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
"""
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = load(config)
    assert loaded.listen == (
        f"wss:0:interface=127.0.0.1:cert={files.cert}:key={files.key}:chain={files.ca_file}",
        "tcp:0:interface=127.0.0.1",
    )
    assert loaded.admin is not None
    assert loaded.admin.listen == (f"wss:0:interface=127.0.0.1:cert={files.cert}:key={files.key}",)
    assert resolve_files("wss:1:cert=a\\:b.pem", Path("/etc/x:y")) == (
        "wss:1:cert=/etc/x\\:y/a\\:b.pem"
    )
    assert resolve_files("ssl:1:certKey=c.pem", tmp_path) == "ssl:1:certKey=c.pem"
    assert resolve_files("tls:1:interface=::1", tmp_path) == "tls:1:interface=::1"


WORKERS_CONFIG = """
[server]
workers = 2
listen = ["wss:{port}:interface=127.0.0.1:cert={cert}:key={key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["anonymous"]
"""


def test_each_worker_rereads_a_wss_listeners_certificate(tmp_path: Path) -> None:
    """
    [server] workers: SIGHUP (twice in a row) has each worker read the
    wss: listener's files again; every new connection, whichever worker
    takes it, gets the new certificate. A key that does not match the
    certificate is then refused by the supervisor's check, once, naming the
    listener and the files, and the workers keep the new certificate.
    """
    from processes import WORKERS_STARTING

    files = make_server_files(tmp_path / "certs")
    port = free_port()
    config = tmp_path / "wssec.toml"
    config.write_text(WORKERS_CONFIG.format(port=port, cert=files.cert, key=files.key))
    running = twistd(config, tmp_path)
    url = f"wss://127.0.0.1:{port}/echo"
    context = verifying_context(files.ca_file)
    try:
        running.wait_for("wssec 2 workers serving", timeout=WORKERS_STARTING)
        second = files.replace_server_certificate().certificate.serial_number
        seen = len(running.lines)
        running.process.send_signal(signal.SIGHUP)
        running.process.send_signal(signal.SIGHUP)
        # (two SIGHUPs sent together may arrive as one: either way each
        # worker reads the files after both)
        cert = re.escape(str(files.cert))
        reloaded = re.compile(rf"worker=(\d) .*certificate reloaded from {cert}")
        deadline = time.monotonic() + WORKERS_STARTING
        workers: set[str] = set()
        while workers != {"0", "1"} and time.monotonic() < deadline:
            workers = {m[1] for m in map(reloaded.search, running.lines[seen:]) if m}
            time.sleep(0.1)
        assert workers == {"0", "1"}, running.output()
        serials = set()
        for _ in range(8):
            with sync_connect(url, ssl=context, open_timeout=TIMEOUT, proxy=None) as ws:
                serials.add(sync_serial(ws))
                ws.send("x")
                assert ws.recv(TIMEOUT) == "x"
        assert serials == {second}

        # a key that does not match the certificate
        other = make_server_files(tmp_path / "other")
        files.key.write_bytes(other.key.read_bytes())
        seen = len(running.lines)
        running.process.send_signal(signal.SIGHUP)
        line = running.wait_for("configuration reload failed", after=seen).string
        assert "server.listen[0]: " in line and str(files.key) in line, line
        assert "PRIVATE KEY" not in line
        with sync_connect(url, ssl=context, open_timeout=TIMEOUT, proxy=None) as ws:
            assert sync_serial(ws) == second
        assert running.stop() == 0
        output = running.output()
        assert output.count("configuration reload failed") == 1
        assert "Traceback" not in output
    finally:
        running.kill()


def test_a_listener_moved_to_new_files_does_not_block_the_reload(
    twistd_wss: tuple[Process, ServerFiles, int, Path],
) -> None:
    """
    The operator moves the wss: listener's certificate to a new folder (a
    change of [server] listen, applied at the next restart), removes the
    old files and adds a route: the reload applies the route and says the
    listeners are unchanged until a restart; the listener keeps the
    certificate it started with (its files are not read again: the new
    file no longer lists it).
    """
    running, files, port, config = twistd_wss
    make_server_files(config.parent / "moved")
    text = config.read_text()
    assert "certs/server.pem" in text and "certs/server.key" in text
    text = text.replace("certs/server.pem", "moved/server.pem")
    config.write_text(text.replace("certs/server.key", "moved/server.key") + SECOND_ROUTE)
    files.cert.unlink()
    files.key.unlink()
    seen = len(running.lines)
    running.process.send_signal(signal.SIGHUP)
    line = running.wait_for(re.compile("configuration reload(ed| failed)"), after=seen).string
    assert "reload failed" not in line, line
    running.wait_for("listeners are unchanged until a restart", after=seen)
    context = verifying_context(files.ca_file)
    with sync_connect(
        f"wss://127.0.0.1:{port}/second", ssl=context, open_timeout=TIMEOUT, proxy=None
    ) as ws:
        assert sync_serial(ws) == files.server.certificate.serial_number
    assert running.stop() == 0


def _x25519_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import x25519

    return x25519.X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_a_key_of_a_type_tls_cannot_use_is_a_settings_error(tmp_path: Path) -> None:
    """
    A key file holding a key TLS cannot sign with (X25519): a
    TLSSettingsError naming the setting and the file, as any other
    unusable key (not pyOpenSSL's bare TypeError, which named neither).
    """
    from txwssec.tls import TLSSettingsError

    files = make_server_files(tmp_path)
    files.key.write_bytes(_x25519_key())
    with pytest.raises(TLSSettingsError) as raised:
        ReloadingContextFactory(TLSSettings(cert=files.cert, key=files.key))
    assert raised.value.field == "key"
    assert str(files.key) in str(raised.value)


def test_reload_certificates_goes_on_past_an_unusable_key(tmp_path: Path) -> None:
    """
    The Python API's reload_certificates(): a listener whose key file now
    holds a key of a type TLS cannot use is counted as failed and keeps
    its certificate; the others are reloaded (the TypeError stopped the
    loop and escaped).
    """
    from OpenSSL import SSL

    from txwssec.tls import reload_certificates

    def serial(context: ReloadingContextFactory) -> int:
        return int(
            SSL.Connection(context.getContext(), None).get_certificate().get_serial_number()
        )

    broken_files = make_server_files(tmp_path / "broken")
    good_files = make_server_files(tmp_path / "good")
    broken = ReloadingContextFactory(TLSSettings(cert=broken_files.cert, key=broken_files.key))
    good = ReloadingContextFactory(TLSSettings(cert=good_files.cert, key=good_files.key))
    kept = serial(broken)
    broken_files.key.write_bytes(_x25519_key())
    renewed = good_files.replace_server_certificate().certificate.serial_number
    reloaded, failed = reload_certificates()
    assert failed >= 1 and reloaded >= 1
    assert serial(good) == renewed
    assert serial(broken) == kept
