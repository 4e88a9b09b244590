"""`cortex chat` in a pseudo-terminal (pexpect) against a real server with the fake provider.

The server runs in the test's event loop; pexpect's blocking calls run in a thread beside it.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pexpect
import pytest
from conftest import TIMEOUT, eventually

from cortex.app import Cortex
from cortex.testing.fake_openai import FakeOpenAI, Reply

ALICE = "alice-" + "A1" * 20
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class Terminal:
    """`cortex chat` in a pty, with waits that do not block the event loop."""

    def __init__(self, url: str, env: dict[str, str]) -> None:
        self.child = pexpect.spawn(
            sys.executable,
            ["-m", "cortex.cli", "chat", "--url", url],
            env=env,
            encoding="utf-8",
            dimensions=(50, 200),
            timeout=TIMEOUT,
        )
        self.output = ""

    async def expect(self, pattern: str, timeout: float = TIMEOUT) -> str:
        """Wait for `pattern` (a regex) in the output; what came before it, ANSI codes removed."""
        await asyncio.to_thread(self.child.expect, pattern, timeout)
        before = ANSI.sub("", f"{self.child.before}{self.child.after}")
        self.output += before
        return before

    async def line(self, text: str, *, wait_prompt: bool = True) -> str:
        self.child.sendline(text)
        return await self.expect(r"you> ") if wait_prompt else ""

    async def close(self) -> int:
        if self.child.isalive():
            self.child.sendline("/quit")
            await asyncio.to_thread(self.child.expect, pexpect.EOF, TIMEOUT)
        self.child.close()
        return int(self.child.exitstatus or 0)


@pytest.fixture
async def terminal(server: Cortex) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Terminal] = []

    async def _open(app: Cortex = server, **env: str) -> Terminal:
        environment = {k: v for k, v in os.environ.items() if k != "CORTEX_TOKEN"}
        environment.update(NO_COLOR="1", **env)
        term = Terminal(app.url, environment)
        opened.append(term)
        await term.expect(r"you> ")
        return term

    yield _open
    for term in opened:
        if term.child.isalive():
            term.child.terminate(force=True)


async def test_chat_streams_lists_switches_and_configures(
    terminal: Callable[..., Any], server: Cortex, provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(text="alpha beta gamma delta", chunks=4, chunk_delay=0.05),
        Reply(text="second conversation answer"),
        Reply(text="back in the first one"),
    )
    term: Terminal = await terminal()
    shown = await term.line("tell me a story")
    assert "assistant is typing…" in shown
    assert "assistant> alpha beta gamma delta" in shown
    first = (await server.store.conversations(owner="local"))[0][0].id

    shown = await term.line("/list")
    assert re.search(rf"\*\s+1\. tell me a story\s+\[default model\]\s+{first}", shown)
    shown = await term.line("/new")
    assert "new conversation" in shown
    shown = await term.line("another topic")
    assert "assistant> second conversation answer" in shown
    conversations, _ = await server.store.conversations(owner="local")
    assert len(conversations) == 2

    await term.line("/list")
    shown = await term.line("/open 2")  # the older one: the first conversation
    assert "— tell me a story —" in shown and "alpha beta gamma delta" in shown
    shown = await term.line("/history")
    assert "you: tell me a story" in shown and "assistant> alpha beta gamma delta" in shown
    shown = await term.line("/model mock")
    assert "this conversation now uses mock" in shown
    conv = await server.store.get_conversation(first, owner="local")
    assert conv is not None and conv.model == "mock"
    shown = await term.line("/model openai/not-allowed")
    assert "[bad_frame]" in shown
    shown = await term.line("/model default")
    assert "default model" in shown
    shown = await term.line("and now?")
    assert "assistant> back in the first one" in shown
    shown = await term.line("/help")
    assert "/cancel" in shown and "/open ID|N" in shown
    assert await term.close() == 0


async def test_cancel_with_the_command_and_with_ctrl_c(
    terminal: Callable[..., Any], provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(text="endless one two three", chunks=8, stall_after=2),
        Reply(text="endless four five six", chunks=8, stall_after=2),
    )
    term: Terminal = await terminal()
    await term.line("go on forever", wait_prompt=False)
    await term.expect(r"assistant> \S+")
    term.child.sendline("/cancel")
    shown = await term.expect(r"you> ")
    assert "[reply cancelled]" in shown
    await term.line("again", wait_prompt=False)
    await term.expect(r"assistant> \S+")
    term.child.sendintr()
    shown = await term.expect(r"you> ")
    assert "^C: cancelling the reply" in shown and "[reply cancelled]" in shown
    await eventually(lambda: provider.active_requests == 0)
    assert await term.close() == 0


async def test_reconnects_and_resumes_a_reply_without_gap_or_repeat(
    start_server: Any, terminal: Callable[..., Any], provider: FakeOpenAI
) -> None:
    app: Cortex = await start_server(auth_tokens=f"{ALICE}:alice")
    words = [f"w{i:02d}" for i in range(40)]
    provider.enqueue(Reply(text=" ".join(words) + " end.", chunk_delay=0.03))
    term: Terminal = await terminal(app, CORTEX_TOKEN=ALICE)
    await term.line("count slowly", wait_prompt=False)
    await term.expect(r"w05")
    for connection in list(app.connections):
        connection.close(1012, "restart")  # the server drops every connection
    await term.expect(r"connection lost")
    await term.expect(r"reconnected")
    await term.expect(r"end\.")
    await term.expect(r"you> ")
    text = " ".join(
        line
        for line in term.output.splitlines()
        if "connection lost" not in line and "reconnected" not in line
    )
    found = re.findall(r"w\d\d", text)
    assert found == words, found  # every word once, in order
    assert await term.close() == 0


async def test_a_refused_token_is_said_clearly(start_server: Any, provider: FakeOpenAI) -> None:
    app: Cortex = await start_server(auth_tokens=f"{ALICE}:alice")
    env = {**os.environ, "NO_COLOR": "1", "CORTEX_TOKEN": "wrong-" + "x" * 40}
    child = pexpect.spawn(
        sys.executable, ["-m", "cortex.cli", "chat", "--url", app.url], env=env, encoding="utf-8"
    )
    await asyncio.to_thread(child.expect, pexpect.EOF, TIMEOUT)
    child.close()
    assert child.exitstatus == 1
    assert "refused the connection: HTTP 401 (set --token or CORTEX_TOKEN)" in str(child.before)


async def test_edit_retry_branches_switch_delete_and_fork(
    terminal: Callable[..., Any], server: Cortex, provider: FakeOpenAI
) -> None:
    """The tree commands of issue #20: /edit, /retry, /branches, /switch N, /delete N, /fork."""
    provider.enqueue(
        Reply(text="first answer"),
        Reply(text="answer to the edit"),
        Reply(text="a retried answer"),
    )
    term: Terminal = await terminal()
    assert "assistant> first answer" in await term.line("a question")
    conversation_id = (await server.store.conversations(owner="local"))[0][0].id
    shown = await term.line("/edit a better question")
    assert "assistant> answer to the edit" in shown
    shown = await term.line("/retry")
    assert "assistant> a retried answer" in shown
    shown = await term.line("/branches")
    assert "at user 'a better question' (2/2):" in shown and "1. branch 1/2" in shown
    assert "at assistant 'a retried answer' (2/2):" in shown and "2. branch 1/2" in shown
    shown = await term.line("/switch 1")  # back to the first question and its answer
    assert "you: a question" in shown and "assistant> first answer" in shown
    path = await server.store.path_page(conversation_id)
    assert path is not None and [r.content for r in path.rows] == ["a question", "first answer"]
    await term.line("/branches")
    shown = await term.line("/delete 1")  # the edited branch goes, with both its answers
    assert "you: a question" in shown
    assert await server.store.count_messages(conversation_id) == 2
    shown = await term.line("/branches")
    assert "no other branches" in shown
    shown = await term.line("/fork")
    assert "forked into" in shown and "first answer" in shown
    conversations, _ = await server.store.conversations(owner="local")
    assert len(conversations) == 2
    shown = await term.line("/switch 9")
    assert "usage: /switch N" in shown


async def test_search_command_lists_hits_with_their_matches_marked(
    terminal: Callable[..., Any], server: Cortex, provider: FakeOpenAI
) -> None:
    provider.enqueue(Reply(text="Rotate the signing keys monthly."))
    term: Terminal = await terminal()
    assert "assistant> Rotate the signing keys monthly." in await term.line("how do I rotate keys?")
    shown = await term.line('/search "signing keys"')
    conv = (await server.store.conversations(owner="local"))[0][0].id
    assert re.search(rf"1\. how do I rotate keys\?\s+\[assistant #2\]\s+{conv}", shown)
    assert "Rotate the *signing keys* monthly." in shown
    shown = await term.line("/search nothing-like-this")
    assert "(no hits)" in shown
    shown = await term.line("/search " + "x" * 1001)
    assert "[too_large]" in shown


async def test_attach_a_file_to_the_next_message(
    terminal: Callable[..., Any], provider: FakeOpenAI, tmp_path: Any
) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("the meeting is at noon\n")
    provider.enqueue(Reply(text="noon it is"))
    term: Terminal = await terminal()
    shown = await term.line(f"/attach {notes}")
    assert "attached notes.txt: text; with your next message: notes.txt" in shown
    shown = await term.line(f"/attach {tmp_path / 'missing.txt'}")
    assert "cannot read" in shown
    binary = tmp_path / "tool.exe"
    binary.write_bytes(b"MZ" + b"\x00" * 5000)
    shown = await term.line(f"/attach {binary}")
    assert "[bad_attachment]" in shown and "executable" in shown
    shown = await term.line("when is the meeting?")
    assert "assistant> noon it is" in shown
    assert provider.requests[-1]["messages"][-1]["content"][1] == {
        "type": "text",
        "text": "[Attached file: notes.txt]\nthe meeting is at noon\n",
    }
    shown = await term.line("/history")
    assert "you: when is the meeting? [notes.txt]" in shown
    assert await term.close() == 0
