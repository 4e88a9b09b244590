"""The chat page's branch flows (issue #20) in headless Chromium: Edit in place (Enter
resends), "‹ n/m ›" between versions, Regenerate on the last reply, Fork, all by keyboard."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import expect
from test_browser import (  # noqa: F401 - fixtures, used by name
    OpenTab,
    browser,
    chromium,
    last_reply,
    open_url,
    send,
    wait_conversation_id,
)
from test_browser import open_tab as open_tab  # noqa: F401

from cortex.testing.fake_openai import FakeOpenAI, Reply

pytestmark = pytest.mark.browser


async def test_edit_switch_regenerate_and_fork_by_keyboard(
    open_tab: OpenTab, provider: FakeOpenAI, http: Any
) -> None:
    provider.enqueue(
        Reply(text="Answer to the first question."),
        Reply(text="Answer to the edited question."),
        Reply(text="Another answer to the edited question."),
    )
    page = (await open_tab()).page
    await send(page, "first question")
    conv_id = await wait_conversation_id(page)
    await expect(last_reply(page)).to_have_attribute("data-status", "complete")

    # Edit in place: the Edit button (by keyboard), the text, Enter.
    user = page.locator("#messages .msg-user").first
    await user.locator(".edit-btn").focus()
    await page.keyboard.press("Enter")
    box = user.locator(".edit-box")
    await expect(box).to_be_focused()
    await box.fill("edited question")
    await box.press("Enter")
    await expect(last_reply(page).locator(".md")).to_have_text("Answer to the edited question.")
    await expect(page.locator("#messages .msg-user .user-text")).to_have_text("edited question")
    await expect(page.locator("#messages > li")).to_have_count(2)  # the path only
    nav = page.locator("#messages .msg-user .branch-nav")
    await expect(nav.locator(".branch-pos")).to_have_text("2/2")

    # ‹ goes back to the first version and its answer.
    await nav.get_by_label("Previous version").focus()
    await page.keyboard.press("Enter")
    await expect(page.locator("#messages .msg-user .user-text")).to_have_text("first question")
    await expect(last_reply(page).locator(".md")).to_have_text("Answer to the first question.")
    await expect(nav.locator(".branch-pos")).to_have_text("1/2")
    await nav.get_by_label("Next version").click()
    await expect(page.locator("#messages .msg-user .user-text")).to_have_text("edited question")

    # Regenerate, on the last reply only.
    await expect(page.locator("#messages .regen-btn:visible")).to_have_count(1)
    await last_reply(page).locator(".regen-btn").focus()
    await page.keyboard.press("Enter")
    await expect(last_reply(page).locator(".md")).to_have_text(
        "Another answer to the edited question."
    )
    await expect(last_reply(page).locator(".branch-pos")).to_have_text("2/2")
    status, body = await http(f"/api/conversations/{conv_id}/messages")
    assert status == 200
    assert [m["content"] for m in body["messages"]] == [
        "edited question",
        "Another answer to the edited question.",
    ]

    # Fork from the reply's menu: a new conversation with the path, opened.
    await last_reply(page).get_by_role("button", name="Fork").click()
    await page.wait_for_url(lambda url: conv_id not in url and "#c=" in url)
    forked = page.url.partition("#c=")[2]
    await expect(last_reply(page).locator(".md")).to_have_text(
        "Another answer to the edited question."
    )
    await expect(page.locator(f"#conv-list a[data-id='{forked}']")).to_have_count(1)
    status, body = await http(f"/api/conversations/{conv_id}/messages")
    assert len(body["messages"]) == 2  # the original is unchanged
