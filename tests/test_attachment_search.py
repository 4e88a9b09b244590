"""Search finds attachments by name and by their text (migration 0008): a hit of kind
`attachment` opens the message that carries the file, and leaves with it."""

from __future__ import annotations

from typing import Any

from attach_client import upload
from attach_samples import pdf
from conftest import final_message

from cortex.app import Cortex

BOTH_BACKENDS = True


async def test_files_are_found_by_name_and_text_until_their_message_goes(
    server: Cortex, connect_to: Any
) -> None:
    client = await connect_to(server)
    notes = await upload(client, b"rotate the signing keys quarterly\n", "runbook.txt")
    paper = await upload(client, pdf(["Pangolins migrate at dusk"]), "field-notes.pdf")
    ids = [notes["attachment"]["id"], paper["attachment"]["id"]]
    ack = await client.request(type="send", content="two files", attachments=ids)
    conv, message = ack["conversation_id"], ack["message_id"]
    await client.request(type="subscribe", conversation_id=conv, after_seq=0)
    final_message(await client.until_reply())

    (hit,) = (await client.request(type="search", query="quarterly"))["items"]
    assert (hit["kind"], hit["message_id"], hit["seq"], hit["role"]) == (
        "attachment",
        message,
        1,
        "user",
    )
    assert hit["snippet"].startswith("runbook.txt: ")
    assert [hit["snippet"][a:b] for a, b in hit["highlights"]] == ["quarterly"]
    (by_name,) = (await client.request(type="search", query="runbook"))["items"]
    assert by_name["kind"] == "attachment"
    (in_pdf,) = (await client.request(type="search", query="pangolin*"))["items"]
    assert in_pdf["snippet"].startswith("field-notes.pdf: ")

    # An edit keeps the files: its message carries them too, and a switch back shows both.
    edit = await client.request(type="edit", conversation_id=conv, message_id=message, content="hi")
    final_message(await client.until_reply())
    hits = (await client.request(type="search", query="quarterly"))["items"]
    assert sorted((h["message_id"], h["on_active_path"]) for h in hits) == sorted(
        [(message, False), (edit["message_id"], True)]
    )
    await client.request(type="delete_branch", conversation_id=conv, message_id=edit["message_id"])
    hits = (await client.request(type="search", query="quarterly"))["items"]
    assert [h["message_id"] for h in hits] == [message]

    await client.request(type="delete", conversation_id=conv)
    assert (await client.request(type="search", query="quarterly OR runbook"))["items"] == []
