"""`cortex chat`: a terminal client that streams replies as they arrive."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


async def run_chat(
    url: str, *, conversation_id: str | None = None, token: str | None = None
) -> int:
    token = token or os.environ.get("CORTEX_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with connect(url, additional_headers=headers, max_size=None) as ws:
            print(f"connected to {url}; type a message, Ctrl+D to quit", flush=True)
            return await _loop(ws, conversation_id)
    except OSError as exc:
        print(f"cannot connect to {url}: {exc}", file=sys.stderr)
        return 1


async def _loop(ws: ClientConnection, conversation_id: str | None) -> int:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, _prompt)
        if line is None:
            return 0
        if not line.strip():
            continue
        frame: dict[str, Any] = {"type": "send", "content": line, "client_msg_id": uuid.uuid4().hex}
        if conversation_id:
            frame["conversation_id"] = conversation_id
        await ws.send(json.dumps(frame))
        conversation_id = await _print_reply(ws, conversation_id)


def _prompt() -> str | None:
    try:
        return input("you> ")
    except EOFError:
        return None


async def _print_reply(ws: ClientConnection, conversation_id: str | None) -> str | None:
    """Print deltas until the assistant's final message (or an error) arrives."""
    started = False
    async for raw in ws:
        event = json.loads(raw)
        kind = event.get("type")
        if kind == "ack":
            conversation_id = event.get("conversation_id", conversation_id)
        elif kind == "delta":
            if not started:
                print("assistant> ", end="", flush=True)
                started = True
            print(event["text"], end="", flush=True)
        elif kind == "tool_call":
            print(f"\n  [tool {event['name']}({json.dumps(event['arguments'])})]", flush=True)
        elif kind == "error":
            print(f"\n[error {event['code']}] {event['message']}", flush=True)
        elif kind == "message":
            message = event["message"]
            if (
                message["role"] == "assistant"
                and message["status"] != "streaming"
                and not message.get("tool_calls")
            ):
                if not started and message["content"]:
                    print(f"assistant> {message['content']}", end="")
                print(flush=True)
                return conversation_id
    return conversation_id
