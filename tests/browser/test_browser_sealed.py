"""
Sealed payloads in Chromium: examples/browser/sealed.js (WebCrypto, no
dependency) reproduces the test vectors of docs/sealed-v1.md, echoes text
and binary through a real C{twistd wssec} route with C{sealed = "required"},
and each tampering case a page can make (a bit of ciphertext, tag or
counter flipped, a replayed, reordered or truncated message) closes the
session with 1007. Skipped as the browser suite is when chromium is missing.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness
import pytest
from processes import EXAMPLES, twistd
from test_sealed import KEY, VECTORS

pytestmark = pytest.mark.skipif(harness.missing() is not None, reason=str(harness.missing()))

API_KEY = "john-key"

CONFIG = """
[server]
listen = ["tcp:0:interface=127.0.0.1"]

[auth.key]
header = "apikey"
subprotocol = "token"

[[consumer]]
name = "john"
keys = ["{api_key}"]
seal_keys = ["{seal_key}"]

[[route]]
path = "/echo"
app = "echo"
auth = ["key"]
allowed_origins = ["{origin}"]
sealed = "required"
"""

SEAL_KEY = "base64:" + base64.b64encode(KEY).decode()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("pages")
    (folder / "index.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>sealed</title>\n'
        '<script src="sealed.js"></script>\n'
    )
    shutil.copy(EXAMPLES / "browser" / "sealed.js", folder)
    with harness.static_site(folder) as origin:
        yield origin


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, site: str) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("server")
    config = folder / "wssec.toml"
    config.write_text(CONFIG.format(api_key=API_KEY, seal_key=SEAL_KEY, origin=site))
    process = twistd(config, folder)
    try:
        pattern = re.compile(
            r"wssec listening on tcp:0:interface=127\.0\.0\.1 \(127\.0\.0\.1:(\d+)\)"
        )
        yield f"ws://127.0.0.1:{process.wait_for(pattern).group(1)}"
    finally:
        process.stop()
        output = process.output()
        assert "Traceback" not in output
        assert KEY.hex() not in output and SEAL_KEY[7:] not in output


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory, site: str) -> Iterator[Any]:
    home = harness.trusting_home(tmp_path_factory.mktemp("home"), None)
    driver = harness.chromium(home, tmp_path_factory.mktemp("profile"))
    try:
        driver.get(f"{site}/index.html")
        yield driver
    finally:
        driver.quit()


VECTORS_SCRIPT = """
const done = arguments[arguments.length - 1];
const [helloHex, s2cHex] = arguments;
const S = WssecSealed;
const hex = (b) => Array.from(new Uint8Array(b), (x) => x.toString(16).padStart(2, "0")).join("");
const bytes = (h) => Uint8Array.from(h.match(/../g), (x) => parseInt(x, 16));
const range = (a, n) => Uint8Array.from({length: n}, (_, i) => a + i);
(async () => {
    const key = range(0, 32);
    const handshake = new S.ClientHandshake(key, "/echo", range(0x40, 16));
    const [c2s, s2c] = await S.deriveKeys(key, range(0x40, 16), range(0x80, 16), "/echo", true);
    const session = await handshake.acceptHello(bytes(helloHex));
    const out = {
        kid: hex(await S.keyId(key)),
        offer: await handshake.offer(),
        c2s_key: hex(await crypto.subtle.exportKey("raw", c2s)),
        s2c_key: hex(await crypto.subtle.exportKey("raw", s2c)),
        hello: helloHex,
        c2s_0_text_hello: hex(await session.seal("hello")),
        c2s_1_binary_00010203: hex(await session.seal(Uint8Array.from([0, 1, 2, 3]))),
    };
    const [text, binary] = await session.unseal(bytes(s2cHex));
    out.s2c_1_text_hello = text === "hello" && !binary ? s2cHex : "unsealed " + text;
    done(out);
})().catch((error) => done({error: String(error)}));
"""


def test_vectors_in_chromium(page: Any) -> None:
    """The JS module derives, seals and opens exactly the spec's vectors."""
    seen = page.execute_async_script(VECTORS_SCRIPT, VECTORS["hello"], VECTORS["s2c_1_text_hello"])
    assert seen == VECTORS


ECHO_SCRIPT = """
const done = arguments[arguments.length - 1];
const [url, key, apiKey] = arguments;
(async () => {
    const socket = await WssecSealed.connect(url, {key, protocols: ["token", apiKey]});
    const got = [];
    const closed = new Promise((resolve) => { socket.onclose = resolve; });
    const both = new Promise((resolve) => {
        socket.onmessage = (data, isBinary) => {
            got.push(isBinary ? Array.from(new Uint8Array(data)) : data);
            if (got.length === 2) resolve();
        };
    });
    await socket.send("héllo");
    await socket.send(Uint8Array.from([0, 1, 2, 255]));
    await both;
    socket.close(1000);
    const end = await closed;
    done({protocol: socket.protocol, got, code: end.code, wasClean: end.wasClean});
})().catch((error) => done({error: String(error)}));
"""


def test_sealed_echo_in_chromium(page: Any, ws: str) -> None:
    seen = page.execute_async_script(ECHO_SCRIPT, f"{ws}/echo", SEAL_KEY, API_KEY)
    assert seen == {
        "protocol": "wssec.sealed.v1",
        "got": ["héllo", [0, 1, 2, 255]],
        "code": 1000,
        "wasClean": True,
    }, json.dumps(seen)


def test_wrong_key_refused_in_chromium(page: Any, ws: str) -> None:
    """A key that is not the consumer's: 403, connect() rejects."""
    other = "base64:" + base64.b64encode(bytes(32)).decode()
    seen = page.execute_async_script(ECHO_SCRIPT, f"{ws}/echo", other, API_KEY)
    assert seen == {"error": "Error: closed before the hello: 1006"}


#: Opens a sealed session by hand (a raw WebSocket and the module's
#: handshake), sends message 0 (echoed), then the tampered messages, and
#: reports the close code the server sent.
TAMPER_SCRIPT = """
const done = arguments[arguments.length - 1];
const [url, key, apiKey, kase] = arguments;
const S = WssecSealed;
(async () => {
    const handshake = new S.ClientHandshake(key, new URL(url).pathname);
    const ws = new WebSocket(url, [S.PROTOCOL, await handshake.offer(), "token", apiKey]);
    ws.binaryType = "arraybuffer";
    const closed = new Promise((resolve) => { ws.onclose = resolve; });
    const messages = [];
    let arrived;
    ws.onmessage = (event) => { messages.push(event.data); if (arrived) arrived(); };
    const next = () => new Promise((resolve) => {
        if (messages.length) resolve(messages.shift());
        else arrived = () => { arrived = null; resolve(messages.shift()); };
    });
    const session = await handshake.acceptHello(await next());
    const sealed = [];
    for (const n of [0, 1, 2]) sealed.push(await session.seal("message " + n));
    ws.send(sealed[0]);
    const [echo] = await session.unseal(await next());
    const flip = (m, i) => { const c = m.slice(); c[(i + c.length) % c.length] ^= 1; return c; };
    const cases = {
        "ciphertext bit": [flip(sealed[1], 10)],
        "tag bit": [flip(sealed[1], -1)],
        "counter bit": [flip(sealed[1], 8)],
        "replay": [sealed[0]],
        "reorder": [sealed[2], sealed[1]],
        "truncate": [sealed[1].slice(0, sealed[1].length - 1)],
    };
    for (const message of cases[kase]) ws.send(message);
    const end = await closed;
    done({echo, code: end.code, reason: end.reason});
})().catch((error) => done({error: String(error)}));
"""


@pytest.mark.parametrize(
    "case", ["ciphertext bit", "tag bit", "counter bit", "replay", "reorder", "truncate"]
)
def test_tampering_in_chromium(page: Any, ws: str, case: str) -> None:
    seen = page.execute_async_script(TAMPER_SCRIPT, f"{ws}/echo", SEAL_KEY, API_KEY, case)
    assert seen == {"echo": "message 0", "code": 1007, "reason": "sealed message rejected"}


def test_module_is_dependency_free() -> None:
    text = (Path(EXAMPLES) / "browser" / "sealed.js").read_text()
    assert "import " not in text and "require(" not in text
