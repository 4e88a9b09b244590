// Markdown-to-DOM for model output: markdown-it (CommonMark + GFM tables and strikethrough),
// highlight.js for code, KaTeX (MathML output) for math, DOMPurify as defence in depth.
//
// Safety: markdown-it runs with raw HTML off, so `<script>` in a reply is text. Its HTML output
// is only ever parsed by DOMPurify (RETURN_DOM_FRAGMENT: an inert document, never a live node),
// then links are checked again (markdown-it's validation plus http/https/mailto only) and get
// rel="noopener noreferrer". Images never load: they become links (or text if the URL is not
// safe). Code blocks and math are built from the token text, not from HTML.
//
// highlight.js and KaTeX are loaded lazily, the first time a reply has a code block or a formula;
// until then the block shows plain text, and it is upgraded in place when the library arrives.
//
// renderMarkdown(text) returns a DocumentFragment at once. renderInto(el, text) is the streaming
// path (the view calls it at most once per animation frame): it re-renders only from the last
// top-level block on, since earlier blocks can no longer change while text is only appended.
// (Past 400 lines on purpose: parsing, the math rule, sanitising and the lazy upgrades are one
// pipeline, and each step's safety depends on the one before it.)

import MarkdownIt from "../vendor/markdown-it/markdown-it.mjs";
import DOMPurify from "../vendor/dompurify/purify.mjs";
import { h, icon } from "./dom.js";

const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const MAX_NESTING = 20; // markdown-it's block/inline nesting limit (deeper input stays text)
const HIGHLIGHT_LIMIT = 100_000; // longer code stays plain
const DETECT_SAMPLE = 2000; // language detection looks at this much of a block
const KATEX_OPTIONS = {
  output: "mathml",
  throwOnError: true,
  trust: false,
  strict: "ignore",
  maxSize: 20,
  maxExpand: 200,
};
const MATH_LIMIT = 5000; // longer formulas stay source text

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

// ---- markdown-it set-up ---------------------------------------------------------------------

const md = new MarkdownIt("default", {
  html: false,
  linkify: true,
  breaks: true, // a chat reply's single newlines are line breaks, as in other chat apps
  typographer: false,
  maxNesting: MAX_NESTING,
});
const defaultValidateLink = md.validateLink;
// Let every link through the parser so that a refused one still shows its text, not its
// source; the anchors are checked (markdown-it's rule and ours) after sanitising.
md.validateLink = () => true;
const linkAllowed = (href) => defaultValidateLink(href) && safeUrl(href) !== null;

md.use(mathPlugin);
md.core.ruler.after("block", "too_deep", tooDeep);
md.renderer.rules.too_deep = (tokens, i) => `<p class="md-raw">${md.utils.escapeHtml(tokens[i].content)}</p>`;

// markdown-it stops parsing a container nested beyond maxNesting and drops what is inside. A
// top-level block that reaches that depth is shown as its source text instead, so that
// "- - - - … x" or "> > > … x" stays readable.
function tooDeep(state) {
  const tokens = state.tokens;
  const lines = state.src.split("\n");
  const out = [];
  for (let i = 0; i < tokens.length; i++) {
    const open = tokens[i];
    if (open.level !== 0 || open.nesting !== 1) {
      out.push(open);
      continue;
    }
    let j = i;
    let deepest = 0;
    let depth = 0;
    do {
      depth += tokens[j].nesting;
      deepest = Math.max(deepest, tokens[j].level);
      j++;
    } while (j < tokens.length && depth > 0);
    if (deepest >= MAX_NESTING - 2 && open.map) {
      const token = new state.Token("too_deep", "p", 0);
      token.content = lines.slice(open.map[0], open.map[1]).join("\n");
      token.map = open.map;
      token.block = true;
      out.push(token);
    } else out.push(...tokens.slice(i, j));
    i = j - 1;
  }
  state.tokens = out;
}

// Code blocks and math are kept out of the HTML: a placeholder carries an index into env.
md.renderer.rules.fence = (tokens, i, _opts, env) => {
  const token = tokens[i];
  env.blocks.push({ kind: "code", code: token.content, lang: token.info.trim().split(/\s+/)[0] });
  return `<pre data-slot="${env.blocks.length - 1}"></pre>`;
};
md.renderer.rules.code_block = (tokens, i, _opts, env) => {
  env.blocks.push({ kind: "code", code: tokens[i].content, lang: "" });
  return `<pre data-slot="${env.blocks.length - 1}"></pre>`;
};
md.renderer.rules.math_inline = (tokens, i, _opts, env) => {
  env.blocks.push({ kind: "math", tex: tokens[i].content, display: false });
  return `<span data-slot="${env.blocks.length - 1}"></span>`;
};
md.renderer.rules.math_block = (tokens, i, _opts, env) => {
  env.blocks.push({ kind: "math", tex: tokens[i].content, display: true });
  return `<div data-slot="${env.blocks.length - 1}"></div>`;
};
// Images load nothing: a link to the image (checked like any link), labelled with its alt text.
md.renderer.rules.image = (tokens, i, opts, env, self) => {
  const token = tokens[i];
  const alt = self.renderInlineAsText(token.children, opts, env) || "image";
  const src = md.utils.escapeHtml(token.attrGet("src") || "");
  return `<a href="${src}" class="md-image">${md.utils.escapeHtml(alt)}</a>`;
};
md.renderer.rules.s_open = () => "<del>"; // ~~struck~~ text, as GFM renders it
md.renderer.rules.s_close = () => "</del>";
md.renderer.rules.table_open = () => '<div class="table-wrap"><table>';
md.renderer.rules.table_close = () => "</table></div>";
// Table alignment as a class, not a style attribute (the page's CSP has no inline styles).
for (const name of ["th_open", "td_open"]) {
  md.renderer.rules[name] = (tokens, i, opts, _env, self) => {
    const token = tokens[i];
    const style = token.attrGet("style");
    if (style) {
      token.attrs = token.attrs.filter(([key]) => key !== "style");
      const align = /text-align:(\w+)/.exec(style);
      if (align) token.attrJoin("class", `align-${align[1]}`);
    }
    return self.renderToken(tokens, i, opts);
  };
}

const PURIFY = {
  RETURN_DOM_FRAGMENT: true,
  // DOMPurify's own default with only http, https and mailto as schemes (it also applies to
  // other attributes' values, such as <ol start="3">); finish() then drops relative links.
  ALLOWED_URI_REGEXP: /^(?:(?:https?|mailto):|[^a-z]|[a-z+.-]+(?:[^a-z+.\-:]|$))/i,
  FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "iframe", "object", "embed"],
  FORBID_ATTR: ["style", "srcset"],
};

// ---- rendering ------------------------------------------------------------------------------

/** Render Markdown text into a DocumentFragment of sanitised nodes, ready to insert. */
export function renderMarkdown(text) {
  const env = { blocks: [] };
  return renderTokens(md.parse(String(text), env), env);
}

function renderTokens(tokens, env) {
  // markdown-it puts a newline after block tags; text is escaped, so ">\n" and "\n<" only occur
  // around real tags (and at the end of code, which is not in this HTML).
  const html = md.renderer.render(tokens, md.options, env).replace(/>\n/g, ">").replace(/\n</g, "<");
  const fragment = DOMPurify.sanitize(html, PURIFY);
  finish(fragment, env);
  return fragment;
}

function finish(root, env) {
  for (const a of root.querySelectorAll("a")) {
    const href = a.getAttribute("href");
    if (!href || !linkAllowed(href)) {
      a.replaceWith(...a.childNodes);
      continue;
    }
    a.setAttribute("target", "_blank");
    a.setAttribute("rel", "noopener noreferrer");
    if (a.classList.contains("md-image")) a.title = "Image (not loaded): open in a new tab";
  }
  for (const slot of root.querySelectorAll("[data-slot]")) {
    const block = env.blocks[Number(slot.dataset.slot)];
    if (!block) slot.remove();
    else if (block.kind === "code") slot.replaceWith(codeBlock(block.code, block.lang));
    else slot.replaceWith(mathNode(block.tex, block.display));
  }
  for (const li of root.querySelectorAll("li")) taskItem(li);
}

// "- [ ] todo" / "- [x] done": a disabled checkbox.
function taskItem(li) {
  const holder = li.firstChild && li.firstChild.nodeName === "P" ? li.firstChild : li;
  const first = holder.firstChild;
  if (!first || first.nodeType !== Node.TEXT_NODE) return;
  const m = /^\[([ xX])\](?=[ \t]|$)/.exec(first.data);
  if (!m) return;
  first.data = first.data.slice(3);
  li.classList.add("task");
  holder.insertBefore(h("input", { type: "checkbox", disabled: true, checked: m[1] !== " " }), first);
}

// ---- code -----------------------------------------------------------------------------------

let hljs = null;
let hljsLoading = null;
const pendingCode = new Set();
const detected = new Map();

function codeBlock(raw, lang) {
  const code = raw.endsWith("\n") ? raw.slice(0, -1) : raw;
  const language = lang.replace(/[^\w+#.-]/g, "").slice(0, 30);
  const copy = h(
    "button",
    { type: "button", class: "copy-btn", title: "Copy code" },
    icon("copy"),
    h("span", { text: "Copy" }),
  );
  copy.addEventListener("click", () => copyText(code, copy));
  const codeEl = h("code", language ? { class: `language-${language}` } : null, code);
  const label = h("span", { class: "code-lang", text: language || "text" });
  if (code.trim() && code.length <= HIGHLIGHT_LIMIT) {
    if (hljs) highlight(codeEl, label, code, language);
    else {
      pendingCode.add({ codeEl, label, code, language });
      loadHighlighter();
    }
  }
  return h("div", { class: "code-block" }, h("div", { class: "code-head" }, label, copy), h("pre", null, codeEl));
}

function loadHighlighter() {
  hljsLoading ??= import("../vendor/highlight.js/highlight.mjs").then(
    (mod) => {
      hljs = mod.default;
      hljs.configure({ ignoreUnescapedHTML: true, throwUnescapedHTML: false });
      for (const item of pendingCode) highlight(item.codeEl, item.label, item.code, item.language);
      pendingCode.clear();
    },
    (err) => console.warn("highlight.js did not load", err),
  );
}

function highlight(codeEl, label, code, language) {
  let result;
  try {
    let lang = language && hljs.getLanguage(language) ? language : null;
    if (!lang && !language) {
      // Detection looks at the start of the block, and its answer is kept for that start, so a
      // block that is still streaming in is not re-detected on every frame.
      const sample = code.slice(0, DETECT_SAMPLE);
      lang = detected.get(sample);
      if (lang === undefined) {
        lang = hljs.highlightAuto(sample).language || "";
        if (detected.size > 200) detected.clear();
        detected.set(sample, lang);
      }
      if (lang) label.textContent = lang;
    }
    if (!lang) return;
    result = hljs.highlight(code, { language: lang, ignoreIllegals: true });
  } catch {
    return;
  }
  // highlight.js escapes the code and adds only <span class="hljs-…">; sanitised all the same.
  const fragment = DOMPurify.sanitize(result.value, { RETURN_DOM_FRAGMENT: true, ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] });
  codeEl.replaceChildren(fragment);
  codeEl.classList.add("hljs");
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

// ---- math -----------------------------------------------------------------------------------

let katex = null;
let katexLoading = null;
const pendingMath = new Set();
const mathCache = new Map();

function mathNode(tex, display) {
  const el = h(display ? "div" : "span", { class: display ? "math math-display" : "math math-inline" });
  el.textContent = display ? tex : tex; // source text until KaTeX is there (or if it fails)
  el.dataset.tex = tex;
  if (katex) typeset(el, tex, display);
  else {
    pendingMath.add(el);
    katexLoading ??= import("../vendor/katex/katex.mjs").then(
      (mod) => {
        katex = mod.default;
        for (const node of pendingMath) typeset(node, node.dataset.tex, node.classList.contains("math-display"));
        pendingMath.clear();
      },
      (err) => console.warn("KaTeX did not load", err),
    );
  }
  return el;
}

function typeset(el, tex, display) {
  const key = `${display ? "D" : "I"}${tex}`;
  let cached = mathCache.get(key);
  if (cached === undefined) {
    cached = null;
    if (tex.length <= MATH_LIMIT) {
      try {
        const markup = katex.renderToString(tex, { ...KATEX_OPTIONS, displayMode: display });
        cached = DOMPurify.sanitize(markup, {
          RETURN_DOM_FRAGMENT: true,
          USE_PROFILES: { html: true, mathMl: true },
          // KaTeX keeps the TeX source in <semantics><annotation> (copy-paste, screen readers).
          ADD_TAGS: ["semantics", "annotation"],
          ADD_ATTR: ["encoding"],
          FORBID_ATTR: ["style", "href"],
        });
      } catch {
        cached = null; // a bad formula stays its source text
      }
    }
    if (mathCache.size > 500) mathCache.clear();
    mathCache.set(key, cached);
  }
  if (cached) {
    el.replaceChildren(cached.cloneNode(true));
    el.classList.remove("math-error");
  } else el.classList.add("math-error");
}

// $…$, $$…$$, \(…\) and \[…\], inline and (for $$ and \[ at the start of a line) as blocks.
function mathPlugin(mdi) {
  mdi.inline.ruler.before("escape", "math_inline", mathInline);
  mdi.block.ruler.before("fence", "math_block", mathBlock, { alt: ["paragraph", "reference", "blockquote", "list"] });
}

function mathInline(state, silent) {
  const src = state.src;
  const pos = state.pos;
  let open;
  let close;
  if (src.startsWith("\\(", pos)) [open, close] = ["\\(", "\\)"];
  else if (src.startsWith("\\[", pos)) [open, close] = ["\\[", "\\]"];
  else if (src.startsWith("$$", pos)) [open, close] = ["$$", "$$"];
  else if (src[pos] === "$") [open, close] = ["$", "$"];
  else return false;
  const start = pos + open.length;
  let end = src.indexOf(close, start);
  if (open === "$") {
    // Pandoc's rule, so that prices ("$5 and $10") stay text: no space inside the dollars, and
    // no digit right after the closing one.
    if (/\s/.test(src[start] || " ") || (pos > 0 && src[pos - 1] === "\\")) return false;
    while (end !== -1 && (src[end - 1] === "\\" || /\s/.test(src[end - 1]) || /\d/.test(src[end + 1] || ""))) {
      end = src.indexOf("$", end + 1);
    }
  }
  if (end === -1 || end === start) return false;
  // `\[` and `\(` are also CommonMark escapes: take them as math only around something
  // formula-like, so that "\[\\\]" stays escaped punctuation.
  if (open[0] === "\\" && !/[\p{L}\p{N}]/u.test(src.slice(start, end))) return false;
  if (!silent) {
    const token = state.push("math_inline", "math", 0);
    token.markup = open;
    token.content = src.slice(start, end);
  }
  state.pos = end + close.length;
  return true;
}

function mathBlock(state, startLine, endLine, silent) {
  let pos = state.bMarks[startLine] + state.tShift[startLine];
  let max = state.eMarks[startLine];
  if (state.sCount[startLine] - state.blkIndent >= 4) return false;
  const first = state.src.slice(pos, max);
  let close;
  if (first.startsWith("$$")) close = "$$";
  else if (first.startsWith("\\[")) close = "\\]";
  else return false;
  if (silent) return true;
  let body = first.slice(2);
  let line = startLine;
  let found = false;
  const lines = [];
  // A formula on one line: $$ x $$ (anything after the closing marker keeps it inline instead).
  const sameLine = body.indexOf(close);
  if (sameLine !== -1) {
    if (body.slice(sameLine + 2).trim()) return false;
    lines.push(body.slice(0, sameLine));
    found = true;
  } else {
    if (body.trim()) lines.push(body);
    while (!found && ++line < endLine) {
      pos = state.bMarks[line] + state.tShift[line];
      max = state.eMarks[line];
      if (pos < max && state.sCount[line] < state.blkIndent) break;
      const text = state.src.slice(pos, max);
      const at = text.indexOf(close);
      if (at !== -1) {
        if (text.slice(at + 2).trim()) return false;
        lines.push(text.slice(0, at));
        found = true;
      } else lines.push(text);
    }
    // Still streaming (or never closed): a $$ block runs to the end, shown as its source. An
    // unclosed \[ is left to the other rules, since \[ is also a CommonMark escape.
    if (!found && close === "\\]") return false;
  }
  if (close === "\\]" && !/[\p{L}\p{N}]/u.test(lines.join(""))) return false;
  state.line = Math.min(line + 1, endLine);
  const token = state.push("math_block", "math", 0);
  token.block = true;
  token.content = lines.join("\n").trim();
  token.markup = close;
  token.map = [startLine, state.line];
  return true;
}

// ---- streaming ------------------------------------------------------------------------------

const streams = new WeakMap();
const REFERENCE_DEF = /^ {0,3}\[[^\]\n]+\]:/m;

/**
 * Show `text` in `el`. The page's view already renders at most once per animation frame (see
 * view.js: deltas mark a message dirty, one requestAnimationFrame renders them), so this renders
 * at once; while text only grows, the blocks before the last top-level one are kept and only the
 * rest is parsed and rendered again.
 */
export function renderInto(el, text) {
  let state = streams.get(el);
  if (!state) {
    state = { text: null, parts: [], env: null };
    streams.set(el, state);
  }
  update(el, state, String(text));
}

function update(el, state, text) {
  if (text === state.text) return;
  const parts = state.parts;
  const last = parts[parts.length - 1];
  const incremental =
    state.text !== null && last && text.startsWith(state.text) && parts.every((p) => p.nodes.every((n) => n.parentNode === el));
  let from = 0;
  let kept = [];
  if (incremental) {
    from = last.offset;
    kept = parts.slice(0, -1);
    for (const node of last.nodes) node.remove();
  } else {
    el.replaceChildren();
    state.env = { blocks: [], references: {} };
  }
  const env = state.env;
  // Reference definitions from the blocks kept stay in env.references.
  env.blocks = [];
  const tail = text.slice(from);
  if (incremental && REFERENCE_DEF.test(tail)) {
    // A link reference definition still arriving can turn "[x]" in an earlier block into a
    // link (and its URL is still growing): render the whole reply again, with fresh references.
    state.text = null;
    state.parts = [];
    update(el, state, text);
    return;
  }
  const tokens = md.parse(tail, env);
  const lineStarts = [0];
  for (let i = tail.indexOf("\n"); i !== -1; i = tail.indexOf("\n", i + 1)) lineStarts.push(i + 1);
  const fragment = renderTokens(tokens, env);
  const starts = tokens.filter((t) => t.level === 0 && t.nesting !== -1 && t.map).map((t) => from + lineStarts[t.map[0]]);
  const nodes = [...fragment.childNodes];
  const newParts = [];
  if (starts.length === nodes.length && starts.length) {
    nodes.forEach((node, i) => newParts.push({ offset: starts[i], nodes: [node] }));
  } else if (nodes.length) newParts.push({ offset: starts[0] ?? from, nodes });
  el.append(fragment);
  state.parts = kept.concat(newParts);
  state.text = text;
}
