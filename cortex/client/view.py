"""What `cortex chat` shows: a prompt that output moves aside, and a transcript that is idempotent.

Events can arrive twice after a reconnect (a live event, then the same one in the catch-up), so
the transcript prints each stored message once (by `seq`), each reply's text once (by character
`offset`), and each reply's end once (by message id).
"""

from __future__ import annotations

import os
from typing import Any, TextIO

PROMPT = "you> "
ASSISTANT = "assistant> "
SAID = "you: "  # a stored message of yours, printed from history (unlike the prompt)
TYPING = "assistant is typing…"


class Screen:
    """Terminal output. Async output first clears a shown prompt; colour only on a terminal."""

    def __init__(self, out: TextIO, *, color: bool | None = None, prompts: bool = True) -> None:
        self.out = out
        self.prompts = prompts
        self.tty = out.isatty()
        self.color = self.tty and "NO_COLOR" not in os.environ if color is None else color
        self.prompt_shown = False
        self.midline = False  # the cursor is after streamed text

    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _clear_prompt(self) -> None:
        if self.prompt_shown:
            self._write("\r\x1b[2K" if self.tty else "\n")
            self.prompt_shown = False

    def prompt(self) -> None:
        if self.prompts and not self.prompt_shown and not self.midline:
            self._write(self._style(PROMPT, "1"))
            self.prompt_shown = True

    def typed(self) -> None:
        """The user pressed Enter: the terminal echoed a newline, the prompt is gone."""
        self.prompt_shown = False

    def line(self, text: str) -> None:
        self._clear_prompt()
        self.end_text()
        self._write(text + "\n")

    def note(self, text: str) -> None:
        """A dim line about the client itself (connection, commands)."""
        self.line(self._style(text, "2"))

    def marked(self, text: str, ranges: list[list[int]]) -> str:
        """`text` with the [start, end) `ranges` in bold, or between * without colour."""
        out, at = [], 0
        for start, end in sorted(ranges):
            if at <= start < end <= len(text):
                part = text[start:end]
                out += [text[at:start], self._style(part, "1") if self.color else f"*{part}*"]
                at = end
        return "".join([*out, text[at:]])

    def error(self, text: str) -> None:
        self.line(self._style(text, "31"))

    def start_text(self, label: str) -> None:
        self._clear_prompt()
        self.end_text()
        self._write(self._style(label, "1;36"))
        self.midline = True

    def text(self, text: str) -> None:
        self._clear_prompt()
        self._write(text)
        self.midline = True

    def end_text(self) -> None:
        if self.midline:
            self._write("\n")
            self.midline = False

    def typing(self) -> None:
        self.line(self._style(TYPING, "2;3"))

    def erase_typing(self) -> None:
        """Take back the typing line just printed (on a terminal; elsewhere it stays)."""
        if self.tty and not self.midline and not self.prompt_shown:
            self._write("\x1b[1A\r\x1b[2K")


class Transcript:
    """The open conversation as printed: which messages, reply text and endings were shown."""

    def __init__(self, screen: Screen) -> None:
        self.screen = screen
        self.reset()

    def reset(self) -> None:
        self.last_seq = 0
        self.replying = False
        self._shown: set[int] = set()  # seqs of stored messages already printed
        self.mine: set[int] = set()  # seqs of this client's own messages (echoed by the terminal)
        self._printed: dict[str, int] = {}  # reply message id -> characters printed
        self._finished: set[str] = set()
        self._typing_line = False
        self._current: str | None = None  # the reply whose text is on screen

    def seen(self, seq: int) -> None:
        self.last_seq = max(self.last_seq, seq)

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message":
            self._message(event["message"])
        elif kind == "delta":
            self._delta(event["message_id"], int(event["offset"]), event["text"])
        elif kind == "typing":
            self._typing(bool(event.get("active")))
        elif kind == "tool_call":
            arguments = event.get("arguments")
            self.screen.note(f"  [tool {event.get('name')}({_short(arguments)})]")
        elif kind == "tool_result":
            outcome = "ok" if event.get("ok") else f"failed: {event.get('error')}"
            self.screen.note(f"  [tool result {outcome}]")

    def _typing(self, active: bool) -> None:
        self.replying = active
        if active and not self._typing_line and self._current is None:
            self.screen.typing()
            self._typing_line = True
        elif not active:
            self._typing_line = False
            self.screen.end_text()
            self._current = None

    def _message(self, message: dict[str, Any]) -> None:
        seq, role, status = int(message["seq"]), message["role"], message["status"]
        self.seen(seq)
        if role == "assistant":
            if status in ("streaming", "queued"):  # queued: a regenerate's row, not yet begun
                self._printed.setdefault(message["id"], 0)
            else:
                self._finish(message)
            return
        if seq in self._shown:
            return
        self._shown.add(seq)
        if role == "user" and seq not in self.mine:
            self.screen.line(f"you (another client): {message['content']}{_files(message)}")
        elif role == "tool":
            pass  # announced by tool_call / tool_result

    def _delta(self, message_id: str, offset: int, text: str) -> None:
        printed = self._printed.get(message_id, 0)
        if message_id in self._finished or offset + len(text) <= printed:
            return  # a repeat
        if offset > printed:
            return  # a gap: the catch-up after the next (re)subscribe fills it
        self._show(message_id, text[printed - offset :])

    def _show(self, message_id: str, text: str) -> None:
        if not text:
            return
        if self._current != message_id:
            if self._typing_line:
                self.screen.erase_typing()
                self._typing_line = False
            self.screen.start_text(ASSISTANT)
            self._current = message_id
        self.screen.text(text)
        self._printed[message_id] = self._printed.get(message_id, 0) + len(text)

    def _finish(self, message: dict[str, Any]) -> None:
        message_id = message["id"]
        if message_id in self._finished:
            return
        self._finished.add(message_id)
        content = message.get("content") or ""
        printed = self._printed.get(message_id, 0)
        self._show(message_id, content[printed:])
        status = message["status"]
        if self._current == message_id:
            self.screen.end_text()
            self._current = None
        if status != "complete":
            code = message.get("error_code")
            self.screen.note(f"  [reply {status}{f': {code}' if code else ''}]")

    def history(self, messages: list[dict[str, Any]]) -> None:
        """Print a page of stored messages (oldest first) as a transcript."""
        for message in messages:
            seq, role = int(message["seq"]), message["role"]
            self.seen(seq)
            self._shown.add(seq)
            content = message.get("content") or ""
            if role == "assistant" and message["status"] in ("streaming", "queued"):
                # Still being written: show it so far; its deltas carry on from here.
                self._printed[message["id"]] = 0
                self._show(message["id"], content)
            elif role == "assistant":
                self._finished.add(message["id"])
                self._printed[message["id"]] = len(content)
                if content:
                    self.screen.line(f"{ASSISTANT}{content}")
                if message["status"] != "complete":
                    self.screen.note(f"  [reply {message['status']}]")
            elif role == "user":
                self.screen.line(f"{SAID}{content}{_files(message)}")


def _files(message: dict[str, Any]) -> str:
    """A message's attachments as the terminal shows them: " [cat.png, notes.txt]"."""
    names = [str(a.get("filename")) for a in message.get("attachments") or ()]
    return f" [{', '.join(names)}]" if names else ""


def _short(value: Any, limit: int = 80) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"
