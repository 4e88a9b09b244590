// The chat page's hand-written renderer before markdown-it (issue 19), kept only so that
// bench/markdown_render.py can compare it with the new one in the same run.

// A small, safe Markdown-to-DOM renderer for model output.
//
// It never parses HTML: every piece of text becomes a text node (textContent / append(string)),
// so `<script>` or `<img onerror=...>` in the input shows up as text. Links are kept only for
// http:, https: and mailto: URLs and open with rel="noopener noreferrer".
//
// Supported: ATX headings, paragraphs (single newlines are line breaks), fenced code blocks
// (``` or ~~~, an unclosed fence runs to the end, which suits text still streaming), block
// quotes, ordered / unordered / task lists with nesting, tables (GFM), horizontal rules; inline
// code, **bold**, *italic*, ~~strike~~, [links](url), <autolinks> and bare URLs.

import { h, icon } from "./dom.js"; // served at /static/js/markdown_old.js by bench/markdown_render.py

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const MAX_DEPTH = 10;
const EMPHASIS_WINDOW = 4000; // how far to look for a closing delimiter

const FENCE = /^( {0,3})(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
const FENCE_CLOSE = /^ {0,3}(`{3,}|~{3,})[ \t]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const HR = /^ {0,3}(?:(?:-[ \t]*){3,}|(?:\*[ \t]*){3,}|(?:_[ \t]*){3,})$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
const TABLE_SEP = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const TASK = /^\[([ xX])\][ \t]+/;
const PUNCT = /[!-/:-@[-`{-~]/;
const WORD = /[\p{L}\p{N}]/u;
const AUTOLINK = /<((?:https?:\/\/|mailto:)[^\s<>]+)>/y;
const BARE_URL = /https?:\/\/[^\s<>"'`]+/y;

/** The URL if it is absolute http(s) or mailto, else null. */
export function safeUrl(raw) {
  const text = String(raw).trim();
  if (!text || /[\u0000-\u0020\u007f]/.test(text)) return null;
  let url;
  try {
    url = new URL(text);
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
}

/** Render Markdown text into a DocumentFragment of freshly built nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
  renderBlocks(lines, fragment, 0);
  return fragment;
}

// ---- blocks ---------------------------------------------------------------------------------

function renderBlocks(lines, parent, depth) {
  if (depth > MAX_DEPTH) {
    parent.append(h("p", null, lines.join("\n")));
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) {
      i++;
      continue;
    }
    let m = FENCE.exec(line);
    if (m) {
      const indent = m[1].length;
      const marker = m[2];
      const body = [];
      i++;
      while (i < lines.length) {
        const close = FENCE_CLOSE.exec(lines[i]);
        if (close && close[1][0] === marker[0] && close[1].length >= marker.length) {
          i++;
          break;
        }
        body.push(stripIndent(lines[i], indent));
        i++;
      }
      parent.append(codeBlock(body.join("\n"), m[3] || ""));
      continue;
    }
    m = HEADING.exec(line);
    if (m) {
      parent.append(inline(h(`h${m[1].length}`), m[2] || "", depth));
      i++;
      continue;
    }
    if (HR.test(line)) {
      parent.append(h("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && lines[i].trim()) {
        const q = QUOTE.exec(lines[i]);
        if (!q && startsBlock(lines, i)) break;
        inner.push(q ? q[1] : lines[i]);
        i++;
      }
      const quote = h("blockquote");
      renderBlocks(inner, quote, depth + 1);
      parent.append(quote);
      continue;
    }
    if (ITEM.test(line)) {
      i = renderList(lines, i, parent, depth);
      continue;
    }
    if (isTableStart(lines, i)) {
      i = renderTable(lines, i, parent, depth);
      continue;
    }
    const para = [line.trim()];
    i++;
    while (i < lines.length && lines[i].trim() && !startsBlock(lines, i)) {
      para.push(lines[i].trim());
      i++;
    }
    parent.append(inline(h("p"), para.join("\n"), depth));
  }
}

function stripIndent(line, indent) {
  let n = 0;
  while (n < indent && line[n] === " ") n++;
  return line.slice(n);
}

function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE.test(line) ||
    HEADING.test(line) ||
    HR.test(line) ||
    QUOTE.test(line) ||
    ITEM.test(line) ||
    isTableStart(lines, i)
  );
}

function isTableStart(lines, i) {
  return (
    i + 1 < lines.length &&
    lines[i].includes("|") &&
    lines[i + 1].includes("|") &&
    lines[i + 1].includes("-") &&
    TABLE_SEP.test(lines[i + 1])
  );
}

function renderList(lines, start, parent, depth) {
  const first = ITEM.exec(lines[start]);
  const base = first[1].length;
  const ordered = /\d/.test(first[2]);
  const list = h(ordered ? "ol" : "ul");
  if (ordered) {
    const n = parseInt(first[2], 10);
    if (n !== 1) list.setAttribute("start", String(n));
  }
  const items = [];
  let loose = false;
  let i = start;
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length < base || m[1].length > base + 1 || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = m[1].length + m[2].length + 1;
    const body = [m[3] || ""];
    let blank = false;
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) {
        blank = true;
        body.push("");
        i++;
        continue;
      }
      const indent = line.length - line.trimStart().length;
      if (indent >= base + 2) {
        if (blank) loose = loose || !ITEM.test(line);
        body.push(line.slice(Math.min(indent, contentIndent)));
        blank = false;
        i++;
        continue;
      }
      if (blank || ITEM.test(line) || startsBlock(lines, i)) break;
      body.push(line.trim()); // lazy continuation of the item's paragraph
      i++;
    }
    while (body.length && !body[body.length - 1].trim()) body.pop();
    if (blank && i < lines.length) {
      const next = ITEM.exec(lines[i]);
      if (next && next[1].length >= base && next[1].length <= base + 1) loose = true;
    }
    items.push(body);
  }
  for (const body of items) {
    const li = h("li");
    const task = TASK.exec(body[0]);
    if (task) {
      body[0] = body[0].slice(task[0].length);
      li.className = "task";
      li.append(
        h("input", { type: "checkbox", disabled: true, checked: task[1] !== " " }),
        " ",
      );
    }
    renderBlocks(body, li, depth + 1);
    if (!loose) {
      for (const p of li.querySelectorAll(":scope > p")) p.replaceWith(...p.childNodes);
    }
    list.append(li);
  }
  parent.append(list);
  return i;
}

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith("|")) s = s.slice(1);
  if (s.endsWith("|") && !s.endsWith("\\|")) s = s.slice(0, -1);
  const cells = [];
  let cur = "";
  let code = false;
  for (let k = 0; k < s.length; k++) {
    const c = s[k];
    if (c === "\\" && s[k + 1] === "|") {
      cur += "|";
      k++;
      continue;
    }
    if (c === "`") code = !code;
    if (c === "|" && !code) {
      cells.push(cur.trim());
      cur = "";
      continue;
    }
    cur += c;
  }
  cells.push(cur.trim());
  return cells;
}

function renderTable(lines, start, parent, depth) {
  const head = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((c) => {
    if (c.startsWith(":") && c.endsWith(":")) return "center";
    if (c.endsWith(":")) return "right";
    return "";
  });
  const cell = (tag, text, col) =>
    inline(h(tag, aligns[col] ? { class: `align-${aligns[col]}` } : null), text || "", depth);
  const thead = h("thead", null, h("tr", null, head.map((text, col) => cell("th", text, col))));
  const tbody = h("tbody");
  let i = start + 2;
  while (i < lines.length && lines[i].trim() && lines[i].includes("|")) {
    const cells = splitRow(lines[i]);
    tbody.append(h("tr", null, head.map((_, col) => cell("td", cells[col], col))));
    i++;
  }
  parent.append(h("div", { class: "table-wrap" }, h("table", null, thead, tbody)));
  return i;
}

function codeBlock(code, lang) {
  const language = lang.replace(/[^\w+#.-]/g, "").slice(0, 30);
  const copy = h(
    "button",
    { type: "button", class: "copy-btn", title: "Copy code" },
    icon("copy"),
    h("span", { text: "Copy" }),
  );
  copy.addEventListener("click", () => copyText(code, copy));
  return h(
    "div",
    { class: "code-block" },
    h("div", { class: "code-head" }, h("span", { class: "code-lang", text: language || "text" }), copy),
    h("pre", null, h("code", language ? { class: `language-${language}` } : null, code)),
  );
}

async function copyText(text, button) {
  const label = button.querySelector("span");
  try {
    await navigator.clipboard.writeText(text);
    label.textContent = "Copied";
  } catch {
    label.textContent = "Copy failed";
  }
  setTimeout(() => {
    label.textContent = "Copy";
  }, 1500);
}

// ---- inline ---------------------------------------------------------------------------------

function inline(el, text, depth, noLinks = false) {
  appendInline(el, text, depth, noLinks);
  return el;
}

function runLength(s, i, ch) {
  let j = i;
  while (s[j] === ch) j++;
  return j - i;
}

function appendInline(parent, s, depth, noLinks) {
  if (depth > MAX_DEPTH) {
    parent.append(s);
    return;
  }
  let buf = "";
  const flush = () => {
    if (buf) {
      parent.append(buf);
      buf = "";
    }
  };
  let i = 0;
  while (i < s.length) {
    const c = s[i];
    if (c === "\\" && i + 1 < s.length && PUNCT.test(s[i + 1])) {
      buf += s[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.append(h("br"));
      i++;
      continue;
    }
    if (c === "`") {
      const run = runLength(s, i, "`");
      const close = findBackticks(s, i + run, run);
      if (close !== -1) {
        flush();
        let code = s.slice(i + run, close).replace(/\n/g, " ");
        if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ") && code.trim()) {
          code = code.slice(1, -1);
        }
        parent.append(h("code", null, code));
        i = close + run;
        continue;
      }
      buf += s.slice(i, i + run);
      i += run;
      continue;
    }
    if (!noLinks && (c === "[" || (c === "!" && s[i + 1] === "["))) {
      const image = c === "!";
      const link = parseLink(s, image ? i + 1 : i);
      if (link) {
        flush();
        const href = safeUrl(link.href);
        const label = link.text || (image ? "image" : link.href);
        if (href) {
          const a = h("a", { href, target: "_blank", rel: "noopener noreferrer" });
          if (image) a.append(label);
          else appendInline(a, label, depth + 1, true);
          parent.append(a);
        } else {
          appendInline(parent, label, depth + 1, true);
        }
        i = link.end;
        continue;
      }
    }
    if (!noLinks && c === "<") {
      AUTOLINK.lastIndex = i;
      const m = AUTOLINK.exec(s);
      const href = m && safeUrl(m[1]);
      if (href) {
        flush();
        parent.append(link(href, m[1]));
        i = AUTOLINK.lastIndex;
        continue;
      }
    }
    if (!noLinks && (c === "h" || c === "H") && (i === 0 || !WORD.test(s[i - 1]))) {
      BARE_URL.lastIndex = i;
      const m = BARE_URL.exec(s);
      if (m) {
        let url = m[0].replace(/[.,:;!?*_~]+$/, "");
        if (url.endsWith(")") && !url.includes("(")) url = url.slice(0, -1);
        const href = safeUrl(url);
        if (href && url.length > 8) {
          flush();
          parent.append(link(href, url));
          i += url.length;
          continue;
        }
      }
    }
    if (c === "*" || c === "_" || c === "~") {
      const em = parseEmphasis(s, i);
      if (em) {
        flush();
        parent.append(inline(h(em.tag), em.inner, depth + 1, noLinks));
        i = em.end;
        continue;
      }
      const run = runLength(s, i, c);
      buf += s.slice(i, i + run);
      i += run;
      continue;
    }
    buf += c;
    i++;
  }
  flush();
}

function link(href, text) {
  return h("a", { href, target: "_blank", rel: "noopener noreferrer" }, text);
}

function findBackticks(s, from, run) {
  let j = from;
  while (j < s.length) {
    j = s.indexOf("`", j);
    if (j === -1) return -1;
    const len = runLength(s, j, "`");
    if (len === run) return j;
    j += len;
  }
  return -1;
}

function parseLink(s, i) {
  // s[i] === "["; find the matching "]" then "(" destination [title] ")".
  let depth = 0;
  let j = i;
  for (; j < s.length && j - i < EMPHASIS_WINDOW; j++) {
    const c = s[j];
    if (c === "\\") {
      j++;
      continue;
    }
    if (c === "[") depth++;
    else if (c === "]") {
      depth--;
      if (depth === 0) break;
    } else if (c === "\n" && s[j + 1] === "\n") return null;
  }
  if (s[j] !== "]" || s[j + 1] !== "(") return null;
  const text = s.slice(i + 1, j);
  let k = j + 2;
  while (s[k] === " ") k++;
  let href = "";
  if (s[k] === "<") {
    const end = s.indexOf(">", k);
    if (end === -1) return null;
    href = s.slice(k + 1, end);
    k = end + 1;
  } else {
    let parens = 0;
    const begin = k;
    for (; k < s.length; k++) {
      const c = s[k];
      if (/\s/.test(c)) break;
      if (c === "(") parens++;
      else if (c === ")") {
        if (parens === 0) break;
        parens--;
      }
    }
    href = s.slice(begin, k);
  }
  while (s[k] === " ") k++;
  if (s[k] === '"' || s[k] === "'") {
    const end = s.indexOf(s[k], k + 1);
    if (end === -1) return null;
    k = end + 1;
    while (s[k] === " ") k++;
  }
  if (s[k] !== ")") return null;
  return { text, href, end: k + 1 };
}

function parseEmphasis(s, i) {
  const c = s[i];
  const run = runLength(s, i, c);
  let size;
  let tag;
  if (c === "~") {
    if (run !== 2) return null;
    size = 2;
    tag = "del";
  } else {
    size = run >= 2 ? 2 : 1;
    tag = size === 2 ? "strong" : "em";
  }
  const open = i + size;
  const next = s[open];
  if (!next || /\s/.test(next)) return null;
  if (c === "_" && i > 0 && WORD.test(s[i - 1])) return null; // snake_case is not emphasis
  const delim = c.repeat(size);
  const limit = Math.min(s.length, open + EMPHASIS_WINDOW);
  let j = open + (run > size ? run - size : 0);
  while (j < limit) {
    j = s.indexOf(delim, j);
    if (j === -1 || j >= limit) return null;
    const runEnd = j + runLength(s, j, c);
    const closeRun = runEnd - j;
    const prev = s[j - 1];
    let k = -1;
    if (prev && !/\s/.test(prev) && prev !== "\\") {
      if (size === 1) {
        if (closeRun === 1) k = j;
        else if (closeRun >= 3) k = runEnd - 1;
      } else {
        k = closeRun >= 3 ? runEnd - 2 : j;
      }
    }
    if (k > open && !(c === "_" && WORD.test(s[k + size] || ""))) {
      return { tag, inner: s.slice(open, k), end: k + size };
    }
    j = runEnd;
  }
  return null;
}
