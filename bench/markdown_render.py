"""The chat page's Markdown renderer while a long reply streams in, old against new, in Chromium.

    .venv/bin/python bench/markdown_render.py [--chars 20000] [--delta 5] [--repeat 3] [--json]

A 20,000-character reply (prose, lists, fenced code in several languages, tables, inline and
display math) arrives in 5-character deltas. Each delta is one animation frame, as on the page
(view.js renders dirty messages once per frame): the frame's render time is the renderer's call
plus the style and layout it forces (`offsetHeight`), measured with performance.now().

- old: bench/markdown_old.js, the hand-written renderer before issue 19, used as the page used
  it: `el.replaceChildren(renderMarkdown(text))` on every frame (a full re-render).
- new: cortex/static/js/markdown.js, `renderInto(el, text)`: markdown-it + DOMPurify, with
  highlight.js and KaTeX, re-rendering only from the last top-level block.

highlight.js and KaTeX are loaded (lazily, as on the page) by a warm-up render before the timed
run, so the frames measure rendering, not the one-off module load, which is printed separately.
Totals are the sum of the frames' render times: the main-thread time the renderer costs.

The page is served from the files themselves through Playwright's request routing on a made-up
origin (no server, no network); Debian's Chromium, never a downloaded browser.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import statistics
from pathlib import Path
from typing import Any

from playwright.async_api import Route, async_playwright

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "cortex" / "static"
OLD = Path(__file__).resolve().parent / "markdown_old.js"
ORIGIN = "http://bench.invalid"
CHROMIUM = "/usr/bin/chromium"

SECTION = r"""## Part {n}: measuring a stream

The renderer sees **{n} sections** so far; each adds *a little* of everything, with `inline code`,
a [link](https://example.com/{n}) and the energy $E = mc^2$ of a mass $m_{n}$.

1. Parse the reply with markdown-it.
2. Sanitise the HTML with DOMPurify:
   - links are checked twice;
   - images never load.
3. Highlight code and typeset math.

```python
def mean(values: list[float]) -> float:
    total = 0.0
    for value in values:
        total += value
    return total / len(values)  # section {n}
```

| step | time (ms) | share |
|:-----|----------:|:-----:|
| parse | 1.{n} | 40 % |
| sanitise | 0.{n} | 30 % |
| layout | 0.5 | 30 % |

The mean of $n$ values is

$$
\bar{{x}} = \frac{{1}}{{n}} \sum_{{i=1}}^{{n}} x_i
$$

and in JavaScript:

```js
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
console.log(mean([1, 2, 3]), "section {n}");
```

> A quoted remark, with \(\sqrt{{2}} \approx 1.414\) inline.

"""


def reply(chars: int) -> str:
    text = ""
    n = 1
    while len(text) < chars:
        text += SECTION.replace("{{", "\x00").replace("}}", "\x01").replace("{n}", str(n))
        n += 1
    return text.replace("\x00", "{").replace("\x01", "}")[:chars]


PAGE = """<!doctype html><html><head><meta charset="utf-8">
<link rel="stylesheet" href="/static/app.css"></head>
<body><main style="width: 760px"><div id="old" class="md"></div><div id="new" class="md"></div>
</main></body></html>"""

RUN = """async ({ text, delta, which }) => {
  const el = document.getElementById(which);
  el.replaceChildren();
  const frame = () => new Promise((resolve) => requestAnimationFrame(resolve));
  let render;
  if (which === "old") {
    const { renderMarkdown } = await import("/static/js/markdown_old.js");
    render = (t) => el.replaceChildren(renderMarkdown(t));
  } else {
    const { renderInto } = await import("/static/js/markdown.js");
    render = (t) => renderInto(el, t);
  }
  const times = [];
  for (let end = delta; end < text.length + delta; end += delta) {
    await frame();
    const t0 = performance.now();
    render(text.slice(0, end));
    void el.offsetHeight;
    times.push(performance.now() - t0);
  }
  const result = { times, html: el.innerHTML.length };
  el.replaceChildren();
  return result;
}"""

WARM = """async (text) => {
  const t0 = performance.now();
  const { renderMarkdown } = await import("/static/js/markdown.js");
  const el = document.getElementById("new");
  el.append(renderMarkdown(text));
  // highlight.js and KaTeX load on first use; wait until both have upgraded the blocks.
  for (let i = 0; i < 200; i++) {
    const done = el.querySelector("code.hljs") && el.querySelector(".math math");
    if (done) break;
    await new Promise((r) => setTimeout(r, 10));
  }
  const ms = performance.now() - t0;
  el.replaceChildren();
  return ms;
}"""


async def serve(route: Route) -> None:
    path = route.request.url.removeprefix(ORIGIN).split("?")[0]
    if path == "/":
        await route.fulfill(body=PAGE, content_type="text/html")
        return
    if path == "/static/js/markdown_old.js":
        file = OLD
    else:
        file = (STATIC / path.removeprefix("/static/")).resolve()
        if STATIC not in file.parents or not file.is_file():
            await route.fulfill(status=404, body="")
            return
    if file.suffix in (".js", ".mjs"):
        kind = "text/javascript"
    else:
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    await route.fulfill(body=file.read_bytes(), content_type=kind)


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {
        "frames": len(times),
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(pct(0.95), 3),
        "max_ms": round(ordered[-1], 3),
        "total_ms": round(sum(times), 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars", type=int, default=20_000)
    parser.add_argument("--delta", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    text = reply(args.chars)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        page = await browser.new_page(viewport={"width": 1000, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.route("**/*", serve)
        await page.goto(f"{ORIGIN}/")
        load_ms = await page.evaluate(WARM, text)
        runs: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(args.repeat):
            for which in ("old", "new"):
                result: dict[str, Any] = await page.evaluate(
                    RUN, {"text": text, "delta": args.delta, "which": which}
                )
                runs[which].extend(result["times"])
        await browser.close()
    if errors:
        raise SystemExit(f"page errors: {errors}")

    out = {
        "chars": len(text),
        "delta": args.delta,
        "repeat": args.repeat,
        "lazy_load_ms": round(load_ms, 1),
        "old": summary(runs["old"]),
        "new": summary(runs["new"]),
    }
    for which in ("old", "new"):
        out[which]["total_ms"] = round(out[which]["total_ms"] / args.repeat, 1)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"{len(text)} characters in {args.delta}-character deltas, one render per frame, "
        f"{args.repeat} run(s) of each (frame = render + forced layout)"
    )
    print(f"first use of highlight.js + KaTeX (module load, once): {out['lazy_load_ms']} ms")
    head = ("renderer", "frames", "p50 ms", "p95 ms", "max ms", "total ms")
    print(f"{head[0]:<10}{head[1]:>8}{head[2]:>10}{head[3]:>10}{head[4]:>10}{head[5]:>12}")
    for which, label in (("old", "old"), ("new", "new")):
        s = out[which]
        print(
            f"{label:<10}{s['frames'] // args.repeat:>8}{s['p50_ms']:>10}{s['p95_ms']:>10}"
            f"{s['max_ms']:>10}{s['total_ms']:>12}"
        )
    print("(total ms: main-thread time the renderer costs for one whole reply)")


if __name__ == "__main__":
    asyncio.run(main())
