"""CommonMark conformance of the chat page's renderer, in Chromium.

    .venv/bin/python scripts/commonmark.py [--spec spec.txt] [--show N]

Takes the examples of the CommonMark spec (0.31.2, from the npm package `commonmark-spec`,
fetched with `npm pack` unless --spec is given), leaves out the sections about raw HTML
("HTML blocks", "Raw HTML": the page never renders raw HTML), and counts how many give the spec's
HTML:

- markdown-it: the vendored markdown-it alone, `commonmark` preset with `html: false`;
- renderMarkdown: the page's renderer, after undoing its own chrome (the code block's header,
  the table wrapper, link targets, images shown as links) and with a line break (`<br>`) taken
  as equal to a soft line break, since the page renders single newlines as breaks on purpose;
  and once more with links compared by their text, since the page turns relative links (most of
  the spec's) into text on purpose.

Both sides are compared after the same normalisation (the browser's serialisation, whitespace
around block tags dropped, other runs of whitespace collapsed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from playwright.async_api import Route, async_playwright

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "cortex" / "static"
ORIGIN = "http://spec.invalid"
SPEC_VERSION = "0.31.2"
SKIP_SECTIONS = {"HTML blocks", "Raw HTML"}

EXAMPLE = re.compile(r"^`{32} example\n([\s\S]*?)^\.\n([\s\S]*?)^`{32}$|^#{1,6} *(.*)$", re.M)


def examples(spec: str) -> list[dict[str, Any]]:
    spec = re.sub(r"^<!-- END TESTS -->[\s\S]*", "", spec.replace("\r\n", "\n"), flags=re.M)
    out: list[dict[str, Any]] = []
    section = ""
    number = 0
    for m in EXAMPLE.finditer(spec):
        if m.group(3) is not None:
            section = m.group(3)
            continue
        number += 1
        out.append(
            {
                "number": number,
                "section": section,
                "markdown": m.group(1).replace("→", "\t"),
                "html": m.group(2).replace("→", "\t"),
            }
        )
    return out


def fetch_spec() -> str:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["npm", "pack", "--silent", "--ignore-scripts", f"commonmark-spec@{SPEC_VERSION}"],
            cwd=tmp,
            check=True,
            capture_output=True,
        )
        tgz = next(Path(tmp).glob("*.tgz"))
        subprocess.run(["tar", "xzf", str(tgz), "-C", tmp], check=True)
        return (Path(tmp) / "package" / "spec.txt").read_text()


CHECK = r"""async (cases) => {
  const { default: MarkdownIt } = await import("/static/vendor/markdown-it/markdown-it.mjs");
  const { renderMarkdown } = await import("/static/js/markdown.js");
  const plain = new MarkdownIt("commonmark", { html: false });
  const BLOCK = "p|ul|ol|li|blockquote|h[1-6]|pre|hr|table|thead|tbody|tr|th|td|div";
  const around = new RegExp(`\\s*(</?(?:${BLOCK})\\b[^>]*>)\\s*`, "g");
  const norm = (html, breaks) => {
    const t = document.createElement("template");
    t.innerHTML = html;
    let s = t.innerHTML;
    if (breaks) s = s.replace(/<br>\s*/g, "\n");
    return s.replace(around, "$1").replace(/\s+/g, " ").trim();
  };
  const unlink = (s) =>
    s.replace(/<\/?a\b[^>]*>/g, "").replace(/<img\b[^>]*alt="([^"]*)"[^>]*>/g, "$1");
  const unchrome = (frag) => {
    const d = document.createElement("div");
    d.append(frag);
    for (const block of d.querySelectorAll(".code-block")) {
      const code = block.querySelector("pre code");
      const pre = document.createElement("pre");
      const c = document.createElement("code");
      const lang = [...code.classList].find((x) => x.startsWith("language-"));
      if (lang) c.className = lang;
      c.textContent = code.textContent ? code.textContent + "\n" : "";
      pre.append(c);
      block.replaceWith(pre);
    }
    for (const w of d.querySelectorAll(".table-wrap")) w.replaceWith(...w.childNodes);
    for (const a of d.querySelectorAll("a")) {
      a.removeAttribute("target");
      a.removeAttribute("rel");
      if (a.classList.contains("md-image")) {
        const img = document.createElement("img");
        img.setAttribute("src", a.getAttribute("href"));
        img.setAttribute("alt", a.textContent);
        a.replaceWith(img);
      }
    }
    return d.innerHTML;
  };
  return cases.map((c) => {
    const want = norm(c.html, false);
    const wantBr = norm(c.html, true);
    return {
      number: c.number,
      plain: norm(plain.render(c.markdown), false) === want,
      page: norm(unchrome(renderMarkdown(c.markdown)), true) === wantBr,
      got: norm(unchrome(renderMarkdown(c.markdown)), true),
      // the same, with links and images reduced to their text on both sides
      pageTextLinks:
        unlink(norm(unchrome(renderMarkdown(c.markdown)), true)) === unlink(wantBr),
      want: wantBr,
    };
  });
}"""


async def serve(route: Route) -> None:
    path = route.request.url.removeprefix(ORIGIN).split("?")[0]
    if path == "/":
        await route.fulfill(body="<!doctype html><title>spec</title>", content_type="text/html")
        return
    file = (STATIC / path.removeprefix("/static/")).resolve()
    if STATIC not in file.parents or not file.is_file():
        await route.fulfill(status=404, body="")
        return
    await route.fulfill(body=file.read_bytes(), content_type="text/javascript")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, help="spec.txt (default: npm pack commonmark-spec)")
    parser.add_argument("--show", type=int, default=0, help="print N of the page's misses")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec = args.spec.read_text() if args.spec else fetch_spec()
    everything = examples(spec)
    cases = [c for c in everything if c["section"] not in SKIP_SECTIONS]
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"]
        )
        page = await browser.new_page()
        await page.route("**/*", serve)
        await page.goto(f"{ORIGIN}/")
        results: list[dict[str, Any]] = await page.evaluate(CHECK, cases)
        await browser.close()
    plain = sum(r["plain"] for r in results)
    ours = sum(r["page"] for r in results)
    ours_links = sum(r["pageTextLinks"] for r in results)
    summary = {
        "spec": SPEC_VERSION,
        "examples": len(everything),
        "without_raw_html": len(cases),
        "markdown_it": plain,
        "render_markdown": ours,
        "render_markdown_links_as_text": ours_links,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"CommonMark {SPEC_VERSION}: {len(cases)} of {len(everything)} examples without raw "
            f"HTML\n  markdown-it (commonmark preset, html off): {plain}\n"
            f"  renderMarkdown (page chrome undone, <br> = soft break): {ours}\n"
            f"  renderMarkdown, links compared as text (the page keeps only absolute http, "
            f"https and mailto links): {ours_links}"
        )
    misses = [r for r in results if not r["page"]]
    for r in misses[: args.show]:
        print(f"\n#{r['number']}\n  want {r['want']!r}\n  got  {r['got']!r}")


if __name__ == "__main__":
    asyncio.run(main())
