// The Cortex chat page: wires the connection, the conversation list and the open conversation.
//
// State of the open conversation lives in `chat` (replaced when another one is opened). Stored
// messages are keyed by id and ordered by seq; the user's own messages show at once with a local
// id and are re-keyed when the server's `ack` arrives. A streamed reply grows from `delta`
// events, applied by exact character offset (code points, as the server counts them): a repeat
// is dropped, a gap triggers a resubscribe, which replays everything after the last settled seq.

import { Connection, readToken, storeToken } from "./connection.js";
import { createMessage, updateMessage } from "./messages.js";
import { Sidebar } from "./sidebar.js";

const PAGE = 50;
const NEAR_BOTTOM_PX = 80;
const LOAD_OLDER_WITHIN_PX = 400;
const ID_PATTERN = /^[A-Za-z0-9_.:-]{1,64}$/;

const $ = (id) => document.getElementById(id);
const ui = {
  app: $("app"),
  chat: $("chat"),
  sidebar: $("sidebar"),
  backdrop: $("backdrop"),
  drawerOpen: $("drawer-open"),
  drawerClose: $("drawer-close"),
  newChat: $("new-chat"),
  convList: $("conv-list"),
  convMore: $("conv-more"),
  tokenOpen: $("token-open"),
  title: $("chat-title"),
  conn: $("conn"),
  connText: $("conn-text"),
  connRetry: $("conn-retry"),
  scroller: $("scroller"),
  loadEarlier: $("load-earlier"),
  historyLoading: $("history-loading"),
  empty: $("empty"),
  list: $("messages"),
  typing: $("typing"),
  toBottom: $("to-bottom"),
  alert: $("alert"),
  alertCode: $("alert-code"),
  alertText: $("alert-text"),
  alertClose: $("alert-close"),
  tokenForm: $("token-form"),
  tokenInput: $("token-input"),
  tokenHint: $("token-hint"),
  tokenCancel: $("token-cancel"),
  form: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  live: $("live"),
};

const conn = new Connection();
const sidebar = new Sidebar({ conn, list: ui.convList, more: ui.convMore, onError: showAlert });
/** Sent but not yet acknowledged messages, by client_msg_id: resent after a reconnect. */
const outbox = new Map();
let creating = null; // the outbox entry whose send creates a new conversation
let localCounter = 0;
let noticeCounter = 0;
let chat = freshChat(null);

function freshChat(id) {
  return {
    id,
    messages: new Map(), // id -> message state
    elements: new Map(), // id -> <li>
    toolMsgs: new Map(), // tool_call_id -> stored tool message
    callOwner: new Map(), // tool_call_id -> assistant message id
    dirty: new Set(),
    frame: null,
    hasMore: false,
    loaded: false,
    loading: false,
    missing: false,
    typing: false,
    stopping: false,
    resyncing: false,
  };
}

// ---- text helpers ---------------------------------------------------------------------------

/** Length in code points: the server's offsets count Python characters, not UTF-16 units. */
function cpLength(s) {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < s.length) i++;
    n++;
  }
  return n;
}

/** `s` without its first `count` code points. */
function cpSlice(s, count) {
  let i = 0;
  for (let n = 0; n < count && i < s.length; n++) {
    const c = s.charCodeAt(i);
    i += c >= 0xd800 && c <= 0xdbff && i + 1 < s.length ? 2 : 1;
  }
  return s.slice(i);
}

function uuid() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function titleFrom(text) {
  const line = text.split(/\s+/).join(" ").trim();
  return line.length <= 60 ? line : `${line.slice(0, 59).trimEnd()}…`;
}

// ---- message state --------------------------------------------------------------------------

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
    liveTools: new Map(),
  };
}

/** Merge a stored message (from history, catch-up or a live `message` event). */
function upsert(view, live) {
  if (!view || view.role === "system" || typeof view.id !== "string") return;
  let msg = chat.messages.get(view.id);
  if (!msg) {
    msg = fromView(view);
    chat.messages.set(msg.id, msg);
  } else {
    if (msg.status !== "streaming" && view.status === "streaming") return; // never go back
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
    });
    if (!keepText) {
      msg.content = content;
      msg.length = length;
    }
  }
  if (msg.role === "tool" && msg.tool_call_id) {
    chat.toolMsgs.set(msg.tool_call_id, msg);
    const owner = chat.messages.get(chat.callOwner.get(msg.tool_call_id));
    if (owner) markDirty(owner);
  }
  if (msg.role === "assistant" && msg.tool_calls) {
    for (const call of msg.tool_calls) {
      if (!call || typeof call.id !== "string") continue;
      chat.callOwner.set(call.id, msg.id);
      const toolMsg = chat.toolMsgs.get(call.id);
      if (toolMsg) markDirty(toolMsg); // an orphan shown alone until now folds under its reply
    }
  }
  markDirty(msg);
  if (live && msg.role === "assistant") {
    if (msg.status === "complete" && msg.content) announce(`Cortex replied: ${msg.content.slice(0, 400)}`);
    else if (msg.status === "cancelled") announce("Reply stopped.");
  }
}

function settledSeq() {
  // The last seq before which nothing is still streaming: a catch-up from here resends every
  // message we might not have in its final form.
  let max = 0;
  let streaming = Infinity;
  for (const m of chat.messages.values()) {
    if (m.local || m.ephemeral || typeof m.seq !== "number") continue;
    if (m.seq > max) max = m.seq;
    if (m.status === "streaming" && m.seq < streaming) streaming = m.seq;
  }
  return Math.max(0, Math.min(max, streaming - 1));
}

function oldestSeq() {
  let min = null;
  for (const m of chat.messages.values()) {
    if (m.local || m.ephemeral || typeof m.seq !== "number") continue;
    if (min === null || m.seq < min) min = m.seq;
  }
  return min;
}

function maxSeq() {
  let max = 0;
  for (const m of chat.messages.values()) if (typeof m.seq === "number" && m.seq > max) max = m.seq;
  return max;
}

function streamingMessage() {
  let found = null;
  for (const m of chat.messages.values()) {
    if (m.status === "streaming" && (!found || m.seq > found.seq)) found = m;
  }
  return found;
}

function lastAssistant() {
  let found = null;
  for (const m of chat.messages.values()) {
    if (m.role === "assistant" && (!found || m.seq > found.seq)) found = m;
  }
  return found;
}

function addNotice(code, text) {
  const msg = {
    id: `notice:${++noticeCounter}`,
    kind: "notice",
    role: "notice",
    seq: maxSeq() + 0.5,
    content: text,
    code,
    ephemeral: true,
    liveTools: new Map(),
  };
  chat.messages.set(msg.id, msg);
  markDirty(msg);
  flush();
}

function toolsOf(msg) {
  if (msg.kind === "tool") {
    return [toolEntry(msg.tool_call_id, "tool", undefined, null)];
  }
  if (msg.kind !== "assistant") return [];
  const tools = [];
  const seen = new Set();
  for (const call of msg.tool_calls || []) {
    if (!call || typeof call.id !== "string") continue;
    const fn = call.function || {};
    tools.push(toolEntry(call.id, fn.name || call.name, fn.arguments ?? call.arguments, msg));
    seen.add(call.id);
  }
  for (const [id, live] of msg.liveTools) {
    if (!seen.has(id)) tools.push(toolEntry(id, live.name, live.arguments, msg));
  }
  return tools;
}

function toolEntry(id, name, args, owner) {
  const live = owner ? owner.liveTools.get(id) : undefined;
  const stored = chat.toolMsgs.get(id);
  const entry = { id, name: name || (live && live.name) || "tool", arguments: args ?? live?.arguments };
  if (stored) {
    entry.state = stored.status === "error" ? "error" : "ok";
    if (entry.state === "error") entry.error = stored.content;
    else entry.result = stored.content;
  } else if (live && live.state && live.state !== "running") {
    Object.assign(entry, { state: live.state, result: live.result, error: live.error });
  } else if (chat.typing || (owner && owner.status === "streaming")) {
    entry.state = "running";
  } else {
    entry.state = "error";
    entry.error = "No result was stored for this call.";
  }
  return entry;
}

// ---- rendering ------------------------------------------------------------------------------

function markDirty(msg) {
  chat.dirty.add(msg);
  if (!chat.frame) {
    const c = chat;
    const run = () => {
      if (c === chat && c.frame) flush();
    };
    // requestAnimationFrame does not run in a hidden tab; keep such a tab current anyway.
    c.frame = document.hidden
      ? { raf: false, id: setTimeout(run, 100) }
      : { raf: true, id: requestAnimationFrame(run) };
  }
}

function cancelFrame(c) {
  if (!c.frame) return;
  if (c.frame.raf) cancelAnimationFrame(c.frame.id);
  else clearTimeout(c.frame.id);
  c.frame = null;
}

function sortKey(msg) {
  return typeof msg.seq === "number" ? msg.seq : 1e12 + (msg.order || 0);
}

function place(li, msg) {
  const key = sortKey(msg);
  li.dataset.key = String(key);
  let after = null;
  for (let node = ui.list.lastElementChild; node; node = node.previousElementSibling) {
    if (node !== li && Number(node.dataset.key) <= key) {
      after = node;
      break;
    }
  }
  if (after) {
    if (after.nextElementSibling !== li) after.after(li);
  } else if (ui.list.firstElementChild !== li) {
    ui.list.prepend(li);
  }
}

function renderOne(msg) {
  let li = chat.elements.get(msg.id);
  const folded =
    msg.kind === "tool" && chat.messages.has(chat.callOwner.get(msg.tool_call_id) || "");
  if (folded || !chat.messages.has(msg.id)) {
    if (li) {
      li.remove();
      chat.elements.delete(msg.id);
    }
    return;
  }
  if (!li) {
    li = createMessage(msg);
    chat.elements.set(msg.id, li);
    place(li, msg);
  } else if (li.dataset.key !== String(sortKey(msg))) {
    place(li, msg);
  }
  updateMessage(li, msg, toolsOf(msg));
}

/** Render what changed now. `keepScroll`: do not follow the bottom (history prepends). */
function flush(keepScroll = false) {
  cancelFrame(chat);
  const stick = !keepScroll && isNearBottom();
  for (const msg of chat.dirty) renderOne(msg);
  chat.dirty.clear();
  updateChrome();
  if (stick) scrollToBottom();
}

function isNearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function replying() {
  return chat.typing || streamingMessage() !== null;
}

function updateChrome() {
  const busy = replying();
  const streaming = streamingMessage();
  ui.empty.hidden = Boolean(chat.id) || chat.messages.size > 0;
  ui.typing.hidden = !(busy && !(streaming && streaming.length > 0));
  ui.stop.hidden = !busy || !chat.id;
  ui.stop.disabled = chat.stopping || !conn.isOpen;
  ui.stop.querySelector("span").textContent = chat.stopping ? "Stopping…" : "Stop";
  ui.loadEarlier.hidden = !(chat.loaded && chat.hasMore && !chat.loading);
  ui.historyLoading.hidden = !(chat.loaded && chat.loading);
  ui.toBottom.hidden = isNearBottom();
  const title = chat.missing
    ? "Conversation not found"
    : chat.id
      ? sidebar.titleOf(chat.id) || firstUserTitle() || "Conversation"
      : "New chat";
  if (ui.title.textContent !== title) ui.title.textContent = title;
  document.title = `${title} · Cortex`;
  updateSendButton();
}

function firstUserTitle() {
  let first = null;
  for (const m of chat.messages.values()) {
    if (m.role === "user" && (!first || sortKey(m) < sortKey(first))) first = m;
  }
  return first && !chat.hasMore ? titleFrom(first.content) : null;
}

function updateSendButton() {
  const open = conn.isOpen;
  ui.input.disabled = !open;
  ui.send.disabled = !open || !ui.input.value.trim() || (!chat.id && creating !== null);
  ui.input.placeholder = open ? "Message Cortex" : "Waiting for the connection…";
}

function announce(text) {
  ui.live.textContent = text;
}

function showAlert(err) {
  ui.alertCode.textContent = err.code || "error";
  ui.alertText.textContent = err.message || "Something went wrong.";
  ui.alert.hidden = false;
}

// ---- conversations --------------------------------------------------------------------------

function hashId() {
  const m = /^#c=(.+)$/.exec(location.hash);
  if (!m) return null;
  let id;
  try {
    id = decodeURIComponent(m[1]);
  } catch {
    return null;
  }
  return ID_PATTERN.test(id) ? id : null;
}

function openConversation(id) {
  if (chat.id && chat.id !== id && conn.isOpen) {
    conn.send({ type: "unsubscribe", conversation_id: chat.id });
  }
  cancelFrame(chat);
  chat = freshChat(id);
  ui.list.replaceChildren();
  ui.alert.hidden = true;
  sidebar.setActive(id);
  closeDrawer(false);
  updateChrome();
  if (id && conn.isOpen) loadInitial();
}

async function loadInitial() {
  const c = chat;
  if (!c.id || c.loading || !conn.isOpen) return;
  c.loading = true;
  updateChrome();
  try {
    const page = await conn.request({ type: "history", conversation_id: c.id, limit: PAGE });
    if (c !== chat) return;
    for (const view of page.messages || []) upsert(view, false);
    c.hasMore = Boolean(page.has_more);
    c.loaded = true;
    subscribeCurrent();
    flush(true);
    scrollToBottom();
  } catch (err) {
    if (c !== chat) return;
    if (err.code === "not_found" || err.code === "forbidden") {
      c.missing = true;
      addNotice(err.code, "This conversation does not exist or belongs to someone else.");
    } else if (err.code !== "disconnected") {
      showAlert(err);
    }
  } finally {
    if (c === chat) {
      c.loading = false;
      updateChrome();
      maybeLoadOlder();
    }
  }
}

async function loadOlder() {
  const c = chat;
  const before = oldestSeq();
  if (!c.id || !c.loaded || !c.hasMore || c.loading || !conn.isOpen || before === null) return;
  c.loading = true;
  updateChrome();
  try {
    const page = await conn.request({
      type: "history",
      conversation_id: c.id,
      before_seq: before,
      limit: PAGE,
    });
    if (c !== chat) return;
    const s = ui.scroller;
    const fromBottom = s.scrollHeight - s.scrollTop;
    for (const view of page.messages || []) upsert(view, false);
    c.hasMore = Boolean(page.has_more);
    c.loading = false;
    flush(true);
    s.scrollTop = s.scrollHeight - fromBottom; // keep what the reader was looking at in place
  } catch (err) {
    if (c === chat && err.code !== "disconnected") showAlert(err);
  } finally {
    if (c === chat) {
      c.loading = false;
      updateChrome();
      maybeLoadOlder();
    }
  }
}

function maybeLoadOlder() {
  if (chat.hasMore && !chat.loading && ui.scroller.scrollTop < LOAD_OLDER_WITHIN_PX) loadOlder();
}

/** Subscribe to the open conversation, catching up on everything after the last settled seq. */
function subscribeCurrent() {
  const c = chat;
  if (!c.id || !conn.isOpen) return;
  c.resyncing = true;
  conn.send({ type: "subscribe", conversation_id: c.id, after_seq: settledSeq() });
  // Frames are answered in order: once the pong is here, the catch-up has been delivered.
  conn.request({ type: "ping" }).then(
    () => {
      if (c === chat) c.resyncing = false;
    },
    () => {},
  );
}

function resync() {
  if (chat.loaded && !chat.resyncing) subscribeCurrent();
}

// ---- sending --------------------------------------------------------------------------------

function submit() {
  const text = ui.input.value;
  if (!text.trim() || !conn.isOpen) return;
  if (!chat.id && creating !== null) return; // the first message is still creating the chat
  const clientMsgId = uuid();
  const msg = {
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
  chat.messages.set(msg.id, msg);
  const frame = { type: "send", content: text, client_msg_id: clientMsgId };
  if (chat.id) frame.conversation_id = chat.id;
  const entry = { frame, msg, chat };
  outbox.set(clientMsgId, entry);
  if (!chat.id) creating = entry;
  ui.input.value = "";
  autosize();
  markDirty(msg);
  flush(true);
  scrollToBottom();
  transmit(entry);
}

async function transmit(entry) {
  const { msg } = entry;
  msg.retrying = false;
  if (entry.chat === chat) markDirty(msg);
  try {
    const ack = await conn.request({ ...entry.frame, request_id: entry.frame.client_msg_id });
    onAck(entry, ack);
  } catch (err) {
    if (err.code === "disconnected" || err.code === "timeout") {
      msg.retrying = true; // resent with the same client_msg_id once connected again
      if (entry.chat === chat) markDirty(msg);
      if (err.code === "timeout" && conn.isOpen) transmit(entry);
      return;
    }
    outbox.delete(entry.frame.client_msg_id);
    if (creating === entry) creating = null;
    msg.failed = { code: err.code || "error", message: err.message || "The message was not sent." };
    if (entry.chat === chat) {
      markDirty(msg);
      if (!ui.input.value) {
        ui.input.value = msg.content; // give the text back so it can be sent again
        autosize();
      }
      updateChrome();
    }
  }
}

function onAck(entry, ack) {
  outbox.delete(entry.frame.client_msg_id);
  if (creating === entry) creating = null;
  sidebar.refreshSoon();
  if (entry.chat !== chat) return;
  const { msg } = entry;
  if (!chat.id) {
    chat.id = ack.conversation_id;
    chat.loaded = true;
    history.replaceState(null, "", `#c=${encodeURIComponent(chat.id)}`);
    sidebar.addLocal(chat.id, titleFrom(msg.content));
    sidebar.setActive(chat.id);
  }
  const li = chat.elements.get(msg.id);
  chat.messages.delete(msg.id);
  chat.elements.delete(msg.id);
  if (chat.messages.has(ack.message_id)) {
    if (li) li.remove(); // the stored message arrived first
  } else {
    Object.assign(msg, { id: ack.message_id, seq: ack.seq, local: false, retrying: false });
    chat.messages.set(msg.id, msg);
    if (li) chat.elements.set(msg.id, li);
    markDirty(msg);
  }
  updateChrome();
}

function stop() {
  if (!chat.id || !conn.isOpen || chat.stopping) return;
  chat.stopping = true;
  conn.send({ type: "cancel", conversation_id: chat.id });
  announce("Stopping the reply.");
  updateChrome();
  const c = chat;
  setTimeout(() => {
    if (c === chat && c.stopping) {
      c.stopping = false;
      updateChrome();
    }
  }, 8000);
}

// ---- events from the server -----------------------------------------------------------------

function onFrame(frame) {
  const mine = typeof frame.conversation_id === "string" && frame.conversation_id === chat.id;
  switch (frame.type) {
    case "message":
      if (mine) upsert(frame.message, true);
      else if (frame.message && frame.message.status !== "streaming") sidebar.refreshSoon(500);
      break;
    case "delta":
      if (mine) onDelta(frame);
      break;
    case "typing":
      if (!mine) break;
      chat.typing = Boolean(frame.active);
      if (!chat.typing) chat.stopping = false;
      else announce("Cortex is typing…");
      for (const m of chat.messages.values()) if (m.liveTools.size) markDirty(m);
      updateChrome();
      break;
    case "tool_call":
    case "tool_result":
      if (mine) onTool(frame);
      break;
    case "error":
      onError(frame);
      break;
    default:
      break; // ack / pong / pages without a waiting request: nothing to do
  }
}

function onDelta(frame) {
  const msg = chat.messages.get(frame.message_id);
  if (!msg) {
    resync(); // a reply we never saw start
    return;
  }
  if (msg.status !== "streaming" || typeof frame.text !== "string") return;
  const offset = Number(frame.offset);
  const have = msg.length;
  if (offset > have) {
    resync(); // a gap: the catch-up sends the whole text so far at offset 0
    return;
  }
  const size = cpLength(frame.text);
  if (offset + size <= have) return; // a repeat
  const fresh = cpSlice(frame.text, have - offset);
  msg.content += fresh;
  msg.length += size - (have - offset);
  markDirty(msg);
}

function onTool(frame) {
  const owner = chat.messages.get(frame.message_id);
  if (!owner || typeof frame.call_id !== "string") return;
  chat.callOwner.set(frame.call_id, owner.id);
  const live = owner.liveTools.get(frame.call_id) || { state: "running" };
  if (frame.type === "tool_call") {
    Object.assign(live, { name: frame.name, arguments: frame.arguments });
  } else {
    Object.assign(live, {
      state: frame.ok ? "ok" : "error",
      result: frame.result,
      error: frame.error,
    });
  }
  owner.liveTools.set(frame.call_id, live);
  markDirty(owner);
}

function onError(frame) {
  const code = String(frame.code || "error");
  const text = String(frame.message || "");
  if (typeof frame.conversation_id === "string") {
    if (frame.conversation_id !== chat.id) return;
    if ((code === "not_found" || code === "forbidden") && !chat.loaded) {
      chat.missing = true;
    }
    const last = lastAssistant();
    if (last && last.status === "error" && last.error_code === code && !last.errorText) {
      last.errorText = text;
      markDirty(last);
      return;
    }
    addNotice(code, text);
    return;
  }
  showAlert({ code, message: text });
}

// ---- connection -----------------------------------------------------------------------------

function renderConnection(state, delay) {
  ui.conn.dataset.state = state;
  ui.connRetry.hidden = state !== "waiting";
  if (state === "open") ui.connText.textContent = "Connected";
  else if (state === "connecting") ui.connText.textContent = "Connecting…";
  else ui.connText.textContent = `Offline · retrying in ${Math.max(1, Math.round(delay / 1000))} s`;
}

conn.addEventListener("state", (event) => {
  renderConnection(event.detail.state, event.detail.delay);
  updateChrome();
});

conn.addEventListener("open", () => {
  // A prompt that came up by itself goes away once connected, unless the user is using it.
  const tokenInUse =
    ui.tokenForm.contains(document.activeElement) || ui.tokenInput.value !== readToken();
  if (ui.tokenForm.dataset.auto === "1" && !tokenInUse) hideTokenForm();
  // 1. Resend what was not acknowledged (same client_msg_id: the server deduplicates), before
  //    the catch-up, so that our own messages come back as acks first.
  for (const entry of outbox.values()) transmit(entry);
  // 2. Catch up on the open conversation.
  if (chat.id) {
    if (chat.loaded) subscribeCurrent();
    else loadInitial();
  }
  sidebar.refresh();
  updateChrome();
});

conn.addEventListener("close", (event) => {
  chat.typing = false;
  chat.stopping = false;
  chat.resyncing = false;
  chat.loading = false;
  for (const entry of outbox.values()) {
    entry.msg.retrying = true;
    if (entry.chat === chat) markDirty(entry.msg);
  }
  if (event.detail.needsToken) {
    showTokenForm(
      true,
      event.detail.code === 1008
        ? "The server refused the connection. It may need an access token."
        : "Cannot connect to the server. If it needs an access token, enter it here; " +
            "otherwise Cortex keeps trying.",
    );
  }
  updateChrome();
});

conn.addEventListener("refused", (event) => {
  const { status, message, hadToken } = event.detail;
  if (status === 401) {
    showTokenForm(
      true,
      hadToken
        ? "The server refused the stored access token."
        : "This server needs an access token (`cortex token create` makes one).",
    );
  } else {
    showAlert({ code: "forbidden", message: message || "The server refused the connection." });
  }
});

conn.addEventListener("frame", (event) => onFrame(event.detail));

// ---- token prompt ---------------------------------------------------------------------------

function showTokenForm(auto, why = "") {
  ui.tokenHint.textContent = `${why} The token is kept in this browser only.`.trim();
  if (!ui.tokenForm.hidden) return;
  ui.tokenForm.dataset.auto = auto ? "1" : "";
  ui.tokenInput.value = readToken();
  ui.tokenForm.hidden = false;
  ui.tokenInput.focus();
}

function hideTokenForm() {
  ui.tokenForm.hidden = true;
  ui.tokenForm.dataset.auto = "";
}

ui.tokenForm.addEventListener("submit", (event) => {
  event.preventDefault();
  storeToken(ui.tokenInput.value.trim());
  hideTokenForm();
  conn.restart();
  ui.input.focus();
});
ui.tokenCancel.addEventListener("click", hideTokenForm);
ui.tokenOpen.addEventListener("click", () => {
  closeDrawer(false);
  showTokenForm(false, "Enter the access token for this server, if it needs one.");
});

// ---- layout and input -----------------------------------------------------------------------

const fieldSizing = typeof CSS !== "undefined" && CSS.supports("field-sizing", "content");

function autosize() {
  if (fieldSizing) return;
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 200)}px`;
}

function openDrawer() {
  ui.app.classList.add("drawer-open");
  ui.chat.inert = true; // keep keyboard focus inside the open drawer
  ui.backdrop.hidden = false;
  ui.drawerOpen.setAttribute("aria-expanded", "true");
  ui.newChat.focus();
}

function closeDrawer(restoreFocus) {
  if (!ui.app.classList.contains("drawer-open")) return;
  ui.app.classList.remove("drawer-open");
  ui.chat.inert = false;
  ui.backdrop.hidden = true;
  ui.drawerOpen.setAttribute("aria-expanded", "false");
  if (restoreFocus) ui.drawerOpen.focus();
}

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
ui.input.addEventListener("input", () => {
  autosize();
  updateSendButton();
});
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
  ui.input.focus();
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", () => {
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  openConversation(null);
  ui.input.focus();
});
ui.loadEarlier.addEventListener("click", loadOlder);
ui.scroller.addEventListener(
  "scroll",
  () => {
    ui.toBottom.hidden = isNearBottom();
    maybeLoadOlder();
  },
  { passive: true },
);
ui.toBottom.addEventListener("click", () => {
  ui.scroller.scrollTo({ top: ui.scroller.scrollHeight, behavior: "smooth" });
  ui.input.focus();
});
ui.alertClose.addEventListener("click", () => {
  ui.alert.hidden = true;
});
ui.connRetry.addEventListener("click", () => conn.reconnectNow());
ui.drawerOpen.addEventListener("click", openDrawer);
ui.drawerClose.addEventListener("click", () => closeDrawer(true));
ui.backdrop.addEventListener("click", () => closeDrawer(true));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.app.classList.contains("drawer-open")) closeDrawer(true);
});
function followUrl() {
  if (location.hash && !location.hash.startsWith("#c=")) return; // not a conversation link
  const id = hashId();
  if (id !== chat.id) openConversation(id);
}
window.addEventListener("hashchange", followUrl);
window.addEventListener("popstate", followUrl); // back/forward across "New chat"
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault(); // keep the conversation in the URL hash
  ui.input.focus();
});
window.addEventListener("focus", () => sidebar.refreshSoon());
sidebar.onChange(() => updateChrome());

openConversation(hashId());
conn.start();
