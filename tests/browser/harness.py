"""
What the browser tests need besides pytest: headless Debian chromium driven
by Selenium through chromedriver (no Selenium Manager, no downloads), static
pages served from local origins, an NSS database that trusts a CA, and a
JavaScript probe that opens one WebSocket and reports what the page saw.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Debian's packages (chromium, chromium-driver); override with these variables.
CHROMIUM = os.environ.get("TXWSSEC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (
    os.environ.get("TXWSSEC_CHROMEDRIVER")
    or shutil.which("chromedriver")
    or "/usr/bin/chromedriver"
)
#: certutil (libnss3-tools) writes the NSS database chromium reads its trusted CAs from.
CERTUTIL = shutil.which("certutil") or "/usr/bin/certutil"

#: Headless, nothing contacted but the test's servers, no HTTP/3 probing.
CHROMIUM_ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

#: How long the probe waits for the outcome it is asked for (seconds).
PROBE_TIMEOUT = 10.0


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not os.access(path, os.X_OK):
            return f"{name} not installed ({path}): apt-get install chromium chromium-driver"
    if not os.access(CERTUTIL, os.X_OK):
        return f"certutil not installed ({CERTUTIL}): apt-get install libnss3-tools"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium not installed: pip install '.[test]'"
    return None


def trusting_home(home: Path, ca: Path | None) -> Path:
    """
    A HOME for chromium whose NSS database (C{~/.pki/nssdb}, which chromium
    on Linux reads for locally trusted roots, headless and as root alike)
    trusts C{ca} for TLS servers; an empty database when C{ca} is None.
    """
    database = home / ".pki" / "nssdb"
    database.mkdir(parents=True)
    certutil = [CERTUTIL, "-d", f"sql:{database}"]
    subprocess.run([*certutil, "-N", "--empty-password"], check=True, capture_output=True)
    if ca is not None:
        subprocess.run(
            [*certutil, "-A", "-n", "txwssec test CA", "-t", "C,,", "-i", str(ca)],
            check=True,
            capture_output=True,
        )
    return home


def chromium(home: Path, profile: Path) -> Any:
    """
    A headless chromium session (Selenium's C{webdriver.Chrome}) with HOME
    set to C{home} and a fresh profile in C{profile}; the console ("browser")
    log is kept for the tests to read.
    """
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in CHROMIUM_ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    environment = {**os.environ, "HOME": str(home)}
    service = Service(executable_path=CHROMEDRIVER, env=environment)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(PROBE_TIMEOUT + 20)
    return driver


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_site(folder: Path) -> Iterator[str]:
    """Serve C{folder} over plain HTTP on 127.0.0.1; yields the origin."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


#: Opens one WebSocket and reports what the page saw. Arguments: url,
#: protocols (a list, or null for none), messages to send once open (a string,
#: or {size: N} for "a" repeated N times), how many replies to wait for before
#: closing with 1000 (null: wait for the server to close), and the timeout.
PROBE = """
const [url, protocols, sends, replies, timeout, done] = arguments;
const seen = {opened: false, errors: 0, messages: [], protocol: null, extensions: null};
let finished = false;
function finish(extra) {
    if (finished) return;
    finished = true;
    clearTimeout(timer);
    done(Object.assign(seen, extra));
}
const timer = setTimeout(() => finish({timedOut: true}), timeout * 1000);
let ws;
try {
    ws = protocols === null ? new WebSocket(url) : new WebSocket(url, protocols);
} catch (error) {
    finish({thrown: String(error)});
    return;
}
ws.binaryType = "arraybuffer";
ws.onopen = () => {
    seen.opened = true;
    seen.protocol = ws.protocol;
    seen.extensions = ws.extensions;
    for (const message of sends) {
        ws.send(typeof message === "string" ? message : "a".repeat(message.size));
    }
    if (replies === 0) ws.close(1000);
};
ws.onmessage = (event) => {
    const data = event.data;
    if (typeof data !== "string") seen.messages.push({binary: data.byteLength});
    else if (data.length > 1000) seen.messages.push({size: data.length, all_a: /^a*$/.test(data)});
    else seen.messages.push(data);
    if (replies !== null && seen.messages.length >= replies) ws.close(1000);
};
ws.onerror = () => { seen.errors += 1; };
ws.onclose = (event) => {
    finish({code: event.code, reason: event.reason, wasClean: event.wasClean});
};
"""


def probe(
    driver: Any,
    url: str,
    protocols: list[str] | None = None,
    sends: list[Any] | None = None,
    replies: int | None = 0,
    timeout: float = PROBE_TIMEOUT,
) -> dict[str, Any]:
    """
    Run L{PROBE} in the current page; returns what it saw (opened, protocol,
    extensions, messages, errors, code, reason, wasClean, timedOut) plus
    C{console}: the console lines logged meanwhile.
    """
    driver.get_log("browser")  # drop what earlier probes logged
    seen: dict[str, Any] = driver.execute_async_script(
        PROBE, url, protocols, sends or [], replies, timeout
    )
    seen["console"] = [entry["message"] for entry in driver.get_log("browser")]
    return seen
