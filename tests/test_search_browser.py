"""The page's search in headless Chromium (as tests/test_browser.py): Ctrl+K or `/`, results as
you type with the matches marked, and a click that opens the conversation at the hit."""

from __future__ import annotations

import pytest
import test_browser
from playwright.async_api import expect
from test_browser import OpenTab, conversation_id

from cortex.app import Cortex
from cortex.auth.tokens import LOCAL_USER

pytestmark = pytest.mark.browser

# The page's fixtures, shared with its other tests.
chromium = test_browser.chromium
browser = test_browser.browser
open_url = test_browser.open_url
open_tab = test_browser.open_tab


async def long_conversation(server: Cortex, needle_at: int) -> str:
    """40 exchanges (80 messages), with a word to find in exchange `needle_at`."""
    store = server.store
    conv: str | None = None
    for n in range(40):
        text = f"question {n} about the weather"
        if n == needle_at:
            text += " and the <b>pangolin</b> migration"
        stored = await store.add_user_message(
            owner=LOCAL_USER, conversation_id=conv, content=text, client_msg_id=None
        )
        assert stored is not None
        conv = stored.conversation.id
        await store.add_message(
            conversation_id=conv,
            role="assistant",
            content=f"answer {n}",
            parent_id=stored.message.id,
        )
        await store.mark_answered(conv, stored.message.seq)
    assert conv is not None
    return conv


async def test_search_opens_a_deep_hit_with_its_matches_marked(
    server: Cortex, open_tab: OpenTab
) -> None:
    conv = await long_conversation(server, needle_at=3)
    other = await long_conversation(server, needle_at=-1)
    tab = await open_tab(f"#c={other}")
    page = tab.page
    await expect(page.locator("#messages li[data-seq='80']")).to_be_visible()

    await page.keyboard.press("Control+k")
    box = page.locator("#search-input")
    await expect(box).to_be_focused()
    await box.press_sequentially("pango*")
    hit = page.locator("#search-results .search-hit button")
    await expect(hit).to_have_count(1)
    await expect(hit.locator("mark")).to_have_text(["pangolin"])
    # The payload's angle brackets are text, never markup.
    await expect(hit.locator(".search-snippet")).to_contain_text("<b>pangolin</b> migration")
    assert await hit.locator(".search-snippet b").count() == 0

    await hit.click()
    await expect(page.locator("#search-panel")).to_be_hidden()
    await page.wait_for_url(f"**#c={conv}")
    assert conversation_id(page) == conv
    found = page.locator("#messages li.msg-found")
    await expect(found).to_have_attribute("data-seq", "7")
    await expect(found).to_be_in_viewport()
    await expect(found).to_contain_text("pangolin")
    # The rest of the conversation is there too: older by scrolling up, newer by the catch-up.
    await expect(page.locator("#messages li[data-seq='80']")).to_have_count(1)


async def test_slash_in_an_empty_composer_opens_search_and_escape_closes_it(
    server: Cortex, open_tab: OpenTab
) -> None:
    tab = await open_tab()
    page = tab.page
    composer = page.locator("#input")
    await expect(composer).to_be_enabled()
    await composer.press_sequentially("a/b")  # `/` inside a message is just a character
    await expect(composer).to_have_value("a/b")
    await expect(page.locator("#search-panel")).to_be_hidden()
    await composer.fill("")
    await composer.press("/")
    await expect(page.locator("#search-input")).to_be_focused()
    await page.locator("#search-input").press_sequentially('"unclosed -')
    await expect(page.locator("#search-status")).to_have_text("No results.")
    await page.keyboard.press("Escape")
    await expect(page.locator("#search-panel")).to_be_hidden()
    await expect(composer).to_be_focused()
    await expect(composer).to_have_value("")
