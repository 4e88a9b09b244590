"""The browser chat page (static/) in headless Chromium, against a real server and fake provider.

Debian's Chromium (`apt-get install chromium`) is driven by Playwright's Python API; a browser is
never downloaded. The page keeps its strict CSP (no inline script or style) except in the XSS
test, which turns CSP off so that only the page's own rendering stands between model output and
script execution.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import TIMEOUT, Client
from playwright.async_api import Browser, Page, WebSocketRoute, async_playwright, expect

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
# The README's picture is refreshed only on request (CORTEX_UPDATE_SCREENSHOT=1), so that a test
# run never changes a tracked file; otherwise the screenshot is still taken, into a temp folder.
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
WAIT_MS = TIMEOUT * 1000
expect.set_options(timeout=WAIT_MS)

# Records every distinct text of the newest assistant reply as the page renders it; installed
# before any page script runs (and again after a reload).
RECORD_RENDERS = """
window.__renders = [];
new MutationObserver(() => {
  const nodes = document.querySelectorAll("#messages .msg-assistant .md");
  const text = nodes.length ? nodes[nodes.length - 1].textContent : "";
  const seen = window.__renders;
  if (text && seen[seen.length - 1] !== text) seen.push(text);
}).observe(document, { subtree: true, childList: true, characterData: true });
"""

MARKDOWN_REPLY = """## Counting words in a file

64 KiB is $64 \\times 2^{10}$ = **65,536 bytes**. To count words, read the file *line by line* \
so that even a large file stays cheap:

```python
from collections import Counter

def count_words(path: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            counts.update(line.lower().split())
    return counts
```

- `counts.most_common(10)` gives the ten most frequent words.
- Pass `errors="replace"` to `open()` when the file may not be valid UTF-8.

See the [collections docs](https://docs.python.org/3/library/collections.html) for more."""

CODE = MARKDOWN_REPLY.split("```python\n")[1].split("\n```")[0]


@dataclass
class Tab:
    """A page plus what went wrong in it (console errors, uncaught exceptions, CSP reports)."""

    page: Page
    errors: list[str] = field(default_factory=list)
    sockets: list[str] = field(default_factory=list)
    allowed_errors: tuple[str, ...] = ()


@pytest.fixture
def chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `apt-get install -y chromium` "
            "(these tests drive Debian's Chromium and never download a browser)",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture
async def browser(chromium: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        instance = await pw.chromium.launch(
            executable_path=str(chromium), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


OpenUrl = Callable[..., Awaitable[Tab]]
OpenTab = Callable[..., Awaitable[Tab]]


@pytest.fixture
async def open_url(browser: Browser) -> AsyncIterator[OpenUrl]:
    """Open a page in a new browser context; fail the test on any page error it does not allow."""
    tabs: list[Tab] = []

    async def _open(
        url: str,
        *,
        connected: bool = True,
        record: bool = False,
        route_ws: Callable[[WebSocketRoute], Any] | None = None,
        **context_options: Any,
    ) -> Tab:
        context = await browser.new_context(**context_options)
        if record:
            await context.add_init_script(script=RECORD_RENDERS)
        page = await context.new_page()
        if route_ws is not None:
            await page.route_web_socket(re.compile(r"/ws(\?|$)"), route_ws)
        tab = Tab(page)
        page.on(
            "console",
            lambda m: tab.errors.append(f"console: {m.text}") if m.type == "error" else None,
        )
        page.on("pageerror", lambda e: tab.errors.append(f"pageerror: {e}"))
        page.on("websocket", lambda ws: tab.sockets.append(ws.url))
        tabs.append(tab)
        await page.goto(url)
        if connected:
            await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
        return tab

    yield _open
    problems = [
        error
        for tab in tabs
        for error in tab.errors
        if not any(allowed in error for allowed in tab.allowed_errors)
    ]
    for tab in tabs:
        await tab.page.context.close()
    assert not problems, problems


@pytest.fixture
def open_tab(server: Cortex, open_url: OpenUrl) -> OpenTab:
    """Open the chat page of the `server` fixture, at `hash_`, and wait until it is connected.

    `server` comes first so that it stops after the pages are closed, not under them.
    """

    async def _open(hash_: str = "", **options: Any) -> Tab:
        return await open_url(f"http://127.0.0.1:{server.port}/{hash_}", **options)

    return _open


async def send(page: Page, text: str) -> None:
    """Type a message and press Enter, as a person would."""
    box = page.locator("#input")
    await expect(box).to_be_enabled()
    await box.fill(text)
    await box.press("Enter")


def conversation_id(page: Page) -> str:
    fragment = page.url.partition("#")[2]
    assert fragment.startswith("c="), page.url
    return fragment[2:]


async def wait_conversation_id(page: Page) -> str:
    await page.wait_for_url("**#c=*")
    return conversation_id(page)


def last_reply(page: Page) -> Any:
    return page.locator("#messages .msg-assistant").last


async def stored_messages(http: Any, conv_id: str) -> list[dict[str, Any]]:
    status, body = await http(f"/api/conversations/{conv_id}/messages?limit=200")
    assert status == 200, body
    messages: list[dict[str, Any]] = body["messages"]
    return messages


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


async def test_reply_streams_in_as_markdown_with_tool_call(
    open_tab: OpenTab, provider: FakeOpenAI, http: Any, tmp_path: Path
) -> None:
    provider.enqueue(
        Reply(
            text="",
            tool_calls=[ToolCallSpec(name="calculator", arguments='{"expression": "64 * 1024"}')],
        ),
        Reply(text=MARKDOWN_REPLY, chunks=40, chunk_delay=0.02),
    )
    tab = await open_tab(record=True)
    page = tab.page
    await expect(page.locator("#empty")).to_be_visible()
    question = "How do I count words in a file with Python? And how many bytes are in 64 KiB?"
    await send(page, question)
    # The user's message shows at once; the conversation id lands in the URL after the ack.
    await expect(page.locator("#messages .msg-user .user-text")).to_have_text(question)
    conv_id = await wait_conversation_id(page)
    reply = page.locator("#messages li[data-status='complete']").filter(has=page.locator(".md h2"))
    await expect(reply).to_have_count(1)

    # Rendered while streaming: several partial texts, each longer than the one before.
    renders: list[str] = await page.evaluate("window.__renders")
    final_text = await reply.locator(".md").text_content()
    assert final_text is not None
    partial = [r for r in renders if 0 < len(r) < len(final_text)]
    assert len(partial) >= 3, renders
    assert [len(r) for r in partial] == sorted(len(r) for r in partial)

    # Markdown became elements, not text.
    md = reply.locator(".md")
    await expect(md.locator("h2")).to_have_text("Counting words in a file")
    await expect(md.locator("strong")).to_have_text("65,536 bytes")
    await expect(md.locator("em")).to_have_text("line by line")
    code = md.locator("pre > code")
    await expect(code).to_have_count(1)
    assert await code.text_content() == CODE
    await expect(code).to_have_class(re.compile(r"\blanguage-python\b"))
    # highlight.js (loaded lazily for the first code block) coloured it in place.
    await expect(code).to_have_class(re.compile(r"\bhljs\b"))
    await expect(code.locator("span.hljs-keyword").first).to_have_text("from")
    await expect(md.locator("ul > li")).to_have_count(2)
    await expect(md.locator("li code").first).to_have_text("counts.most_common(10)")
    link = md.locator("a")
    await expect(link).to_have_attribute(
        "href", "https://docs.python.org/3/library/collections.html"
    )
    await expect(link).to_have_attribute("rel", "noopener noreferrer")
    await expect(link).to_have_attribute("target", "_blank")

    # The tool call is folded under the reply that made it.
    tool = page.locator("#messages details.tool")
    await expect(tool).to_have_count(1)
    await expect(tool.locator("summary")).to_contain_text("calculator")
    await expect(tool.locator(".tool-state")).to_have_text("Done")
    await expect(tool).not_to_have_attribute("open", "")
    await expect(page.locator("#typing")).to_be_hidden()
    await expect(page.locator("#stop")).to_be_hidden()
    # The sidebar lists the conversation under its first message.
    entry = page.locator(f"#conv-list a[data-id='{conv_id}']")
    await expect(entry).to_have_text(question)
    await expect(entry).to_have_attribute("aria-current", "page")
    await expect(page.locator("#chat-title")).to_have_text(question)

    # KaTeX (loaded on first use) typeset the formula as MathML.
    await expect(md.locator(".math-inline math")).to_have_count(1)
    await page.set_viewport_size({"width": 1280, "height": 860})
    await page.locator("#input").blur()
    target = DOCS_SCREENSHOT if os.environ.get("CORTEX_UPDATE_SCREENSHOT") else tmp_path / "s.png"
    await page.screenshot(path=str(target), animations="disabled")
    assert target.stat().st_size > 10_000

    await tool.locator("summary").click()
    await expect(tool.locator(".tool-body")).to_contain_text("64 * 1024")
    await expect(tool.locator(".tool-body")).to_contain_text("65536")

    stored = await stored_messages(http, conv_id)
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("tool", "complete"),
        ("assistant", "complete"),
    ]
    assert stored[-1]["content"] == MARKDOWN_REPLY


async def test_two_tabs_show_the_same_conversation_live(
    open_tab: OpenTab, provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(text="Hello from the first reply."),
        Reply(text=words(40), chunks=20, chunk_delay=0.03),
    )
    alice = (await open_tab()).page
    await send(alice, "hello")
    conv_id = await wait_conversation_id(alice)
    await expect(last_reply(alice)).to_have_attribute("data-status", "complete")

    bob = (await open_tab(f"#c={conv_id}", record=True)).page
    await expect(bob.locator("#messages > li")).to_have_count(2)
    await expect(last_reply(bob).locator(".md")).to_have_text("Hello from the first reply.")
    await expect(bob.locator(f"#conv-list a[data-id='{conv_id}']")).to_have_text("hello")

    # Bob writes; Alice sees his message and the reply stream in, live.
    await send(bob, "and now?")
    await expect(alice.locator("#messages .msg-user .user-text").last).to_have_text("and now?")
    for page in (alice, bob):
        await expect(page.locator("#messages li[data-status='streaming']")).to_have_count(1)
    for page in (alice, bob):
        await expect(last_reply(page)).to_have_attribute("data-status", "complete")
        await expect(last_reply(page).locator(".md")).to_have_text(words(40))
        await expect(page.locator("#messages > li")).to_have_count(4)
    renders: list[str] = await bob.evaluate("window.__renders")
    assert any(0 < len(r) < len(words(40)) for r in renders), renders


async def test_rename_configure_and_delete_from_another_client(
    open_tab: OpenTab, provider: FakeOpenAI, connect_client: Any
) -> None:
    """Another connection of the same user manages the open conversation: the page follows."""
    provider.enqueue(
        Reply(text="Kept."),
        Reply(text="Hello there."),
        Reply(text="A fresh start."),
    )
    client: Client = await connect_client()
    await client.send(type="send", content="keep me")
    other_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()

    page = (await open_tab()).page
    other = page.locator(f"#conv-list a[data-id='{other_id}']")
    await expect(other).to_have_text("keep me")
    await send(page, "plan a trip")  # the sender is subscribed: the page gets its events
    conv_id = await wait_conversation_id(page)
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    entry = page.locator(f"#conv-list a[data-id='{conv_id}']")
    title = page.locator("#chat-title")
    await expect(entry).to_have_text("plan a trip")
    await expect(title).to_have_text("plan a trip")

    answer = await client.request(type="rename", conversation_id=conv_id, title="Trip\nto Rome")
    assert answer["type"] == "ack", answer
    await expect(title).to_have_text("Trip to Rome")
    await expect(entry).to_have_text("Trip to Rome")
    await expect(entry).to_have_attribute("title", "Trip to Rome")
    await expect(entry).to_have_attribute("aria-current", "page")
    await expect(other).to_have_text("keep me")

    # Settings are not shown on the page: it takes them without a change or an error.
    answer = await client.request(type="configure", conversation_id=conv_id, temperature=0.2)
    assert answer["type"] == "ack", answer
    answer = await client.request(type="rename", conversation_id=conv_id, title="Rome, final")
    assert answer["type"] == "ack", answer
    await expect(title).to_have_text("Rome, final")  # the configure came first, without harm
    await expect(page.locator("#messages > li")).to_have_count(2)

    answer = await client.request(type="delete", conversation_id=conv_id)
    assert answer["type"] == "ack", answer
    # The page leaves it for a new, empty chat, and the sidebar forgets it.
    await expect(page).to_have_url(re.compile(r"^http://[^#]+/$"))
    await expect(title).to_have_text("New chat")
    await expect(page.locator("#empty")).to_be_visible()
    await expect(page.locator("#messages > li")).to_have_count(0)
    await expect(entry).to_have_count(0)
    await expect(other).to_have_text("keep me")
    await expect(page.locator("#alert")).to_be_hidden()
    await expect(page.locator("#live")).to_have_text("This conversation was deleted.")

    # And it is ready for the next conversation.
    await send(page, "start over")
    new_id = await wait_conversation_id(page)
    assert new_id not in (conv_id, other_id)
    await expect(last_reply(page).locator(".md")).to_have_text("A fresh start.")
    await expect(page.locator(f"#conv-list a[data-id='{new_id}']")).to_have_text("start over")


async def test_reload_mid_reply_continues_without_repeat_or_gap(
    open_tab: OpenTab, provider: FakeOpenAI
) -> None:
    text = words(150)
    provider.enqueue(Reply(text=text, chunks=150, chunk_delay=0.02))
    tab = await open_tab(record=True)
    page = tab.page
    await send(page, "count slowly")
    await wait_conversation_id(page)
    await page.wait_for_function(
        "() => (document.querySelector('#messages .msg-assistant .md')?.textContent ?? '')"
        ".length > 40"
    )
    await page.reload()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
    # After the reload the reply is still in progress, and goes on from where it was.
    await expect(page.locator("#messages li[data-status='streaming']")).to_have_count(1)
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    await expect(last_reply(page).locator(".md")).to_have_text(text)
    await expect(page.locator("#messages > li")).to_have_count(2)
    renders: list[str] = await page.evaluate("window.__renders")
    assert renders and renders[-1] == text
    assert any(len(r) < len(text) for r in renders), "the reload came after the reply ended"
    for seen in renders:
        assert text.startswith(seen), f"rendered text is not a prefix of the reply: {seen!r}"
    assert [len(r) for r in renders] == sorted(len(r) for r in renders)


async def test_deltas_apply_by_offset_repeats_dropped_gaps_resubscribed(
    open_tab: OpenTab, provider: FakeOpenAI
) -> None:
    """Between server and page, repeat one delta and lose another: the text stays exact."""
    text = words(80)
    # 80 chunks 10 ms apart: about 16 delta frames, one each CORTEX_DELTA_INTERVAL_MS (50).
    provider.enqueue(Reply(text=text, chunks=80, chunk_delay=0.01))
    from_page: list[dict[str, Any]] = []
    deltas = 0

    def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def up(message: str | bytes) -> None:
            from_page.append(json.loads(message))
            server.send(message)

        def down(message: str | bytes) -> None:
            nonlocal deltas
            if json.loads(message).get("type") == "delta":
                deltas += 1
                if deltas == 6:
                    return  # lost: the next delta shows a gap
                if deltas == 3:
                    ws.send(message)  # repeated: dropped by its offset
            ws.send(message)

        ws.on_message(up)
        server.on_message(down)

    tab = await open_tab(record=True, route_ws=route)
    page = tab.page
    await send(page, "count to eighty")
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    await expect(last_reply(page).locator(".md")).to_have_text(text)
    renders: list[str] = await page.evaluate("window.__renders")
    for seen in renders:
        assert text.startswith(seen), f"rendered text is not a prefix of the reply: {seen!r}"
    subscribes = [f for f in from_page if f["type"] == "subscribe"]
    assert len(subscribes) == 1, from_page  # the gap made the page catch up
    assert subscribes[0]["after_seq"] == 1  # the user's message; the reply was still streaming
    assert any(len(r) > 40 and r != text for r in renders), "no render after the gap"


async def test_dropped_socket_resumes_and_policy_close_asks_for_token(
    open_tab: OpenTab, provider: FakeOpenAI, server: Cortex
) -> None:
    text = words(120)
    provider.enqueue(Reply(text=text, chunks=120, chunk_delay=0.02))
    tab = await open_tab(record=True)
    page = tab.page
    await send(page, "keep going")
    await wait_conversation_id(page)
    await page.wait_for_function(
        "() => (document.querySelector('#messages .msg-assistant .md')?.textContent ?? '')"
        ".length > 30"
    )
    assert server.server is not None
    for ws in list(server.server.connections):
        await ws.close(1012, "service restart")
    await expect(page.locator("#conn")).not_to_have_attribute("data-state", "open")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    await expect(last_reply(page).locator(".md")).to_have_text(text)
    renders: list[str] = await page.evaluate("window.__renders")
    for seen in renders:
        assert text.startswith(seen), f"rendered text is not a prefix of the reply: {seen!r}"
    assert len(tab.sockets) == 2 and "access_token" not in tab.sockets[1]

    # A policy close (1008: what the server does without a valid token) asks for a token,
    # which is kept in localStorage and sent on the next connection.
    for ws in list(server.server.connections):
        await ws.close(1008, "unauthorized")
    token_box = page.locator("#token-input")
    await expect(token_box).to_be_visible()
    await expect(token_box).to_be_focused()
    await token_box.fill("s3cret/+token")
    await token_box.press("Enter")
    await expect(page.locator("#token-form")).to_be_hidden()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
    assert await page.evaluate("localStorage.getItem('cortex.token')") == "s3cret/+token"
    assert tab.sockets[-1].endswith("/ws?access_token=s3cret%2F%2Btoken"), tab.sockets


async def test_server_with_auth_asks_for_the_token_once(
    start_server: Callable[..., Awaitable[Cortex]], open_url: OpenUrl, provider: FakeOpenAI
) -> None:
    token = "browser-test-token-0123456789abcdef"
    app = await start_server(auth_tokens=f"{token}:alice")
    provider.enqueue(Reply(text="Hello, Alice."))
    tab = await open_url(f"http://127.0.0.1:{app.port}/", connected=False)
    # Chromium logs each refused upgrade and the probe's answer.
    tab.allowed_errors = ("401", "HTTP Authentication failed")
    page = tab.page
    token_box = page.locator("#token-input")
    await expect(token_box).to_be_visible()
    await expect(page.locator("#token-hint")).to_contain_text("This server needs an access token")
    await expect(page.locator("#input")).to_be_disabled()
    assert all("access_token" not in url for url in tab.sockets)

    await token_box.fill("not-the-right-token-0123456789abcdef")
    await token_box.press("Enter")
    await expect(page.locator("#token-hint")).to_contain_text("refused the stored access token")
    await expect(token_box).to_be_visible()

    await token_box.fill(token)
    await token_box.press("Enter")
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
    await expect(token_box).to_be_hidden()
    await send(page, "hi")
    await expect(last_reply(page).locator(".md")).to_have_text("Hello, Alice.")
    # The token stays in this browser: a reload connects at once, without asking.
    await page.reload()
    await expect(page.locator("#conn")).to_have_attribute("data-state", "open")
    await expect(page.locator("#messages > li")).to_have_count(2)
    await expect(token_box).to_be_hidden()
    assert tab.sockets[-1].endswith(f"/ws?access_token={token}")


async def test_stop_cancels_the_reply(open_tab: OpenTab, provider: FakeOpenAI, http: Any) -> None:
    text = words(300)
    provider.enqueue(Reply(text=text, chunks=300, chunk_delay=0.02, first_chunk_delay=0.3))
    page = (await open_tab()).page
    await send(page, "write a lot")
    conv_id = await wait_conversation_id(page)
    stop = page.locator("#stop")
    await expect(stop).to_be_visible()
    # Typing dots until the first words arrive, then the text itself shows progress.
    await expect(page.locator("#typing")).to_be_visible()
    await page.wait_for_function(
        "() => (document.querySelector('#messages .msg-assistant .md')?.textContent ?? '')"
        ".length > 20"
    )
    await expect(page.locator("#typing")).to_be_hidden()
    await stop.focus()
    await page.keyboard.press("Enter")  # keyboard alone
    await expect(last_reply(page)).to_have_attribute("data-status", "cancelled")
    await expect(last_reply(page).locator(".msg-foot")).to_have_text("Stopped")
    await expect(stop).to_be_hidden()
    await expect(page.locator("#typing")).to_be_hidden()
    stored = await stored_messages(http, conv_id)
    assert [(m["role"], m["status"]) for m in stored] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
    ]
    assert 0 < len(stored[1]["content"]) < len(text) and text.startswith(stored[1]["content"])
    shown = await last_reply(page).locator(".md").text_content()
    assert shown == stored[1]["content"].strip()


async def test_markup_in_model_output_and_user_text_is_inert(
    open_tab: OpenTab, provider: FakeOpenAI
) -> None:
    hostile = (
        'Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script>\n\n'
        "[click me](javascript:window.__xss=4) and **<b>not html</b>**"
    )
    provider.enqueue(Reply(text=hostile, chunks=7, chunk_delay=0.01))
    # Without CSP, so that only the renderer keeps this from running.
    page = (await open_tab(bypass_csp=True)).page
    box = page.locator("#input")
    await box.fill('<img src=x onerror="window.__xss=3">')
    await box.press("Shift+Enter")
    await box.press_sequentially("<script>window.__xss=5</script>")
    assert await box.input_value() == (
        '<img src=x onerror="window.__xss=3">\n<script>window.__xss=5</script>'
    )
    await box.press("Enter")
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    user = page.locator("#messages .msg-user .user-text")
    await expect(user).to_have_text(
        '<img src=x onerror="window.__xss=3">\n<script>window.__xss=5</script>'
    )
    md = last_reply(page).locator(".md")
    await expect(md.locator("p").first).to_have_text(
        'Look: <img src=x onerror="window.__xss=1"> and <script>window.__xss=2</script>'
    )
    await expect(md.locator("strong")).to_have_text("<b>not html</b>")
    await expect(md.locator("a")).to_have_count(0)
    await expect(md).to_contain_text("click me")
    messages = page.locator("#messages")
    for tag in ("img", "script", "b", "iframe"):
        await expect(messages.locator(tag)).to_have_count(0)
    assert await page.evaluate("typeof window.__xss") == "undefined"


async def test_long_history_pages_in_when_scrolling_up(
    open_tab: OpenTab, provider: FakeOpenAI, connect_client: Any
) -> None:
    client: Client = await connect_client()
    conv_id: str | None = None
    for i in range(60):
        provider.enqueue(Reply(text=f"answer {i}"))
        frame: dict[str, Any] = {"type": "send", "content": f"question {i}"}
        if conv_id:
            frame["conversation_id"] = conv_id
        await client.send(**frame)
        conv_id = (await client.until_type("ack"))[-1]["conversation_id"]
        await client.until_reply()
    page = (await open_tab(f"#c={conv_id}")).page
    items = page.locator("#messages > li")
    await expect(items).to_have_count(50)
    await expect(items.last.locator(".md")).to_have_text("answer 59")
    scroller = page.locator("#scroller")
    # The newest page is scrolled into view at the bottom.
    await expect(items.last).to_be_in_viewport()
    for expected in (100, 120):
        first_id = await items.first.get_attribute("data-id")
        await scroller.evaluate("el => { el.scrollTop = 0; }")
        await expect(items).to_have_count(expected)
        # What the reader was looking at stays put: the old first message is still in view.
        await expect(page.locator(f"#messages > li[data-id='{first_id}']")).to_be_in_viewport()
    seqs = await items.evaluate_all("els => els.map(el => Number(el.dataset.seq))")
    assert seqs == list(range(1, 121))
    await expect(items.first.locator(".user-text")).to_have_text("question 0")
    await expect(page.locator("#load-earlier")).to_be_hidden()


async def test_phone_width_and_keyboard(open_tab: OpenTab, provider: FakeOpenAI) -> None:
    provider.enqueue(Reply(text="Short answer."))
    page = (await open_tab(viewport={"width": 390, "height": 780}, has_touch=True)).page
    sidebar = page.locator("#sidebar")
    await expect(sidebar).to_be_hidden()
    # Keyboard: the first Tab reaches the skip link, which jumps to the message box.
    await page.keyboard.press("Tab")
    await expect(page.locator(".skip-link")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#input")).to_be_focused()
    await page.keyboard.type("hi from a phone")
    await page.keyboard.press("Enter")
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")
    await expect(last_reply(page).locator(".md")).to_have_text("Short answer.")
    await expect(page.locator("#live")).to_have_text("Cortex replied: Short answer.")
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390
    # The conversation list is a drawer: open, listed, closed with Escape.
    opener = page.locator("#drawer-open")
    await opener.focus()
    await page.keyboard.press("Enter")
    await expect(sidebar).to_be_visible()
    await expect(page.locator("#new-chat")).to_be_focused()
    await expect(page.locator("#conv-list a.conv-link")).to_have_text(["hi from a phone"])
    await page.keyboard.press("Escape")
    await expect(sidebar).to_be_hidden()
    await expect(opener).to_be_focused()
    await expect(opener).to_have_attribute("aria-expanded", "false")


async def test_markdown_renderer_cases(open_tab: OpenTab) -> None:
    """The renderer on its own, in the page: structure out, never markup from the input."""
    page = (await open_tab()).page
    cases = {
        "# Title\n\ntext": "<h1>Title</h1><p>text</p>",
        "a\nb": "<p>a<br>b</p>",
        "**b** *i* ~~s~~ `c`": "<p><strong>b</strong> <em>i</em> <del>s</del> <code>c</code></p>",
        "***both***": "<p><em><strong>both</strong></em></p>",  # CommonMark's nesting
        "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
        "1. one\n2. two\n   - nested": (
            "<ol><li>one</li><li>two<ul><li>nested</li></ul></li></ol>"
        ),
        "3. three": '<ol start="3"><li>three</li></ol>',
        "- [x] done": (
            '<ul><li class="task"><input type="checkbox" disabled="" checked=""> done</li></ul>'
        ),
        "> quoted": "<blockquote><p>quoted</p></blockquote>",
        "---": "<hr>",
        "| a | b |\n|---|--:|\n| 1 | 2 |": (
            '<div class="table-wrap"><table><thead><tr><th>a</th><th class="align-right">b</th>'
            '</tr></thead><tbody><tr><td>1</td><td class="align-right">2</td></tr></tbody>'
            "</table></div>"
        ),
        "[x](https://e.com/a_(b))": (
            '<p><a href="https://e.com/a_(b)" target="_blank" rel="noopener noreferrer">x</a></p>'
        ),
        "see https://e.com/x.": (
            '<p>see <a href="https://e.com/x" target="_blank" rel="noopener noreferrer">'
            "https://e.com/x</a>.</p>"
        ),
        "[m](mailto:a@b.c)": (
            '<p><a href="mailto:a@b.c" target="_blank" rel="noopener noreferrer">m</a></p>'
        ),
        "[bad](javascript:alert(1)) [data](data:text/html,x) [rel](/x)": "<p>bad data rel</p>",
        # CommonMark: `&amp;` is an entity (shown as "&"), backslash escapes are literal
        "<b>x</b> &amp; \\*lit\\*": "<p>&lt;b&gt;x&lt;/b&gt; &amp; *lit*</p>",
        "```\nunclosed <i>": (
            '<div class="code-block"><div class="code-head"><span class="code-lang">text</span>'
            '<button type="button" class="copy-btn" title="Copy code">'
        ),
    }
    rendered = await page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import("/static/js/markdown.js");
            const out = {};
            for (const text of cases) {
                const div = document.createElement("div");
                div.append(renderMarkdown(text));
                out[text] = div.innerHTML;
            }
            return out;
        }""",
        list(cases),
    )
    for text, html in cases.items():
        assert rendered[text].startswith(html), (text, rendered[text])
    unclosed = rendered["```\nunclosed <i>"]
    assert unclosed.endswith("<pre><code>unclosed &lt;i&gt;</code></pre></div>"), unclosed
    assert all("<i>" not in html and "<b>" not in html for html in rendered.values())
