// State of the open conversation, without any DOM.
//
// A `Chat` is the conversation on screen (replaced when another one is opened). Stored messages
// are keyed by id and ordered by seq; the user's own messages show at once with a local id and
// are re-keyed when the server's `ack` arrives. A streamed reply grows from `delta` events,
// applied by exact character offset (code points, as the server counts them): a repeat is
// dropped, a gap is reported so that the caller resubscribes, which replays everything after the
// last settled seq. Whatever changes is added to `dirty` and reported through `onDirty`, for the
// view to render.

let localCounter = 0;
let noticeCounter = 0;

// ---- text helpers ---------------------------------------------------------------------------

/** Length in code points: the server's offsets count Python characters, not UTF-16 units. */
export function cpLength(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) i++;
    n++;
  }
  return n;
}

/** `s` without its first `count` code points. */
export function cpSlice(s, count) {
  let i = 0;
  for (let n = 0; n < count && i < s.length; n++) {
    const c = s.charCodeAt(i);
    i += c >= 0xd800 && c <= 0xdbff && i + 1 < s.length ? 2 : 1;
  }
  return s.slice(i);
}

export function uuid() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

export function titleFrom(text) {
  const line = text.split(/\s+/).join(" ").trim();
  return line.length <= 60 ? line : `${line.slice(0, 59).trimEnd()}…`;
}

/** Where a message goes in the list: by seq; messages without one (not yet acked) last. */
export function sortKey(msg) {
  return typeof msg.seq === "number" ? msg.seq : 1e12 + (msg.order || 0);
}

function kindOf(role) {
  if (role === "user") return "user";
  if (role === "tool") return "tool";
  return "assistant";
}

function fromView(view) {
  const content = view.content || "";
  return {
    id: view.id,
    seq: view.seq,
    role: view.role,
    kind: kindOf(view.role),
    content,
    length: cpLength(content),
    status: view.status,
    tool_calls: view.tool_calls || null,
    tool_call_id: view.tool_call_id || null,
    error_code: view.error_code || null,
    parent_id: view.parent_id || null,
    sibling_ids: view.sibling_ids || null, // from history and catch-up only
    attachments: view.attachments || null,
    liveTools: new Map(),
  };
}

// ---- the open conversation ------------------------------------------------------------------

export class Chat {
  constructor(id) {
    this.id = id;
    this.info = null; // the conversation as its last `conversation` event described it
    this.messages = new Map(); // id -> message state
    this.toolMsgs = new Map(); // tool_call_id -> stored tool message
    this.callOwner = new Map(); // tool_call_id -> assistant message id
    this.dirty = new Set(); // messages changed since the last render
    this.onDirty = null; // called when a message joins `dirty`
    this.hasMore = false;
    this.loaded = false;
    this.loading = false;
    this.missing = false;
    this.typing = false;
    this.stopping = false;
    this.resyncing = false;
    this.aroundSeq = null; // a search hit to open the conversation at (session.js)
    // A search hit on an inactive branch: the id of the hit message, whose branch is shown
    // read-only until the user switches to it or goes back (session.js); else null.
    this.readOnlyAt = null;
    this.switching = false; // "Switch to this branch" was sent
  }

  markDirty(msg) {
    this.dirty.add(msg);
    if (this.onDirty) this.onDirty(this);
  }

  /** Merge a stored message (from history, catch-up or a live `message` event); returns it. */
  upsert(view) {
    if (!view || view.role === "system" || typeof view.id !== "string") return null;
    let msg = this.messages.get(view.id);
    if (!msg) {
      msg = fromView(view);
      this.messages.set(msg.id, msg);
    } else {
      if (msg.status !== "streaming" && view.status === "streaming") return null; // never go back
      const content = view.content || "";
      const length = cpLength(content);
      // A catch-up resends a streaming row with empty content, then the text so far as a delta.
      const keepText = view.status === "streaming" && msg.length > length;
      Object.assign(msg, {
        seq: view.seq,
        status: view.status,
        tool_calls: view.tool_calls || null,
        tool_call_id: view.tool_call_id || null,
        error_code: view.error_code || null,
        parent_id: view.parent_id || null,
        sibling_ids: view.sibling_ids || msg.sibling_ids, // live events do not carry them
      });
      if (!keepText) {
        msg.content = content;
        msg.length = length;
      }
    }
    if (msg.role === "tool" && msg.tool_call_id) {
      this.toolMsgs.set(msg.tool_call_id, msg);
      const owner = this.messages.get(this.callOwner.get(msg.tool_call_id));
      if (owner) this.markDirty(owner);
    }
    if (msg.role === "assistant" && msg.tool_calls) {
      for (const call of msg.tool_calls) {
        if (!call || typeof call.id !== "string") continue;
        this.callOwner.set(call.id, msg.id);
        const toolMsg = this.toolMsgs.get(call.id);
        if (toolMsg) this.markDirty(toolMsg); // an orphan shown alone until now folds under its reply
      }
    }
    this.markDirty(msg);
    return msg;
  }

  /** A live message of another branch (its parent is not on the path shown): not drawn. */
  offPath(view) {
    return (
      Boolean(view) &&
      typeof view.parent_id === "string" &&
      !this.messages.has(view.parent_id) &&
      !this.messages.has(view.id)
    );
  }

  /**
   * Extend the streaming reply with a `delta` by its offset. Returns "gap" when the page must
   * catch up (a reply never seen start, or text missing before this delta), else "ok".
   */
  applyDelta(frame) {
    const msg = this.messages.get(frame.message_id);
    if (!msg) return "gap"; // a reply we never saw start
    if (msg.status !== "streaming" || typeof frame.text !== "string") return "ok";
    const offset = Number(frame.offset);
    const have = msg.length;
    if (offset > have) return "gap"; // the catch-up sends the whole text so far at offset 0
    const size = cpLength(frame.text);
    if (offset + size <= have) return "ok"; // a repeat
    msg.content += cpSlice(frame.text, have - offset);
    msg.length += size - (have - offset);
    this.markDirty(msg);
    return "ok";
  }

  /** A live `tool_call` or `tool_result`, shown under the reply that made it. */
  applyTool(frame) {
    const owner = this.messages.get(frame.message_id);
    if (!owner || typeof frame.call_id !== "string") return;
    this.callOwner.set(frame.call_id, owner.id);
    const live = owner.liveTools.get(frame.call_id) || { state: "running" };
    if (frame.type === "tool_call") {
      Object.assign(live, { name: frame.name, arguments: frame.arguments, server: frame.server || null });
    } else {
      Object.assign(live, { state: frame.ok ? "ok" : "error", result: frame.result, error: frame.error });
      if (frame.server) live.server = frame.server;
    }
    owner.liveTools.set(frame.call_id, live);
    this.markDirty(owner);
  }

  setTyping(active) {
    this.typing = active;
    if (!active) this.stopping = false;
    for (const m of this.messages.values()) if (m.liveTools.size) this.markDirty(m);
  }

  /** Attach an `error` event's text to the failed reply it explains; false if there is none. */
  attachError(code, text) {
    const last = this.lastAssistant();
    if (!last || last.status !== "error" || last.error_code !== code || last.errorText) return false;
    last.errorText = text;
    this.markDirty(last);
    return true;
  }

  /** An error shown inline in the conversation, after the newest message. */
  addNotice(code, text) {
    const msg = {
      id: `notice:${++noticeCounter}`,
      kind: "notice",
      role: "notice",
      seq: this.maxSeq() + 0.5,
      content: text,
      code,
      ephemeral: true,
      liveTools: new Map(),
    };
    this.messages.set(msg.id, msg);
    this.markDirty(msg);
    return msg;
  }

  /** The user's message, shown before the server has it. */
  addLocal(text, clientMsgId, attachments = null) {
    const msg = {
      attachments,
      id: `local:${clientMsgId}`,
      kind: "user",
      role: "user",
      content: text,
      length: cpLength(text),
      status: "complete",
      local: true,
      order: ++localCounter,
      liveTools: new Map(),
    };
    this.messages.set(msg.id, msg);
    return msg;
  }

  /**
   * A local message was acknowledged: it takes the stored id and seq. Returns false when the
   * stored message arrived first, in which case the local one is dropped.
   */
  acknowledge(msg, ack) {
    this.messages.delete(msg.id);
    if (this.messages.has(ack.message_id)) return false;
    Object.assign(msg, { id: ack.message_id, seq: ack.seq, local: false, retrying: false });
    this.messages.set(msg.id, msg);
    this.markDirty(msg);
    return true;
  }

  /** Whether `msg` is shown on its own (not dropped, not folded under the reply that called it). */
  shows(msg) {
    if (this.messages.get(msg.id) !== msg) return false;
    return !(msg.kind === "tool" && this.messages.has(this.callOwner.get(msg.tool_call_id) || ""));
  }

  settledSeq() {
    // The last seq before which nothing is still streaming: a catch-up from here resends every
    // message we might not have in its final form.
    let max = 0;
    let streaming = Infinity;
    for (const m of this.messages.values()) {
      if (m.local || m.ephemeral || typeof m.seq !== "number") continue;
      if (m.seq > max) max = m.seq;
      if (m.status === "streaming" && m.seq < streaming) streaming = m.seq;
    }
    return Math.max(0, Math.min(max, streaming - 1));
  }

  oldestSeq() {
    let min = null;
    for (const m of this.messages.values()) {
      if (m.local || m.ephemeral || typeof m.seq !== "number") continue;
      if (min === null || m.seq < min) min = m.seq;
    }
    return min;
  }

  maxSeq() {
    let max = 0;
    for (const m of this.messages.values()) if (typeof m.seq === "number" && m.seq > max) max = m.seq;
    return max;
  }

  streamingMessage() {
    let found = null;
    for (const m of this.messages.values()) {
      if (m.status === "streaming" && (!found || m.seq > found.seq)) found = m;
    }
    return found;
  }

  lastAssistant() {
    let found = null;
    for (const m of this.messages.values()) {
      if (m.role === "assistant" && (!found || m.seq > found.seq)) found = m;
    }
    return found;
  }

  replying() {
    return this.typing || this.streamingMessage() !== null;
  }

  /** A title from the first message, when the whole conversation is loaded. */
  firstUserTitle() {
    let first = null;
    for (const m of this.messages.values()) {
      if (m.role === "user" && (!first || sortKey(m) < sortKey(first))) first = m;
    }
    return first && !this.hasMore ? titleFrom(first.content) : null;
  }

  /** The tool calls to show under `msg`: [{id, name, arguments, state, result, error, server}]. */
  toolsOf(msg) {
    if (msg.kind === "tool") return [this.toolEntry(msg.tool_call_id, "tool", undefined, null)];
    if (msg.kind !== "assistant") return [];
    const tools = [];
    const seen = new Set();
    for (const call of msg.tool_calls || []) {
      if (!call || typeof call.id !== "string") continue;
      const fn = call.function || {};
      tools.push(this.toolEntry(call.id, fn.name || call.name, fn.arguments ?? call.arguments, msg));
      seen.add(call.id);
    }
    for (const [id, live] of msg.liveTools) {
      if (!seen.has(id)) tools.push(this.toolEntry(id, live.name, live.arguments, msg));
    }
    return tools;
  }

  toolEntry(id, name, args, owner) {
    const live = owner ? owner.liveTools.get(id) : undefined;
    const stored = this.toolMsgs.get(id);
    const entry = { id, name: name || (live && live.name) || "tool", arguments: args ?? live?.arguments };
    if (live && live.server) entry.server = live.server; // the MCP server, from the live events
    if (stored) {
      entry.state = stored.status === "error" ? "error" : "ok";
      if (entry.state === "error") entry.error = stored.content;
      else entry.result = stored.content;
    } else if (live && live.state && live.state !== "running") {
      Object.assign(entry, { state: live.state, result: live.result, error: live.error });
    } else if (this.typing || (owner && owner.status === "streaming")) {
      entry.state = "running";
    } else {
      entry.state = "error";
      entry.error = "No result was stored for this call.";
    }
    return entry;
  }
}

// ---- pending sends --------------------------------------------------------------------------

/** Sent but not yet acknowledged messages, by client_msg_id: resent after a reconnect. */
export class Outbox {
  constructor() {
    this.entries = new Map();
    this.creating = null; // the entry whose send creates a new conversation
  }

  /** Queue `text` for `chat` (shown at once as a local message); returns the entry. */
  add(chat, text, attachments = []) {
    const clientMsgId = uuid();
    const msg = chat.addLocal(text, clientMsgId, attachments.length ? attachments : null);
    const frame = { type: "send", content: text, client_msg_id: clientMsgId };
    if (attachments.length) frame.attachments = attachments.map((a) => a.id);
    if (chat.id) frame.conversation_id = chat.id;
    const entry = { frame, msg, chat };
    this.entries.set(clientMsgId, entry);
    if (!chat.id) this.creating = entry;
    return entry;
  }

  /** The entry got its answer (ack or refusal): it is no longer pending. */
  settle(entry) {
    this.entries.delete(entry.frame.client_msg_id);
    if (this.creating === entry) this.creating = null;
  }

  values() {
    return this.entries.values();
  }
}
