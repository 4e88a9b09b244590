// Attachments on the page: the tray of files waiting to go with the next message (attach
// button, paste, drag and drop; chips with a thumbnail and an upload progress bar), and the
// files of sent messages (images shown, click to enlarge; other files as chips that download).
//
// The bytes go over the WebSocket: an `upload` frame, then binary frames, answered by
// `attachment` (docs/attachments.md). `/api/attachments/{id}` needs the bearer header, which an
// <img src> cannot send: the page fetches the bytes and shows them from blob: URLs.

import { readToken } from "./connection.js";
import { h } from "./dom.js";

const PIECE = 256 * 1024; // bytes a binary frame
const BUFFERED_MAX = 2 * 1024 * 1024; // wait for the socket to drain beyond this
const UPLOAD_TIMEOUT_MS = 120_000; // a PDF's text is read before the answer

let nextChip = 1;

/** The files waiting to go with the next message. */
export class Tray {
  constructor({ conn, list, onChange }) {
    this.conn = conn;
    this.list = list;
    this.onChange = onChange;
    this.items = [];
    this.queue = Promise.resolve(); // one upload at a time per connection
  }

  get busy() {
    return this.items.some((item) => !item.attachment && !item.error);
  }

  get ready() {
    return this.items.filter((item) => item.attachment).map((item) => item.attachment);
  }

  add(files) {
    for (const file of files) {
      const item = { key: nextChip++, file, sent: 0, attachment: null, error: null, thumb: null };
      if (file.type.startsWith("image/")) item.thumb = URL.createObjectURL(file);
      this.items.push(item);
      this.queue = this.queue.then(() => this.upload(item));
    }
    this.render();
  }

  /** Forget the tray (its attachments went with a message, or were removed). */
  clear() {
    for (const item of this.items) if (item.thumb) URL.revokeObjectURL(item.thumb);
    this.items = [];
    this.render();
  }

  remove(item) {
    item.removed = true;
    if (item.thumb) URL.revokeObjectURL(item.thumb);
    this.items = this.items.filter((other) => other !== item);
    this.render();
  }

  async upload(item) {
    if (item.removed) return;
    const { file } = item;
    this.conn.uploading = true; // the heartbeat waits: the server answers no ping mid-upload
    try {
      if (!this.conn.isOpen || !this.conn.ws) throw { code: "disconnected", message: "not connected" };
      const ws = this.conn.ws;
      const answer = this.conn.request(
        { type: "upload", filename: file.name || "pasted", size: file.size, content_type: file.type },
        UPLOAD_TIMEOUT_MS,
      );
      let failed = null;
      answer.catch((err) => (failed = err));
      for (let start = 0; start < file.size && !failed; start += PIECE) {
        const piece = await file.slice(start, start + PIECE).arrayBuffer();
        while (ws.bufferedAmount > BUFFERED_MAX) await new Promise((r) => setTimeout(r, 20));
        if (ws !== this.conn.ws) throw { code: "disconnected", message: "the connection dropped" };
        ws.send(piece);
        item.sent = start + piece.byteLength - ws.bufferedAmount;
        this.render();
      }
      const event = await answer;
      item.attachment = event.attachment;
      item.sent = file.size;
    } catch (err) {
      item.error = { code: err.code || "error", message: err.message || "upload failed" };
    } finally {
      this.conn.uploading = false;
    }
    this.render();
  }

  render() {
    this.list.hidden = this.items.length === 0;
    this.list.replaceChildren(
      ...this.items.map((item) => {
        const done = Boolean(item.attachment);
        const label = item.file.name || "pasted image";
        return h(
          "li",
          {
            class: `chip${item.error ? " chip-error" : ""}${done ? " chip-done" : ""}`,
            dataset: { key: String(item.key) },
          },
          item.thumb
            ? h("img", { class: "chip-thumb", src: item.thumb, alt: "" })
            : h("span", { class: "chip-icon", "aria-hidden": "true", text: "📄" }),
          h("span", { class: "chip-name", text: label }),
          item.error
            ? h("span", { class: "error-code", title: item.error.message, text: item.error.code })
            : h("progress", {
                class: "chip-progress",
                max: String(Math.max(item.file.size, 1)),
                value: String(done ? item.file.size : Math.max(0, item.sent)),
                "aria-label": `Uploading ${label}`,
              }),
          h("button", {
            type: "button",
            class: "chip-remove",
            "aria-label": `Remove ${label}`,
            text: "×",
            onclick: () => this.remove(item),
          }),
        );
      }),
    );
    this.onChange();
  }
}

// ---- files of sent messages ---------------------------------------------------------------------

const blobs = new Map(); // attachment id -> Promise of a blob: URL

/** The attachment's bytes as a blob: URL, fetched once with the bearer header. */
export function blobUrl(id) {
  if (!blobs.has(id)) {
    const token = readToken();
    const promise = fetch(`/api/attachments/${encodeURIComponent(id)}`, {
      headers: token ? { Authorization: `Bearer ${token}` } : {},
    }).then(async (response) => {
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      return URL.createObjectURL(await response.blob());
    });
    promise.catch(() => blobs.delete(id)); // try again next time
    blobs.set(id, promise);
  }
  return blobs.get(id);
}

/** Fill `box` with a message's attachments (once: they never change). */
export function renderAttachments(box, attachments) {
  const ids = (attachments || []).map((a) => a.id).join(",");
  if (box.dataset.ids === ids) return;
  box.dataset.ids = ids;
  box.hidden = !ids;
  box.replaceChildren(
    ...(attachments || []).map((a) => (a.kind === "image" ? imageOf(a) : fileChip(a))),
  );
}

function imageOf(a) {
  const img = h("img", { class: "att-image", alt: a.filename, title: a.filename });
  if (a.width && a.height) {
    img.width = Math.min(a.width, 240);
    img.height = Math.round((img.width * a.height) / a.width);
  }
  blobUrl(a.id).then((url) => (img.src = url), () => img.classList.add("att-missing"));
  return h(
    "button",
    { type: "button", class: "att-open", "aria-label": `Enlarge ${a.filename}`, onclick: () => enlarge(a) },
    img,
  );
}

function fileChip(a) {
  const what = a.kind === "pdf" ? `PDF, ${a.pages} pages` : "text";
  return h(
    "button",
    {
      type: "button",
      class: "chip att-file",
      title: `Download ${a.filename}`,
      onclick: () => download(a),
    },
    h("span", { class: "chip-icon", "aria-hidden": "true", text: "📄" }),
    h("span", { class: "chip-name", text: a.filename }),
    h("span", { class: "muted", text: `${what} · ${formatSize(a.size)}` }),
  );
}

async function download(a) {
  const url = await blobUrl(a.id);
  const link = h("a", { href: url, download: a.filename, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
}

function enlarge(a) {
  let dialog = document.getElementById("viewer");
  if (!dialog) {
    dialog = h(
      "dialog",
      { id: "viewer", class: "viewer", "aria-label": "Image" },
      h("img", { class: "viewer-image", alt: "" }),
      h("button", { type: "button", class: "viewer-close", text: "Close", onclick: () => dialog.close() }),
    );
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // a click beside the image
    });
    document.body.append(dialog);
  }
  const img = dialog.querySelector(".viewer-image");
  img.alt = a.filename;
  blobUrl(a.id).then((url) => (img.src = url));
  dialog.showModal();
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${Math.round(bytes / 1024)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}
