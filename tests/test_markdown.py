"""The reply renderer (static/js/markdown.js: markdown-it, DOMPurify, highlight.js, KaTeX).

The browser tests run in Debian's Chromium against a real server, with tests/test_browser.py's
fixtures. The checksum test needs no browser.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, Request

# The browser fixtures, shared with the chat page's tests (pytest looks them up by name here).
from test_browser import OpenTab, browser, chromium, open_tab, open_url

FIXTURES = (browser, chromium, open_tab, open_url)

VENDOR = Path(__file__).resolve().parent.parent / "cortex" / "static" / "vendor"


def test_vendored_files_match_their_recorded_checksums() -> None:
    """scripts/vendor.sh records a SHA-256 for each vendored file; nothing else may change them."""
    recorded: dict[str, str] = {}
    for line in (VENDOR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        recorded[name] = digest
    present = {str(p.relative_to(VENDOR)) for p in VENDOR.rglob("*") if p.is_file()} - {
        "SHA256SUMS"
    }
    assert present == set(recorded), "vendored files differ from SHA256SUMS: run scripts/vendor.sh"
    for name, digest in recorded.items():
        actual = hashlib.sha256((VENDOR / name).read_bytes()).hexdigest()
        assert actual == digest, f"{name} does not match its checksum: run scripts/vendor.sh"
    for library in ("markdown-it", "dompurify", "highlight.js", "katex"):
        assert (VENDOR / library / "LICENSE").is_file(), library


# Renders each text into its own element on the page, waits until the lazily loaded libraries
# (highlight.js, KaTeX) have had their chance, and reports what came out and how long it took.
RENDER = """async (texts) => {
  const { renderMarkdown } = await import("/static/js/markdown.js");
  const out = [];
  for (const text of texts) {
    const el = document.createElement("div");
    el.className = "md";
    document.getElementById("messages").append(el);
    const t0 = performance.now();
    el.append(renderMarkdown(text));
    void el.offsetHeight;
    out.push({ el, ms: performance.now() - t0 });
  }
  await new Promise((r) => setTimeout(r, 300));
  for (let i = 0; i < 100 && document.querySelector(".md pre code:not(.hljs)"); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }
  return out.map(({ el, ms }) => ({
    html: el.innerHTML,
    text: el.textContent,
    ms,
    height: el.getBoundingClientRect().height,
    width: el.scrollWidth,
  }));
}"""

LOADED = """async () => {
  const { renderMarkdown } = await import("/static/js/markdown.js");
  const el = document.createElement("div");
  el.append(renderMarkdown("```\\nx = 1\\n```\\n\\n$x$"));
  document.getElementById("messages").append(el);
  for (let i = 0; i < 300 && !(el.querySelector("code.hljs") && el.querySelector("math")); i++) {
    await new Promise((r) => setTimeout(r, 20));
  }
  el.remove();
}"""


async def render(page: Page, texts: list[str]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = await page.evaluate(RENDER, texts)
    return result


def watch_requests(page: Page) -> list[str]:
    """Every request the page makes that leaves its own origin."""
    origin = page.url.split("/", 3)[:3]
    foreign: list[str] = []

    def check(request: Request) -> None:
        if request.url.split("/", 3)[:3] != origin and not request.url.startswith("data:"):
            foreign.append(request.url)

    page.on("request", check)
    return foreign


def attribute_names(html: str) -> list[str]:
    names: list[str] = []
    for attrs in re.findall(r'<[a-z][\w-]*((?:\s+[\w:-]+(?:="[^"]*")?)*)\s*/?>', html):
        names += re.findall(r'\s([\w:-]+)(?:="[^"]*")?', attrs)
    return names


HOSTILE = {
    "script": "<script>window.__xss=1</script> after",
    "img onerror": '<img src=x onerror="window.__xss=2"> after',
    "javascript link": "[x](javascript:window.__xss=3) and [y](javascript:alert(1))",
    "javascript autolink": "<javascript:window.__xss=4> and <https://ok.example/>",
    "data link": "[d](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==) d2",
    "vbscript link": "[v](vbscript:msgbox(1)) [f](file:///etc/passwd)",
    "reference link": "[r][1]\n\n[1]: javascript:window.__xss=5",
    "remote image": "![tracker](https://tracker.example/p.gif) and ![x](data:image/png;base64,AA)",
    "html in fence": (
        '```html\n<script>window.__xss=6</script><img src=x onerror="window.__xss=7">\n```'
    ),
    "html in inline code": "`<img src=x onerror=window.__xss=8>`",
    "entities": (
        "&lt;script&gt;window.__xss=9&lt;/script&gt; &#x3C;img src=x onerror=alert(1)&#x3E;"
    ),
    "link title": '[t](https://e.example "x\\" onmouseover=\\"window.__xss=10")',
    "svg": "<svg onload=window.__xss=11><circle r=5></circle></svg>",
    "math href": r"$\href{javascript:window.__xss=12}{click}$ and $$\url{javascript:alert(1)}$$",
    "math includegraphics": r"$\includegraphics{https://tracker.example/i.png}$",
    "math html": r"$\htmlClass{x}{y}\htmlStyle{color:red}{z}\htmlData{a=b}{c}$",
}


@pytest.mark.browser
async def test_hostile_replies_stay_inert_and_local(open_tab: OpenTab) -> None:
    """No script runs and no request leaves the origin, with the page's CSP turned off."""
    tab = await open_tab(bypass_csp=True)
    page = tab.page
    foreign = watch_requests(page)
    await page.evaluate(LOADED)
    results = await render(page, list(HOSTILE.values()))
    for (name, _text), out in zip(HOSTILE.items(), results, strict=True):
        # (the Copy button's icon is the page's own SVG)
        html = re.sub(r'<svg viewBox="0 0 24 24" class="icon".*?</svg>', "", out["html"])
        for bad in ("<script", "<img", "<svg", "<iframe"):
            assert bad not in html, (name, html)
        assert not [a for a in attribute_names(html) if a.startswith("on")], (name, html)
        for url in re.findall(r'\s(?:href|src|action|formaction|xlink:href)="([^"]*)"', html):
            assert re.match(r"(https?|mailto):", url), (name, url)
        assert out["text"].strip(), name
    by_name = dict(zip(HOSTILE, results, strict=True))
    assert "<script>window.__xss=1</script>" in by_name["script"]["text"]
    assert "<script>window.__xss=6</script>" in by_name["html in fence"]["text"]
    assert 'href="https://ok.example/"' in by_name["javascript autolink"]["html"]
    image = by_name["remote image"]["html"]
    assert 'class="md-image"' in image and "tracker" in by_name["remote image"]["text"]
    assert 'rel="noopener noreferrer"' in image
    await page.wait_for_timeout(300)
    assert await page.evaluate("typeof window.__xss") == "undefined"
    assert await page.locator("#messages img, #messages script, #messages iframe").count() == 0
    assert foreign == []


def nested(prefix: str, depth: int) -> str:
    return prefix * depth + "deep"


HUGE = {
    "200 KB line": "word *emph* `c` [l](https://e.example) " * 5000,
    "10,000 nested lists": nested("- ", 10_000),
    "10,000 nested ordered lists": nested("1. ", 10_000),
    "10,000 nested quotes": nested("> ", 10_000),
    "10,000 quote lines": "\n".join(">" * i + " q" for i in range(1, 2000)),
    "50,000 *": "*" * 50_000,
    "50,000 * in text": "a" + "*" * 50_000 + "b",
    "25,000 *x pairs": "*x " * 25_000,
    "50,000 _ and [": "_a [" * 12_500,
    "50,000 backticks": "`" * 50_000 + "x",
    "exponential macros": (
        r"$$\def\a{\b\b}\def\b{\c\c}\def\c{\d\d}\def\d{\e\e}\def\e{\f\f}\def\f{\g\g}"
        r"\def\g{\h\h}\def\h{\i\i}\def\i{xxxxxxxx}\a\a\a\a\a\a\a\a$$"
    ),
    "recursive macro": r"$\def\x{\x\x}\x$",
    "huge size": r"$\rule{10000em}{10000em}\kern{99999em}\Huge\sizing x$",
    "many formulas": " ".join(f"$x_{{{i}}}^2$" for i in range(2000)),
}


@pytest.mark.browser
async def test_huge_and_deep_input_stays_fast_and_readable(open_tab: OpenTab) -> None:
    page = (await open_tab()).page
    foreign = watch_requests(page)
    await page.evaluate(LOADED)
    started = time.monotonic()
    results = await render(page, list(HUGE.values()))
    assert time.monotonic() - started < 20
    for (name, _text), out in zip(HUGE.items(), results, strict=True):
        assert out["ms"] < 3000, (name, out["ms"])
        # Readable: the text is there and the block is not blown up beyond the page.
        assert out["text"].strip() or out["html"] == "<hr>", name
        assert out["width"] < 5000, (name, out["width"])
        assert out["height"] < 2_000_000, (name, out["height"])
    by_name = dict(zip(HUGE, results, strict=True))
    assert "deep" in by_name["10,000 nested lists"]["text"]
    assert "deep" in by_name["10,000 nested quotes"]["text"]
    # A formula KaTeX refuses (too many expansions) stays its source, marked, not an error box.
    assert "math-error" in by_name["exponential macros"]["html"]
    assert r"\def\a" in by_name["exponential macros"]["text"]
    assert "math-error" in by_name["recursive macro"]["html"]
    # The page still answers at once.
    t0 = time.monotonic()
    assert await page.evaluate("1 + 1") == 2
    assert time.monotonic() - t0 < 1
    assert foreign == []


MATH = {
    "dollar": "energy $E = mc^2$ here",
    "double dollar": "$$\n\\int_0^1 x\\,dx = \\frac{1}{2}\n$$",
    "paren": "inline \\(a^2 + b^2\\) too",
    "bracket": "\\[\n\\sqrt{2}\n\\]",
    "prices": "it costs $5 and $10, or $ 3 $",
    "escaped": "not \\$x\\$ math",
    "bad": "$\\frac{1}{$ and $\\badmacro{x}$",
    "code": "`$x$` stays code",
    "unclosed block": "$$\n\\sum_{i",
}


@pytest.mark.browser
async def test_math_in_four_notations_with_katex_mathml(open_tab: OpenTab) -> None:
    tab = await open_tab()  # with the page's CSP: MathML output needs no inline style
    results = dict(zip(MATH, await render(tab.page, list(MATH.values())), strict=True))
    for name in ("dollar", "double dollar", "paren", "bracket"):
        assert "<math" in results[name]["html"], (name, results[name]["html"])
    assert 'display="block"' in results["double dollar"]["html"]
    assert 'display="block"' in results["bracket"]["html"]
    assert "<math" not in results["prices"]["html"]
    assert results["prices"]["text"] == "it costs $5 and $10, or $ 3 $"
    assert "<math" not in results["escaped"]["html"]
    assert results["escaped"]["text"] == "not $x$ math"
    assert "<math" not in results["code"]["html"]
    assert "<code>$x$</code>" in results["code"]["html"]
    bad = results["bad"]
    assert bad["html"].count("math-error") == 2 and "\\frac{1}{" in bad["text"], bad
    assert "\\sum_{i" in results["unclosed block"]["text"]
    assert "style=" not in "".join(r["html"] for r in results.values())


@pytest.mark.browser
async def test_code_is_highlighted_with_label_and_copy(open_tab: OpenTab) -> None:
    page = (await open_tab()).page
    texts = [
        "```python\ndef f(x):\n    return 'a' + x  # c\n```",
        "```\nfunction add(a, b) {\n  return a + b;\n}\nconst x = add(1, 2);\n```",
        "```nosuchlanguage\nplain <b>text</b>\n```",
    ]
    python, detected, unknown = await render(page, texts)
    assert '<span class="code-lang">python</span>' in python["html"]
    assert '<span class="hljs-keyword">def</span>' in python["html"]
    assert '<span class="hljs-string">' in python["html"]
    assert 'class="copy-btn"' in python["html"]
    assert "hljs-keyword" in detected["html"], detected["html"]
    assert '<span class="code-lang">text</span>' not in detected["html"]
    assert '<span class="code-lang">nosuchlanguage</span>' in unknown["html"]
    assert "plain &lt;b&gt;text&lt;/b&gt;" in unknown["html"]


# Streams a reply in small deltas through renderInto (as the page does) and compares the result
# with a one-shot render of the whole text, and every intermediate state with a one-shot render
# of that prefix.
STREAM = """async ({ text, delta }) => {
  const { renderInto, renderMarkdown } = await import("/static/js/markdown.js");
  const el = document.createElement("div");
  document.getElementById("messages").append(el);
  const oneShot = (t) => {
    const d = document.createElement("div");
    d.append(renderMarkdown(t));
    return d.innerHTML;
  };
  const mismatches = [];
  for (let end = delta; end < text.length + delta; end += delta) {
    const part = text.slice(0, end);
    renderInto(el, part);
    const want = oneShot(part);
    if (el.innerHTML !== want && mismatches.length < 5) {
      mismatches.push({ part, got: el.innerHTML, want });
    }
  }
  return mismatches;
}"""

STREAMED = """# Streaming

Some *text* with $x^2$ and a [link][ref].

- one
- two

  still two

- three

```python
def f():
    return 1
```

| a | b |
|---|---|
| 1 | 2 |
| 3 | 4 |

$$
\\frac{1}{2}
$$

Setext heading
--------------

> quote
continued lazily

1. first
2. second
    indented code?

    code

[ref]: https://example.com/ref
final paragraph with [ref] again.
"""


@pytest.mark.browser
async def test_streamed_render_equals_one_shot_render(open_tab: OpenTab) -> None:
    page = (await open_tab()).page
    await page.evaluate(LOADED)
    for delta in (1, 5, 13):
        mismatches = await page.evaluate(STREAM, {"text": STREAMED, "delta": delta})
        assert mismatches == [], (delta, mismatches[:1])


# A sample of CommonMark 0.31.2 spec examples (no raw HTML), with the spec's HTML; the renderer
# adds its own chrome (code-block header, table wrapper, link targets), so the check compares
# the text and the main elements rather than the exact markup.
SPEC_SAMPLE = [
    ("Foo *bar*\n=========\n", "<h1>Foo <em>bar</em></h1>"),
    ("    a simple\n      indented code block\n", "a simple\n  indented code block"),
    (
        "\\!\\\"\\#\\$\\%\\&\\'\\(\\)\\*\\+\\,\\-\\.\\/\\:\\;\\<\\=\\>\\?\\@\\[\\\\\\]\\^\\_\\`\\{\\|\\}\\~\n",
        "<p>!\"#$%&amp;'()*+,-./:;&lt;=&gt;?@[\\]^_`{|}~</p>",
    ),
    ("&nbsp; &amp; &copy; &AElig; &Dcaron;\n", "<p>&nbsp; &amp; © Æ Ď</p>"),
    ('[link](/uri "title")\n', "<p>link</p>"),
    (
        '[foo]: https://e.example/url "title"\n\n[foo]\n',
        '<p><a href="https://e.example/url" title="title" target="_blank" '
        'rel="noopener noreferrer">foo</a></p>',
    ),
    ("*foo**bar**baz*\n", "<p><em>foo<strong>bar</strong>baz</em></p>"),
    ("**foo*bar*baz**\n", "<p><strong>foo<em>bar</em>baz</strong></p>"),
    ("*(**foo**)*\n", "<p><em>(<strong>foo</strong>)</em></p>"),
    ("__foo, __bar__, baz__\n", "<p><strong>foo, <strong>bar</strong>, baz</strong></p>"),
    ("- foo\n\n  bar\n", "<ul><li><p>foo</p><p>bar</p></li></ul>"),
    ("> # Foo\n> bar\n> baz\n", "<blockquote><h1>Foo</h1><p>bar<br>baz</p></blockquote>"),
    ("`` foo ` bar ``\n", "<p><code>foo ` bar</code></p>"),
    ("***\n---\n___\n", "<hr><hr><hr>"),
    ("Foo\nbar\n---\nbaz\n", "<h2>Foo<br>bar</h2><p>baz</p>"),
]


@pytest.mark.browser
async def test_commonmark_spec_sample(open_tab: OpenTab) -> None:
    page = (await open_tab()).page
    results = await render(page, [md for md, _ in SPEC_SAMPLE])
    for (markdown, want), out in zip(SPEC_SAMPLE, results, strict=True):
        if want.startswith("<"):
            assert out["html"] == want, (markdown, out["html"])
        else:
            assert want in out["text"], (markdown, out["text"])
