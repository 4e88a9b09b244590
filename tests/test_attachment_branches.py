"""Attachments on the conversation tree: an edit keeps the original's files unless it names
others, a deleted branch frees the files only it used, and a fork shares them."""

from __future__ import annotations

from typing import Any

from attach_client import stored_rows, upload
from conftest import final_message

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI

BOTH_BACKENDS = True


def _files(content: Any) -> list[str]:
    """The attachment headers among the parts the model got."""
    if isinstance(content, str):
        return []
    return [p["text"].split("\n")[0] for p in content if p["text"].startswith("[Attached")]


async def test_an_edit_keeps_or_replaces_the_files_and_the_model_sees_them(
    server: Cortex, connect_to: Any, provider: FakeOpenAI
) -> None:
    client = await connect_to(server)
    notes = (await upload(client, b"the notes\n", "notes.txt"))["attachment"]["id"]
    other = (await upload(client, b"other notes\n", "other.txt"))["attachment"]["id"]
    ack = await client.request(type="send", content="read this", attachments=[notes])
    conv, first = ack["conversation_id"], ack["message_id"]
    await client.request(type="subscribe", conversation_id=conv, after_seq=0)
    final_message(await client.until_reply())
    assert _files(provider.requests[-1]["messages"][-1]["content"]) == [
        "[Attached file: notes.txt]"
    ]

    # No `attachments` in the edit: the original's are kept.
    await client.request(type="edit", conversation_id=conv, message_id=first, content="again")
    final_message(await client.until_reply())
    assert _files(provider.requests[-1]["messages"][-1]["content"]) == [
        "[Attached file: notes.txt]"
    ]
    page = await client.request(type="history", conversation_id=conv)
    assert [a["id"] for a in page["messages"][0]["attachments"]] == [notes]

    # Named: those instead; another user's id or an unknown one is not_found, nothing stored.
    ack = await client.request(
        type="edit", conversation_id=conv, message_id=first, content="now", attachments=[other]
    )
    final_message(await client.until_reply())
    assert _files(provider.requests[-1]["messages"][-1]["content"]) == [
        "[Attached file: other.txt]"
    ]
    before = len(provider.requests)
    error = await client.request(
        type="edit", conversation_id=conv, message_id=first, content="x", attachments=["f" * 32]
    )
    assert error["type"] == "error" and error["code"] == "not_found"
    page = await client.request(type="history", conversation_id=conv)
    assert page["messages"][0]["content"] == "now" and len(provider.requests) == before


async def test_a_deleted_branch_frees_its_own_files_and_a_fork_shares_them(
    server: Cortex, connect_to: Any
) -> None:
    client = await connect_to(server)
    kept = (await upload(client, b"kept\n", "kept.txt"))["attachment"]["id"]
    gone = (await upload(client, b"gone\n", "gone.txt"))["attachment"]["id"]
    ack = await client.request(type="send", content="first", attachments=[kept])
    conv, first = ack["conversation_id"], ack["message_id"]
    await client.request(type="subscribe", conversation_id=conv, after_seq=0)
    final_message(await client.until_reply())
    edited = await client.request(
        type="edit", conversation_id=conv, message_id=first, content="second", attachments=[gone]
    )
    final_message(await client.until_reply())
    assert (await stored_rows(server))[0] == 2

    fork = await client.request(type="fork", conversation_id=conv, message_id=edited["message_id"])
    forked = await client.request(type="history", conversation_id=fork["conversation_id"])
    assert [a["id"] for a in forked["messages"][0]["attachments"]] == [gone]  # shared, not copied
    assert (await stored_rows(server))[0] == 2

    # The fork still uses `gone`: deleting the branch in the original keeps the file.
    await client.request(
        type="delete_branch", conversation_id=conv, message_id=edited["message_id"]
    )
    assert (await stored_rows(server))[0] == 2
    # Once the fork goes too, nothing uses it: it is freed; `kept` stays with its branch.
    await client.request(type="delete", conversation_id=fork["conversation_id"])
    assert (await stored_rows(server))[0] == 1
    page = await client.request(type="history", conversation_id=conv)
    assert [a["id"] for a in page["messages"][0]["attachments"]] == [kept]
