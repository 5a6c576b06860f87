"""
txwssec as a real browser sees it: headless chromium (Debian's chromium and
chromium-driver, driven by Selenium) runs JavaScript in pages served from
local origins against a real C{twistd wssec}, and reports what the page saw:
the negotiated protocol and extensions, the messages, the error events, the
close code and C{wasClean}.

One browser and one server serve the whole module (the example page test has
its own quick-start server). The module takes about 15 s on 2 cores: about
5 s waiting for two JWTs to expire, 5 s for three in-band refreshes, 1 s to
start twistd, 0.5 s per chromium
start (two: the untrusted-CA control has its own), the rest in probes.
Skipped, with the reason, when chromium, chromedriver, certutil or selenium
are missing (C{.ci/run} installs them).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import harness
import jwt
import pytest
from processes import EXAMPLES, Process, free_port, quickstart, twistd

from txwssec.devcert import write_dev_certificates

pytestmark = pytest.mark.skipif(harness.missing() is not None, reason=str(harness.missing()))

KEY = "john-key"
SECRET = "a-secret-of-more-than-32-bytes-for-hs256-tokens"
MAX_MESSAGE_SIZE = 1024 * 1024

HERE = Path(__file__).parent


def listening(scheme: str) -> re.Pattern[str]:
    """The log line of a C{scheme}:0 listener, the port it got as group 1."""
    return re.compile(
        rf"wssec listening on {scheme}:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)"
    )


CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1", "tls:0:interface=127.0.0.1"]

[tls]
cert = "certs/server.pem"
key = "certs/server.key"

[auth.key]
header = "apikey"
subprotocol = "token"

[auth.jwt]
algorithms = ["HS256"]
secret = "{secret}"
subprotocol = "bearer"

[[consumer]]
name = "john"
keys = ["{key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key", "jwt"]
allowed_origins = ["{origin}"]
subprotocols = ["chat.v1"]
max_message_size = {max_message_size}

[[route]]
path = "/deflate"
app = "echo"
auth = ["key"]
allowed_origins = ["{origin}"]
compression = true
max_message_size = {max_message_size}

[[route]]
path = "/gateway"
upstream = "ws://127.0.0.1:{upstream_port}/"
auth = ["key"]
allowed_origins = ["{origin}"]

[[route]]
path = "/refresh"
app = "echo"
auth = ["key", "jwt"]
allowed_origins = ["{origin}"]
refresh = true
refresh_notice = 1
tickets = true

[[route]]
path = "/faulty"
app = "browser_apps:Faulty"
auth = ["key"]
allowed_origins = ["{origin}"]
"""


# -- fixtures: pages, an upstream, the server, the browser ---------------------------


@dataclass
class Sites:
    allowed: str  # the origin in allowed_origins
    evil: str  # another origin, refused


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sites]:
    """
    Two plain HTTP origins on 127.0.0.1 serving a blank page (and the
    example's client.js).
    """
    folder = tmp_path_factory.mktemp("pages")
    (folder / "index.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>txwssec browser tests</title>\n'
    )
    shutil.copy(EXAMPLES / "browser" / "client.js", folder)
    with harness.static_site(folder) as allowed, harness.static_site(folder) as evil:
        yield Sites(allowed, evil)


@dataclass
class Upstream:
    port: int
    requests: list[Any]  # websockets' Request of every handshake it answered


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    """
    An echo upstream for the gateway route that records each handshake
    request it gets, and answers C{whoami} with C{X-Consumer-Username}.
    """
    from websockets.sync.server import ServerConnection, serve

    requests: list[Any] = []

    def echo(connection: ServerConnection) -> None:
        requests.append(connection.request)
        for message in connection:
            if message == "whoami":
                assert connection.request is not None
                message = connection.request.headers.get("X-Consumer-Username", "(none)")
            connection.send(message)

    server = serve(echo, "127.0.0.1", 0, max_size=MAX_MESSAGE_SIZE)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Upstream(server.socket.getsockname()[1], requests)
    finally:
        server.shutdown()
        thread.join()


@dataclass
class Server:
    process: Process
    ws: str  # ws://127.0.0.1:PORT
    wss: str  # wss://localhost:PORT
    ca: Path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, sites: Sites, upstream: Upstream
) -> Iterator[Server]:
    """One twistd wssec for the module, ws:// and wss://, four routes."""
    folder = tmp_path_factory.mktemp("server")
    write_dev_certificates(folder / "certs")
    config = folder / "wssec.toml"
    config.write_text(
        CONFIG.format(
            secret=SECRET,
            key=KEY,
            origin=sites.allowed,
            max_message_size=MAX_MESSAGE_SIZE,
            upstream_port=upstream.port,
        )
    )
    with pytest.MonkeyPatch.context() as monkeypatch:
        # The server imports app = "browser_apps:Faulty" from this folder.
        monkeypatch.setenv("PYTHONPATH", str(HERE), prepend=os.pathsep)
        process = twistd(config, folder)
    try:
        ws_port = process.wait_for(listening("tcp")).group(1)
        wss_port = process.wait_for(listening("tls")).group(1)
        yield Server(
            process,
            f"ws://127.0.0.1:{ws_port}",
            f"wss://localhost:{wss_port}",
            folder / "certs" / "ca.pem",
        )
    finally:
        process.kill()


@pytest.fixture(scope="module")
def browser(
    tmp_path_factory: pytest.TempPathFactory, server: Server, sites: Sites
) -> Iterator[Any]:
    """
    One headless chromium for the module, trusting the server's dev CA
    through its NSS database, on a blank page of the allowed origin.
    """
    home = harness.trusting_home(tmp_path_factory.mktemp("home"), server.ca)
    driver = harness.chromium(home, tmp_path_factory.mktemp("profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any, sites: Sites) -> Any:
    """The browser, on the allowed origin's page."""
    browser.get(f"{sites.allowed}/index.html")
    return browser


def bearer(lifetime: int) -> str:
    """
    An HS256 JWT for john, expiring in C{lifetime} to C{lifetime} + 1
    seconds (exp is a whole second).
    """
    return jwt.encode({"sub": "john", "exp": math.ceil(time.time()) + lifetime}, SECRET, "HS256")


def told(seen: dict[str, Any]) -> str:
    """What the page saw, in full, for an assertion's message."""
    return "the page saw:\n" + json.dumps(seen, indent=1)


def assert_refused(seen: dict[str, Any]) -> None:
    """
    What a page sees of a refused handshake, whatever the status: one error
    event, then close 1006 with no reason, never clean, never opened.
    """
    assert seen["opened"] is False
    assert seen["errors"] == 1
    assert (seen["code"], seen["reason"], seen["wasClean"]) == (1006, "", False)


# -- credentials -----------------------------------------------------------------------


def test_key_as_token_subprotocol(page: Any, server: Server) -> None:
    """
    new WebSocket(url, ["token", key]): open, the page sees protocol
    "token" (never the key), an echo, then a clean 1000.
    """
    seen = harness.probe(page, f"{server.ws}/echo", ["token", KEY], ["hello"], replies=1)
    assert seen["opened"] is True
    assert seen["protocol"] == "token"
    assert seen["messages"] == ["hello"]
    assert (seen["code"], seen["wasClean"], seen["errors"]) == (1000, True, 0)


def test_application_subprotocol_with_key(page: Any, server: Server) -> None:
    """["chat.v1", "token", key]: the page sees protocol "chat.v1"."""
    seen = harness.probe(page, f"{server.ws}/echo", ["chat.v1", "token", KEY], ["chat"], replies=1)
    assert seen["protocol"] == "chat.v1"
    assert seen["messages"] == ["chat"]
    assert (seen["code"], seen["wasClean"]) == (1000, True)


def test_bearer_jwt_subprotocol(page: Any, server: Server) -> None:
    """["bearer", jwt]: the page sees protocol "bearer"."""
    seen = harness.probe(page, f"{server.ws}/echo", ["bearer", bearer(60)], ["jwt"], replies=1)
    assert seen["protocol"] == "bearer"
    assert seen["messages"] == ["jwt"]
    assert (seen["code"], seen["wasClean"]) == (1000, True)


def test_wrong_key_refused(page: Any, server: Server) -> None:
    """
    A wrong key gets 401 with WWW-Authenticate: the page sees an error event
    and 1006 only; the console says "HTTP Authentication failed".
    """
    seen = harness.probe(page, f"{server.ws}/echo", ["token", "jane-key"])
    assert_refused(seen)
    assert any("HTTP Authentication failed" in line for line in seen["console"]), told(seen)


def test_no_credential_refused(page: Any, server: Server) -> None:
    """No credential at all: the same 401, the same 1006."""
    seen = harness.probe(page, f"{server.ws}/echo")
    assert_refused(seen)
    assert any("HTTP Authentication failed" in line for line in seen["console"]), told(seen)


def test_jwt_expiry_closes_3000_cleanly(page: Any, server: Server) -> None:
    """
    A JWT expiring in 2-3 s: the session is closed by the server with 3000,
    and the close handshake completes (wasClean true, not a TCP reset).
    """
    token = bearer(2)
    seen = harness.probe(page, f"{server.ws}/echo", ["bearer", token], ["before"], replies=None)
    assert seen["opened"] is True
    assert seen["messages"] == ["before"]
    outcome = (seen["code"], seen["reason"], seen["wasClean"], seen["errors"])
    assert outcome == (3000, "credentials expired", True, 0), told(seen)


# -- origins ---------------------------------------------------------------------------


def test_evil_origin_refused(browser: Any, sites: Sites, server: Server) -> None:
    """
    A page of another origin, with the right key, gets 403: error event,
    1006; the console says "Unexpected response code: 403".
    """
    browser.get(f"{sites.evil}/index.html")
    seen = harness.probe(browser, f"{server.ws}/echo", ["token", KEY])
    assert_refused(seen)
    assert any("Unexpected response code: 403" in line for line in seen["console"]), told(seen)


# -- wss:// ----------------------------------------------------------------------------


def test_wss_with_trusted_dev_ca(page: Any, server: Server) -> None:
    """
    wss://localhost with the dev CA in the browser's NSS database: the TLS
    handshake succeeds (it failed with ERR_SSL_PROTOCOL_ERROR when the
    server sent alert 80 to ClientHellos offering ALPN), the key works.
    """
    seen = harness.probe(page, f"{server.wss}/echo", ["token", KEY], ["over tls"], replies=1)
    assert seen["opened"] is True, told(seen)
    assert seen["protocol"] == "token"
    assert seen["messages"] == ["over tls"]
    assert (seen["code"], seen["wasClean"]) == (1000, True)


def test_wss_with_untrusted_ca(tmp_path: Path, server: Server, sites: Sites) -> None:
    """
    The negative control: a browser whose NSS database does not trust the
    dev CA refuses the certificate (net::ERR_CERT_AUTHORITY_INVALID in the
    console); the page sees an error event and 1006.
    """
    home = harness.trusting_home(tmp_path / "home", None)
    driver = harness.chromium(home, tmp_path / "profile")
    try:
        driver.get(f"{sites.allowed}/index.html")
        seen = harness.probe(driver, f"{server.wss}/echo", ["token", KEY])
    finally:
        driver.quit()
    assert_refused(seen)
    assert any("net::ERR_CERT_AUTHORITY_INVALID" in line for line in seen["console"]), told(seen)


# -- gateway ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offered", "forwarded"), [([], []), (["chat.v1"], ["chat.v1"])], ids=["token", "chat.v1"]
)
def test_gateway_route(
    page: Any, server: Server, upstream: Upstream, offered: list[str], forwarded: list[str]
) -> None:
    """
    A gateway route in front of a local echo upstream: the echo works, the
    upstream is told the consumer, and never sees the key nor the "token"
    marker (only the application subprotocols the page offered); the page
    sees protocol "token" (the upstream chose none).
    """
    before = len(upstream.requests)
    seen = harness.probe(
        page,
        f"{server.ws}/gateway",
        [*offered, "token", KEY],
        ["through the gateway", "whoami"],
        replies=2,
    )
    assert seen["opened"] is True, told(seen)
    assert seen["protocol"] == "token"
    assert seen["messages"] == ["through the gateway", "john"]
    assert (seen["code"], seen["wasClean"]) == (1000, True)
    [request] = upstream.requests[before:]
    assert request.headers["X-Consumer-Username"] == "john"
    assert request.headers.get_all("Sec-WebSocket-Protocol") == forwarded
    assert KEY not in f"{request.path}\n{request.headers}"


# -- sizes, compression, application errors --------------------------------------------


@pytest.mark.parametrize("route", ["/echo", "/deflate"])
def test_max_message_size_boundary(page: Any, server: Server, route: str) -> None:
    """
    A message of exactly max_message_size is echoed whole; one byte more is
    closed with 1009, cleanly (with compression: after inflating).
    """
    url = f"{server.ws}{route}"
    exact = harness.probe(page, url, ["token", KEY], [{"size": MAX_MESSAGE_SIZE}], replies=1)
    assert exact["messages"] == [{"size": MAX_MESSAGE_SIZE, "all_a": True}]
    assert (exact["code"], exact["wasClean"]) == (1000, True)

    over = harness.probe(page, url, ["token", KEY], [{"size": MAX_MESSAGE_SIZE + 1}], replies=None)
    assert over["opened"] is True
    assert over["messages"] == []
    assert (over["code"], over["wasClean"], over["errors"]) == (1009, True, 0), told(over)


def test_deflate_negotiated_only_where_enabled(page: Any, server: Server) -> None:
    """ws.extensions: permessage-deflate on the compression route, none elsewhere."""
    on = harness.probe(page, f"{server.ws}/deflate", ["token", KEY], ["zip"], replies=1)
    assert on["extensions"].startswith("permessage-deflate"), told(on)
    assert on["messages"] == ["zip"]
    off = harness.probe(page, f"{server.ws}/echo", ["token", KEY], ["plain"], replies=1)
    assert off["extensions"] == ""
    assert off["messages"] == ["plain"]


def test_application_exception_closes_1011(page: Any, server: Server) -> None:
    """An application's onMessage that raises: close 1011, cleanly."""
    seen = harness.probe(
        page, f"{server.ws}/faulty", ["token", KEY], ["ok", "raise"], replies=None
    )
    outcome = (seen["messages"], seen["code"], seen["wasClean"], seen["errors"])
    assert outcome == (["ok"], 1011, True, 0), told(seen)


# -- examples/browser ------------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """
    examples/browser served over HTTP, and the quick-start server allowing
    that origin; yields (page URL, ws:// URL of the echo route).
    """
    with harness.static_site(EXAMPLES / "browser") as origin:
        port = free_port()
        config = quickstart(tmp_path, port)
        text = config.read_text()
        assert '"http://localhost:8000"' in text
        config.write_text(text.replace('"http://localhost:8000"', f'"{origin}"'))
        process = twistd(config, tmp_path)
        try:
            process.wait_for(f"wssec listening on tcp:{port}:")
            yield f"{origin}/index.html", f"ws://127.0.0.1:{port}/echo"
        finally:
            process.kill()


def test_example_page_echoes(browser: Any, example: tuple[str, str]) -> None:
    """
    examples/browser/index.html, used as its README says: enter the URL
    and key, connect, send; the echo appears in the page's log.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    page_url, ws_url = example
    browser.get(page_url)
    url = browser.find_element(By.ID, "url")
    url.clear()
    url.send_keys(ws_url)
    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "connect").click()
    wait = WebDriverWait(browser, harness.PROBE_TIMEOUT)
    wait.until(lambda driver: "open (protocol token)" in driver.find_element(By.ID, "log").text)
    message = browser.find_element(By.ID, "message")
    message.clear()
    message.send_keys("hello from the example")
    browser.find_element(By.ID, "send").click()
    wait.until(
        lambda driver: "received: hello from the example" in driver.find_element(By.ID, "log").text
    )
    log = browser.find_element(By.ID, "log").text
    assert KEY not in log


#: Runs examples/browser/client.js's SecureSocket with a JWT that expires
#: soon, then a fresh one, and sends a message over the size limit once
#: reconnected; reports the status lines and which credentials were asked for.
SECURE_SOCKET = """
const [url, expiring, fresh, oversize, done] = arguments;
const lines = [];
const asked = [];
const script = document.createElement("script");
script.src = "client.js";
script.onload = () => {
    const socket = new SecureSocket({
        url,
        method: "bearer",
        getCredential: async (isFresh) => {
            asked.push(isFresh);
            return isFresh ? fresh : expiring;
        },
        onStatus: (line) => {
            lines.push(line);
            if (line.startsWith("open") && asked.length === 2) socket.send("a".repeat(oversize));
            if (line.endsWith("not reconnecting")) setTimeout(() => done({lines, asked}), 500);
        },
        baseDelay: 100,
    });
    socket.start();
};
document.head.appendChild(script);
"""


def test_example_client_acts_on_close_codes(page: Any, server: Server) -> None:
    """
    examples/browser/client.js: after 3000 it asks for a fresh credential
    and reconnects at once; after 1009 it stops for good.
    """
    seen = page.execute_async_script(
        SECURE_SOCKET, f"{server.ws}/echo", bearer(2), bearer(60), MAX_MESSAGE_SIZE + 1
    )
    assert seen["asked"] == [False, True]
    assert seen["lines"] == [
        "open (protocol bearer)",
        "closed 3000 (credentials expired)",
        "credentials expired: reconnecting with a fresh credential",
        "open (protocol bearer)",
        "closed 1009 (message too big)",
        "the server refused what this client sent (1009): not reconnecting",
    ]


#: examples/browser/client.js's SecureSocket with refresh: true on the
#: /refresh route: the first credential, then one fresh credential per
#: wssec.expiring; after three refreshes it sends a message and reports the
#: status lines, the messages the page got, and the credentials asked for.
REFRESHING_SOCKET = """
const [url, first, fresh, done] = arguments;
const lines = [];
const messages = [];
const asked = [];
const script = document.createElement("script");
script.src = "client.js";
script.onload = () => {
    const socket = new SecureSocket({
        url,
        method: "bearer",
        refresh: true,
        getCredential: async (isFresh) => {
            asked.push(isFresh);
            return isFresh ? fresh.shift() : first;
        },
        onStatus: (line) => {
            lines.push(line);
            if (lines.filter((each) => each.startsWith("refreshed")).length === 3
                    && line.startsWith("refreshed")) {
                socket.send("still open");
            }
        },
        onMessage: (data) => {
            messages.push(data);
            socket.stop();
            setTimeout(() => done({lines, messages, asked}), 200);
        },
    });
    socket.start();
};
document.head.appendChild(script);
"""


def test_example_client_refreshes(page: Any, server: Server) -> None:
    """
    examples/browser/client.js with refresh: true: on each wssec.expiring
    (refresh_notice = 1 s ahead) it sends a fresh JWT; three refreshes
    later (tokens valid 2, 4, 6, 8 s from the start) the session has
    outlived its first token without a reconnect, and the page's onMessage
    saw only the echo, none of the refresh messages.
    """
    start = math.ceil(time.time())
    first = bearer_until(start + 2)
    fresh = [bearer_until(start + 4), bearer_until(start + 6), bearer_until(start + 8)]
    seen = page.execute_async_script(REFRESHING_SOCKET, f"{server.ws}/refresh", first, fresh)
    assert time.time() > start + 2, told(seen)
    assert seen["asked"] == [False, True, True, True], told(seen)
    assert seen["messages"] == ["still open"], told(seen)
    assert seen["lines"] == [
        "open (protocol bearer)",
        f"refreshed until {start + 4}",
        f"refreshed until {start + 6}",
        f"refreshed until {start + 8}",
        "closed 1000",
    ], told(seen)


def bearer_until(exp: int) -> str:
    """An HS256 JWT for john that expires at C{exp}."""
    return jwt.encode({"sub": "john", "exp": exp}, SECRET, "HS256")


#: fetchTicket() from examples/browser/client.js (a cross-origin POST with an
#: apikey header: a CORS preflight first), then SecureSocket with method
#: "ticket", then the same ticket again on a plain WebSocket.
TICKETS = """
const [postUrl, wsUrl, key, done] = arguments;
const result = {lines: []};
function openOnce(url) {
    return new Promise((resolve) => {
        const ws = new WebSocket(url);
        let opened = false;
        ws.onopen = () => { opened = true; ws.close(1000); };
        ws.onclose = (event) => resolve({opened, code: event.code});
    });
}
const script = document.createElement("script");
script.src = "client.js";
script.onload = async () => {
    let ticket;
    try {
        ticket = await fetchTicket(postUrl, {apikey: key});
    } catch (error) {
        done({error: String(error)});
        return;
    }
    result.length = ticket.length;
    const socket = new SecureSocket({
        url: wsUrl,
        method: "ticket",
        getCredential: async () => ticket,
        onStatus: (line) => {
            result.lines.push(line);
            if (line.startsWith("open")) socket.send("with a ticket");
        },
        onMessage: async (data) => {
            result.echo = data;
            socket.stop();
            result.again = await openOnce(`${wsUrl}?ticket=${ticket}`);
            done(result);
        },
    });
    socket.start();
};
document.head.appendChild(script);
"""


def test_example_tickets(browser: Any, sites: Sites, server: Server) -> None:
    """
    From the allowed origin, fetchTicket() gets a ticket (the preflight and
    the POST get their CORS answers), the ticket opens the WebSocket once
    (no credential in the handshake), and a second use is refused. From
    another origin, the browser does not let the page read the answer.
    """
    post_url = "http" + server.ws.removeprefix("ws") + "/refresh"
    ws_url = f"{server.ws}/refresh"
    browser.get(f"{sites.allowed}/index.html")
    seen = browser.execute_async_script(TICKETS, post_url, ws_url, KEY)
    assert seen.get("length") == 43, told(seen)
    assert seen["lines"][0] == "open (protocol )", told(seen)
    assert seen["echo"] == "with a ticket", told(seen)
    assert seen["again"] == {"opened": False, "code": 1006}, told(seen)
    browser.get(f"{sites.evil}/index.html")
    seen = browser.execute_async_script(TICKETS, post_url, ws_url, KEY)
    assert seen == {"error": "TypeError: Failed to fetch"}, told(seen)
