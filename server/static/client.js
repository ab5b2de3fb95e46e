/**
 * OrchestratorStream: the browser client of the progress stream (see PROTOCOL.md).
 *
 * A dependency-free ES module, no build step:
 *
 *   import { OrchestratorStream } from "/static/client.js";
 *   const stream = new OrchestratorStream(sessionId, {
 *     onEvent: {
 *       progress: (e) => bar.value = e.progress,
 *       complete: (e) => { if (e.final) show(e.data.result); },
 *       error: (e) => banner.textContent = e.error,
 *     },
 *     onStateChange: ({ state, transport, reconnects }) => render(state),
 *   });
 *   await stream.opened;   // optional: start the workflow once the stream listens
 *
 * What it does:
 * - connects by WebSocket (`/ws/orchestrator/<id>`); falls back to Server-Sent
 *   Events (`/sse/orchestrator/<id>`) for good when the WebSocket cannot connect (its
 *   handshake fails, or it closes before a single frame came through), when the
 *   browser has no WebSocket, or when `transport: "sse"` is given;
 * - reconnects with exponential back-off and full jitter, resuming after the last
 *   stored event it received (`?last_event_id=`), and drops events it has already
 *   seen (by `seq`), so every stored event reaches the handlers exactly once;
 * - stops for good on the final event (`final: true`), on close 1000 (the stream
 *   ended) and on 1008 (refused), and over SSE on a 4xx refusal or a 204 (ended), or
 *   when `close()` is called, or after `maxReconnects` failed reconnects in a row; reconnects on 1001, 1011, 1013, abnormal closes, SSE
 *   responses that end early, 5xx and network errors;
 * - on a `replay_gap` notice (the resume point could not be served) it forgets the
 *   seqs it has seen, so the retained events the server replays next are delivered
 *   again, and calls `onReplayGap` so the app can reset what it derived from them.
 *
 * Handlers: `onEvent` is either one function (every event) or an object with one
 * function per event type (`agent_status`, `progress`, `complete`, `error`,
 * `heartbeat`, and `"*"` for every event). Control errors other than `replay_gap`
 * (`slow_consumer`, `invalid_session_id`, ...) reach the `error` handler too; they
 * have no `id`. Unknown fields are passed through untouched, and so are unknown event
 * types over WebSocket; over SSE only the five types above arrive (an EventSource hears
 * only the `event:` names it listens for).
 */

export const STATES = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

export const EVENT_TYPES = Object.freeze([
  "agent_status",
  "progress",
  "complete",
  "error",
  "heartbeat",
]);

const SESSION_ID = /^[A-Za-z0-9_-]{8,128}$/;
const REPLAY_GAP = "replay_gap";

// WebSocket close codes (PROTOCOL.md "WebSocket").
const CLOSE_NORMAL = 1000; // after the final event: do not reconnect
const CLOSE_POLICY = 1008; // refused (bad session id, origin, token): do not reconnect

const DEFAULTS = Object.freeze({
  baseUrl: undefined, // defaults to the page's origin
  transport: "auto", // "auto" | "websocket" | "sse"
  backoff: { initialMs: 500, maxMs: 15000 },
  maxReconnects: Infinity,
  connectTimeoutMs: 10000, // a WebSocket handshake or an SSE response that hangs longer fails
  idleTimeoutMs: 75000, // no frame at all for this long: the connection is dead (0: never)
  token: undefined, // stream token (`?token=`) when the server requires one
});

/**
 * Full-jitter exponential back-off: a uniform delay in [0, min(max, initial * 2^attempt)].
 * Exported for tests.
 */
export function backoffDelay(attempt, { initialMs, maxMs }, random = Math.random) {
  const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

const MAX_RETRY_AFTER_MS = 300000; // a Retry-After beyond 5 minutes is read as 5 minutes

/** A `Retry-After` header (seconds, or an HTTP date) in ms; 0 when absent or unreadable. */
function retryAfterMs(value, now = Date.now()) {
  if (!value) return 0;
  const text = value.trim();
  const ms = /^\d+$/.test(text) ? Number(text) * 1000 : Date.parse(text) - now;
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), MAX_RETRY_AFTER_MS) : 0;
}

export class OrchestratorStream {
  /**
   * @param {string} sessionId  8 to 128 letters, digits, "-" or "_"
   * @param {object} [options]
   * @param {string} [options.baseUrl]  http(s) origin of the server; the page's by default
   * @param {"auto"|"websocket"|"sse"} [options.transport]
   * @param {object|function} [options.onEvent]  handler per event type, or one for all
   * @param {function} [options.onStateChange]  called with `stream.info` on every change
   * @param {function} [options.onReplayGap]  called with the replay_gap notice
   * @param {{initialMs: number, maxMs: number}} [options.backoff]
   * @param {number} [options.maxReconnects]  failed reconnects in a row before the stream
   *   stops with closeReason "gave_up" (default Infinity: never). The count restarts
   *   whenever a connection delivers a stored event or a heartbeat, so separate outages
   *   that each heal do not add up; `reconnects` still counts every reconnect.
   * @param {number} [options.connectTimeoutMs]  a WebSocket handshake or SSE request
   *   unanswered this long fails and is retried (default 10000)
   * @param {number} [options.idleTimeoutMs]  an open connection that brings nothing at
   *   all (no event, no heartbeat) for this long is taken for dead and reconnected
   *   (default 75000; 0: never). Keep it well above the server's --heartbeat-interval
   *   (30 s by default), say 2.5 times it: with a longer interval, raise it, or healthy
   *   idle streams are dropped and reconnected every idleTimeoutMs.
   * @param {boolean} [options.autoStart]  connect at once (default true); else call start()
   * @param {string} [options.token]  the stream token from run-workflow, when the server
   *   requires one (sent as `?token=`)
   */
  constructor(sessionId, options = {}) {
    if (!SESSION_ID.test(String(sessionId))) {
      throw new TypeError("session ids are 8 to 128 characters of letters, digits, '-' and '_'");
    }
    this.sessionId = sessionId;
    this.options = {
      ...DEFAULTS,
      ...options,
      backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) },
    };
    if (!["auto", "websocket", "sse"].includes(this.options.transport)) {
      throw new TypeError(`unknown transport ${this.options.transport}`);
    }
    const base = new URL(this.options.baseUrl || globalThis.location.href);
    this._httpBase = base.origin;
    this._wsBase = (base.protocol === "https:" ? "wss://" : "ws://") + base.host;

    this.state = STATES.CONNECTING;
    this.transport = null; // "websocket" | "sse" while connected or trying
    this.reconnects = 0; // connection attempts after the first
    this.lastEventId = null; // id of the last stored event received
    this.lastSeq = 0;
    this.closeReason = null; // "final" | "ended" | "refused" | "client" | "gave_up" | "unsupported"
    this.finalEvent = null;

    this._seen = new Set();
    this._attempt = 0; // reconnects since the connection last worked: back-off, maxReconnects
    this._wsWorked = false; // a WebSocket of this stream has delivered a frame
    this._useSse =
      this.options.transport === "sse" ||
      (this.options.transport === "auto" && typeof globalThis.WebSocket !== "function");
    this._socket = null;
    this._source = null;
    this._retryTimer = null;
    this._connectTimer = null;
    this._idleTimer = null;
    this._started = false;

    this.opened = new Promise((resolve, reject) => {
      this._resolveOpened = resolve;
      this._rejectOpened = reject;
    });
    this.opened.catch(() => {}); // nobody has to wait for it
    this.done = new Promise((resolve) => {
      this._resolveDone = resolve;
    });

    this._onOnline = () => {
      if (this.state === STATES.RECONNECTING && this._retryTimer !== null) {
        clearTimeout(this._retryTimer);
        this._retryTimer = null;
        this._connect();
      }
    };
    if (this.options.autoStart !== false) this.start();
  }

  /** A snapshot of the connection: what `onStateChange` receives. */
  get info() {
    return {
      state: this.state,
      transport: this.transport,
      reconnects: this.reconnects,
      lastEventId: this.lastEventId,
      lastSeq: this.lastSeq,
      closeReason: this.closeReason,
    };
  }

  start() {
    // Closed before it started (`autoStart: false`): nothing to start, nor to listen for.
    if (this._started || this.state === STATES.CLOSED) return this;
    this._started = true;
    globalThis.addEventListener?.("online", this._onOnline);
    this._connect();
    return this;
  }

  /** Stop for good. Called once the final event came (from its handler, say), the
   * stream still ended with it: `closeReason` stays "final". */
  close() {
    this._finish(this.finalEvent ? "final" : "client");
  }

  /** Ask the server for a heartbeat at once (WebSocket only); false when not possible. */
  ping() {
    const ws = this._socket;
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "ping" }));
      return true;
    }
    return false;
  }

  // --- connecting --------------------------------------------------------------------

  _streamUrl(kind) {
    const path = `/${kind}/orchestrator/${encodeURIComponent(this.sessionId)}`;
    const query = new URLSearchParams();
    if (this.lastEventId) query.set("last_event_id", this.lastEventId);
    if (this.options.token) query.set("token", this.options.token);
    const search = query.toString();
    return (kind === "ws" ? this._wsBase : this._httpBase) + path + (search ? `?${search}` : "");
  }

  _connect() {
    if (this.state === STATES.CLOSED) return;
    this._retryTimer = null;
    if (this._useSse) this._connectSse();
    else this._connectWebSocket();
  }

  _connectWebSocket() {
    this.transport = "websocket";
    this._emitState();
    let opened = false;
    let ws;
    try {
      ws = new WebSocket(this._streamUrl("ws"));
    } catch (_error) {
      this._transportFailed();
      return;
    }
    this._socket = ws;
    this._connectTimer = setTimeout(() => {
      // A handshake that hangs (a proxy that swallows upgrades): give up on it.
      if (this._socket === ws && !opened) {
        this._dropSocket();
        this._transportFailed();
      }
    }, this.options.connectTimeoutMs);

    ws.onopen = () => {
      if (this._socket !== ws) return;
      opened = true;
      clearTimeout(this._connectTimer);
      this._setOpen();
    };
    ws.onmessage = (message) => {
      if (this._socket !== ws) return;
      if (typeof message.data !== "string") return;
      this._wsWorked = true;
      this._receive(message.data);
    };
    ws.onerror = () => {}; // always followed by close, which decides
    ws.onclose = (close) => {
      if (this._socket !== ws) return;
      this._socket = null;
      clearTimeout(this._connectTimer);
      this._clearIdle();
      if (this.state === STATES.CLOSED) return;
      if (close.code === CLOSE_NORMAL) return this._finish("ended");
      if (close.code === CLOSE_POLICY) return this._finish("refused");
      // 1001 going away, 1011 internal error, 1013 try later, 1006 abnormal: resume.
      this._transportFailed();
    };
  }

  _connectSse() {
    this.transport = "sse";
    this._emitState();
    if (typeof globalThis.EventSource !== "function") {
      this._finish("unsupported");
      return;
    }
    const url = this._streamUrl("sse");
    const source = new EventSource(url);
    let opened = false;
    this._source = source;
    this._connectTimer = setTimeout(() => {
      // A request that is never answered (a proxy, a network black hole): give up on it.
      if (this._source === source && !opened) {
        this._dropSource();
        this._transportFailed();
      }
    }, this.options.connectTimeoutMs);
    source.onopen = () => {
      if (this._source !== source) return;
      opened = true;
      clearTimeout(this._connectTimer);
      this._setOpen();
    };
    const onMessage = (message) => {
      if (this._source !== source) return;
      this._receive(message.data);
    };
    for (const type of EVENT_TYPES) {
      if (type !== "error") source.addEventListener(type, onMessage);
    }
    source.onmessage = onMessage; // frames without an `event:` line
    // `event: error` frames and connection errors share the "error" name: only the
    // former are MessageEvents carrying data.
    source.addEventListener("error", (event) => {
      if (this._source !== source) return;
      if (typeof event.data === "string") {
        onMessage(event);
        return;
      }
      // The response ended or failed. EventSource would reconnect on its own with its
      // fixed `retry:` delay; this client reconnects itself, with back-off.
      this._dropSource();
      if (this.state === STATES.CLOSED) return;
      if (opened) {
        this._transportFailed();
        return;
      }
      // Refused before it opened: EventSource does not say why. Ask once, so that a
      // refusal (4xx, like WebSocket 1008) or the end (204) stops it, while overload
      // (503) and network trouble are retried.
      this._probeSse(url).then(({ status, retryAfterMs }) => {
        if (this.state === STATES.CLOSED || this._source !== null) return;
        if (status === 204) this._finish("ended");
        else if (status >= 400 && status < 500 && status !== 408 && status !== 429) {
          this._finish("refused");
        } else this._transportFailed(retryAfterMs); // a 503 says when to come back
      });
    });
  }

  /** The HTTP status of an SSE URL (the body is not read), 0 when unreachable, and its
   * `Retry-After` in ms (0 without one). */
  async _probeSse(url) {
    if (typeof fetch !== "function") return { status: 0, retryAfterMs: 0 };
    const controller = new AbortController();
    try {
      const response = await fetch(url, {
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
        signal: controller.signal,
      });
      return {
        status: response.status,
        retryAfterMs: retryAfterMs(response.headers.get("Retry-After")),
      };
    } catch (_error) {
      return { status: 0, retryAfterMs: 0 };
    } finally {
      controller.abort();
    }
  }

  _dropSocket() {
    const ws = this._socket;
    this._socket = null;
    clearTimeout(this._connectTimer);
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(CLOSE_NORMAL);
      } catch (_error) {
        /* already closed */
      }
    }
  }

  _dropSource() {
    const source = this._source;
    this._source = null;
    clearTimeout(this._connectTimer);
    if (source) source.close();
  }

  /** The connection failed or ended without the final event; the next attempt waits at
   * least `minDelayMs` (a 503's Retry-After). */
  _transportFailed(minDelayMs = 0) {
    this._clearIdle();
    if (!this._useSse && !this._wsWorked && this.options.transport === "auto") {
      // The WebSocket never got a frame through (the handshake was refused, or a proxy
      // accepted it and then dropped the connection): use SSE from now on, at once.
      this._useSse = true;
      this._scheduleReconnect(0);
      return;
    }
    this._scheduleReconnect(undefined, minDelayMs);
  }

  _scheduleReconnect(delayMs, minDelayMs = 0) {
    // Failed attempts in a row: a connection that delivered an event or a heartbeat has
    // reset the count, so separate outages that each heal do not add up.
    if (this._attempt >= this.options.maxReconnects) {
      this._finish("gave_up");
      return;
    }
    const delay = Math.max(delayMs ?? backoffDelay(this._attempt, this.options.backoff), minDelayMs);
    this._attempt += 1;
    this.reconnects += 1;
    this.state = STATES.RECONNECTING;
    this._emitState();
    this._retryTimer = setTimeout(() => this._connect(), delay);
  }

  _setOpen() {
    this.state = STATES.OPEN;
    this._armIdle();
    this._resolveOpened(this.info);
    this._emitState();
  }

  _finish(reason) {
    if (this.state === STATES.CLOSED) return;
    this.closeReason = reason;
    this.state = STATES.CLOSED;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._clearIdle();
    globalThis.removeEventListener?.("online", this._onOnline);
    if (this._source) this._dropSource();
    if (this._socket) {
      // After the final event the server closes with 1000 itself; otherwise close now.
      if (reason === "final") this._socket.onclose = null;
      else this._dropSocket();
    }
    this._rejectOpened(new Error(`stream closed: ${reason}`));
    this._emitState();
    this._resolveDone(this.info);
  }

  // --- liveness ------------------------------------------------------------------------

  _armIdle() {
    this._clearIdle();
    const ms = this.options.idleTimeoutMs;
    if (!ms) return;
    this._idleTimer = setTimeout(() => {
      // Nothing at all (not even a heartbeat) for too long: the peer is gone.
      if (this.state !== STATES.OPEN) return;
      if (this._socket) this._dropSocket();
      if (this._source) this._dropSource();
      this._transportFailed();
    }, ms);
  }

  _clearIdle() {
    clearTimeout(this._idleTimer);
    this._idleTimer = null;
  }

  // --- events --------------------------------------------------------------------------

  _receive(text) {
    let event;
    try {
      event = JSON.parse(text);
    } catch (_error) {
      return; // not an event
    }
    if (event === null || typeof event !== "object" || typeof event.type !== "string") return;
    if (this.state === STATES.CLOSED) return;
    this._armIdle();

    const stored = typeof event.id === "string" && Number.isInteger(event.seq);
    if (stored) {
      if (this._seen.has(event.seq)) return; // delivered before this reconnect
      this._seen.add(event.seq);
      this.lastEventId = event.id;
      this.lastSeq = event.seq;
      this._attempt = 0; // the connection works: the next reconnect starts fast
    } else if (event.type === "heartbeat") {
      this._attempt = 0; // so does one that carries the server's heartbeats
    } else if (event.type === "error" && event.code === REPLAY_GAP) {
      // The server could not resume where we asked; it now replays what it retains.
      this._seen.clear();
      this.lastSeq = 0;
      this._call(this.options.onReplayGap, event);
      return;
    }

    // Recorded before the handlers run, which may look at it or call close().
    const final = stored && event.final === true;
    if (final) this.finalEvent = event;
    this._dispatch(event);
    if (final) this._finish("final");
  }

  _dispatch(event) {
    const handlers = this.options.onEvent;
    if (typeof handlers === "function") {
      this._call(handlers, event);
      return;
    }
    if (!handlers) return;
    if (Object.prototype.hasOwnProperty.call(handlers, event.type)) {
      this._call(handlers[event.type], event);
    }
    this._call(handlers["*"], event);
  }

  _emitState() {
    this._call(this.options.onStateChange, this.info);
  }

  _call(handler, arg) {
    if (typeof handler !== "function") return;
    try {
      handler(arg, this);
    } catch (error) {
      // One faulty handler must not break the stream.
      console.error("OrchestratorStream handler failed:", error);
    }
  }
}
