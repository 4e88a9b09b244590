"""Uploads over the WebSocket: the `upload` frame, binary frames, `attachment`, and every bad
input of issue #21 (docs/attachments.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from attach_client import stored_rows, upload
from attach_samples import encrypted_pdf, pdf, pdf_bomb, png, png_bomb
from conftest import Client

from cortex.app import Cortex

BOTH_BACKENDS = True


async def test_a_png_named_pdf_and_claimed_text_is_an_image(client: Client, server: Cortex) -> None:
    data = png(640, 480)
    answer = await upload(client, data, "cat.pdf", content_type="text/plain")
    assert answer["type"] == "attachment", answer
    attachment = answer["attachment"]
    assert attachment["kind"] == "image"
    assert attachment["content_type"] == "image/png"
    assert (attachment["width"], attachment["height"]) == (640, 480)
    assert attachment["filename"] == "cat.pdf"
    assert attachment["size"] == len(data)
    assert await server.router.files.store.read(attachment["id"]) == data


async def test_text_and_pdf_uploads(client: Client, server: Cortex) -> None:
    text = await upload(client, "naïve,csv\n1,2\n".encode(), "data.csv")
    assert text["attachment"]["kind"] == "text"
    assert text["attachment"]["content_type"].startswith("text/plain")
    doc = await upload(client, pdf(["one", "two", "three"]), "doc.pdf")
    assert doc["attachment"]["kind"] == "pdf" and doc["attachment"]["pages"] == 3


async def test_the_same_file_twice_is_stored_once(client: Client, server: Cortex) -> None:
    first = await upload(client, png(), "a.png")
    again = await upload(client, png(), "b.png")
    assert first["attachment"]["id"] == again["attachment"]["id"]
    assert (await stored_rows(server))[0] == 1


@pytest.mark.parametrize(
    ("data", "code", "words"),
    [
        (b"PK\x03\x04" + b"\x00" * 100, "bad_attachment", "zip"),
        (b"MZ" + b"\x90" * 100, "bad_attachment", "executable"),
        ("café".encode("latin-1") * 10, "bad_attachment", "UTF-8"),
        (png_bomb(), "bad_attachment", "pixels"),
        (encrypted_pdf(), "bad_attachment", "encrypted"),
    ],
)
async def test_bad_files_are_refused_and_the_connection_goes_on(
    client: Client, server: Cortex, data: bytes, code: str, words: str
) -> None:
    answer = await upload(client, data, "innocent.txt")
    assert answer["type"] == "error" and answer["code"] == code, answer
    assert words in answer["message"]
    assert (await client.request(type="ping"))["type"] == "pong"
    assert await stored_rows(server) == (0, 0)


async def test_a_refused_large_file_drains_quietly(client: Client, server: Cortex) -> None:
    """The type is judged on the first chunk: the rest of a refused file is dropped unanswered."""
    zip_file = b"PK\x03\x04" + b"\x00" * 600_000
    answer = await upload(client, zip_file, "big.zip")
    assert answer["code"] == "bad_attachment"
    assert (await client.request(type="ping"))["type"] == "pong"
    assert all(e["type"] != "error" for e in client.seen[client.seen.index(answer) + 1 :])
    assert await stored_rows(server) == (0, 0)


async def test_a_file_over_the_limit_is_refused_at_the_upload_frame(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(max_attachment_bytes=10_000)
    client = await connect_to(app)
    answer = await client.request(type="upload", filename="big.png", size=10_001)
    assert answer["code"] == "too_large"
    assert await stored_rows(app) == (0, 0)  # nothing was held
    assert (await client.request(type="ping"))["type"] == "pong"
    # a client that sends the bytes without waiting for the answer is not punished for them
    answer = await upload(client, b"z" * 10_001, "big.png", piece=1000)
    assert answer["code"] == "too_large"
    assert (await client.request(type="ping"))["type"] == "pong"
    assert not [e for e in client.seen if "no upload" in e.get("message", "")]


async def test_the_quota_is_per_user(start_server: Any, connect_to: Any) -> None:
    app = await start_server(attachment_quota_bytes=3000)
    client = await connect_to(app)
    assert (await upload(client, b"a" * 2000, "a.txt"))["type"] == "attachment"
    answer = await client.request(type="upload", filename="b.txt", size=1001)
    assert answer["code"] == "quota_exceeded"
    assert (await upload(client, b"b" * 1000, "b.txt"))["type"] == "attachment"


async def test_more_bytes_than_announced_are_refused(client: Client, server: Cortex) -> None:
    await client.send(type="upload", filename="a.txt", size=10, request_id="u")
    await client.ws.send(b"x" * 11)
    answer = (await client.until(lambda e: e.get("request_id") == "u"))[-1]
    assert answer["code"] == "bad_attachment" and "more bytes" in answer["message"]
    assert await stored_rows(server) == (0, 0)
    assert (await upload(client, b"fine", "a.txt"))["type"] == "attachment"


async def test_a_connection_closed_mid_upload_leaves_nothing(
    connect_client: Any, server: Cortex
) -> None:
    client = await connect_client()
    await client.send(type="upload", filename="a.txt", size=900_000, request_id="u")
    await client.ws.send(b"x" * 300_000)  # past the first chunk: rows are stored
    await client.ws.close()
    await eventually_empty(server)


async def eventually_empty(server: Cortex) -> None:
    async with asyncio.timeout(10):
        while await stored_rows(server) != (0, 0):  # noqa: ASYNC110 - polls the database
            await asyncio.sleep(0.05)


async def test_other_frames_mid_upload_are_refused_without_corrupting_it(
    client: Client, server: Cortex
) -> None:
    data = b"ligne de journal\n" * 40_000  # 680 KB: several chunks
    await client.send(type="upload", filename="app.log", size=len(data), request_id="u")
    await client.ws.send(data[:300_000])
    refused = await client.request(type="ping")
    assert refused["code"] == "bad_frame" and "upload is in progress" in refused["message"]
    second = await client.request(type="upload", filename="b.txt", size=3)
    assert second["code"] == "bad_frame"
    sending = await client.request(type="send", content="hi")
    assert sending["code"] == "bad_frame"
    await client.ws.send(data[300_000:])
    answer = (await client.until(lambda e: e.get("request_id") == "u"))[-1]
    assert answer["type"] == "attachment", answer
    assert await server.router.files.store.read(answer["attachment"]["id"]) == data


async def test_cancel_upload_drops_it(client: Client, server: Cortex) -> None:
    await client.send(type="upload", filename="a.txt", size=600_000)
    await client.ws.send(b"y" * 300_000)
    assert (await client.request(type="cancel_upload"))["type"] == "ack"
    assert await stored_rows(server) == (0, 0)
    assert (await client.request(type="ping"))["type"] == "pong"


async def test_binary_frames_with_no_upload_are_refused_then_closed(client: Client) -> None:
    for _ in range(2):
        await client.ws.send(b"stray bytes")
        error = (await client.until_type("error"))[-1]
        assert error["code"] == "bad_frame" and "no upload" in error["message"]
    await client.ws.send(b"stray bytes")
    await client.ws.wait_closed()
    assert client.ws.close_code == 1008


async def test_upload_frames_do_not_count_against_the_rate_limits(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(
        rate_per_s=1, rate_burst=3, rate_bytes_per_s=1024, rate_bytes_burst=2048
    )
    client = await connect_to(app)
    data = b"x" * 200_000
    answer = await upload(client, data, "a.txt", piece=8_000)  # 25 frames, 200 KB
    assert answer["type"] == "attachment", answer


async def test_a_pdf_being_read_does_not_hold_the_connection(client: Client) -> None:
    """A PDF's text takes seconds (here a bomb: 7 s of pypdf): the connection goes on meanwhile,
    and the answer comes when the worker is done."""
    await client.send(type="upload", filename="bomb.pdf", size=len(BOMB), request_id="u")
    await client.ws.send(BOMB)
    assert (await client.request(type="ping"))["type"] == "pong"
    second = await client.request(type="upload", filename="b.txt", size=3)
    assert second["code"] == "bad_frame" and "still being checked" in second["message"]
    answer = (await client.until(lambda e: e.get("request_id") == "u", timeout=30))[-1]
    assert answer["code"] == "bad_attachment"
    assert client.seen.index(answer) > client.seen.index(second)


BOMB = pdf_bomb()
