// The open conversation's exchanges with the server: opening it (history, then a catch-up
// `subscribe`), older pages, resubscribing after a gap or a reconnect, sending with the outbox,
// and Stop. The state is in state.js, its rendering in view.js; the frames the server pushes
// are dispatched in main.js.

import { Chat, Outbox, uuid } from "./state.js";

const PAGE = 50;
const LOAD_OLDER_WITHIN_PX = 400;

export class Session {
  /** `onCreated(id, firstText)`: the first message created the open conversation, `id`. */
  constructor({ conn, view, sidebar, onCreated }) {
    this.conn = conn;
    this.view = view;
    this.sidebar = sidebar;
    this.onCreated = onCreated;
    this.outbox = new Outbox();
    this.chat = new Chat(null);
    view.show(this.chat);
  }

  /** Whether a first message is still creating a conversation. */
  get creating() {
    return this.outbox.creating !== null;
  }

  /**
   * Show conversation `id` (null: a new chat). `unsubscribe`: tell the server that the one shown
   * until now is no longer watched (not after it was deleted).
   */
  open(id, { unsubscribe = true, aroundSeq = null, readOnlyAt = null } = {}) {
    const { conn } = this;
    if (unsubscribe && this.chat.id && this.chat.id !== id && conn.isOpen) {
      conn.send({ type: "unsubscribe", conversation_id: this.chat.id });
    }
    this.chat = new Chat(id);
    // A search hit: the first page is the one around it (history {around_seq}).
    this.chat.aroundSeq = id && Number.isInteger(aroundSeq) ? aroundSeq : null;
    // A hit on an inactive branch: that branch, read-only (no subscribe, no sending).
    this.chat.readOnlyAt = id && this.chat.aroundSeq !== null ? readOnlyAt : null;
    this.view.show(this.chat);
    this.sidebar.setActive(id);
    this.view.updateChrome();
    if (id && conn.isOpen) this.loadInitial();
  }

  async loadInitial() {
    const { conn, view } = this;
    const c = this.chat;
    if (!c.id || c.loading || !conn.isOpen) return;
    c.loading = true;
    view.updateChrome();
    try {
      const frame = { type: "history", conversation_id: c.id, limit: PAGE };
      if (c.aroundSeq !== null) frame.around_seq = c.aroundSeq;
      const page = await conn.request(frame);
      if (c !== this.chat) return;
      for (const msg of page.messages || []) c.upsert(msg);
      c.hasMore = Boolean(page.has_more);
      c.loaded = true;
      if (!c.readOnlyAt) this.subscribe(); // live events follow the active path, not this one
      view.flush(true);
      if (c.aroundSeq === null || !view.showSeq(c.aroundSeq)) view.scrollToBottom();
    } catch (err) {
      if (c !== this.chat) return;
      if (err.code === "not_found" || err.code === "forbidden") {
        c.missing = true;
        c.addNotice(err.code, "This conversation does not exist or belongs to someone else.");
        view.flush();
      } else if (err.code !== "disconnected") {
        view.showAlert(err);
      }
    } finally {
      if (c === this.chat) {
        c.loading = false;
        view.updateChrome();
        this.maybeLoadOlder();
      }
    }
  }

  async loadOlder() {
    const { conn, view } = this;
    const c = this.chat;
    const before = c.oldestSeq();
    if (!c.id || !c.loaded || !c.hasMore || c.loading || !conn.isOpen || before === null) return;
    c.loading = true;
    view.updateChrome();
    try {
      const page = await conn.request({
        type: "history",
        conversation_id: c.id,
        before_seq: before,
        limit: PAGE,
      });
      if (c !== this.chat) return;
      view.keepPlace(() => {
        for (const msg of page.messages || []) c.upsert(msg);
        c.hasMore = Boolean(page.has_more);
        c.loading = false;
        view.flush(true);
      });
    } catch (err) {
      if (c === this.chat && err.code !== "disconnected") view.showAlert(err);
    } finally {
      if (c === this.chat) {
        c.loading = false;
        view.updateChrome();
        this.maybeLoadOlder();
      }
    }
  }

  maybeLoadOlder() {
    const c = this.chat;
    if (c.hasMore && !c.loading && this.view.ui.scroller.scrollTop < LOAD_OLDER_WITHIN_PX) {
      this.loadOlder();
    }
  }

  /** Subscribe to the open conversation, catching up on everything after the last settled seq. */
  subscribe() {
    const c = this.chat;
    if (!c.id || !this.conn.isOpen) return;
    c.resyncing = true;
    this.conn.send({ type: "subscribe", conversation_id: c.id, after_seq: c.settledSeq() });
    // Frames are answered in order: once the pong is here, the catch-up has been delivered.
    this.conn.request({ type: "ping" }).then(
      () => {
        if (c === this.chat) c.resyncing = false;
      },
      () => {},
    );
  }

  /** Catch up after a gap in the stream (once, however many gaps show meanwhile). */
  resync() {
    if (this.chat.loaded && !this.chat.resyncing && !this.chat.readOnlyAt) this.subscribe();
  }

  /** Connected (again): resend what was not acknowledged, then catch up. */
  resume() {
    // Resent with the same client_msg_id (the server deduplicates) before the catch-up, so
    // that our own messages come back as acks first.
    for (const entry of this.outbox.values()) this.transmit(entry);
    const c = this.chat;
    if (c.id) {
      if (c.loaded && !c.readOnlyAt) this.subscribe();
      else this.loadInitial();
    }
  }

  /** The connection dropped: whatever was in progress waits for the next one. */
  suspend() {
    const c = this.chat;
    c.typing = false;
    c.stopping = false;
    c.resyncing = false;
    c.loading = false;
    for (const entry of this.outbox.values()) {
      entry.msg.retrying = true;
      entry.chat.markDirty(entry.msg);
    }
  }

  // ---- sending ------------------------------------------------------------------------------

  /** Send the message box's text. */
  submit() {
    const { ui } = this.view;
    const c = this.chat;
    const text = ui.input.value;
    const tray = this.tray;
    if (tray && tray.busy) return; // files still uploading: the button says so
    const attachments = tray ? tray.ready : [];
    if ((!text.trim() && !attachments.length) || !this.conn.isOpen) return;
    if (!c.id && this.creating) return; // the first message is still creating the chat
    if (c.readOnlyAt) return; // another branch, shown read-only
    const entry = this.outbox.add(c, text, attachments);
    if (tray) tray.clear();
    ui.input.value = "";
    this.view.autosize();
    c.markDirty(entry.msg);
    this.view.flush(true);
    this.view.scrollToBottom();
    this.transmit(entry);
  }

  async transmit(entry) {
    const { msg } = entry;
    msg.retrying = false;
    entry.chat.markDirty(msg);
    try {
      const ack = await this.conn.request({ ...entry.frame, request_id: entry.frame.client_msg_id });
      this.acknowledged(entry, ack);
    } catch (err) {
      if (err.code === "disconnected" || err.code === "timeout") {
        msg.retrying = true; // resent with the same client_msg_id once connected again
        entry.chat.markDirty(msg);
        if (err.code === "timeout" && this.conn.isOpen) this.transmit(entry);
        return;
      }
      this.outbox.settle(entry);
      msg.failed = { code: err.code || "error", message: err.message || "The message was not sent." };
      if (entry.chat === this.chat) {
        const { ui } = this.view;
        entry.chat.markDirty(msg);
        if (!ui.input.value) {
          ui.input.value = msg.content; // give the text back so it can be sent again
          this.view.autosize();
        }
        this.view.updateChrome();
      }
    }
  }

  acknowledged(entry, ack) {
    this.outbox.settle(entry);
    this.sidebar.refreshSoon();
    const c = this.chat;
    if (entry.chat !== c) return;
    const { msg } = entry;
    if (!c.id) {
      c.id = ack.conversation_id;
      c.loaded = true;
      this.onCreated(c.id, msg.content);
    }
    if (!c.acknowledge(msg, ack)) this.view.remove(msg); // the stored message arrived first
    this.view.updateChrome();
  }

  // ---- branches (docs/protocol.md, "Branches") ---------------------------------------------

  /**
   * Make the branch shown read-only the active one. The server's `conversation` event with the
   * new `active_leaf_id` then reads it again, no longer read-only (main.js).
   */
  async switchToShown() {
    const c = this.chat;
    if (!c.readOnlyAt || c.switching) return;
    c.switching = true;
    this.view.updateChrome();
    const ack = await this.branch({ type: "switch_branch", message_id: c.readOnlyAt });
    if (!ack && c === this.chat) {
      c.switching = false;
      this.view.updateChrome();
    }
  }

  /** Read the open conversation again: its active path changed. */
  reload() {
    const id = this.chat.id;
    if (!id) return;
    this.chat = new Chat(id);
    this.view.show(this.chat);
    this.view.updateChrome();
    if (this.conn.isOpen) this.loadInitial();
  }

  async branch(frame) {
    const c = this.chat;
    if (!c.id || !this.conn.isOpen) return null;
    try {
      return await this.conn.request({ ...frame, conversation_id: c.id });
    } catch (err) {
      if (err.code !== "disconnected") this.view.showAlert(err);
      return null;
    }
  }

  editMessage(msg, content) {
    return this.branch({ type: "edit", message_id: msg.id, content, client_msg_id: uuid() });
  }

  regenerate(msg) {
    return this.branch({ type: "regenerate", message_id: msg.id, client_msg_id: uuid() });
  }

  switchTo(messageId) {
    return this.branch({ type: "switch_branch", message_id: messageId });
  }

  async fork(msg) {
    const ack = await this.branch({ type: "fork", message_id: msg.id });
    if (ack && typeof ack.conversation_id === "string") {
      location.hash = `#c=${encodeURIComponent(ack.conversation_id)}`; // opens it
    }
  }

  /** Stop the reply in progress. */
  stop() {
    const c = this.chat;
    if (!c.id || !this.conn.isOpen || c.stopping) return;
    c.stopping = true;
    this.conn.send({ type: "cancel", conversation_id: c.id });
    this.view.announce("Stopping the reply.");
    this.view.updateChrome();
    setTimeout(() => {
      if (c === this.chat && c.stopping) {
        c.stopping = false;
        this.view.updateChrome();
      }
    }, 8000);
  }
}
