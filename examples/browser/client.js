// SecureSocket: a browser WebSocket client for txwssec, done right.
//
// * The credential travels as a subprotocol: new WebSocket(url, [...app, "token", key])
//   ("bearer" for a JWT). Browsers cannot set headers on a WebSocket, and a
//   query string ends up in logs and history. The server answers with the
//   application subprotocol, or "token"; it never echoes the key.
// * A refused handshake (401, 403, 429...) is invisible to the page: it only
//   gets an error event and close 1006 with no reason. The browser's console
//   shows the status ("HTTP Authentication failed", "Unexpected response
//   code: 403"). So a 1006 before the socket ever opened is retried with a
//   growing delay, a few times, then given up.
// * Once open, the close code tells what to do (txwssec's close-code contract):
//     3000  credentials expired         -> get a new credential, reconnect now
//     3003  credentials revoked         -> stop, do not reconnect
//     1008  policy violation (rates)    -> stop: fix the client, do not loop
//     1009  message too big             -> stop: fix the client, do not loop
//     1002  protocol error              -> stop: fix the client, do not loop
//     1003  unsupported data (type)     -> stop: fix the client, do not loop
//     1007  invalid payload (UTF-8...)  -> stop: fix the client, do not loop
//     1001  server going away           -> reconnect with backoff
//     1011  internal error              -> reconnect with backoff
//     1013  overloaded / slow consumer  -> reconnect with backoff
//     1014  upstream failed (gateway)   -> reconnect with backoff
//     3008  timeout (idle, ping)        -> reconnect with backoff
//     1000  normal                      -> done
//
// Refresh before expiry (refresh: true, for a route with refresh = true): when
// the server sends {"type": "wssec.expiring"} (refresh_notice seconds before
// the credential expires), the client asks getCredential(true) for a fresh one
// and sends {"type": "wssec.refresh", "token": ...}; the session goes on with
// no reconnect. The server's answers (wssec.refreshed, wssec.refresh_rejected)
// go to onStatus, never to onMessage. Without it (or if the refresh fails) the
// session ends with 3000 and the client reconnects with a fresh credential.
// One-time tickets (method: "ticket", a route with tickets = true): the page
// gets a ticket with fetchTicket() (a POST the browser authenticates with a
// header, from an allowed origin) and connects with ?ticket=...: no credential
// in the WebSocket handshake at all.
"use strict";

// Codes after which reconnecting cannot help.
const GIVE_UP = new Set([3003, 1002, 1003, 1007, 1008, 1009]);

// The server's refresh messages: a JSON object whose first member is "type".
const REFRESH_MESSAGE = /^\s*\{\s*"type"\s*:\s*"wssec\.(expiring|refreshed|refresh_rejected)"/;

// POST <route> with headers that authenticate it (e.g. {apikey: "..."} or
// {Authorization: "Bearer ..."}): a one-time ticket for that route's WebSocket.
async function fetchTicket(url, headers) {
  const response = await fetch(url, {method: "POST", headers, cache: "no-store"});
  if (response.status !== 201) throw new Error(`ticket refused: HTTP ${response.status}`);
  return (await response.json()).ticket;
}

class SecureSocket {
  constructor({url, getCredential, method = "token", protocols = [], onMessage, onStatus,
               refresh = false, baseDelay = 1000, maxDelay = 30000, maxFailedOpens = 5}) {
    this.url = url;
    this.getCredential = getCredential;
    this.method = method;
    this.protocols = protocols;
    this.onMessage = onMessage || (() => {});
    this.onStatus = onStatus || (() => {});
    this.refresh = refresh;
    this.baseDelay = baseDelay;
    this.maxDelay = maxDelay;
    this.maxFailedOpens = maxFailedOpens;
    this.ws = null;
    this.stopped = true;
    this.attempt = 0;        // consecutive failures, for the backoff
    this.failedOpens = 0;    // consecutive handshakes that never opened
    this.timer = null;
  }

  start() {
    this.stopped = false;
    this.connect(false);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.ws) this.ws.close(1000);
  }

  send(data) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(data);
    return true;
  }

  async connect(fresh) {
    if (this.stopped) return;
    let credential;
    try {
      credential = await this.getCredential(fresh);
    } catch (error) {
      this.onStatus(`no credential: ${error}`);
      this.retry();
      return;
    }
    if (this.stopped) return;
    let opened = false;
    const ws = this.method === "ticket"
      ? new WebSocket(`${this.url}?ticket=${encodeURIComponent(credential)}`, this.protocols)
      : new WebSocket(this.url, [...this.protocols, this.method, credential]);
    this.ws = ws;
    ws.onopen = () => {
      opened = true;
      this.attempt = 0;
      this.failedOpens = 0;
      this.onStatus(`open (protocol ${ws.protocol})`);
    };
    ws.onmessage = (event) => {
      if (this.refresh && typeof event.data === "string" && REFRESH_MESSAGE.test(event.data)) {
        this.refreshMessage(ws, JSON.parse(event.data));
      } else {
        this.onMessage(event.data);
      }
    };
    ws.onclose = (event) => {
      if (this.ws === ws) this.ws = null;
      this.onStatus(`closed ${event.code}${event.reason ? ` (${event.reason})` : ""}` +
                    `${event.wasClean ? "" : ", not clean"}`);
      this.closed(event.code, opened);
    };
  }

  closed(code, opened) {
    if (this.stopped || code === 1000) return;
    if (code === 3000) {
      // The credential expired: get a fresh one and reconnect at once (with
      // backoff if the new one is refused or expires at once).
      this.onStatus("credentials expired: reconnecting with a fresh credential");
      if (this.attempt === 0) {
        this.attempt = 1;
        this.connect(true);
      } else {
        this.retry(true);
      }
      return;
    }
    if (GIVE_UP.has(code)) {
      this.stopped = true;
      this.onStatus(code === 3003 ? "credentials revoked: not reconnecting"
                                  : `the server refused what this client sent (${code}): not reconnecting`);
      return;
    }
    if (!opened) {
      // Handshake refused (bad key, origin, overload) or server unreachable:
      // the page cannot tell which. Retry a few times, then stop.
      this.failedOpens += 1;
      if (this.failedOpens >= this.maxFailedOpens) {
        this.stopped = true;
        this.onStatus("could not connect: giving up (see the browser console for the HTTP status)");
        return;
      }
    }
    // 1001, 1006, 1011, 1013, 1014, 3008, and any other code: back off and retry.
    this.retry(false);
  }

  retry(fresh) {
    if (this.stopped) return;
    // Exponential backoff with full jitter, capped.
    const ceiling = Math.min(this.maxDelay, this.baseDelay * 2 ** this.attempt);
    const delay = Math.round(Math.random() * ceiling);
    this.attempt += 1;
    this.onStatus(`reconnecting in ${(delay / 1000).toFixed(1)} s`);
    this.timer = setTimeout(() => this.connect(fresh), delay);
  }

  // The server's refresh messages (refresh: true).
  async refreshMessage(ws, message) {
    if (message.type === "wssec.expiring") {
      await this.refreshBeforeExpiry(ws);
    } else if (message.type === "wssec.refreshed") {
      this.onStatus(`refreshed until ${message.expires_at}`);
    } else if (message.reason === "too many refreshes") {
      // Within a second of the previous one: try once more a second later.
      setTimeout(() => this.refreshBeforeExpiry(ws), 1000);
    } else {
      // The session goes on until it expires (3000), then reconnects.
      this.onStatus(`refresh rejected: ${message.reason}`);
    }
  }

  // Send {"type": "wssec.refresh", "token": <fresh credential>} before the
  // session's expiry, so that it is never closed with 3000.
  async refreshBeforeExpiry(ws) {
    let credential;
    try {
      credential = await this.getCredential(true);
    } catch (error) {
      this.onStatus(`no credential to refresh with: ${error}`);
      return;
    }
    if (ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({type: "wssec.refresh", token: credential}));
    }
  }
}
