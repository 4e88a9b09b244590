// DOM for one message. Untrusted text only ever reaches the page as text nodes or through the
// Markdown renderer (which builds nodes itself); nothing here touches innerHTML.

import { renderAttachments } from "./attachments.js";
import { h, icon } from "./dom.js";
import { renderInto } from "./markdown.js";

const STATUS_NOTES = {
  cancelled: "Stopped",
  interrupted: "Interrupted: the server stopped before this reply was finished.",
};

const ERROR_TEXT = {
  provider_error: "The model provider returned an error.",
  provider_timeout: "The model provider did not answer in time.",
  tool_error: "A tool failed.",
  rate_limited: "Too many messages; wait a moment.",
  internal: "Something went wrong on the server.",
};

const shown = new WeakMap(); // <li> -> the message it shows (for the copy button)

// What the branch buttons do (session.js), set once by main.js: edit(msg, text),
// regenerate(msg), switchTo(id), fork(msg).
let actions = null;
export function setActions(value) {
  actions = value;
}

function actionButton(label, title, onclick, cls = "") {
  return h(
    "button",
    { type: "button", class: `action-btn ${cls}`.trim(), title, onclick },
    h("span", { class: "action-label", text: label }),
  );
}

/** "‹ n/m ›" for a message with siblings: the other versions of it, by seq. */
function renderBranchNav(nav, msg) {
  nav.replaceChildren();
  const siblings = Array.isArray(msg.sibling_ids) ? msg.sibling_ids : [];
  const at = siblings.indexOf(msg.id);
  nav.hidden = siblings.length < 2 || at < 0;
  if (nav.hidden) return;
  const go = (offset) => () => actions && actions.switchTo(siblings[at + offset]);
  const prev = h("button", {
    type: "button",
    class: "branch-btn",
    "aria-label": "Previous version",
    text: "‹",
    onclick: go(-1),
  });
  const next = h("button", {
    type: "button",
    class: "branch-btn",
    "aria-label": "Next version",
    text: "›",
    onclick: go(1),
  });
  prev.disabled = at === 0;
  next.disabled = at === siblings.length - 1;
  nav.append(prev, h("span", { class: "branch-pos", text: `${at + 1}/${siblings.length}` }), next);
}

/** Edit a user message in place: Enter sends the new version, Escape puts the text back. */
function startEdit(li) {
  const msg = shown.get(li);
  const bubble = li.querySelector(".bubble");
  if (!msg || !actions || bubble.querySelector(".edit-box")) return;
  const box = h("textarea", { class: "edit-box", "aria-label": "Edit your message", rows: 3 });
  box.value = msg.content;
  const text = li.querySelector(".user-text");
  text.hidden = true;
  const stop = () => {
    box.remove();
    text.hidden = false;
    li.querySelector(".edit-btn").focus();
  };
  box.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.preventDefault();
      stop();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      const value = box.value;
      if (!value.trim()) return;
      stop();
      actions.edit(msg, value);
    }
  });
  bubble.append(box);
  box.focus();
}

/** A new, empty list item for `msg`; fill it with updateMessage(). */
export function createMessage(msg) {
  const li = h("li", { class: `msg msg-${msg.kind}`, dataset: { id: msg.id } });
  if (msg.kind === "user") {
    li.append(
      h("h3", { class: "sr-only", text: "You said:" }),
      h("div", { class: "bubble" }, h("div", { class: "user-text" })),
      h("div", { class: "attachments", hidden: true }),
      h("div", { class: "msg-foot" }),
      h(
        "div",
        { class: "msg-actions" },
        h("div", { class: "branch-nav" }),
        actionButton("Edit", "Edit this message", () => startEdit(li), "edit-btn branch-action"),
        actionButton("Fork", "Fork: a new conversation up to here", () => fork(li), "branch-action"),
      ),
    );
  } else if (msg.kind === "notice") {
    li.setAttribute("role", "alert");
    li.append(
      h(
        "div",
        { class: "notice" },
        h("span", { class: "error-code" }),
        h("span", { class: "notice-text" }),
      ),
    );
  } else {
    li.append(
      h("div", { class: "avatar", "aria-hidden": "true" }, h("span", { text: "C" })),
      h(
        "div",
        { class: "msg-body" },
        h("h3", { class: "sr-only", text: "Cortex said:" }),
        h("div", { class: "md" }),
        h("div", { class: "tools" }),
        h("div", { class: "msg-foot" }),
        h(
          "div",
          { class: "msg-actions" },
          h(
            "button",
            {
              type: "button",
              class: "action-btn",
              title: "Copy reply",
              onclick: (event) => copyReply(li, event.currentTarget),
            },
            icon("copy"),
            h("span", { class: "action-label", text: "Copy" }),
          ),
          actionButton("Regenerate", "Another reply", () => regenerate(li), "regen-btn branch-action"),
          actionButton("Fork", "Fork: a new conversation up to here", () => fork(li), "branch-action"),
          h("div", { class: "branch-nav" }),
        ),
      ),
    );
  }
  return li;
}

/**
 * Bring `li` up to date with `msg`. `tools` is the list of tool calls to show under it:
 * [{id, name, arguments, state: running|ok|error, result, error}].
 */
export function updateMessage(li, msg, tools) {
  shown.set(li, msg);
  li.dataset.id = msg.id;
  li.dataset.status = msg.status || "";
  if (msg.seq !== undefined && msg.seq !== null) li.dataset.seq = String(msg.seq);
  if (msg.kind === "user") {
    const text = li.querySelector(".user-text");
    if (text.textContent !== msg.content) text.textContent = msg.content;
    renderAttachments(li.querySelector(".attachments"), msg.attachments);
    const foot = li.querySelector(".msg-foot");
    foot.replaceChildren();
    if (msg.local) {
      foot.append(
        msg.failed
          ? h("span", { class: "error-code", text: msg.failed.code })
          : h("span", { class: "muted", text: msg.retrying ? "Waiting for the connection…" : "Sending…" }),
      );
      if (msg.failed) foot.append(" ", h("span", { text: msg.failed.message }));
    }
    li.classList.toggle("pending", Boolean(msg.local && !msg.failed));
    li.querySelector(".msg-actions").hidden = Boolean(msg.local);
    renderBranchNav(li.querySelector(".branch-nav"), msg);
    return;
  }
  if (msg.kind === "notice") {
    li.querySelector(".error-code").textContent = msg.code;
    li.querySelector(".notice-text").textContent = msg.content;
    return;
  }
  const md = li.querySelector(".md");
  const content = msg.kind === "tool" ? "" : msg.content;
  if (msg.renderedContent !== content) {
    renderInto(md, content); // at most once per frame, re-rendering only the last block
    msg.renderedContent = content;
  }
  md.hidden = !content;
  const busy = msg.status === "streaming" || msg.status === "queued";
  li.setAttribute("aria-busy", busy ? "true" : "false");
  renderTools(li.querySelector(".tools"), tools);
  const foot = li.querySelector(".msg-foot");
  foot.replaceChildren();
  if (msg.kind === "tool") {
    // the tool's own outcome is shown in its folded details
  } else if (msg.status === "error" || msg.error_code) {
    foot.append(
      h("span", { class: "error-code", text: msg.error_code || "error" }),
      " ",
      h("span", { text: msg.errorText || ERROR_TEXT[msg.error_code] || "The reply failed." }),
    );
  } else if (STATUS_NOTES[msg.status]) {
    foot.append(h("span", { class: "muted", text: STATUS_NOTES[msg.status] }));
  }
  foot.hidden = !foot.firstChild;
  li.querySelector(".msg-actions").hidden = msg.kind !== "assistant" || busy;
  li.querySelector(".msg-actions .action-btn").hidden = !content; // Copy
  if (msg.kind === "assistant") renderBranchNav(li.querySelector(".branch-nav"), msg);
}

function regenerate(li) {
  const msg = shown.get(li);
  if (msg && actions) actions.regenerate(msg);
}

function fork(li) {
  const msg = shown.get(li);
  if (msg && actions) actions.fork(msg);
}

async function copyReply(li, button) {
  const msg = shown.get(li);
  const label = button.querySelector(".action-label");
  try {
    await navigator.clipboard.writeText(msg ? msg.content : "");
    label.textContent = "Copied";
  } catch {
    label.textContent = "Copy failed";
  }
  setTimeout(() => {
    label.textContent = "Copy";
  }, 1500);
}

function renderTools(container, tools) {
  const open = new Set();
  for (const d of container.querySelectorAll("details[open]")) open.add(d.dataset.callId);
  container.replaceChildren();
  container.hidden = tools.length === 0;
  for (const tool of tools) {
    const state = tool.state || "running";
    const stateText = { running: "Running…", ok: "Done", error: "Failed" }[state];
    const summary = h(
      "summary",
      null,
      icon("tool"),
      h(
        "span",
        null,
        "Used ",
        h("code", { text: tool.name || "tool" }),
        ...(tool.server ? [" on ", h("span", { class: "tool-server", text: tool.server })] : []),
      ),
      h("span", { class: `tool-state tool-${state}`, text: stateText }),
    );
    const body = h("div", { class: "tool-body" });
    body.append(h("div", { class: "tool-label", text: "Arguments" }), pre(pretty(tool.arguments)));
    if (state !== "running") {
      body.append(
        h("div", { class: "tool-label", text: state === "error" ? "Error" : "Result" }),
        pre(state === "error" ? tool.error || pretty(tool.result) : pretty(tool.result)),
      );
    }
    const details = h(
      "details",
      { class: "tool", dataset: { callId: tool.id }, open: open.has(tool.id) },
      summary,
      body,
    );
    container.append(details);
  }
}

function pre(text) {
  return h("pre", null, h("code", null, text));
}

function pretty(value) {
  if (value === undefined || value === null) return "";
  if (typeof value === "string") {
    try {
      return JSON.stringify(JSON.parse(value), null, 2);
    } catch {
      return value;
    }
  }
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}
