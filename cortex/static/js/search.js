// The search box: Ctrl+K (or `/` in an empty composer) opens it, results come as you type
// (debounced), and a click opens the conversation at that message. Hits are built from text
// nodes and <mark> elements made from the server's [start, end) `highlights`: nothing of the
// payload is ever parsed as HTML.

import { h } from "./dom.js";

const DEBOUNCE_MS = 200;
const LIMIT = 20;

/** `text` as nodes, with the [start, end) `ranges` in <mark>. */
export function highlighted(text, ranges) {
  const nodes = [];
  let at = 0;
  const sorted = (Array.isArray(ranges) ? ranges : [])
    .filter((r) => Array.isArray(r) && Number.isInteger(r[0]) && Number.isInteger(r[1]))
    .sort((a, b) => a[0] - b[0]);
  for (const [start, end] of sorted) {
    if (start < at || end <= start || end > text.length) continue;
    if (start > at) nodes.push(text.slice(at, start));
    nodes.push(h("mark", { text: text.slice(start, end) }));
    at = end;
  }
  if (at < text.length) nodes.push(text.slice(at));
  return nodes;
}

export class SearchBox {
  /** `onOpen(hit)`: the user chose a hit. */
  constructor({ conn, ui, onOpen }) {
    this.conn = conn;
    this.ui = ui;
    this.onOpen = onOpen;
    this.timer = 0;
    this.asked = 0; // the latest request: older answers are dropped
    this.cursor = null;
    this.returnFocus = null;
    ui.input.addEventListener("input", () => this.schedule());
    ui.input.addEventListener("keydown", (event) => this.onKey(event));
    ui.results.addEventListener("keydown", (event) => this.onKey(event));
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      const first = ui.results.querySelector("button");
      if (first) first.click();
    });
    ui.close.addEventListener("click", () => this.close(true));
    ui.more.addEventListener("click", () => this.run(this.cursor));
  }

  get isOpen() {
    return !this.ui.panel.hidden;
  }

  open() {
    const { ui } = this;
    if (!this.isOpen) this.returnFocus = document.activeElement;
    ui.panel.hidden = false;
    ui.input.focus();
    ui.input.select();
  }

  close(restoreFocus) {
    this.ui.panel.hidden = true;
    clearTimeout(this.timer);
    if (restoreFocus && this.returnFocus && this.returnFocus.focus) this.returnFocus.focus();
  }

  schedule() {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.run(null), DEBOUNCE_MS);
  }

  onKey(event) {
    if (event.key === "Escape") {
      event.preventDefault();
      this.close(true);
      return;
    }
    if (event.key !== "ArrowDown" && event.key !== "ArrowUp") return;
    const buttons = [...this.ui.results.querySelectorAll("button")];
    if (!buttons.length) return;
    event.preventDefault();
    const at = buttons.indexOf(document.activeElement);
    const next = event.key === "ArrowDown" ? at + 1 : at - 1;
    if (next < 0) this.ui.input.focus();
    else buttons[Math.min(next, buttons.length - 1)].focus();
  }

  async run(cursor) {
    const { ui, conn } = this;
    const query = ui.input.value;
    const asked = ++this.asked;
    if (!query.trim()) {
      ui.results.replaceChildren();
      ui.status.textContent = "";
      ui.more.hidden = true;
      return;
    }
    if (!conn.isOpen) {
      ui.status.textContent = "Not connected.";
      return;
    }
    const frame = { type: "search", query, limit: LIMIT };
    if (cursor) frame.cursor = cursor;
    try {
      const page = await conn.request(frame);
      if (asked !== this.asked) return;
      this.render(page, Boolean(cursor));
    } catch (err) {
      if (asked !== this.asked) return;
      ui.results.replaceChildren();
      ui.more.hidden = true;
      ui.status.textContent =
        err.code === "too_large" ? "That search is too long." : String(err.message || err.code);
    }
  }

  render(page, append) {
    const { ui } = this;
    const items = Array.isArray(page.items) ? page.items : [];
    const rows = items.map((hit) => this.row(hit));
    if (append) ui.results.append(...rows);
    else ui.results.replaceChildren(...rows);
    this.cursor = typeof page.next_cursor === "string" ? page.next_cursor : null;
    ui.more.hidden = !this.cursor;
    const shown = ui.results.childElementCount;
    ui.status.textContent = shown
      ? `${shown}${this.cursor ? "+" : ""} result${shown === 1 ? "" : "s"}`
      : "No results.";
  }

  row(hit) {
    const title = String(hit.conversation_title || "Untitled");
    const where = hit.kind === "title" ? "title" : String(hit.role || hit.kind);
    const snippet = String(hit.snippet || "");
    return h(
      "li",
      { class: "search-hit" },
      h(
        "button",
        {
          type: "button",
          dataset: { conversation: String(hit.conversation_id), seq: String(hit.seq ?? "") },
          onclick: () => this.onOpen(hit),
        },
        h(
          "span",
          { class: "search-hit-head" },
          h("span", { class: "search-hit-title", text: title }),
          h("span", { class: "muted", text: where }),
        ),
        h("span", { class: "search-snippet" }, highlighted(snippet, hit.highlights)),
      ),
    );
  }
}
