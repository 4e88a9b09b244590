"""An upload on process A, answered by a reply generated on process B (docs/scaling.md): the
bytes live in PostgreSQL, where every process reads them."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from attach_client import upload
from attach_samples import png
from conftest import final_message
from test_scale import clients, two_processes

from cortex.testing.fake_openai import FakeOpenAI, Reply
from cortex.testing.services import RedisServer

pytestmark = pytest.mark.slow


async def test_an_upload_on_one_process_is_sent_by_the_other(
    tmp_path: Path, provider: FakeOpenAI, postgres_url: str, redis_server: RedisServer
) -> None:
    provider.enqueue(Reply(text="a red square"))
    cat = png(300, 200)
    async with (
        two_processes(
            tmp_path, provider, postgres_url, redis_server.url, vision_models="openai/fake-model"
        ) as procs,
        clients(procs[0][1], procs[1][1]) as (on_a, on_b),
    ):
        attachment = (await upload(on_a, cat, "cat.png", piece=100))["attachment"]
        procs[0][0].kill()  # A is gone: only B can read the bytes and answer
        await procs[0][0].wait()
        await on_b.send(type="send", content="what is it?", attachments=[attachment["id"]])
        events = await on_b.until_reply()
        assert final_message(events)["content"] == "a red square"
    parts = provider.requests[-1]["messages"][-1]["content"]
    assert parts[2] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + base64.b64encode(cat).decode()},
    }
