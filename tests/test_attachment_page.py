"""The chat page's attachments in Chromium: attach button, paste, drag and drop, chips with a
thumbnail and a progress bar, images in the message (blob: URLs, click to enlarge), file chips
that download."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from attach_samples import png
from playwright.async_api import FilePayload, expect
from test_browser import OpenUrl, Tab, browser, chromium, open_url  # noqa: F401 - fixtures

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI, Reply

pytestmark = pytest.mark.browser
BLOB = re.compile("^blob:")

# A File made in the page, handed over as a paste or a drop (what a person's clipboard or
# file manager would hand over).
HAND_OVER = """([kind, name, type, b64]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type }));
  if (kind === "paste") {
    document.querySelector("#input").dispatchEvent(
      new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
  } else {
    const chat = document.querySelector("#chat");
    const options = { dataTransfer: data, bubbles: true, cancelable: true };
    chat.dispatchEvent(new DragEvent("dragover", options));
    chat.dispatchEvent(new DragEvent("drop", options));
  }
}"""


async def test_attach_paste_drop_send_show_enlarge_download(
    start_server: Any,
    open_url: OpenUrl,  # noqa: F811 - the fixture imported above
    provider: FakeOpenAI,  # noqa: F811
) -> None:
    app: Cortex = await start_server(vision_models=["*"])
    provider.enqueue(Reply(text="a cat, a dog and some notes"))
    tab: Tab = await open_url(f"http://127.0.0.1:{app.port}/")
    page = tab.page
    # the attach button opens the file picker
    async with page.expect_file_chooser() as chooser:
        await page.locator("#attach").click()
    cat: FilePayload = {"name": "cat.png", "mimeType": "image/png", "buffer": png(320, 200)}
    await (await chooser.value).set_files([cat])
    # paste an image, drop a text file
    dog = base64.b64encode(png(100, 80, (20, 200, 20))).decode()
    await page.evaluate(HAND_OVER, ["paste", "dog.png", "image/png", dog])
    notes = base64.b64encode(b"remember the milk\n").decode()
    await page.evaluate(HAND_OVER, ["drop", "notes.txt", "text/plain", notes])

    chips = page.locator("#tray .chip")
    await expect(chips).to_have_count(3)
    await expect(page.locator("#tray .chip-done")).to_have_count(3)  # uploaded
    await expect(chips.nth(0).locator("img.chip-thumb")).to_have_attribute("src", BLOB)
    await expect(chips.nth(0).locator("progress")).to_have_count(1)

    await page.locator("#input").fill("what are these?")
    await page.locator("#input").press("Enter")
    await expect(page.locator("#tray .chip")).to_have_count(0)
    await expect(page.locator("#messages .msg-assistant").last).to_contain_text(
        "a cat, a dog and some notes"
    )
    parts = provider.requests[-1]["messages"][-1]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url", "text"]
    assert parts[1]["text"] == "[Attached image: cat.png, 320x200]"
    assert parts[5]["text"] == "[Attached file: notes.txt]\nremember the milk\n"

    user = page.locator("#messages .msg-user").last
    images = user.locator("img.att-image")
    await expect(images).to_have_count(2)
    await expect(images.first).to_have_attribute("src", BLOB)
    assert await images.first.evaluate("img => img.complete && img.naturalWidth") == 320
    await images.first.click()
    viewer = page.locator("#viewer")
    await expect(viewer).to_be_visible()
    await expect(viewer.locator("img")).to_have_attribute("src", BLOB)
    await page.keyboard.press("Escape")
    await expect(viewer).to_be_hidden()

    async with page.expect_download() as downloading:
        await user.locator(".att-file").click()
    download = await downloading.value
    assert download.suggested_filename == "notes.txt"
    assert (await download.path()).read_bytes() == b"remember the milk\n"  # noqa: ASYNC240

    # after a reload the message still shows its files (from history)
    await page.reload()
    await expect(page.locator("#messages .msg-user img.att-image")).to_have_count(2)


async def test_a_refused_file_shows_its_error_and_does_not_block_sending(
    start_server: Any,
    open_url: OpenUrl,  # noqa: F811 - the fixture imported above
    provider: FakeOpenAI,  # noqa: F811
) -> None:
    app: Cortex = await start_server()
    provider.enqueue(Reply(text="fine"))
    tab: Tab = await open_url(f"http://127.0.0.1:{app.port}/")
    page = tab.page
    zip_file = base64.b64encode(b"PK\x03\x04" + b"\x00" * 100).decode()
    await page.evaluate(HAND_OVER, ["drop", "archive.zip", "application/zip", zip_file])
    chip = page.locator("#tray .chip-error")
    await expect(chip).to_have_count(1)
    await expect(chip.locator(".error-code")).to_have_text("bad_attachment")
    await chip.locator(".chip-remove").click()
    await expect(page.locator("#tray")).to_be_hidden()
    await page.locator("#input").fill("hello")
    await page.locator("#input").press("Enter")
    await expect(page.locator("#messages .msg-assistant").last).to_contain_text("fine")
