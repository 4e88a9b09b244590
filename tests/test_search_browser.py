"""The page's search in headless Chromium (as tests/test_browser.py): Ctrl+K or `/`, results as
you type with the matches marked, a click that opens the conversation at the hit, and a hit on
an inactive branch shown read-only until "Switch to this branch"."""

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


async def test_a_hit_on_an_inactive_branch_opens_read_only_until_switched(
    server: Cortex, open_tab: OpenTab
) -> None:
    store = server.store
    first = await store.add_user_message(
        owner=LOCAL_USER,
        conversation_id=None,
        content="tell me about the okapi",
        client_msg_id=None,
    )
    assert first is not None
    conv = first.conversation.id
    await store.add_message(
        conversation_id=conv, role="assistant", content="answer one", parent_id=first.message.id
    )
    await store.mark_answered(conv, first.message.seq)
    # Edited: the original (with the word) is now on an inactive branch.
    edited = await store.edit_message(
        owner=LOCAL_USER,
        conversation_id=conv,
        message_id=first.message.id,
        content="tell me about the giraffe",
        client_msg_id=None,
        reply_options={},
    )
    await store.add_message(
        conversation_id=conv, role="assistant", content="answer two", parent_id=edited.message.id
    )
    await store.mark_answered(conv, edited.message.seq)
    assert first.message.id not in await store.active_path_ids(conv)

    tab = await open_tab(f"#c={conv}")
    page = tab.page
    texts = page.locator("#messages .msg-user .user-text")
    await expect(texts).to_have_text(["tell me about the giraffe"])
    banner = page.locator("#branch-banner")
    await expect(banner).to_be_hidden()

    await page.keyboard.press("Control+k")
    await page.locator("#search-input").press_sequentially("okapi")
    # The message's hit (the title, made from it, matches too).
    hit = page.locator(f"#search-results .search-hit button[data-seq='{first.message.seq}']")
    await expect(hit).to_have_count(1)
    await hit.click()

    # That branch, read-only: the banner, the original text, no composer, no branch actions.
    await expect(banner).to_be_visible()
    await expect(banner).to_contain_text("another branch")
    switch = banner.get_by_role("button", name="Switch to this branch")
    await expect(switch).to_be_focused()
    await expect(texts).to_have_text(["tell me about the okapi"])
    await expect(page.locator("#messages li.msg-found")).to_contain_text("okapi")
    await expect(page.locator("#input")).to_be_disabled()
    await expect(page.locator("#send")).to_be_disabled()
    await expect(page.locator("#messages .edit-btn:visible")).to_have_count(0)
    await expect(page.locator("#messages .regen-btn:visible")).to_have_count(0)
    await expect(page.locator("#messages .branch-nav:visible")).to_have_count(0)
    assert first.message.id not in await store.active_path_ids(conv)

    # "Back to the current branch": the active path again, still unchanged.
    await banner.get_by_role("button", name="Back to the current branch").click()
    await expect(banner).to_be_hidden()
    await expect(texts).to_have_text(["tell me about the giraffe"])
    await expect(page.locator("#input")).to_be_enabled()

    # Open the hit again, then switch (by keyboard): the server's path now runs through it.
    await page.keyboard.press("Control+k")
    await page.locator("#search-input").press_sequentially("okapi")
    await expect(hit).to_have_count(1)
    await hit.click()
    await expect(banner).to_be_visible()
    await expect(switch).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(banner).to_be_hidden()
    await expect(page.locator("#input")).to_be_enabled()
    await expect(page.locator("#input")).to_be_focused()
    await expect(texts).to_have_text(["tell me about the okapi"])
    await expect(page.locator("#messages .msg-user .branch-pos")).to_have_text("1/2")
    assert first.message.id in await store.active_path_ids(conv)
