// The Cortex chat page: wires the connection, the URL, the conversation list, the token prompt,
// the drawer and the keyboard to the open conversation, and dispatches the server's events.
//
// The open conversation's state is in state.js (a `Chat`, replaced when another one is opened),
// its rendering in view.js, its requests (history, subscribe, send, stop) in session.js.

import { Tray } from "./attachments.js";
import { Connection, readToken, storeToken } from "./connection.js";
import { Sidebar } from "./sidebar.js";
import { SearchBox } from "./search.js";
import { Session } from "./session.js";
import { titleFrom } from "./state.js";
import { ChatView } from "./view.js";
import { setActions } from "./messages.js";

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
  searchOpen: $("search-open"),
  attach: $("attach"),
  branchBanner: $("branch-banner"),
  branchSwitch: $("branch-switch"),
  branchBack: $("branch-back"),
};

const conn = new Connection();
const sidebar = new Sidebar({
  conn,
  list: ui.convList,
  more: ui.convMore,
  onError: (err) => view.showAlert(err),
});
const view = new ChatView({
  ui,
  conn,
  titleOf: (id) => sidebar.titleOf(id),
  creating: () => session.creating,
});
const session = new Session({
  conn,
  view,
  sidebar,
  onCreated(id, firstText) {
    history.replaceState(null, "", `#c=${encodeURIComponent(id)}`);
    sidebar.addLocal(id, titleFrom(firstText));
    sidebar.setActive(id);
  },
});

// The branch buttons of each message (edit, regenerate, ‹ n/m ›, fork); hidden, and inert, while
// another branch is shown read-only.
const unlessReadOnly =
  (action) =>
  (...args) =>
    session.chat.readOnlyAt ? null : action(...args);
setActions({
  edit: unlessReadOnly((msg, text) => session.editMessage(msg, text)),
  regenerate: unlessReadOnly((msg) => session.regenerate(msg)),
  switchTo: unlessReadOnly((id) => session.switchTo(id)),
  fork: unlessReadOnly((msg) => session.fork(msg)),
});

// ---- search (docs/search.md) ----------------------------------------------------------------

const search = new SearchBox({
  conn,
  ui: {
    panel: $("search-panel"),
    form: $("search-form"),
    input: $("search-input"),
    close: $("search-close"),
    status: $("search-status"),
    results: $("search-results"),
    more: $("search-more"),
  },
  onOpen(hit) {
    search.close(false);
    const id = String(hit.conversation_id);
    if (!ID_PATTERN.test(id)) return;
    if (hashId() !== id) history.pushState(null, "", `#c=${encodeURIComponent(id)}`);
    // A hit on an inactive branch opens that branch read-only (switching changes the path
    // every client sees, so it is a button of its own).
    const inactive = hit.on_active_path === false && typeof hit.message_id === "string";
    openConversation(id, {
      aroundSeq: Number.isInteger(hit.seq) ? hit.seq : null,
      readOnlyAt: inactive ? hit.message_id : null,
    });
    if (session.chat.readOnlyAt) ui.branchSwitch.focus();
    else ui.input.focus();
  },
});

/** Ctrl+K anywhere, or `/` in an empty composer (or outside any text field), opens search. */
function searchKey(event) {
  if ((event.ctrlKey || event.metaKey) && !event.altKey && event.key.toLowerCase() === "k") {
    return true;
  }
  if (event.key !== "/" || event.ctrlKey || event.metaKey || event.altKey) return false;
  const target = event.target;
  if (target === ui.input) return ui.input.value === "";
  return !(target instanceof HTMLInputElement || target instanceof HTMLTextAreaElement);
}

document.addEventListener("keydown", (event) => {
  if (event.isComposing || !searchKey(event)) return;
  event.preventDefault();
  closeDrawer(false);
  search.open();
});
ui.searchOpen.addEventListener("click", () => {
  closeDrawer(false);
  search.open();
});

// ---- conversations and the URL --------------------------------------------------------------

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

function openConversation(id, options) {
  closeDrawer(false);
  session.open(id, options);
}

function newChat() {
  if (location.hash) history.pushState(null, "", location.pathname + location.search);
  openConversation(null);
}

function followUrl() {
  if (location.hash && !location.hash.startsWith("#c=")) return; // not a conversation link
  const id = hashId();
  if (id !== session.chat.id) openConversation(id);
}

// ---- events from the server -----------------------------------------------------------------

/** Every frame that is not the answer to a waiting request, by type. */
function onFrame(frame) {
  const chat = session.chat;
  const mine = typeof frame.conversation_id === "string" && frame.conversation_id === chat.id;
  // Another branch shown read-only: the live events (of the active path) are not drawn into
  // it; leaving it reads the conversation again.
  const live = ["message", "delta", "typing", "tool_call", "tool_result"];
  if (mine && chat.readOnlyAt && live.includes(frame.type)) return;
  switch (frame.type) {
    case "message": {
      if (!mine) {
        if (frame.message && frame.message.status !== "streaming") sidebar.refreshSoon(500);
        break;
      }
      if (chat.offPath(frame.message)) break; // another branch: not on the path shown
      const msg = chat.upsert(frame.message);
      if (msg && msg.role === "assistant") {
        if (msg.status === "complete" && msg.content) {
          view.announce(`Cortex replied: ${msg.content.slice(0, 400)}`);
        } else if (msg.status === "cancelled") view.announce("Reply stopped.");
      }
      break;
    }
    case "delta":
      if (mine && chat.applyDelta(frame) === "gap") session.resync();
      break;
    case "typing":
      if (!mine) break;
      chat.setTyping(Boolean(frame.active));
      if (chat.typing) view.announce("Cortex is typing…");
      view.updateChrome();
      break;
    case "tool_call":
    case "tool_result":
      if (mine) chat.applyTool(frame);
      break;
    case "conversation":
      onConversation(frame, mine);
      break;
    case "error":
      onError(frame, mine);
      break;
    case "ack":
    case "pong":
    case "history":
    case "conversations":
    case "search_results":
    case "attachment": // an upload's answer (attachments.js waits for it by request_id)
      break; // answers whose request stopped waiting (timed out, or the socket was replaced)
    default:
      break; // a type this page does not know
  }
}

/** A conversation was renamed, configured or titled, or deleted. */
function onConversation(frame, mine) {
  const id = frame.conversation_id;
  if (typeof id !== "string") return;
  if (frame.deleted) {
    sidebar.remove(id);
    if (mine) {
      // Leave it for a new chat; replace the URL so that Back does not lead to it again.
      const focusLost = ui.list.contains(document.activeElement); // e.g. on a copy button
      if (location.hash) history.replaceState(null, "", location.pathname + location.search);
      openConversation(null, { unsubscribe: false }); // the server dropped the subscription
      if (focusLost) ui.input.focus();
      view.announce("This conversation was deleted.");
    }
    return;
  }
  const conv = frame.conversation;
  if (!conv || typeof conv !== "object") return;
  if (mine) session.chat.info = { ...conv }; // the header's title when the sidebar lacks it
  // The active path moved (edit, regenerate, switch_branch, delete_branch): draw it again,
  // unless another branch is shown read-only and this is not our "Switch to this branch".
  const moved = frame.active_leaf_id !== undefined || !conv.active_leaf_id;
  const chat = session.chat;
  if (mine && moved && (!chat.readOnlyAt || chat.switching)) {
    session.reload();
    if (chat.switching) ui.input.focus(); // the banner and its button are gone
  }
  sidebar.update(id, conv);
  view.updateChrome();
}

function onError(frame, mine) {
  const code = String(frame.code || "error");
  const text = String(frame.message || "");
  if (typeof frame.conversation_id !== "string") {
    view.showAlert({ code, message: text });
    return;
  }
  if (!mine) return;
  const chat = session.chat;
  if ((code === "not_found" || code === "forbidden") && !chat.loaded) chat.missing = true;
  if (chat.attachError(code, text)) return;
  chat.addNotice(code, text);
  view.flush();
}

// ---- connection -----------------------------------------------------------------------------

conn.addEventListener("state", (event) => {
  view.renderConnection(event.detail.state, event.detail.delay);
  view.updateChrome();
});

conn.addEventListener("open", () => {
  // A prompt that came up by itself goes away once connected, unless the user is using it.
  const tokenInUse =
    ui.tokenForm.contains(document.activeElement) || ui.tokenInput.value !== readToken();
  if (ui.tokenForm.dataset.auto === "1" && !tokenInUse) hideTokenForm();
  session.resume();
  sidebar.refresh();
  view.updateChrome();
});

conn.addEventListener("close", (event) => {
  session.suspend();
  if (event.detail.needsToken) {
    showTokenForm(
      true,
      event.detail.code === 1008
        ? "The server refused the connection. It may need an access token."
        : "Cannot connect to the server. If it needs an access token, enter it here; " +
            "otherwise Cortex keeps trying.",
    );
  }
  view.updateChrome();
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
    view.showAlert({ code: "forbidden", message: message || "The server refused the connection." });
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

// ---- drawer ---------------------------------------------------------------------------------

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

ui.drawerOpen.addEventListener("click", openDrawer);
ui.drawerClose.addEventListener("click", () => closeDrawer(true));
ui.backdrop.addEventListener("click", () => closeDrawer(true));

// ---- keyboard and controls ------------------------------------------------------------------

ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    session.submit();
  }
});
ui.input.addEventListener("input", () => {
  view.autosize();
  view.updateSendButton();
});
ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  session.submit();
  ui.input.focus();
});
ui.stop.addEventListener("click", () => session.stop());
ui.branchSwitch.addEventListener("click", () => session.switchToShown());
ui.branchBack.addEventListener("click", () => {
  session.reload(); // the active path, as when the conversation is opened
  ui.input.focus();
});
ui.newChat.addEventListener("click", () => {
  newChat();
  ui.input.focus();
});
ui.loadEarlier.addEventListener("click", () => session.loadOlder());
ui.scroller.addEventListener(
  "scroll",
  () => {
    ui.toBottom.hidden = view.isNearBottom();
    session.maybeLoadOlder();
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
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.app.classList.contains("drawer-open")) closeDrawer(true);
});
document.querySelector(".skip-link").addEventListener("click", (event) => {
  event.preventDefault(); // keep the conversation in the URL hash
  ui.input.focus();
});
window.addEventListener("hashchange", followUrl);
window.addEventListener("popstate", followUrl); // back/forward across "New chat"
window.addEventListener("focus", () => sidebar.refreshSoon());
sidebar.onChange(() => view.updateChrome());

// ---- attachments: the button, paste, drag and drop ------------------------------------------

const tray = new Tray({ conn, list: $("tray"), onChange: () => view.updateSendButton() });
session.tray = tray;
view.tray = tray;
const attachInput = $("attach-input");
$("attach").addEventListener("click", () => attachInput.click());
attachInput.addEventListener("change", () => {
  tray.add([...attachInput.files]);
  attachInput.value = "";
  ui.input.focus();
});
ui.input.addEventListener("paste", (event) => {
  const files = [...(event.clipboardData?.files || [])];
  if (!files.length) return; // text is pasted as usual
  event.preventDefault();
  tray.add(files);
});
ui.chat.addEventListener("dragover", (event) => {
  if (![...(event.dataTransfer?.types || [])].includes("Files")) return;
  event.preventDefault();
  ui.chat.classList.add("dropping");
});
ui.chat.addEventListener("dragleave", (event) => {
  if (event.target === ui.chat) ui.chat.classList.remove("dropping");
});
ui.chat.addEventListener("drop", (event) => {
  ui.chat.classList.remove("dropping");
  const files = [...(event.dataTransfer?.files || [])];
  if (!files.length) return;
  event.preventDefault();
  tray.add(files);
  ui.input.focus();
});

openConversation(hashId());
conn.start();
