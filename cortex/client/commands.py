"""The slash commands of `cortex chat` (`/help` lists them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from .view import Screen, Transcript


class Session(Protocol):
    """What the commands use of the chat client (`chat.ChatClient`)."""

    conversation_id: str | None
    info: dict[str, Any] | None
    listing: list[dict[str, Any]]
    model: str | None
    screen: Screen
    transcript: Transcript

    def quit(self) -> None: ...

    def leave_conversation(self) -> None: ...

    async def request(self, frame: dict[str, Any]) -> dict[str, Any] | None: ...

    async def send_frame(self, frame: dict[str, Any]) -> bool: ...

    async def send_message(self, content: str) -> None: ...

    async def upload(self, data: bytes, filename: str) -> dict[str, Any] | None: ...

    attached: list[dict[str, Any]]


HISTORY_LINES = 20
HELP = """commands:
  /new             start a new conversation (with your next message)
  /list            your conversations, newest first
  /open ID|N       open a conversation by id (or its number in /list) and show its end
  /history [N]     the last N messages of this conversation (default 20)
  /search WORDS    search your conversations: words, "a phrase", prefix*, -excluded
  /cancel          stop the reply in progress (or press Ctrl+C)
  /model [NAME]    show or set the model (of this conversation, or of the next new one)
  /rename TITLE    rename this conversation
  /delete          delete this conversation and its messages
  /edit TEXT       replace your last message with TEXT (a new branch) and get a new reply
  /retry           another reply to your last message (a new branch)
  /branches        the other branches along this conversation, numbered
  /switch N        go to branch N of /branches
  /delete N        delete branch N of /branches (and everything beneath it)
  /fork            a new conversation with a copy of this one's path
  /attach PATH     attach a file (image, text, PDF) to your next message
  /help            this list
  /quit            leave (or Ctrl+D; Ctrl+C twice)
A line starting with // sends the rest of it, starting with /."""


class Commands:
    def __init__(self, client: Session) -> None:
        self.client = client
        self.table: dict[str, Callable[[str], Awaitable[None]]] = {
            "help": self.help,
            "quit": self.leave,
            "exit": self.leave,
            "new": self.new,
            "list": self.list_conversations,
            "open": self.open,
            "history": self.history,
            "search": self.search,
            "cancel": self.cancel,
            "model": self.model,
            "rename": self.rename,
            "delete": self.delete,
            "edit": self.edit,
            "retry": self.retry,
            "branches": self.branches,
            "switch": self.switch,
            "fork": self.fork,
            "attach": self.attach,
        }
        self.alternatives: list[str] = []  # the branches /branches numbered

    async def run(self, line: str) -> None:
        """Run a command line, or send the line as a message."""
        client = self.client
        if line.startswith("//"):
            await client.send_message(line[1:])
            return
        if not line.startswith("/"):
            if line.strip():
                await client.send_message(line)
            return
        name, _, argument = line[1:].partition(" ")
        handler = self.table.get(name.lower())
        if handler is None:
            client.screen.note(f"unknown command /{name}; /help lists them")
            return
        await handler(argument.strip())

    async def help(self, _argument: str) -> None:
        self.client.screen.note(HELP)

    async def leave(self, _argument: str) -> None:
        self.client.quit()

    async def new(self, _argument: str) -> None:
        client = self.client
        if client.conversation_id is not None:
            await client.request({"type": "unsubscribe", "conversation_id": client.conversation_id})
        client.leave_conversation()
        client.screen.note("(new conversation: your next message starts it)")

    async def list_conversations(self, _argument: str) -> None:
        client = self.client
        page = await client.request({"type": "conversations", "limit": 20})
        if page is None:
            return
        client.listing = page.get("items", [])
        if not client.listing:
            client.screen.note("(no conversations yet)")
        for number, item in enumerate(client.listing, start=1):
            mark = "*" if item["id"] == client.conversation_id else " "
            model = item.get("model") or "default model"
            title = item.get("title") or "(untitled)"
            client.screen.line(f"{mark}{number:>3}. {title}  [{model}]  {item['id']}")
        if page.get("has_more"):
            client.screen.note("  (older conversations not shown)")

    def _resolve(self, argument: str) -> str:
        listing = self.client.listing
        if argument.isdigit() and 1 <= int(argument) <= len(listing):
            return str(listing[int(argument) - 1]["id"])
        matches = [item["id"] for item in listing if str(item["id"]).startswith(argument)]
        return str(matches[0]) if len(matches) == 1 else argument

    async def open(self, argument: str) -> None:
        client = self.client
        if not argument:
            client.screen.note("usage: /open ID (or a number from /list)")
            return
        target = self._resolve(argument)
        page = await client.request(
            {"type": "history", "conversation_id": target, "limit": HISTORY_LINES}
        )
        if page is None:
            return
        if client.conversation_id is not None and client.conversation_id != target:
            await client.request({"type": "unsubscribe", "conversation_id": client.conversation_id})
        client.leave_conversation()
        client.conversation_id = target
        client.info = next((item for item in client.listing if item["id"] == target), None)
        client.screen.note(f"— {(client.info or {}).get('title') or target} —")
        if page.get("has_more"):
            client.screen.note(f"  (older messages: /history {HISTORY_LINES * 5})")
        client.transcript.history(page.get("messages", []))
        await client.send_frame(
            {
                "type": "subscribe",
                "conversation_id": target,
                "after_seq": client.transcript.last_seq,
            }
        )

    async def history(self, argument: str) -> None:
        client = self.client
        if client.conversation_id is None:
            client.screen.note("(no conversation open: /list, then /open)")
            return
        limit = min(int(argument), 200) if argument.isdigit() and int(argument) else HISTORY_LINES
        page = await client.request(
            {"type": "history", "conversation_id": client.conversation_id, "limit": limit}
        )
        if page is not None:
            messages = page.get("messages", [])
            client.screen.note(f"— the last {len(messages)} messages —")
            Transcript(client.screen).history(messages)  # a printout: the live state is kept

    async def search(self, argument: str) -> None:
        client = self.client
        if not argument:
            client.screen.note('usage: /search WORDS ("a phrase", prefix*, -excluded)')
            return
        answer = await client.request({"type": "search", "query": argument, "limit": 20})
        if answer is None:
            return
        items = answer.get("items", [])
        if not items:
            client.screen.note("(no hits)")
        for number, hit in enumerate(items, start=1):
            title = hit.get("conversation_title") or "(untitled)"
            where = "title" if hit["kind"] == "title" else f"{hit.get('role')} #{hit.get('seq')}"
            client.screen.line(f"{number:>3}. {title}  [{where}]  {hit['conversation_id']}")
            snippet = client.screen.marked(hit.get("snippet", ""), hit.get("highlights", []))
            client.screen.line(f"     {snippet}")
        if answer.get("next_cursor"):
            client.screen.note("  (more hits: narrow the search)")
        if items:
            client.screen.note("  (/open ID opens a conversation)")

    async def cancel(self, _argument: str) -> None:
        client = self.client
        if client.conversation_id is None or not client.transcript.replying:
            client.screen.note("(no reply in progress)")
            return
        await client.request({"type": "cancel", "conversation_id": client.conversation_id})

    async def model(self, argument: str) -> None:
        client = self.client
        if not argument:
            current = (client.info or {}).get("model") if client.conversation_id else client.model
            client.screen.note(f"model: {current or 'the server default'}")
            return
        model = None if argument in ("default", "-") else argument
        if client.conversation_id is None:
            client.model = model
            client.screen.note(f"(the next new conversation uses {model or 'the default model'})")
            return
        answer = await client.request(
            {"type": "configure", "conversation_id": client.conversation_id, "model": model}
        )
        if answer is not None:
            client.screen.note(f"(this conversation now uses {model or 'the default model'})")

    async def rename(self, argument: str) -> None:
        client = self.client
        if client.conversation_id is None or not argument:
            client.screen.note("usage: /rename TITLE, in an open conversation")
            return
        await client.request(
            {"type": "rename", "conversation_id": client.conversation_id, "title": argument}
        )

    async def attach(self, argument: str) -> None:
        """Upload a file now; it goes with the next message."""
        client = self.client
        if not argument:
            client.screen.note("usage: /attach PATH (then type your message)")
            return
        path = Path(argument)
        try:
            data = await asyncio.to_thread(lambda: path.expanduser().read_bytes())
        except OSError as exc:
            client.screen.note(f"(cannot read {path}: {exc.strerror or exc})")
            return
        attachment = await client.upload(data, path.name)
        if attachment is None:
            return
        client.attached.append(attachment)
        what = attachment["kind"]
        if attachment.get("width"):
            what += f" {attachment['width']}x{attachment['height']}"
        elif attachment.get("pages"):
            what += f", {attachment['pages']} pages"
        names = ", ".join(a["filename"] for a in client.attached)
        client.screen.note(
            f"(attached {attachment['filename']}: {what}; with your next message: {names})"
        )

    async def delete(self, argument: str) -> None:
        client = self.client
        if client.conversation_id is None:
            client.screen.note("(no conversation open)")
            return
        if argument:
            await self._branch_frame("delete_branch", argument)
            return
        if await client.request({"type": "delete", "conversation_id": client.conversation_id}):
            client.leave_conversation()  # the `conversation` {deleted} event said so already

    # ---- branches (docs/protocol.md, "Branches") ---------------------------------------------

    async def _path(self) -> list[dict[str, Any]]:
        """The active path's newest messages (history reads the active path)."""
        client = self.client
        if client.conversation_id is None:
            client.screen.note("(no conversation open)")
            return []
        page = await client.request(
            {"type": "history", "conversation_id": client.conversation_id, "limit": 200}
        )
        return list(page.get("messages", [])) if page is not None else []

    async def edit(self, argument: str) -> None:
        client = self.client
        if not argument:
            client.screen.note("usage: /edit TEXT (replaces your last message)")
            return
        mine = [m for m in await self._path() if m["role"] == "user"]
        if not mine:
            client.screen.note("(no message of yours to edit)")
            return
        client.transcript.replying = True
        frame = {
            "type": "edit",
            "conversation_id": client.conversation_id,
            "message_id": mine[-1]["id"],
            "content": argument,
        }
        if await client.request(frame) is None:
            client.transcript.replying = False

    async def retry(self, _argument: str) -> None:
        client = self.client
        replies = [m for m in await self._path() if m["role"] == "assistant"]
        if not replies:
            client.screen.note("(no reply to retry)")
            return
        client.transcript.replying = True
        frame = {
            "type": "regenerate",
            "conversation_id": client.conversation_id,
            "message_id": replies[-1]["id"],
        }
        if await client.request(frame) is None:
            client.transcript.replying = False

    async def branches(self, _argument: str) -> None:
        client = self.client
        self.alternatives = []
        for message in await self._path():
            siblings = message.get("sibling_ids") or [message["id"]]
            if len(siblings) < 2:
                continue
            place = siblings.index(message["id"]) + 1
            client.screen.line(
                f"  at {message['role']} {_quote(message['content'])} ({place}/{len(siblings)}):"
            )
            for other in siblings:
                if other == message["id"]:
                    continue
                self.alternatives.append(other)
                client.screen.line(
                    f"  {len(self.alternatives):>3}. branch {place_of(siblings, other)}"
                )
        if not self.alternatives:
            client.screen.note("(no other branches along this conversation)")

    async def switch(self, argument: str) -> None:
        await self._branch_frame("switch_branch", argument)

    async def _branch_frame(self, kind: str, argument: str) -> None:
        client = self.client
        if not argument.isdigit() or not 1 <= int(argument) <= len(self.alternatives):
            client.screen.note("usage: /switch N or /delete N, N from /branches")
            return
        target = self.alternatives[int(argument) - 1]
        answer = await client.request(
            {"type": kind, "conversation_id": client.conversation_id, "message_id": target}
        )
        if answer is not None:
            self.alternatives = []
            await self.history("")

    async def fork(self, _argument: str) -> None:
        client = self.client
        path = await self._path()
        if not path:
            return
        answer = await client.request(
            {
                "type": "fork",
                "conversation_id": client.conversation_id,
                "message_id": path[-1]["id"],
            }
        )
        if answer is not None:
            client.screen.note(f"(forked into {answer['conversation_id']})")
            await self.open(str(answer["conversation_id"]))


def place_of(siblings: list[str], message_id: str) -> str:
    return f"{siblings.index(message_id) + 1}/{len(siblings)}"


def _quote(text: str, limit: int = 40) -> str:
    line = " ".join(text.split())
    return repr(line if len(line) <= limit else line[: limit - 1] + "…")
