"""`cortex chat`: a terminal client over the WebSocket.

Replies stream as they arrive, with the typing state shown until the first words. When the
connection drops, the client reconnects with backoff and resumes: messages not yet acknowledged
are sent again (their `client_msg_id` makes that safe), and the open conversation is
re-subscribed from the last `seq` seen, which also brings the text so far of a reply in progress.
Ctrl+C during a reply cancels it; Ctrl+C twice (or Ctrl+D, or /quit) leaves.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import os
import random
import signal
import sys
import time
import uuid
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from .commands import Commands
from .view import Screen, Transcript

RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
ANSWER_TIMEOUT_S = 15.0
UPLOAD_PIECE = 256 * 1024  # bytes a binary frame: well within the server's frame limit
UPLOAD_TIMEOUT_S = 120.0  # a PDF's text is extracted before the answer


class ChatClient:
    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        conversation_id: str | None = None,
        model: str | None = None,
        out: TextIO | None = None,
        in_fd: int | None = None,
    ) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else None
        self._in_fd = sys.stdin.fileno() if in_fd is None else in_fd
        # Prompts only for a person at a terminal, not for input from a pipe or a file.
        self.screen = Screen(out if out is not None else sys.stdout, prompts=os.isatty(self._in_fd))
        self.transcript = Transcript(self.screen)
        self.conversation_id = conversation_id
        self.info: dict[str, Any] | None = None  # the open conversation's view, when known
        self.model = model  # for new conversations
        self.attached: list[dict[str, Any]] = []  # /attach: they go with the next message
        self.ws: ClientConnection | None = None
        self.outbox: dict[str, dict[str, Any]] = {}  # client_msg_id -> send, until acknowledged
        self.listing: list[dict[str, Any]] = []  # the last /list, for /open N
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._quit = asyncio.Event()
        self._exit = 0
        self._last_sigint = 0.0
        self.commands = Commands(self)

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self) -> int:
        try:
            ws = await self._connect()
        except InvalidStatus as exc:
            return self._refused(exc.response.status_code)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            print(f"cannot connect to {self.url}: {exc}", file=sys.stderr)
            return 1
        loop = asyncio.get_running_loop()
        self._watch_input(loop)
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self._sigint)
        self.screen.note(f"connected to {self.url}. Type a message, or /help. Ctrl+D quits.")
        connection = asyncio.create_task(self._connection(ws))
        opening, self.conversation_id = self.conversation_id, None
        reader = asyncio.create_task(self._input(opening))
        try:
            await self._quit.wait()
        finally:
            for task in (reader, connection):
                task.cancel()
            await asyncio.gather(reader, connection, return_exceptions=True)
            with contextlib.suppress(Exception):
                loop.remove_reader(self._in_fd)
                loop.remove_signal_handler(signal.SIGINT)
            if self.ws is not None:
                await self.ws.close()
            self.screen.end_text()
        return self._exit

    async def _connect(self) -> ClientConnection:
        return await connect(
            self.url, additional_headers=self.headers, max_size=None, open_timeout=10
        )

    def _refused(self, status: int) -> int:
        hint = " (set --token or CORTEX_TOKEN)" if status in (401, 403) else ""
        print(
            f"the server at {self.url} refused the connection: HTTP {status}{hint}", file=sys.stderr
        )
        return 1

    async def _connection(self, ws: ClientConnection | None) -> None:
        """Read events; when the connection drops, reconnect with backoff and resume."""
        delay = RETRY_FIRST_S
        while True:
            if ws is None:
                try:
                    ws = await self._connect()
                except InvalidStatus as exc:
                    if exc.response.status_code in (401, 403):
                        self._exit = self._refused(exc.response.status_code)
                        self._quit.set()
                        return
                except (OSError, InvalidHandshake, TimeoutError):
                    pass
                if ws is None:
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self.screen.note("reconnected")
            delay = RETRY_FIRST_S
            self.ws = ws
            try:
                await self._resume(ws)
                async for raw in ws:
                    self._on_frame(raw)
            except ConnectionClosed:
                pass
            self.ws = None
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("connection lost"))
            code = ws.close_code
            ws = None
            self.screen.note(f"connection lost ({code or 'no close code'}); reconnecting…")

    async def _resume(self, ws: ClientConnection) -> None:
        # Unacknowledged sends first: their acks then come before the catch-up, so this
        # client's own messages are recognised and not printed again.
        for frame in list(self.outbox.values()):
            await ws.send(json.dumps(frame))
        if self.conversation_id is not None:
            await ws.send(
                json.dumps(
                    {
                        "type": "subscribe",
                        "conversation_id": self.conversation_id,
                        "after_seq": self.transcript.last_seq,
                    }
                )
            )

    # ---- input --------------------------------------------------------------------------

    def _watch_input(self, loop: asyncio.AbstractEventLoop) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        buffer = ""

        def readable() -> None:
            nonlocal buffer
            try:
                data = os.read(self._in_fd, 65536)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self._in_fd)
                self._lines.put_nowait(None)
                return
            buffer += decoder.decode(data)
            while "\n" in buffer:
                line, buffer = buffer.split("\n", 1)
                self._lines.put_nowait(line.rstrip("\r"))

        try:
            loop.add_reader(self._in_fd, readable)
        except PermissionError:
            # A regular file (or /dev/null) cannot be polled, and never blocks: read it now.
            while data := os.read(self._in_fd, 65536):
                buffer += decoder.decode(data)
            buffer += decoder.decode(b"", final=True)
            for line in buffer.splitlines():
                self._lines.put_nowait(line)
            self._lines.put_nowait(None)

    async def _input(self, opening: str | None) -> None:
        if opening is not None:
            await self.commands.open(opening)
        self.screen.prompt()
        while True:
            line = await self._lines.get()
            if line is None:  # end of input: let what was sent be answered, then leave
                await self._settle()
                self._quit.set()
                return
            self.screen.typed()
            try:
                await self.commands.run(line)
            except Exception as exc:  # a client bug must not end the session
                self.screen.error(f"[client error] {type(exc).__name__}: {exc}")
            if not self.transcript.replying and not self._quit.is_set():
                self.screen.prompt()

    async def _settle(self, limit_s: float = 600.0) -> None:
        deadline = time.monotonic() + limit_s
        # Polls: the outbox and the reply state change in several places, none of them special.
        while (self.outbox or self.transcript.replying) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    def _sigint(self) -> None:
        if self.transcript.replying and self.conversation_id is not None:
            self.screen.note("^C: cancelling the reply")
            asyncio.get_running_loop().create_task(self.commands.cancel(""))
            return
        now = time.monotonic()
        if now - self._last_sigint < 2.0:
            self._quit.set()
            return
        self._last_sigint = now
        self.screen.note("^C: press Ctrl+C again to quit (or /quit)")
        self.screen.prompt()

    # ---- frames from the server ---------------------------------------------------------

    def _on_frame(self, raw: str | bytes) -> None:
        event: dict[str, Any] = json.loads(raw)
        kind, rid = event.get("type"), event.get("request_id")
        if isinstance(rid, str) and rid.startswith("send:"):
            self._send_answered(rid[5:], event)
            return
        future = self._waiting.get(rid) if isinstance(rid, str) else None
        if future is not None:
            if not future.done():
                future.set_result(event)
            return
        conversation = event.get("conversation_id")
        if conversation is not None and conversation != self.conversation_id:
            return  # a conversation this client has left
        if kind == "error":
            self.screen.error(f"[{event.get('code')}] {event.get('message')}")
        elif kind == "conversation":
            self._conversation_event(event)
        else:
            self.transcript.on_event(event)
            if kind == "typing" and not event.get("active"):
                self.screen.prompt()

    def _send_answered(self, client_msg_id: str, event: dict[str, Any]) -> None:
        frame = self.outbox.pop(client_msg_id, None)
        if event.get("type") == "error":
            self.transcript.replying = False
            self.screen.error(f"[{event.get('code')}] {event.get('message')}")
            self.screen.prompt()
            return
        if frame is None or event.get("type") != "ack":
            return
        conversation_id = event["conversation_id"]
        if self.conversation_id is None and "conversation_id" not in frame:
            self.conversation_id = conversation_id
            self.screen.note(f"(new conversation {conversation_id})")
        if conversation_id == self.conversation_id:
            self.transcript.mine.add(int(event["seq"]))
            self.transcript.seen(int(event["seq"]))

    def _conversation_event(self, event: dict[str, Any]) -> None:
        if event.get("deleted"):
            self.screen.note("(this conversation was deleted; your next message starts a new one)")
            self.leave_conversation()
            return
        if event.get("active_leaf_id"):
            self.screen.note("(the conversation moved to another branch: /history shows it)")
        view = event.get("conversation") or {}
        before = self.info or {}
        if before and view.get("title") != before.get("title"):
            self.screen.note(f"(title: {view.get('title')})")
        if before and view.get("model") != before.get("model"):
            self.screen.note(f"(model: {view.get('model') or 'the server default'})")
        self.info = view

    # ---- state used by the commands ------------------------------------------------------

    def quit(self) -> None:
        self._quit.set()

    def leave_conversation(self) -> None:
        """Forget the open conversation; the next message starts a new one."""
        self.conversation_id = None
        self.info = None
        self.transcript.reset()

    # ---- requests -----------------------------------------------------------------------

    async def send_frame(self, frame: dict[str, Any]) -> bool:
        ws = self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(frame))
        except ConnectionClosed:
            return False
        return True

    async def request(self, frame: dict[str, Any]) -> dict[str, Any] | None:
        """Send a frame and wait for its direct answer (None, said why, if there is none)."""
        rid = f"c{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        try:
            if not await self.send_frame({**frame, "request_id": rid}):
                self.screen.note("(not connected; try again in a moment)")
                return None
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                answer = await future
        except (ConnectionError, TimeoutError):
            self.screen.note("(no answer: the connection was lost)")
            return None
        finally:
            self._waiting.pop(rid, None)
        if answer.get("type") == "error":
            self.screen.error(f"[{answer.get('code')}] {answer.get('message')}")
            return None
        return answer

    async def upload(self, data: bytes, filename: str) -> dict[str, Any] | None:
        """Send a file (the `upload` frame, then its bytes) and wait for its `attachment`."""
        rid = f"c{next(self._ids)}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        frame = {"type": "upload", "filename": filename, "size": len(data), "request_id": rid}
        try:
            if not await self.send_frame(frame):
                self.screen.note("(not connected; try again in a moment)")
                return None
            ws = self.ws
            for start in range(0, len(data), UPLOAD_PIECE):
                if future.done() or ws is None:
                    break  # refused already: no need to send the rest
                await ws.send(data[start : start + UPLOAD_PIECE])
            async with asyncio.timeout(UPLOAD_TIMEOUT_S):
                answer = await future
        except (ConnectionError, ConnectionClosed, TimeoutError):
            self.screen.note("(no answer: the connection was lost)")
            return None
        finally:
            self._waiting.pop(rid, None)
        if answer.get("type") == "error":
            self.screen.error(f"[{answer.get('code')}] {answer.get('message')}")
            return None
        attachment: dict[str, Any] = answer["attachment"]
        return attachment

    async def send_message(self, content: str) -> None:
        client_msg_id = uuid.uuid4().hex
        frame: dict[str, Any] = {
            "type": "send",
            "content": content,
            "client_msg_id": client_msg_id,
            "request_id": f"send:{client_msg_id}",
        }
        if self.attached:
            frame["attachments"] = [a["id"] for a in self.attached]
            self.attached = []
        if self.conversation_id is not None:
            frame["conversation_id"] = self.conversation_id
        elif self.model:
            frame["model"] = self.model
        self.outbox[client_msg_id] = frame
        self.transcript.replying = True  # until typing goes off (or the send fails)
        if not await self.send_frame(frame):
            self.screen.note("(not connected: it will be sent when the connection is back)")


async def run_chat(
    url: str,
    *,
    conversation_id: str | None = None,
    token: str | None = None,
    model: str | None = None,
) -> int:
    """Run the terminal client until the user leaves; the exit status."""
    client = ChatClient(
        url,
        token=token or os.environ.get("CORTEX_TOKEN"),
        conversation_id=conversation_id,
        model=model,
    )
    return await client.run()
