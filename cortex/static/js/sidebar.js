// The list of the user's conversations, newest activity first, grouped by day.

import { h } from "./dom.js";

const PAGE = 50;
const MAX_PAGE = 200;

export class Sidebar {
  constructor({ conn, list, more, onError }) {
    this.conn = conn;
    this.list = list;
    this.more = more;
    this.onError = onError;
    this.items = [];
    this.hasMore = false;
    this.activeId = null;
    this.loading = false;
    this.timer = null;
    this.listeners = new Set();
    more.addEventListener("click", () => this.loadMore());
  }

  onChange(fn) {
    this.listeners.add(fn);
  }

  titleOf(id) {
    const item = this.items.find((c) => c.id === id);
    return item ? item.title : null;
  }

  /** Reload the first pages (as many items as are shown now). */
  async refresh() {
    if (!this.conn.isOpen) return;
    const limit = Math.min(MAX_PAGE, Math.max(PAGE, this.items.length));
    try {
      const page = await this.conn.request({ type: "conversations", limit });
      this.items = page.items || [];
      this.hasMore = Boolean(page.has_more);
      this.render();
    } catch (err) {
      if (err.code !== "disconnected") this.onError(err);
    }
  }

  /** Refresh soon, once, however many times this is called meanwhile. */
  refreshSoon(delay = 250) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delay);
  }

  async loadMore() {
    if (this.loading || !this.hasMore || !this.items.length || !this.conn.isOpen) return;
    this.loading = true;
    this.more.disabled = true;
    try {
      const before = this.items[this.items.length - 1].id;
      const page = await this.conn.request({ type: "conversations", before, limit: PAGE });
      const known = new Set(this.items.map((c) => c.id));
      this.items.push(...(page.items || []).filter((c) => !known.has(c.id)));
      this.hasMore = Boolean(page.has_more);
      this.render();
    } catch (err) {
      if (err.code !== "disconnected") this.onError(err);
    } finally {
      this.loading = false;
      this.more.disabled = false;
    }
  }

  /** Show a conversation this page just created, before the server's list has it. */
  addLocal(id, title) {
    if (this.items.some((c) => c.id === id)) return;
    const now = new Date().toISOString();
    this.items.unshift({ id, title, created_at: now, updated_at: now, last_seq: 1 });
    this.render();
  }

  /** A conversation's new state (a `conversation` event: renamed, configured, titled). */
  update(id, conv) {
    const item = this.items.find((c) => c.id === id);
    if (!item) {
      // New to this list: made in another tab, or a fork (the user's topic told every tab).
      this.refreshSoon();
      return;
    }
    Object.assign(item, conv, { id });
    // In place: a rename or configure does not move a conversation, and focus stays put.
    const link = this.list.querySelector(`a[data-id="${CSS.escape(id)}"]`);
    if (link) {
      link.title = item.title || "";
      link.querySelector(".conv-title").textContent = item.title || "Untitled";
    }
    for (const fn of this.listeners) fn();
  }

  /** A conversation was deleted. */
  remove(id) {
    const count = this.items.length;
    this.items = this.items.filter((c) => c.id !== id);
    if (this.items.length !== count) this.render();
  }

  setActive(id) {
    this.activeId = id;
    for (const a of this.list.querySelectorAll("a[data-id]")) {
      if (a.dataset.id === id) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
  }

  render() {
    const groups = new Map();
    for (const item of this.items) {
      const label = dayGroup(item.updated_at);
      if (!groups.has(label)) groups.set(label, []);
      groups.get(label).push(item);
    }
    const nodes = [];
    for (const [label, items] of groups) {
      nodes.push(
        h(
          "li",
          { class: "conv-group" },
          h("h2", { class: "conv-group-title", text: label }),
          h(
            "ul",
            { role: "list" },
            items.map((item) =>
              h(
                "li",
                null,
                h(
                  "a",
                  {
                    class: "conv-link",
                    href: `#c=${encodeURIComponent(item.id)}`,
                    dataset: { id: item.id },
                    "aria-current": item.id === this.activeId ? "page" : null,
                    title: item.title,
                  },
                  h("span", { class: "conv-title", text: item.title || "Untitled" }),
                ),
              ),
            ),
          ),
        ),
      );
    }
    if (!nodes.length) {
      nodes.push(h("li", { class: "conv-empty", text: "No conversations yet." }));
    }
    this.list.replaceChildren(...nodes);
    this.more.hidden = !this.hasMore;
    for (const fn of this.listeners) fn();
  }
}

function dayGroup(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "Earlier";
  const startOfToday = new Date();
  startOfToday.setHours(0, 0, 0, 0);
  const days = Math.floor((startOfToday - when) / 86400000) + 1;
  if (when >= startOfToday) return "Today";
  if (days <= 1) return "Yesterday";
  if (days <= 7) return "Previous 7 days";
  if (days <= 30) return "Previous 30 days";
  return when.toLocaleDateString(undefined, { year: "numeric", month: "long" });
}
