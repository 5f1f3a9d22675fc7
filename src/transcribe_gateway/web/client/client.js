// @ts-check
/**
 * A client for the Transcribe WebSocket protocol, for browsers and Node.
 *
 * - Browser: the global WebSocket cannot set headers, so the credential (a
 *   short-lived token from POST /v1/tokens, never a long-lived key) goes in the
 *   `auth` first message.
 * - Node: pass `WebSocket` from the `ws` package; the credential goes in the
 *   `Authorization: Bearer` header of the upgrade request.
 *
 * There is no silent reconnect: when the socket closes the client emits
 * `closed` (with the close code) and stays closed; reconnecting is the
 * caller's decision (a token is single-use: get a new one first).
 *
 * A server behind on its work stops reading its socket (backpressure): what is
 * sent meanwhile waits in the socket's buffers, the kernel's included, which
 * `bufferedAmount` does not see. In Node (`ws`), as the Python SDK does, the
 * client pings after every second of audio; a pong comes once the server has read
 * all that was sent before its ping, so `drained()` keeps at most 5 s of audio
 * beyond what the server has read, and `close()` knows when the server has read
 * `session.close`. The same pings are a keepalive: a server that shows no sign of
 * life (no message, no pong, none of the queued audio read) for `pingIntervalMs +
 * pingTimeoutMs` is dropped (`closed` with 1011). A browser's WebSocket has no
 * ping: there, none of this; pace a file yourself.
 *
 * This file has no dependencies and needs no build step.
 *
 * @module
 */

/**
 * @typedef {object} SessionConfig
 * @property {string} provider `LOCAL`, `DEEPGRAM`, `OPENAI`, ...
 * @property {string} model e.g. `whisper-tiny.en`, `nova-3`
 * @property {string} [language] BCP-47, default `en`
 * @property {string} [prompt] keyterms or context
 * @property {"pcm16" | "mulaw" | "alaw"} [input_audio_format] default `pcm16`; `mulaw`/`alaw`
 *   (G.711, one byte per sample): send the encoded bytes with `sendPcm16`
 * @property {number} [sample_rate] Hz, default 16000
 * @property {number} [endpointing] ms of silence that ends an utterance
 * @property {number} [endpointing_unfinished] ms of silence that ends an utterance whose
 *   text does not yet end a sentence (semantic endpointing; `LOCAL` Whisper)
 * @property {{provider: string, model: string}} [fallback] the engine that takes over
 *   (with the audio since the last final) if this one fails
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} url WebSocket URL, e.g. `ws://localhost:8000/ws`
 * @property {string} [token] short-lived session token (`tst_...`), or an API key (server side only)
 * @property {string} [apiKey] an API key (Node only: never put one in a web page)
 * @property {SessionConfig} session configuration sent after `session.created`
 * @property {"header" | "message"} [auth] where the credential goes; default: `header`
 *   when a `WebSocket` class taking headers (Node `ws`) is given, else `message`
 * @property {any} [WebSocket] WebSocket class; default `globalThis.WebSocket`
 * @property {number} [connectTimeoutMs] default 15000
 * @property {number} [pingIntervalMs] Node `ws` only: ms between keepalive pings, default
 *   20000; 0 turns the keepalive off
 * @property {number} [pingTimeoutMs] Node `ws` only: the server is dropped (`closed` with
 *   1011) after `pingIntervalMs + pingTimeoutMs` without a sign of life; default 20000
 */

/**
 * @typedef {object} Completed
 * @property {string} type `transcription.completed`
 * @property {string} utterance_id
 * @property {string} text
 * @property {number} start_ms
 * @property {number} end_ms
 * @property {Array<{word: string, start_ms: number, end_ms: number, confidence?: number}>} [words]
 * @property {number | null} latency_ms wall-clock ms from when the audio at `end_ms`
 *   was sent to when this final arrived (`null` if unknown)
 */

/**
 * @typedef {object} ClosedInfo
 * @property {number} code WebSocket close code (1000 normal, 4001 unauthorized, 4029 over
 *   limit; 1011 `keepalive timeout: ...` when the client dropped a server that showed no
 *   sign of life)
 * @property {string} reason the WebSocket close reason
 * @property {boolean} finalized whether `session.closed` arrived: the server finished the
 *   audio. `false` with code 1000 when `close()` gave up waiting (its `timeoutMs`), or
 *   when the client closed a session that `connect()` gave up on
 * @property {string | null} session_reason `session.closed`'s reason (`client_close`,
 *   `idle_timeout`, `shutdown`), `null` without one
 * @property {number | null} audio_seconds `session.closed`'s usage, when the server sent it
 */

/** An `error` message from the server, or a local failure (`code` = `client_error`). */
export class TranscribeError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {boolean} [retryable]
   * @param {string | null} [field]
   */
  constructor(code, message, retryable = false, field = null) {
    super(message);
    this.name = "TranscribeError";
    /** snake_case error code from the protocol */
    this.code = code;
    /** whether retrying the same request may succeed */
    this.retryable = retryable;
    /** the offending path the server named, e.g. `session.sample_rate` (`null` if none) */
    this.field = field;
  }
}

const OPEN = 1;

/** Node `ws`: the most audio (ms) sent beyond what the server has read, in `drained()`. */
const AUDIO_AHEAD_MS = 5000;
/** Node `ws`: a ping after this much audio (ms), to learn how far the server has read. */
const PING_EVERY_AUDIO_MS = 1000;

/** Bytes per sample of each `input_audio_format` (G.711 mu-law and A-law: one). */
const BYTES_PER_SAMPLE = { pcm16: 2, mulaw: 1, alaw: 1 };

/** @param {any} e an `error` message's `error` object */
function errorFrom(e) {
  return new TranscribeError(e.code || "error", e.message || "", !!e.retryable,
    typeof e.field === "string" ? e.field : null);
}

/** `error` codes answering the `session.update` of connect(): the session cannot be served. */
const REFUSES_SESSION = new Set(["invalid_session_config", "provider_unavailable", "provider_error"]);

/** Float32 samples in [-1, 1] to signed 16-bit little-endian PCM.
 * @param {Float32Array} samples
 * @returns {Int16Array}
 */
export function floatToPcm16(samples) {
  const out = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    out[i] = s < 0 ? s * 0x8000 : s * 0x7fff;
  }
  return out;
}

/** @param {Uint8Array} bytes */
function toBase64(bytes) {
  // @ts-ignore Buffer exists in Node only
  if (typeof Buffer !== "undefined") return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, /** @type {any} */ (bytes.subarray(i, i + 0x8000)));
  }
  return btoa(binary);
}

export class TranscribeClient {
  /** @param {ClientOptions} options */
  constructor(options) {
    if (!options || !options.url) throw new TypeError("options.url is required");
    if (!options.session) throw new TypeError("options.session is required");
    /** @private */ this._opts = options;
    /** @private */ this._impl = options.WebSocket || globalThis.WebSocket;
    if (!this._impl) throw new TypeError("no WebSocket: pass options.WebSocket (Node: the `ws` package)");
    /** @private @type {Map<string, Set<Function>>} */ this._listeners = new Map();
    /** @private @type {any} */ this._ws = null;
    /** Session id from `session.created`. @type {string | null} */
    this.sessionId = null;
    /** Effective configuration from the last `session.updated`. @type {Record<string, any> | null} */
    this.effective = null;
    /** @private Audio sent so far, in ms: each chunk at the rate it was sent at. */ this._sentMs = 0;
    /** @private @type {Array<[number, number]>} (audio ms at chunk end, wall ms when sent) */
    this._sent = [];
    /** @private Audio ms at the end of the last entry dropped from `_sent`: a final ending
     * at or before it cannot be timed (its chunk's send time is gone). */
    this._droppedMs = 0;
    /** @private @type {ClosedInfo | null} */ this._closed = null;
    /** @private @type {number | null} */ this._audioSeconds = null;
    /** @private @type {any} the `session.closed` message, once it arrived */ this._sessionClosed = null;
    /** @private @type {Array<(info: ClosedInfo) => void>} connect()'s and close()'s */
    this._closeWaiters = [];
    /** @private @type {Promise<ClosedInfo> | null} */ this._closing = null;
    /** @private The session is ending (close() was called, or the server's `session_closing`):
     * the server refuses more audio, so none is sent. */
    this._ending = false;
    /** @private close()'s inactivity timer, once it runs. @type {any} */ this._closeTimer = null;
    /** @private */ this._closeTimeoutMs = 20000;
    /** @private Whether the server has read `session.close` (the pong of the ping after it). */
    this._closeRead = true;
    // Node `ws` only (pings and pongs): how far the server has read, and its signs of life.
    /** @private */ this._pingable = false;
    /** @private @type {Array<{seq: number, mark: number, then: (() => void) | null}>} pings
     * not yet answered: `mark` is the audio ms sent before each */
    this._pings = [];
    /** @private */ this._pingSeq = 0;
    /** @private Audio ms sent when the last ping went out. */ this._pingedMs = 0;
    /** @private Audio ms the server has surely read (its last pong's mark). */ this._ackedMs = 0;
    /** @private When the server last showed it is alive. */ this._lastAlive = 0;
    /** @private `bufferedAmount` when last looked at. */ this._queued = 0;
    /** @private the keepalive timer, while it runs @type {any} */ this._keepalive = null;
  }

  /** Sample rate the audio must be sent at (from the session). */
  get sampleRate() {
    return (this.effective && this.effective.sample_rate) || this._opts.session.sample_rate || 16000;
  }

  /** Wire format of the audio sent (from the session): `pcm16`, `mulaw` or `alaw`. */
  get inputAudioFormat() {
    return (this.effective && this.effective.input_audio_format) || this._opts.session.input_audio_format || "pcm16";
  }

  /** Whether the socket is open and the session takes audio: `false` once `close()` was
   * called or the server said the session is ending (`session_closing`). */
  get isOpen() {
    return this._ws !== null && this._ws.readyState === OPEN && this._closed === null && !this._ending;
  }

  /**
   * Bytes sent but still queued on the socket (the WebSocket's `bufferedAmount`; 0 before
   * `connect()`). Audio sent faster than the network or the server takes it piles up here.
   * @returns {number}
   */
  get bufferedAmount() {
    return (this._ws && this._ws.bufferedAmount) || 0;
  }

  /**
   * Resolves once fewer than `maxBytes` are queued on the socket and, in Node (`ws`), the
   * server has read all but the last 5 s of audio sent (at once if so already), or once
   * the connection is not open or the session is ending (`isOpen` false). Await it
   * between chunks to stream a file no faster than the server takes it.
   * @param {number} [maxBytes] default 1 MiB
   * @param {{timeoutMs?: number}} [options] `timeoutMs`: reject with a `TranscribeError`
   *   `timeout` if not drained by then (default: no limit)
   * @returns {Promise<void>}
   */
  drained(maxBytes = 1024 * 1024, options = {}) {
    const deadline = options.timeoutMs === undefined ? Infinity : now() + options.timeoutMs;
    // Neither the browser WebSocket nor `ws` has a drain event: poll.
    return new Promise((resolve, reject) => {
      const check = () => {
        const ahead = this._pings.length > 0 && this._sentMs - this._ackedMs >= AUDIO_AHEAD_MS;
        if (!this.isOpen || (this.bufferedAmount < maxBytes && !ahead)) resolve();
        else if (now() >= deadline) reject(new TranscribeError("timeout", `not drained within ${options.timeoutMs} ms`, true));
        else setTimeout(check, 10);
      };
      check();
    });
  }

  /**
   * Listen to an event: `created`, `updated`, `partial`, `completed`,
   * `speech_started`, `speech_stopped`, `error`, `closed`, `message` (every server message).
   * @param {string} event
   * @param {Function} listener
   * @returns {() => void} unsubscribe
   */
  on(event, listener) {
    let set = this._listeners.get(event);
    if (!set) this._listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /** @private @param {string} event @param {any} value */
  _emit(event, value) {
    for (const fn of this._listeners.get(event) || []) {
      try {
        fn(value);
      } catch (err) {
        // A listener's bug must not break the protocol handling.
        setTimeout(() => { throw err; });
      }
    }
  }

  /**
   * Open the socket, authenticate and configure the session.
   * @returns {Promise<Record<string, any>>} the effective configuration (`session.updated`)
   * @throws {TranscribeError} refused (`unauthorized` on close 4001), the server's error when
   *   the session cannot be served (`invalid_session_config`, `provider_unavailable`,
   *   `provider_error`: its message and `retryable`; the socket is closed), timeout
   */
  connect() {
    if (this._ws) return Promise.reject(new TranscribeError("client_error", "connect() was already called"));
    const opts = this._opts;
    const credential = opts.token || opts.apiKey || "";
    const takesHeaders = this._impl !== globalThis.WebSocket;
    const auth = opts.auth || (takesHeaders ? "header" : "message");
    const ws = auth === "header" && credential
      ? new this._impl(opts.url, { headers: { Authorization: `Bearer ${credential}` } })
      : new this._impl(opts.url);
    this._ws = ws;
    if (typeof ws.ping === "function" && typeof ws.on === "function") {
      this._pingable = true; // Node `ws`: pings, and pongs answered in order
      ws.on("pong", (/** @type {any} */ data) => this._pong(data));
      ws.on("ping", () => this._alive(false));
    }
    return new Promise((resolve, reject) => {
      let settled = false;
      let switching = false;
      const timer = setTimeout(() => fail(new TranscribeError("timeout", "no session.updated in time", true)), opts.connectTimeoutMs || 15000);
      /** @param {any} value */
      const done = (value) => { if (!settled) { settled = true; clearTimeout(timer); resolve(value); } };
      /** @param {TranscribeError} err */
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        reject(err);
        // An explicit code: without one the close event reports 1005 (no status).
        if (ws.readyState <= OPEN) ws.close(1000);
      };
      ws.onopen = () => {
        if (auth === "message") ws.send(JSON.stringify({ type: "auth", token: credential }));
        this._startKeepalive();
      };
      ws.onmessage = (/** @type {any} */ ev) => {
        this._alive(true);
        const raw = typeof ev.data === "string" ? ev.data : String(ev.data);
        let msg;
        try {
          msg = JSON.parse(raw);
        } catch {
          return;
        }
        this._handle(msg);
        if (settled) return;
        if (msg.type === "session.created") ws.send(JSON.stringify({ type: "session.update", session: opts.session }));
        else if (msg.type === "session.updated") done(msg.session);
        else if (msg.type === "error" && msg.error && REFUSES_SESSION.has(msg.error.code)) {
          // The server keeps the socket open after these, waiting for another
          // session.update: connect() gives up at once and closes it.
          if (msg.error.code === "provider_error" && opts.session.fallback && !switching) {
            // The primary refused at configuration time: the server switches to the
            // fallback (session.updated follows), or reports that it failed too.
            switching = true;
            return;
          }
          fail(errorFrom(msg.error));
        }
      };
      ws.onerror = () => {}; // the close event that follows carries the code
      ws.onclose = (/** @type {any} */ ev) => this._finish(ev.code, ev.reason || "");
      this._closeWaiters.push((info) => {
        if (settled) return;
        const code = info.code === 4001 ? "unauthorized" : info.code === 4029 ? "over_limit" : "closed";
        fail(new TranscribeError(code, `connection closed (${info.code}${info.reason ? " " + info.reason : ""})`));
      });
    });
  }

  /** @private The end of the connection, reported once: its close event, or the client's
   * own drop (which does not wait for a close handshake the server may never answer).
   * @param {number} code @param {string} reason */
  _finish(code, reason) {
    if (this._closed) return;
    clearTimeout(this._closeTimer);
    clearInterval(this._keepalive);
    const last = this._sessionClosed;
    /** @type {ClosedInfo} */
    const info = {
      code,
      reason,
      finalized: last !== null,
      session_reason: last && typeof last.reason === "string" ? last.reason : null,
      audio_seconds: this._audioSeconds,
    };
    this._closed = info;
    this._emit("closed", info);
    for (const waiter of this._closeWaiters.splice(0)) waiter(info);
  }

  /** @private Close the socket now and report `code`: Node `ws` drops it at once rather
   * than wait up to 30 s for the server's half of the close handshake.
   * @param {number} code @param {string} reason */
  _abort(code, reason) {
    const ws = this._ws;
    if (ws.readyState <= OPEN) ws.close(code, reason); // the close frame, where it still gets out
    if (typeof ws.terminate === "function") ws.terminate();
    this._finish(code, reason);
  }

  /** @private The server showed it is alive: a message (`message` true), a ping or pong,
   * or the socket taking more of the queued audio. @param {boolean} message */
  _alive(message) {
    this._lastAlive = now();
    // close()'s timeout counts the server's inactivity: until the server has read
    // session.close (it may be working through audio queued before it), any sign of
    // life; then only its messages (a server that answers pings but never finishes).
    if (this._closeTimer !== null && (message || !this._closeRead)) this._armCloseTimer();
  }

  /** @private (Re)start close()'s timer. */
  _armCloseTimer() {
    if (this._closed) return;
    clearTimeout(this._closeTimer);
    this._closeTimer = setTimeout(() => this._abort(1000, ""), this._closeTimeoutMs);
  }

  /** @private Whether the socket took some of the queued bytes since last looked at: the
   * server read some (a server that stops reading holds the rest in the buffers). */
  _noteQueue() {
    const queued = this.bufferedAmount;
    if (queued < this._queued) this._alive(false);
    this._queued = queued;
  }

  /** @private Node `ws`: ping; `then` runs at its pong, once the server has read all that
   * was sent before it. @param {(() => void) | null} [then] */
  _ping(then = null) {
    if (!this._pingable || this._ws.readyState !== OPEN) return;
    const seq = ++this._pingSeq;
    this._pings.push({ seq, mark: this._sentMs, then });
    this._pingedMs = this._sentMs;
    this._ws.ping(String(seq));
  }

  /** @private Pongs come in order; each carries its ping's number. @param {any} data */
  _pong(data) {
    this._alive(false);
    const seq = Number(String(data));
    while (this._pings.length > 0 && this._pings[0].seq <= seq) {
      const ping = /** @type {{seq: number, mark: number, then: (() => void) | null}} */ (this._pings.shift());
      this._ackedMs = ping.mark;
      if (ping.then) ping.then();
    }
  }

  /** @private Node `ws`: a ping every `pingIntervalMs`, and the drop of a server that
   * showed no sign of life for `pingIntervalMs + pingTimeoutMs` (as the Python SDK). */
  _startKeepalive() {
    const interval = this._opts.pingIntervalMs ?? 20000;
    if (!this._pingable || !(interval > 0)) return;
    const deadAfter = interval + (this._opts.pingTimeoutMs ?? 20000);
    this._lastAlive = now();
    let pinged = now();
    this._keepalive = setInterval(() => {
      this._noteQueue();
      if (now() - this._lastAlive >= deadAfter) {
        this._abort(1011, `keepalive timeout: no sign of life from the server for ${deadAfter / 1000} s`);
      } else if (now() - pinged >= interval) {
        pinged = now();
        this._ping();
      }
    }, Math.min(1000, interval / 4));
  }

  /** @private @param {any} msg */
  _handle(msg) {
    this._emit("message", msg);
    switch (msg.type) {
      case "session.created":
        this.sessionId = msg.session && msg.session.id;
        this._emit("created", msg.session);
        break;
      case "session.updated":
        this.effective = msg.session;
        this._emit("updated", msg.session);
        break;
      case "transcription.partial":
        this._emit("partial", msg);
        break;
      case "transcription.completed":
        this._emit("completed", { ...msg, latency_ms: this._latency(msg.end_ms) });
        break;
      case "speech.started":
        this._emit("speech_started", msg);
        break;
      case "speech.stopped":
        this._emit("speech_stopped", msg);
        break;
      case "error":
        // The server is ending the session and refuses more audio: stop sending it.
        if (msg.error && msg.error.code === "session_closing") this._ending = true;
        this._emit("error", errorFrom(msg.error || {}));
        break;
      case "session.closed":
        this._sessionClosed = msg;
        this._audioSeconds = msg.usage && typeof msg.usage.audio_seconds === "number"
          ? msg.usage.audio_seconds
          : null;
        break;
    }
  }

  /** @private @param {number} endMs @returns {number | null} */
  _latency(endMs) {
    if (typeof endMs !== "number") return null;
    // Its chunk was dropped: a later one's send time would make the latency too low.
    if (endMs <= this._droppedMs) return null;
    // The first chunk whose audio reaches end_ms: when the end of the speech left here.
    const sent = this._sent;
    for (let i = 0; i < sent.length; i++) {
      if (sent[i][0] >= endMs) {
        const latency = Math.max(0, Math.round(now() - sent[i][1]));
        this._drop(i); // older entries are never needed again
        return latency;
      }
    }
    return null;
  }

  /** @private Drop the `count` oldest send-history entries. @param {number} count */
  _drop(count) {
    if (count <= 0) return;
    this._droppedMs = this._sent[count - 1][0];
    this._sent.splice(0, count);
  }

  /**
   * Send one chunk of audio at the session's sample rate (20 ms recommended), in the
   * session's `input_audio_format`: pcm16, or the encoded bytes of a `mulaw`/`alaw` session.
   * Once the session is ending (`close()` was called, or the server's `session_closing`
   * error arrived) the chunk is dropped: the server would refuse it.
   * @param {Int16Array | ArrayBuffer | Uint8Array} chunk
   * @throws {TranscribeError} `client_error` when the connection is not open (not ending)
   */
  sendPcm16(chunk) {
    if (this._ending && !this._closed) return; // closed: it throws, as docs/browser.md says
    if (!this.isOpen) throw new TranscribeError("client_error", "the connection is not open");
    const bytes = chunk instanceof ArrayBuffer
      ? new Uint8Array(chunk)
      : new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    const width = BYTES_PER_SAMPLE[/** @type {keyof typeof BYTES_PER_SAMPLE} */ (this.inputAudioFormat)] || 2;
    this._sentMs += ((bytes.byteLength / width) * 1000) / this.sampleRate;
    this._sent.push([this._sentMs, now()]);
    if (this._sent.length > 3000) this._drop(this._sent.length - 3000); // bounded
    this._noteQueue();
    this._ws.send(JSON.stringify({ type: "audio.append", audio: toBase64(bytes) }));
    this._queued = this.bufferedAmount;
    if (this._sentMs - this._pingedMs >= PING_EVERY_AUDIO_MS) this._ping();
  }

  /**
   * Send Float32 samples in [-1, 1] at the session's sample rate (converted to pcm16).
   * @param {Float32Array} samples
   */
  sendFloat32(samples) {
    this.sendPcm16(floatToPcm16(samples));
  }

  /**
   * Reconfigure the session.
   * @param {SessionConfig} session
   */
  update(session) {
    if (!this.isOpen) throw new TranscribeError("client_error", "the connection is not open");
    this._opts = { ...this._opts, session };
    this._ws.send(JSON.stringify({ type: "session.update", session }));
  }

  /**
   * End gracefully: the server finalizes the pending audio (last `completed`
   * events), sends `session.closed` and closes with 1000. From the call on no more
   * audio is sent (`isOpen` is false, `sendPcm16` drops chunks). Calling it again
   * while it is under way returns the same promise (the first call's timeout holds).
   * `timeoutMs` (default 20000) is an inactivity timeout: after that long without a
   * message from the server (in Node `ws`, while the server is still reading audio sent
   * before `session.close`: without any sign of life) the client drops the socket, closing
   * with 1000 itself, and resolves at once: the `ClosedInfo` then has `finalized: false`
   * (the server may not have finished the audio).
   * @param {{timeoutMs?: number}} [options]
   * @returns {Promise<ClosedInfo>}
   */
  close(options = {}) {
    if (this._closed) return Promise.resolve(this._closed);
    const ws = this._ws;
    if (!ws) {
      return Promise.resolve({
        code: 1000, reason: "never connected", finalized: false, session_reason: null, audio_seconds: null,
      });
    }
    if (this._closing) return this._closing;
    this._ending = true; // audio sent from now on would be refused (session_closing)
    this._closeTimeoutMs = options.timeoutMs || 20000;
    return (this._closing = new Promise((resolve) => {
      this._closeWaiters.push(resolve);
      this._armCloseTimer();
      if (ws.readyState !== OPEN) {
        ws.close(1000);
      } else {
        ws.send(JSON.stringify({ type: "session.close" }));
        if (this._pingable) {
          // The server may still be reading audio queued before session.close: until it
          // has read it (this ping's pong), any sign of life restarts the timer.
          this._closeRead = false;
          this._ping(() => { this._closeRead = true; this._armCloseTimer(); });
        }
      }
    }));
  }
}

function now() {
  return typeof performance !== "undefined" ? performance.now() : Date.now();
}
