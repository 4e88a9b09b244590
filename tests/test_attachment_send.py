"""Messages with attachments: what the model receives (the fake provider records it), the vision
check, the mock's description, other users' ids, the GET route, export and clean-up."""

from __future__ import annotations

import base64
import io
from typing import Any

import aiohttp
import pytest
from attach_client import stored_rows, upload
from attach_samples import pdf, png
from conftest import Client, final_message
from PIL import Image

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI

BOTH_BACKENDS = True
ALICE = "alice-" + "A1" * 20
BOB = "bob-" + "B2" * 20


@pytest.fixture
async def vision(start_server: Any) -> Cortex:
    app: Cortex = await start_server(vision_models=["openai/fake-model"])
    return app


async def test_the_model_gets_the_exact_parts(
    vision: Cortex, connect_to: Any, provider: FakeOpenAI
) -> None:
    client = await connect_to(vision)
    cat = png(64, 48)
    ids = [
        (await upload(client, cat, "cat.png"))["attachment"]["id"],
        (await upload(client, b"a,b\n1,2\n", "data.csv"))["attachment"]["id"],
        (await upload(client, pdf(["Hello page one", "And page two"]), "doc.pdf"))["attachment"][
            "id"
        ],
    ]
    await client.send(type="send", content="what is this?", attachments=ids)
    events = await client.until_reply()
    user = next(e["message"] for e in events if e["type"] == "message")
    assert [a["filename"] for a in user["attachments"]] == ["cat.png", "data.csv", "doc.pdf"]
    assert final_message(events)["status"] == "complete"
    content = provider.requests[-1]["messages"][-1]["content"]
    assert content == [
        {"type": "text", "text": "what is this?"},
        {"type": "text", "text": "[Attached image: cat.png, 64x48]"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(cat).decode()},
        },
        {"type": "text", "text": "[Attached file: data.csv]\na,b\n1,2\n"},
        {
            "type": "text",
            "text": "[Attached PDF: doc.pdf, 2 pages, 28 characters]\n"
            "Hello page one\n\nAnd page two",
        },
    ]
    # the message objects carry the attachments in history too
    conversation_id = next(e for e in events if e["type"] == "ack")["conversation_id"]
    page = await client.request(type="history", conversation_id=conversation_id)
    assert [a["kind"] for a in page["messages"][0]["attachments"]] == ["image", "text", "pdf"]


async def test_a_large_image_reaches_the_model_scaled_down(
    vision: Cortex, connect_to: Any, provider: FakeOpenAI
) -> None:
    client = await connect_to(vision)
    big = (await upload(client, png(3000, 1500), "wide.png"))["attachment"]
    assert (big["width"], big["height"]) == (3000, 1500)
    await client.send(type="send", content="describe", attachments=[big["id"]])
    await client.until_reply()
    url = provider.requests[-1]["messages"][-1]["content"][2]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        assert img.size == (2048, 1024)


async def test_a_model_without_vision_gets_bad_frame_and_nothing_is_stored(
    client: Client, server: Cortex, provider: FakeOpenAI
) -> None:
    cat = (await upload(client, png(), "cat.png"))["attachment"]["id"]
    answer = await client.request(type="send", content="see?", attachments=[cat])
    assert answer["code"] == "bad_frame"
    assert "openai/fake-model" in answer["message"] and "CORTEX_VISION_MODELS" in answer["message"]
    assert (await client.request(type="conversations"))["items"] == []
    assert provider.requests == []
    # text attachments need no vision
    notes = (await upload(client, b"some notes", "notes.txt"))["attachment"]["id"]
    assert (await client.request(type="send", content="read", attachments=[notes]))["type"] == "ack"


async def test_the_mock_model_says_what_it_received(client: Client) -> None:
    ids = [
        (await upload(client, png(640, 480), "cat.png"))["attachment"]["id"],
        (await upload(client, pdf(["one", "two", "three"]), "doc.pdf"))["attachment"]["id"],
    ]
    await client.send(type="send", content="look", model="mock", attachments=ids)
    reply = final_message(await client.until_reply())["content"]
    assert (
        "I received 1 image (cat.png, 640x480); 1 PDF (doc.pdf, 3 pages, 15 characters)." in reply
    ), reply


async def test_too_many_attachments_and_unknown_ids_are_refused(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(max_attachments=2)
    client = await connect_to(app)
    ids = [
        (await upload(client, f"n{i}".encode(), f"{i}.txt"))["attachment"]["id"] for i in range(3)
    ]
    assert (await client.request(type="send", content="x", attachments=ids))["code"] == "bad_frame"
    missing = await client.request(type="send", content="x", attachments=["nope"])
    assert missing["code"] == "not_found"


async def test_someone_elses_attachment_is_not_found_in_send_and_get(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(auth_tokens=f"{ALICE}:alice, {BOB}:bob")
    alice = await connect_to(app, additional_headers={"Authorization": f"Bearer {ALICE}"})
    bob = await connect_to(app, additional_headers={"Authorization": f"Bearer {BOB}"})
    secret = (await upload(alice, b"alice's notes", "notes.txt"))["attachment"]["id"]
    answer = await bob.request(type="send", content="steal", attachments=[secret])
    assert answer["code"] == "not_found"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.port}") as http:
        async with http.get(
            f"/api/attachments/{secret}", headers={"Authorization": f"Bearer {BOB}"}
        ) as r:
            assert r.status == 404
            assert "alice" not in await r.text()
        async with http.get(
            "/api/attachments/nope", headers={"Authorization": f"Bearer {BOB}"}
        ) as r:
            assert r.status == 404  # the same answer as for an id that exists
        async with http.get(f"/api/attachments/{secret}") as r:
            assert r.status == 401
        async with http.get(
            f"/api/attachments/{secret}", headers={"Authorization": f"Bearer {ALICE}"}
        ) as r:
            assert r.status == 200 and await r.read() == b"alice's notes"
    # the same bytes from bob are his own row: dedup never spans users
    mine = (await upload(bob, b"alice's notes", "notes.txt"))["attachment"]["id"]
    assert mine != secret


async def test_get_serves_images_inline_and_everything_else_as_a_download(
    client: Client, server: Cortex, http: Any
) -> None:
    cat = png()
    image_id = (await upload(client, cat, "cat.txt"))["attachment"]["id"]
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>'
    svg_id = (await upload(client, svg, "x.svg", content_type="image/svg+xml"))["attachment"]
    assert svg_id["kind"] == "text"
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.port}") as session:
        async with session.get(f"/api/attachments/{image_id}") as r:
            assert r.status == 200 and await r.read() == cat
            assert r.headers["Content-Type"] == "image/png"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert r.headers["Content-Disposition"].startswith("inline")
        async with session.get(f"/api/attachments/{svg_id['id']}") as r:
            assert await r.read() == svg
            assert not r.headers["Content-Type"].startswith("image/")
            assert r.headers["Content-Disposition"].startswith("attachment")
            assert "sandbox" in r.headers["Content-Security-Policy"]


async def test_export_has_the_metadata_and_optionally_the_files(
    client: Client, server: Cortex, http: Any
) -> None:
    notes = (await upload(client, b"the notes", "notes.txt"))["attachment"]["id"]
    await client.send(type="send", content="read", attachments=[notes])
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    status, body = await http(f"/api/conversations/{conversation_id}/export")
    attached = body["messages"][0]["attachments"]
    assert attached[0]["filename"] == "notes.txt" and "data_base64" not in attached[0]
    status, body = await http(f"/api/conversations/{conversation_id}/export?attachments=1")
    attached = body["messages"][0]["attachments"]
    assert base64.b64decode(attached[0]["data_base64"]) == b"the notes"
    status, body = await http(f"/api/conversations/{conversation_id}/export?format=md")
    assert b"- Attached: notes.txt (text, 9 bytes)" in body


async def test_deleting_a_conversation_deletes_its_attachments(
    client: Client, server: Cortex
) -> None:
    notes = (await upload(client, b"the notes", "notes.txt"))["attachment"]["id"]
    await client.send(type="send", content="read", attachments=[notes])
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    assert (await stored_rows(server))[0] == 1
    assert (await client.request(type="delete", conversation_id=conversation_id))["type"] == "ack"
    assert await stored_rows(server) == (0, 0)


async def test_unreferenced_uploads_expire(start_server: Any, connect_to: Any) -> None:
    app = await start_server(attachment_ttl_s=0.2, sweep_interval_s=0.1)
    client = await connect_to(app)
    await upload(client, b"forgotten", "a.txt")
    kept = (await upload(client, b"used", "b.txt"))["attachment"]["id"]
    await client.send(type="send", content="x", attachments=[kept])
    await client.until_reply()
    import asyncio

    async with asyncio.timeout(10):
        while (await stored_rows(app))[0] != 1:  # noqa: ASYNC110 - the sweep announces nothing
            await asyncio.sleep(0.05)
    assert await app.router.files.store.get(kept, owner="local") is not None


async def test_files_may_go_without_text(
    vision: Cortex, connect_to: Any, provider: FakeOpenAI
) -> None:
    client = await connect_to(vision)
    notes = (await upload(client, b"just this", "notes.txt"))["attachment"]["id"]
    assert (await client.request(type="send", content="", attachments=[notes]))["type"] == "ack"
    await client.until_reply()
    assert provider.requests[-1]["messages"][-1]["content"] == [
        {"type": "text", "text": "[Attached file: notes.txt]\njust this"}
    ]
    assert (await client.request(type="send", content=" "))["code"] == "bad_frame"
