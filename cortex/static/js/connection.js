// The WebSocket to Cortex: reconnects with exponential backoff, matches answers to requests by
// request_id, keeps the link alive with pings, and carries an optional access token.

export const TOKEN_KEY = "cortex.token";
const REQUEST_TIMEOUT_MS = 20000;
const PING_EVERY_MS = 25000;
const PONG_WITHIN_MS = 10000;
const BACKOFF_BASE_MS = 500;
const BACKOFF_MAX_MS = 15000;
const FAILED_UPGRADES_BEFORE_TOKEN_PROMPT = 3;
// A connection counts as healthy (and the backoff starts over) only once it has stayed open
// this long: a server that accepts and then closes at once must not be retried every 0.5 s.
const HEALTHY_AFTER_MS = 10000;

export function readToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || "";
  } catch {
    return "";
  }
}

export function storeToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage may be unavailable (private mode): the token then lasts for this page only */
  }
}

export function socketUrl(token) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const base = `${scheme}//${location.host}/ws`;
  return token ? `${base}?access_token=${encodeURIComponent(token)}` : base;
}

export class RequestError extends Error {
  constructor(code, message) {
    super(message || code);
    this.code = code;
  }
}

/**
 * Events (EventTarget): "state" {state: connecting|open|waiting, delay?}, "open",
 * "close" {code, reason, opened, needsToken}, "refused" {status: 401|403, message, hadToken}
 * after a failed upgrade, "frame" {frame} for every frame not consumed as the answer of a
 * request().
 */
export class Connection extends EventTarget {
  constructor() {
    super();
    this.ws = null;
    this.state = "idle";
    this.attempt = 0;
    this.failedUpgrades = 0;
    this.retryTimer = null;
    this.pingTimer = null;
    this.pongTimer = null;
    this.requests = new Map();
    this.nextId = 1;
    this.retryAt = 0;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  start() {
    window.addEventListener("online", () => this.reconnectNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && this.state === "waiting") this.reconnectNow();
    });
    this.connect();
  }

  connect() {
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    if (this.ws) this.detach(this.ws);
    let ws;
    try {
      ws = new WebSocket(socketUrl(readToken()));
    } catch {
      this.handleClose(null, 1006, "", false);
      return;
    }
    this.ws = ws;
    let opened = false;
    this.setState("connecting");
    ws.onopen = () => {
      opened = true;
      this.failedUpgrades = 0;
      clearTimeout(this.healthyTimer);
      this.healthyTimer = setTimeout(() => {
        if (this.ws === ws) this.attempt = 0;
      }, HEALTHY_AFTER_MS);
      this.setState("open");
      this.startHeartbeat();
      this.dispatchEvent(new CustomEvent("open"));
    };
    ws.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object") this.route(frame);
    };
    ws.onclose = (event) => this.handleClose(ws, event.code, event.reason, opened);
    ws.onerror = () => {}; // a close event always follows
  }

  detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    try {
      ws.close(1000, "client reconnecting");
    } catch {
      /* already closed */
    }
  }

  handleClose(ws, code, reason, opened) {
    if (ws !== null && ws !== this.ws) return;
    clearTimeout(this.healthyTimer); // closed before it proved healthy: the backoff grows
    if (this.ws) this.detach(this.ws);
    this.ws = null;
    this.stopHeartbeat();
    for (const pending of this.requests.values()) {
      clearTimeout(pending.timer);
      pending.reject(new RequestError("disconnected", "the connection was lost"));
    }
    this.requests.clear();
    if (!opened) {
      this.failedUpgrades++;
      this.probe();
    }
    const needsToken =
      code === 1008 || this.failedUpgrades >= FAILED_UPGRADES_BEFORE_TOKEN_PROMPT;
    this.dispatchEvent(new CustomEvent("close", { detail: { code, reason, opened, needsToken } }));
    this.scheduleReconnect();
  }

  /**
   * A browser does not tell why a WebSocket upgrade failed. Ask the same gate over HTTP: a 401
   * means a token is missing or refused, a 403 names what is refused. Emits "refused".
   */
  async probe() {
    const token = readToken();
    let response;
    try {
      response = await fetch("/api/conversations?limit=1", {
        headers: token ? { Authorization: `Bearer ${token}` } : {},
        cache: "no-store",
        credentials: "omit",
      });
    } catch {
      return; // the server is unreachable: keep retrying
    }
    if (response.status !== 401 && response.status !== 403) return;
    let message = "";
    try {
      const body = await response.json();
      message = String(body?.error?.message || "");
    } catch {
      /* not JSON: no details */
    }
    if (this.isOpen) return;
    this.dispatchEvent(
      new CustomEvent("refused", {
        detail: { status: response.status, message, hadToken: Boolean(token) },
      }),
    );
  }

  scheduleReconnect() {
    clearTimeout(this.retryTimer);
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.attempt++;
    this.retryAt = Date.now() + delay;
    this.setState("waiting", delay);
    this.retryTimer = setTimeout(() => this.connect(), delay);
  }

  /** Reconnect at once (a new token, the network is back, the user asked). */
  reconnectNow() {
    if (this.isOpen) return;
    this.attempt = 0;
    this.connect();
  }

  /** Drop the current socket and connect again (e.g. with a new token). */
  restart() {
    this.attempt = 0;
    this.failedUpgrades = 0;
    this.connect();
  }

  setState(state, delay = 0) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, delay } }));
  }

  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** Send a frame and resolve with its direct answer (rejects on an error frame). */
  request(frame, timeoutMs = REQUEST_TIMEOUT_MS) {
    return new Promise((resolve, reject) => {
      if (!this.isOpen) {
        reject(new RequestError("disconnected", "not connected"));
        return;
      }
      const id = frame.request_id || `r${this.nextId++}`;
      const timer = setTimeout(() => {
        this.requests.delete(id);
        reject(new RequestError("timeout", "the server did not answer in time"));
      }, timeoutMs);
      this.requests.set(id, { resolve, reject, timer });
      this.send({ ...frame, request_id: id });
    });
  }

  route(frame) {
    const id = typeof frame.request_id === "string" ? frame.request_id : null;
    const pending = id !== null ? this.requests.get(id) : undefined;
    if (pending) {
      this.requests.delete(id);
      clearTimeout(pending.timer);
      if (frame.type === "error") pending.reject(new RequestError(frame.code, frame.message));
      else pending.resolve(frame);
      return;
    }
    this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.pingTimer = setInterval(() => {
      // Mid-upload the server refuses every text frame but cancel_upload (attachments.js):
      // the bytes flowing show the link is alive.
      if (!this.isOpen || this.uploading) return;
      const ws = this.ws;
      clearTimeout(this.pongTimer);
      this.pongTimer = setTimeout(() => {
        // No pong: the link is dead even if the socket does not know yet.
        if (ws === this.ws) this.handleClose(ws, 1006, "no pong", true);
      }, PONG_WITHIN_MS);
      this.request({ type: "ping" }, PONG_WITHIN_MS)
        .then(() => clearTimeout(this.pongTimer))
        .catch(() => {});
    }, PING_EVERY_MS);
  }

  stopHeartbeat() {
    clearInterval(this.pingTimer);
    clearTimeout(this.pongTimer);
    this.pingTimer = this.pongTimer = null;
  }
}
