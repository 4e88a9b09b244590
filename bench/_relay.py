"""The floor under bench/capacity.py: the same relay with nothing of Cortex in it.

    python bench/_relay.py API_BASE [--interval-ms 50]

A WebSocket server (websockets on uvloop, as Cortex) that answers each `send` frame with an
`ack`, POSTs the chat-completions request to the provider on one pooled aiohttp session,
decodes each SSE event with orjson, sends the text as `delta` frames at most every
`--interval-ms` (Cortex's CORTEX_DELTA_INTERVAL_MS), then a final assistant `message`. No
database, no logs, no metrics, no auth: what one process must spend to read the model's
chunks and write the frames, measured in the same run as Cortex. Prints "READY http://..." once
it listens (an http:// URL: what the benches' process starter reads).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
from typing import Any

import aiohttp
import orjson
import uvloop
from websockets.asyncio.server import ServerConnection, serve

_ids = itertools.count(1)


async def relay(ws: ServerConnection, session: aiohttp.ClientSession, args: Any) -> None:
    async for raw in ws:
        frame = orjson.loads(raw)
        if frame.get("type") != "send":
            continue
        conv, mid = f"c{next(_ids)}", f"m{next(_ids)}"
        await ws.send(orjson.dumps({"type": "ack", "conversation_id": conv}).decode())
        body = {
            "model": "fake",
            "stream": True,
            "messages": [{"role": "user", "content": frame.get("content", "")}],
        }
        loop = asyncio.get_running_loop()
        text: list[str] = []
        sent = 0  # characters already in delta frames
        last = 0.0
        interval = args.interval_ms / 1000
        async with session.post(args.api_base + "/chat/completions", json=body) as response:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[6:])
                choices = event.get("choices") or ()
                piece = choices[0].get("delta", {}).get("content") if choices else None
                if not piece:
                    continue
                text.append(piece)
                now = loop.time()
                if now - last >= interval:
                    joined = "".join(text)
                    delta = {
                        "type": "delta",
                        "conversation_id": conv,
                        "message_id": mid,
                        "offset": sent,
                        "text": joined[sent:],
                    }
                    await ws.send(orjson.dumps(delta).decode())
                    sent, last = len(joined), now
        whole = "".join(text)
        if len(whole) > sent:
            delta = {"type": "delta", "message_id": mid, "offset": sent, "text": whole[sent:]}
            await ws.send(orjson.dumps({**delta, "conversation_id": conv}).decode())
        final = {"role": "assistant", "status": "complete", "content": whole, "id": mid}
        await ws.send(orjson.dumps({"type": "message", "message": final}).decode())


async def main(args: Any) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async with serve(
            lambda ws: relay(ws, session, args), "127.0.0.1", 0, compression=None, max_queue=None
        ) as server:
            port = next(iter(server.sockets)).getsockname()[1]
            print(f"READY http://127.0.0.1:{port}/ws", flush=True)
            await asyncio.Future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("api_base")
    parser.add_argument("--interval-ms", type=float, default=50.0)
    uvloop.run(main(parser.parse_args()))
