/*
 * wssec.sealed.v1 for browsers: sealed WebSocket payloads (docs/sealed-v1.md)
 * with WebCrypto only (HKDF-SHA256, HMAC-SHA256, AES-256-GCM). No dependency.
 *
 *   const session = await WssecSealed.connect("wss://ws.example.com/echo", {
 *       key: "base64:...",                 // the consumer's seal key
 *       protocols: ["token", "my-api-key"] // credential entries, if any
 *   });
 *   session.onmessage = (data, isBinary) => console.log(data);  // string or ArrayBuffer
 *   session.onclose = ({code, reason, wasClean}) => ...;
 *   await session.send("hello");
 *
 * connect() resolves once the server's hello has been checked, and rejects
 * if the server refused the handshake or did not answer wssec.sealed.v1.
 * A message that does not open closes the socket; a page may only send
 * close codes 1000 and 3000-4999, so the module closes with 1000 and the
 * reason "sealed message rejected", and reports code 1007 to onclose.
 * The key is kept in non-extractable CryptoKeys once imported.
 */
(function (global) {
    "use strict";

    const PROTOCOL = "wssec.sealed.v1";
    const OFFER_PREFIX = "wssec.seal.";
    const HELLO = 0, TEXT = 1, BINARY = 2;
    const HEADER = 9, TAG = 16, NONCE = 16, KID = 8;
    const MAX_COUNTER = 2 ** 32;
    const REASON = "sealed message rejected";
    const subtle = global.crypto.subtle;
    const encoder = new TextEncoder();
    const strictDecoder = new TextDecoder("utf-8", {fatal: true});

    class SealError extends Error {}

    function concat(...parts) {
        const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
        let at = 0;
        for (const part of parts) {
            out.set(part, at);
            at += part.length;
        }
        return out;
    }

    function b64url(bytes) {
        let text = "";
        for (const byte of bytes) text += String.fromCharCode(byte);
        return btoa(text).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
    }

    function parseKey(key) {
        if (key instanceof Uint8Array) return key;
        if (typeof key !== "string" || !key.startsWith("base64:")) {
            throw new TypeError('seal key must be "base64:..." or a Uint8Array');
        }
        const text = atob(key.slice(7).trim().replace(/-/g, "+").replace(/_/g, "/"));
        const bytes = Uint8Array.from(text, (c) => c.charCodeAt(0));
        if (bytes.length !== 32) throw new TypeError("seal key must be 32 bytes");
        return bytes;
    }

    function header(kind, counter) {
        const bytes = new Uint8Array(HEADER);
        bytes[0] = kind;
        new DataView(bytes.buffer).setBigUint64(1, BigInt(counter));
        return bytes;
    }

    async function keyId(key) {
        const hmac = await subtle.importKey("raw", key, {name: "HMAC", hash: "SHA-256"}, false, ["sign"]);
        const mac = await subtle.sign("HMAC", hmac, encoder.encode("wssec.sealed.v1 key id"));
        return new Uint8Array(mac).slice(0, KID);
    }

    async function deriveKeys(key, clientNonce, serverNonce, path, extractable = false) {
        const kid = await keyId(key);
        const ikm = await subtle.importKey("raw", key, "HKDF", false, ["deriveBits"]);
        const salt = concat(clientNonce, serverNonce);
        const keys = [];
        for (const direction of ["c2s", "s2c"]) {
            const info = concat(encoder.encode(PROTOCOL + "\0" + direction + "\0"), kid, encoder.encode(path));
            const bits = await subtle.deriveBits({name: "HKDF", hash: "SHA-256", salt, info}, ikm, 256);
            keys.push(await subtle.importKey("raw", bits, "AES-GCM", extractable, ["encrypt", "decrypt"]));
        }
        return keys;
    }

    /* One direction: its key and counter (the 4-byte nonce prefix: 0 c2s, 1 s2c). */
    class Direction {
        constructor(key, prefix) {
            this.key = key;
            this.prefix = prefix;
            this.counter = 0;
        }

        iv(counter) {
            const iv = new Uint8Array(12);
            const view = new DataView(iv.buffer);
            view.setUint32(0, this.prefix);
            view.setBigUint64(4, BigInt(counter));
            return iv;
        }

        /* Takes the counter now (in call order); encrypts asynchronously. */
        async seal(kind, payload, extra = new Uint8Array(0)) {
            const counter = this.counter;
            if (counter >= MAX_COUNTER) throw new SealError("counter exhausted");
            this.counter = counter + 1;
            const aad = concat(header(kind, counter), extra);
            const sealed = await subtle.encrypt(
                {name: "AES-GCM", iv: this.iv(counter), additionalData: aad, tagLength: 128},
                this.key, payload);
            return concat(aad, new Uint8Array(sealed));
        }

        /* Checks the counter now; decrypts asynchronously. */
        async open(message, extraBytes = 0) {
            const end = HEADER + extraBytes;
            if (message.length < end + TAG) throw new SealError("truncated");
            const counter = new DataView(message.buffer, message.byteOffset).getBigUint64(1);
            if (counter !== BigInt(this.counter)) throw new SealError("counter");
            this.counter += 1;
            let plain;
            try {
                plain = await subtle.decrypt(
                    {name: "AES-GCM", iv: this.iv(this.counter - 1), additionalData: message.slice(0, end), tagLength: 128},
                    this.key, message.slice(end));
            } catch (error) {
                throw new SealError("authentication failed");
            }
            return [message[0], new Uint8Array(plain)];
        }
    }

    class SealedSession {
        constructor(send, receive) {
            this._send = send;
            this._receive = receive;
        }

        /* payload: a string (sent as text) or bytes. Resolves to the sealed message. */
        seal(payload) {
            if (typeof payload === "string") return this._send.seal(TEXT, encoder.encode(payload));
            return this._send.seal(BINARY, new Uint8Array(payload));
        }

        /* Resolves to [data, isBinary]: data a string (text) or an ArrayBuffer. */
        async unseal(message) {
            const [kind, plain] = await this._receive.open(new Uint8Array(message));
            if (kind === BINARY) return [plain.buffer, true];
            if (kind !== TEXT) throw new SealError("unexpected kind");
            try {
                return [strictDecoder.decode(plain), false];
            } catch (error) {
                throw new SealError("text message is not UTF-8");
            }
        }
    }

    /* The client's side before the hello: offer(), then acceptHello(). */
    class ClientHandshake {
        constructor(key, path, clientNonce) {
            this.key = parseKey(key);
            this.path = path;
            this.nonce = clientNonce || global.crypto.getRandomValues(new Uint8Array(NONCE));
        }

        async offer() {
            return OFFER_PREFIX + b64url(concat(await keyId(this.key), this.nonce));
        }

        async acceptHello(message) {
            message = new Uint8Array(message);
            if (message.length !== HEADER + NONCE + TAG || message[0] !== HELLO) {
                throw new SealError("malformed hello");
            }
            const serverNonce = message.slice(HEADER, HEADER + NONCE);
            const [c2s, s2c] = await deriveKeys(this.key, this.nonce, serverNonce, this.path);
            const receive = new Direction(s2c, 1);
            await receive.open(message, NONCE);
            return new SealedSession(new Direction(c2s, 0), receive);
        }
    }

    /* A sealed WebSocket: send(), close(), onmessage, onclose. */
    class SealedSocket {
        constructor(ws, handshake, opened, refused) {
            this.ws = ws;
            this.session = null;
            this.onmessage = null;
            this.onclose = null;
            this._handshake = handshake;
            this._opened = opened;
            this._refused = refused;
            this._failed = false;
            this._rx = Promise.resolve();
            this._tx = Promise.resolve();
            ws.onopen = () => {
                if (ws.protocol !== PROTOCOL) {
                    this._failed = true;
                    ws.close(1000, "sealing refused");
                    refused(new Error("the server did not answer " + PROTOCOL));
                }
            };
            ws.onmessage = (event) => {
                // In arrival order, one at a time: the counters must match.
                this._rx = this._rx.then(() => this._receive(event.data));
            };
            ws.onclose = (event) => {
                this._rx.then(() => {
                    if (this.session === null && !this._failed) {
                        refused(new Error("closed before the hello: " + event.code));
                    }
                    if (this.onclose) {
                        const code = this._failed ? 1007 : event.code;
                        const reason = this._failed ? REASON : event.reason;
                        this.onclose({code, reason, wasClean: event.wasClean});
                    }
                });
            };
        }

        get protocol() {
            return this.ws.protocol;
        }

        async _receive(data) {
            if (this._failed) return;
            let opened;
            try {
                if (typeof data === "string") throw new SealError("sealed message in a text frame");
                if (this.session === null) {
                    this.session = await this._handshake.acceptHello(data);
                    this._handshake = null;
                    this._opened(this);
                    return;
                }
                opened = await this.session.unseal(data);
            } catch (error) {
                if (this.session === null) this._refused(error);
                this._fail();
                return;
            }
            if (this.onmessage) this.onmessage(opened[0], opened[1]);
        }

        _fail() {
            this._failed = true;
            this.session = null;
            this.ws.close(1000, REASON);
        }

        /* Seal and send (in call order); resolves once handed to the socket. */
        send(payload) {
            if (this._failed || this.session === null || this.ws.readyState !== WebSocket.OPEN) {
                return Promise.reject(new Error("not open"));
            }
            const sealed = this.session.seal(payload);
            this._tx = this._tx.then(() => sealed).then((message) => this.ws.send(message));
            return this._tx;
        }

        close(code = 1000, reason = "") {
            this.ws.close(code, reason);
        }
    }

    /* Open a sealed session: resolves to a SealedSocket once the hello is checked. */
    async function connect(url, options) {
        const handshake = new ClientHandshake(options.key, new URL(url).pathname || "/");
        const offer = await handshake.offer();
        const ws = new WebSocket(url, [PROTOCOL, offer, ...(options.protocols || [])]);
        ws.binaryType = "arraybuffer";
        return new Promise((resolve, reject) => new SealedSocket(ws, handshake, resolve, reject));
    }

    global.WssecSealed = {PROTOCOL, connect, ClientHandshake, deriveKeys, keyId, SealError};
})(globalThis);
