// Renders the open conversation (a `Chat` from state.js) into the page: the message list, the
// typing dots, Stop, the history controls, the title, the composer's state, the alert banner
// and the live region. Rendering is batched: a changed message waits for the next animation
// frame (100 ms in a hidden tab, where animation frames do not run) unless flush() is called.

import { createMessage, updateMessage } from "./messages.js";
import { sortKey } from "./state.js";

const NEAR_BOTTOM_PX = 80;

export class ChatView {
  /**
   * `ui`: the page's elements by name; `conn`: the Connection; `titleOf(id)`: a conversation's
   * title from the sidebar, if listed; `creating()`: whether a first message is still creating
   * a conversation.
   */
  constructor({ ui, conn, titleOf, creating }) {
    this.ui = ui;
    this.conn = conn;
    this.titleOf = titleOf;
    this.creating = creating;
    this.chat = null;
    this.elements = new Map(); // message -> <li>
    this.frame = null;
    this.fieldSizing = typeof CSS !== "undefined" && CSS.supports("field-sizing", "content");
  }

  /** Show `chat` instead of the conversation shown until now (an empty list to start with). */
  show(chat) {
    this.cancelFrame();
    this.chat = chat;
    chat.onDirty = (c) => this.schedule(c);
    this.elements = new Map();
    this.ui.list.replaceChildren();
    this.ui.alert.hidden = true;
  }

  schedule(chat) {
    if (chat !== this.chat || this.frame) return;
    const run = () => {
      if (chat === this.chat && this.frame) this.flush();
    };
    // requestAnimationFrame does not run in a hidden tab; keep such a tab current anyway.
    this.frame = document.hidden
      ? { raf: false, id: setTimeout(run, 100) }
      : { raf: true, id: requestAnimationFrame(run) };
  }

  cancelFrame() {
    if (!this.frame) return;
    if (this.frame.raf) cancelAnimationFrame(this.frame.id);
    else clearTimeout(this.frame.id);
    this.frame = null;
  }

  /** Render what changed now. `keepScroll`: do not follow the bottom (history prepends). */
  flush(keepScroll = false) {
    this.cancelFrame();
    const stick = !keepScroll && this.isNearBottom();
    for (const msg of this.chat.dirty) this.renderOne(msg);
    this.chat.dirty.clear();
    // Regenerate is offered on the last reply of the path only.
    const replies = this.ui.list.querySelectorAll(".msg-assistant");
    replies.forEach((li, i) => li.classList.toggle("is-last", i === replies.length - 1));
    this.updateChrome();
    if (stick) this.scrollToBottom();
  }

  /** Take `msg` off the page at once. */
  remove(msg) {
    const li = this.elements.get(msg);
    if (li) li.remove();
    this.elements.delete(msg);
  }

  renderOne(msg) {
    let li = this.elements.get(msg);
    if (!this.chat.shows(msg)) {
      if (li) this.remove(msg);
      return;
    }
    if (!li) {
      li = createMessage(msg);
      this.elements.set(msg, li);
      this.place(li, msg);
    } else if (li.dataset.key !== String(sortKey(msg))) {
      this.place(li, msg);
    }
    updateMessage(li, msg, this.chat.toolsOf(msg));
  }

  place(li, msg) {
    const list = this.ui.list;
    const key = sortKey(msg);
    li.dataset.key = String(key);
    let after = null;
    for (let node = list.lastElementChild; node; node = node.previousElementSibling) {
      if (node !== li && Number(node.dataset.key) <= key) {
        after = node;
        break;
      }
    }
    if (after) {
      if (after.nextElementSibling !== li) after.after(li);
    } else if (list.firstElementChild !== li) {
      list.prepend(li);
    }
  }

  // ---- scrolling ----------------------------------------------------------------------------

  isNearBottom() {
    const s = this.ui.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < NEAR_BOTTOM_PX;
  }

  scrollToBottom() {
    this.ui.scroller.scrollTop = this.ui.scroller.scrollHeight;
  }

  /** Scroll message `seq` into the middle of the view and mark it (a search hit opened). */
  showSeq(seq) {
    const li = this.ui.list.querySelector(`li[data-seq="${Number(seq)}"]`);
    if (!li) return false;
    for (const old of this.ui.list.querySelectorAll(".msg-found")) old.classList.remove("msg-found");
    li.classList.add("msg-found");
    li.scrollIntoView({ block: "center" });
    return true;
  }

  /** Run `change` (which adds messages above) without moving what the reader is looking at. */
  keepPlace(change) {
    const s = this.ui.scroller;
    const fromBottom = s.scrollHeight - s.scrollTop;
    change();
    s.scrollTop = s.scrollHeight - fromBottom;
  }

  // ---- everything around the messages -------------------------------------------------------

  updateChrome() {
    const { ui, chat } = this;
    const busy = chat.replying();
    const streaming = chat.streamingMessage();
    ui.empty.hidden = Boolean(chat.id) || chat.messages.size > 0;
    ui.typing.hidden = !(busy && !(streaming && streaming.length > 0));
    ui.stop.hidden = !busy || !chat.id;
    ui.stop.disabled = chat.stopping || !this.conn.isOpen;
    ui.stop.querySelector("span").textContent = chat.stopping ? "Stopping…" : "Stop";
    ui.loadEarlier.hidden = !(chat.loaded && chat.hasMore && !chat.loading);
    ui.historyLoading.hidden = !(chat.loaded && chat.loading);
    ui.toBottom.hidden = this.isNearBottom();
    const title = chat.missing
      ? "Conversation not found"
      : chat.id
        ? this.titleOf(chat.id) || chat.info?.title || chat.firstUserTitle() || "Conversation"
        : "New chat";
    if (ui.title.textContent !== title) ui.title.textContent = title;
    document.title = `${title} · Cortex`;
    // A search hit on an inactive branch: shown read-only, with Switch and Back (main.js).
    const readOnly = Boolean(chat.readOnlyAt);
    ui.branchBanner.hidden = !readOnly;
    ui.branchSwitch.disabled = chat.switching || !this.conn.isOpen;
    ui.list.classList.toggle("read-only", readOnly);
    this.updateSendButton();
  }

  updateSendButton() {
    const { ui, chat } = this;
    const open = this.conn.isOpen;
    const readOnly = Boolean(chat.readOnlyAt);
    ui.input.disabled = !open || readOnly;
    ui.attach.disabled = readOnly;
    const tray = this.tray; // attachments: files waiting to go, maybe still uploading
    const files = tray ? tray.ready.length : 0;
    ui.send.disabled =
      !open ||
      (!ui.input.value.trim() && !files) ||
      (tray && tray.busy) ||
      (!chat.id && this.creating()) ||
      readOnly;
    ui.input.placeholder = readOnly
      ? "Read-only: switch to this branch to reply"
      : open
        ? "Message Cortex"
        : "Waiting for the connection…";
  }

  /** Grow the message box with its text (where CSS `field-sizing` cannot). */
  autosize() {
    if (this.fieldSizing) return;
    const input = this.ui.input;
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
  }

  renderConnection(state, delay) {
    const { ui } = this;
    ui.conn.dataset.state = state;
    ui.connRetry.hidden = state !== "waiting";
    if (state === "open") ui.connText.textContent = "Connected";
    else if (state === "connecting") ui.connText.textContent = "Connecting…";
    else ui.connText.textContent = `Offline · retrying in ${Math.max(1, Math.round(delay / 1000))} s`;
  }

  announce(text) {
    this.ui.live.textContent = text;
  }

  showAlert(err) {
    this.ui.alertCode.textContent = err.code || "error";
    this.ui.alertText.textContent = err.message || "Something went wrong.";
    this.ui.alert.hidden = false;
  }
}
