"""Client swarms for the issue-8 benches: lean WebSocket clients in worker processes.

Long because it carries its own minimal RFC 6455 client (a `websockets` client costs as much CPU
as the server it measures) and the worker protocol that drives it.

    .venv/bin/python bench/_swarm.py worker      # a client worker: JSON commands on stdin
    .venv/bin/python bench/_swarm.py provider    # a fake provider whose reply length is asked

A bench that measures a server's CPU must not run thousands of clients in the server's
process, nor let the clients' own cost hide the server's on a 2-core machine. So the clients
here are a minimal RFC 6455 client (`RawWs`, an asyncio Protocol: handshake, frame parsing,
masked sends, pong, close) in worker processes that the bench drives with one JSON line per
command (`Swarm`, `serve_commands`). A delta frame is recognised by its prefix and counted,
not JSON-decoded (unless its offset and text are to be checked: `reply_problem`); every other
frame is decoded. `time.monotonic()` is CLOCK_MONOTONIC, one clock for every
process of the machine, so times taken in workers compare with the bench's own.

Also here: the scripted provider (the fake OpenAI server of cortex.testing, answering
"words=N" with N one-word chunks), a py-spy wrapper that prints the hottest functions of a
process, and readings of the server's /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import struct
import sys
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from _common import litellm_chunks, raise_fd_limit

from cortex.testing.deltas import join_deltas

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_DELTA_PREFIX = b'{"type":"delta'  # also matches a future coalesced "deltas" frame
_HEADER_END = b"\r\n\r\n"
_HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- WebSocket client


def _mask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    n = len(payload)
    keystream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big")


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    key = os.urandom(4)
    return head + key + _mask(payload, key)


class RawWs(asyncio.Protocol):
    """One client WebSocket, lean enough that a few processes can hold thousands.

    Counts wire bytes and frames, counts delta frames by prefix (their arrival times too when
    `keep_times`, their offset and text when `keep_pieces`), decodes every other text frame
    and remembers acks, the final assistant message and errors. Answers pings. It may offer
    permessage-deflate (as browsers do); it then inflates what it receives and sends
    uncompressed frames, which the extension allows.
    """

    def __init__(self, host: str, port: int, path: str, offer_deflate: bool) -> None:
        loop = asyncio.get_running_loop()
        self._host, self._port, self._path = host, port, path
        self._offer_deflate = offer_deflate
        self._key = base64.b64encode(os.urandom(16))
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._buf = bytearray()
        self._open = False
        self._fragments: bytearray | None = None
        self._compressed = False
        self._inflater: Any = None  # a zlib decompressor once permessage-deflate is agreed
        self.extensions = ""
        self.close_code: int | None = None
        self._close_sent = False
        # What a bench reads; reset() clears it.
        self.bytes_in = 0
        self.frames_in = 0
        self.deltas = 0
        self.first_delta = 0.0
        self.last_delta = 0.0
        self.keep_times = False
        self.decode_all = False  # also JSON-decode delta frames, as a real client would
        self.delta_times = array("d")
        self.pieces: list[tuple[int, str]] | None = None  # (offset, text) of every delta
        self.acks: list[dict[str, Any]] = []
        self.ack_waiter: asyncio.Future[dict[str, Any]] | None = None
        self.final: dict[str, Any] | None = None
        self.final_time = 0.0
        self.final_waiter: asyncio.Future[None] | None = None
        self.conversation_id: str | None = None
        self.errors: list[str] = []
        self.pongs = 0
        self.pong_waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        lines = [
            f"GET {self._path} HTTP/1.1",
            f"Host: {self._host}:{self._port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        if self._offer_deflate:  # what browsers offer
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost in handshake: {exc}"))
        if not self.lost.done():
            self.lost.set_result(None)
        for waiter in (self.ack_waiter, self.final_waiter, self.pong_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionError(f"closed (code {self.close_code})"))
                waiter.exception()  # whoever awaits it still gets it; nobody else is told

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._open:
            end = buf.find(_HEADER_END)
            if end < 0:
                return
            self._handshake(bytes(buf[:end]))
            del buf[: end + 4]
            if not self._open:
                return
        self.bytes_in += len(data)
        now = time.monotonic()
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if b1 & 0x80:  # a masked server frame is a protocol error; take its key anyway
                head += 4
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            self.frames_in += 1
            self._on_frame(b0, payload, now)
        if pos:
            del buf[:pos]

    # -- frames
    def _handshake(self, head: bytes) -> None:
        status, _, rest = head.partition(b"\r\n")
        if b" 101 " not in status + b" ":
            self.opened.set_exception(ConnectionError(status.decode(errors="replace")))
            assert self.transport is not None
            self.transport.close()
            return
        headers = {}
        for line in rest.split(b"\r\n"):
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        if headers.get(b"sec-websocket-accept") != accept:
            self.opened.set_exception(ConnectionError("bad Sec-WebSocket-Accept"))
            assert self.transport is not None
            self.transport.close()
            return
        self.extensions = headers.get(b"sec-websocket-extensions", b"").decode()
        if self.extensions.startswith("permessage-deflate"):
            self._inflater = zlib.decompressobj(wbits=-15)
        self._open = True
        self.opened.set_result(None)

    def _on_frame(self, b0: int, payload: bytes, now: float) -> None:
        opcode = b0 & 0x0F
        if opcode == 0x9:  # ping
            self._write(0xA, payload)
        elif opcode == 0x8:  # close
            self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            if not self._close_sent:
                self._write(0x8, payload[:2])
                self._close_sent = True
            assert self.transport is not None
            self.transport.close()
        elif opcode in (0x1, 0x2):
            self._compressed = bool(b0 & 0x40)
            if b0 & 0x80:
                self._text(self._inflate(payload), now)
            else:
                self._fragments = bytearray(payload)
        elif opcode == 0x0 and self._fragments is not None:
            self._fragments += payload
            if b0 & 0x80:
                whole, self._fragments = bytes(self._fragments), None
                self._text(self._inflate(whole), now)

    def _inflate(self, payload: bytes) -> bytes:
        """A permessage-deflate message's payload, decompressed (RFC 7692)."""
        if not self._compressed or self._inflater is None:
            return payload
        if "server_no_context_takeover" in self.extensions:
            self._inflater = zlib.decompressobj(wbits=-15)
        inflated: bytes = self._inflater.decompress(payload + b"\x00\x00\xff\xff")
        return inflated

    def _text(self, payload: bytes, now: float) -> None:
        if payload.startswith(_DELTA_PREFIX):
            if self.pieces is not None:
                try:
                    delta = json.loads(payload)
                    self.pieces.append((int(delta["offset"]), str(delta["text"])))
                except (ValueError, KeyError, TypeError):
                    self.errors.append(f"undecodable delta of {len(payload)} bytes")
            elif self.decode_all:
                json.loads(payload)
            self.deltas += 1
            if not self.first_delta:
                self.first_delta = now
            self.last_delta = now
            if self.keep_times:
                self.delta_times.append(now)
            return
        try:
            event = json.loads(payload)
        except ValueError:
            self.errors.append(f"undecodable frame of {len(payload)} bytes")
            return
        kind = event.get("type")
        if kind == "message":
            message = event.get("message") or {}
            if message.get("role") == "assistant" and message.get("status") != "streaming":
                self.final = message
                self.final_time = now
                if self.final_waiter is not None and not self.final_waiter.done():
                    self.final_waiter.set_result(None)
        elif kind == "ack":
            self.acks.append(event)
            if event.get("conversation_id"):
                self.conversation_id = event["conversation_id"]
            if self.ack_waiter is not None and not self.ack_waiter.done():
                self.ack_waiter.set_result(event)
        elif kind == "pong":
            self.pongs += 1
            if self.pong_waiter is not None and not self.pong_waiter.done():
                self.pong_waiter.set_result(None)
        elif kind == "error":
            self.errors.append(f"{event.get('code')}: {event.get('message')}")

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(opcode, payload))

    # -- what a bench calls
    @property
    def is_open(self) -> bool:
        return self._open and self.close_code is None

    def reset(self, keep_times: bool = False, keep_pieces: bool = False) -> None:
        self.bytes_in = self.frames_in = self.deltas = 0
        self.first_delta = self.last_delta = self.final_time = 0.0
        self.keep_times = keep_times
        self.delta_times = array("d")
        self.pieces = [] if keep_pieces else None
        self.acks = []
        self.final = None
        self.errors = []
        loop = asyncio.get_running_loop()
        self.final_waiter = loop.create_future()
        self.ack_waiter = None

    def send_json(self, frame: dict[str, Any]) -> None:
        self._write(0x1, json.dumps(frame, separators=(",", ":")).encode())

    async def request(self, frame: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a frame and wait for the next ack (or error) it gets."""
        self.ack_waiter = asyncio.get_running_loop().create_future()
        self.send_json(frame)
        return await asyncio.wait_for(self.ack_waiter, timeout)

    async def converse(
        self, content: str, timeout: float, *, keep_pieces: bool = False, **fields: Any
    ) -> dict[str, Any]:
        """Send a message (a new conversation's first, unless `fields` name one) and wait for
        its reply's final message, which it returns; the conversation's id is then
        `conversation_id`. A close first raises ConnectionError, a timeout TimeoutError."""
        self.reset(keep_pieces=keep_pieces)
        self.send_json({"type": "send", "content": content, **fields})
        assert self.final_waiter is not None
        await asyncio.wait_for(self.final_waiter, timeout)
        assert self.final is not None
        return self.final

    async def ping(self, timeout: float) -> None:
        """An application-level `ping`, answered by `pong` (a bare echo server echoes it)."""
        self.pong_waiter = asyncio.get_running_loop().create_future()
        self.send_json({"type": "ping"})
        await asyncio.wait_for(self.pong_waiter, timeout)

    async def close(self, timeout: float = 5.0) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if not self._close_sent:
            self._write(0x8, struct.pack("!H", 1000))
            self._close_sent = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        self.transport.close()


async def open_ws(url: str, *, offer_deflate: bool = False, timeout: float = 30.0) -> RawWs:
    """Connect and finish the opening handshake of one `RawWs`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _transport, ws = await loop.create_connection(
            lambda: RawWs(host, port, parts.path or "/", offer_deflate), host, port
        )
        await ws.opened
    return ws


def reply_problem(
    pieces: Sequence[tuple[int, str]], final: dict[str, Any] | None, expected: str
) -> str:
    """What is wrong with one received reply, its deltas' (offset, text) and its final
    message, or "" when it is whole and right: complete, with the `expected` text, and
    deltas that continue one another and spell it."""
    if final is None:
        return "no final message"
    if final.get("status") != "complete":
        return f"final status {final.get('status')!r} ({final.get('error_code')})"
    if final.get("content") != expected:
        got = final.get("content") or ""
        return f"final content differs ({len(got)} chars, expected {len(expected)})"
    if not pieces:
        return "no delta"
    text, problem = join_deltas(pieces)
    if problem:
        return problem
    if text != expected:
        at = next((i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b), -1)
        return f"delta text differs ({len(text)} chars, expected {len(expected)}; first at {at})"
    return ""


# ----------------------------------------------------------------------------- worker process


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _rss_kib() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class WorkerState:
    """The connections one worker process holds, and the commands it answers."""

    def __init__(self) -> None:
        self.conns: list[RawWs] = []

    async def op_connect(
        self, url: str, n: int, parallel: int, offer_deflate: bool, timeout: float
    ) -> dict[str, Any]:
        """Open `n` connections, at most `parallel` handshakes at a time."""
        started = time.monotonic()
        gate = asyncio.Semaphore(parallel)
        failures: Counter[str] = Counter()
        done_times: list[float] = []

        async def one() -> None:
            async with gate:
                try:
                    ws = await open_ws(url, offer_deflate=offer_deflate, timeout=timeout)
                except (OSError, TimeoutError) as exc:
                    failures[f"{type(exc).__name__}: {exc}"[:120]] += 1
                    return
                self.conns.append(ws)
                done_times.append(time.monotonic())

        await asyncio.gather(*(one() for _ in range(n)))
        extensions = Counter(ws.extensions or "none" for ws in self.conns)
        return {
            "opened": len(done_times),
            "failed": sum(failures.values()),
            "failures": dict(failures.most_common(5)),
            "started": started,
            "last_open": max(done_times, default=started),
            "open_total": sum(ws.is_open for ws in self.conns),
            "extensions": dict(extensions),
        }

    async def op_ping(self, timeout: float) -> dict[str, Any]:
        """One application-level ping on every open connection; count the answers."""

        async def one(ws: RawWs) -> bool:
            try:
                await ws.ping(timeout)
                return True
            except (TimeoutError, ConnectionError):
                return False

        results = await asyncio.gather(*(one(ws) for ws in self.conns if ws.is_open))
        return {"answered": sum(results), "asked": len(results)}

    async def op_subscribe(self, conversation_id: str, timeout: float) -> dict[str, Any]:
        """Subscribe every connection to a conversation; wait for every ack."""

        async def one(ws: RawWs) -> bool:
            ws.reset()
            try:
                ack = await ws.request(
                    {"type": "subscribe", "conversation_id": conversation_id}, timeout
                )
            except (TimeoutError, ConnectionError):
                return False
            return ack.get("type") == "ack"

        results = await asyncio.gather(*(one(ws) for ws in self.conns if ws.is_open))
        return {"acked": sum(results), "asked": len(results)}

    async def op_await_final(self, timeout: float) -> dict[str, Any]:
        """Wait until every subscribed connection has the final assistant message."""
        waiters = [ws.final_waiter for ws in self.conns if ws.final_waiter is not None]
        if waiters:
            await asyncio.wait(waiters, timeout=timeout)
        rows = [
            {
                "final": ws.final_time,
                "first": ws.first_delta,
                "bytes": ws.bytes_in,
                "frames": ws.frames_in,
                "deltas": ws.deltas,
                "chars": len((ws.final or {}).get("content") or ""),
                "status": (ws.final or {}).get("status"),
                "close": ws.close_code,
                "errors": ws.errors[:3],
            }
            for ws in self.conns
        ]
        return {"subscribers": rows}

    async def op_chat(
        self,
        n: int,
        content: str,
        start_at: float,
        stagger: float,
        timeout: float,
        expected: str | None = None,
        tag: str | None = None,
    ) -> dict[str, Any]:
        """Each of the first `n` connections sends a new conversation's first message, the i-th
        at `start_at + i * stagger / n`; record the arrival time of every delta frame
        (microseconds after the send). With `expected`, check each reply against that text
        (`reply_problem`); with `tag`, the i-th message's client_msg_id is TAG-i."""
        conns = [ws for ws in self.conns if ws.is_open][:n]

        async def one(i: int, ws: RawWs) -> dict[str, Any]:
            ws.reset(keep_times=True, keep_pieces=expected is not None)
            await asyncio.sleep(max(0.0, start_at + i * stagger / max(1, n) - time.monotonic()))
            sent = time.monotonic()
            frame = {"type": "send", "content": content}
            if tag is not None:
                frame["client_msg_id"] = f"{tag}-{i}"
            ws.send_json(frame)
            assert ws.final_waiter is not None
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(ws.final_waiter, timeout)
            stream = {
                "sent": sent,
                "first": ws.first_delta,
                "final": ws.final_time,
                "status": (ws.final or {}).get("status"),
                "deltas": ws.deltas,
                "times_us": [round((t - sent) * 1e6) for t in ws.delta_times],
                "conversation_id": ws.conversation_id,
                "close": ws.close_code,
                "errors": ws.errors[:3],
            }
            if expected is not None:
                assert ws.pieces is not None
                text, _ = join_deltas(ws.pieces)
                problem = reply_problem(ws.pieces, ws.final, expected)
                stream.update(
                    chars=len(text),
                    chunks=len(text.split()),
                    problem="; ".join([problem, *ws.errors[:3]]).strip("; "),
                )
            return stream

        streams = await asyncio.gather(*(one(i, ws) for i, ws in enumerate(conns)))
        return {"streams": streams}

    async def op_litellm(
        self, n: int, api_base: str, start_at: float, stagger: float, timeout: float
    ) -> dict[str, Any]:
        """`n` streams through `litellm.acompletion` in this process, started like op_chat's;
        record the arrival time of every content chunk (LiteLLM alone, for comparison)."""
        from cortex.llm import load_litellm

        litellm = load_litellm()

        async def one(i: int) -> dict[str, Any]:
            await asyncio.sleep(max(0.0, start_at + i * stagger / max(1, n) - time.monotonic()))
            sent = time.monotonic()
            times: list[float] = []
            status = "complete"
            try:
                async with asyncio.timeout(timeout):
                    await litellm_chunks(litellm, api_base, times, time.monotonic)
            except Exception as exc:
                status = f"{type(exc).__name__}: {exc}"[:200]
            return {
                "sent": sent,
                "first": times[0] if times else 0.0,
                "final": time.monotonic(),
                "status": status,
                "deltas": len(times),
                "times_us": [round((t - sent) * 1e6) for t in times],
                "close": None,
                "errors": [] if status == "complete" else [status],
            }

        streams = await asyncio.gather(*(one(i) for i in range(n)))
        return {"streams": streams}

    async def op_close(self, timeout: float) -> dict[str, Any]:
        await asyncio.gather(*(ws.close(timeout) for ws in self.conns), return_exceptions=True)
        closed = len(self.conns)
        self.conns = []
        return {"closed": closed}

    async def op_stats(self) -> dict[str, Any]:
        return {
            "cpu_s": _cpu_seconds(),
            "rss_kib": _rss_kib(),
            "open": sum(ws.is_open for ws in self.conns),
        }


async def serve_commands(state: WorkerState) -> None:
    """A worker process's life: answer each JSON-line command on stdin, {"op": NAME, ...},
    with `state.op_NAME(...)`'s result as one JSON line on stdout, until "exit" or EOF; then
    close every connection."""
    raise_fd_limit()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 26)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while True:
        line = await reader.readline()
        if not line:
            break
        command = json.loads(line)
        op = command.pop("op")
        if op == "exit":
            break
        try:
            result: dict[str, Any] = await getattr(state, f"op_{op}")(**command)
            result["ok"] = True
        except Exception as exc:  # reported to the bench, which decides
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(result) + "\n")
        out.flush()
    await state.op_close(2.0)


@dataclass
class Worker:
    """One client worker process as the bench sees it."""

    proc: asyncio.subprocess.Process
    index: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, op: str, wait: float = 300.0, **args: Any) -> dict[str, Any]:
        """Run one command; `wait` bounds the wait for its answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        except TimeoutError:
            raise RuntimeError(
                f"client worker {self.index}: {op} did not answer within {wait:g} s"
            ) from None
        if not line:
            raise RuntimeError(f"client worker {self.index} exited (code {self.proc.returncode})")
        result: dict[str, Any] = json.loads(line)
        if not result.get("ok"):
            raise RuntimeError(f"client worker {self.index}: {op} failed: {result.get('error')}")
        return result


@dataclass
class Swarm:
    """Client worker processes; `Swarm.start(n)` then `await swarm.each(op, ...)`."""

    workers: list[Worker] = field(default_factory=list)

    @classmethod
    async def start(
        cls, count: int, log_dir: Path, argv: Sequence[str] = (str(_HERE), "worker")
    ) -> Swarm:
        """`count` workers, each `argv` after the interpreter (a script whose worker mode runs
        `serve_commands`), their stderr in `log_dir`/workerN.log."""
        swarm = cls()
        for index in range(count):
            with (log_dir / f"worker{index}.log").open("wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    limit=1 << 26,
                )
            swarm.workers.append(Worker(proc, index))
        return swarm

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    async def each(self, op: str, wait: float = 300.0, **args: Any) -> list[dict[str, Any]]:
        """The same command to every worker, concurrently."""
        return list(await asyncio.gather(*(w.call(op, wait, **args) for w in self.workers)))

    async def split(
        self, op: str, total: int, wait: float = 300.0, **args: Any
    ) -> list[dict[str, Any]]:
        """`op` with `n=` this worker's share of `total`, to every worker concurrently."""
        shares = split_evenly(total, len(self.workers))
        return list(
            await asyncio.gather(
                *(w.call(op, wait, n=k, **args) for w, k in zip(self.workers, shares, strict=True))
            )
        )

    async def stop(self) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.write(b'{"op":"exit"}\n')
                    await proc.stdin.drain()
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.kill()
                await worker.proc.wait()


def split_evenly(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ------------------------------------------------------------------------- scripted provider

_WORDS = re.compile(r"words=(\d+)")
_DELAY = re.compile(r"delay=([\d.]+)")


async def _provider_main(args: argparse.Namespace) -> None:
    """The fake OpenAI provider of cortex.testing; a user message "words=N" gets N chunks,
    "delay=S" (optional) S seconds between them."""
    from cortex.testing.fake_openai import (
        FakeOpenAI,
        Reply,
        last_user_text,
        serve_until_signalled,
    )

    texts: dict[int, str] = {}

    def text(n: int) -> str:
        if n not in texts:
            texts[n] = " ".join(f"word{i}" for i in range(n))
        return texts[n]

    def responder(body: dict[str, Any]) -> Reply:
        last = last_user_text(body)
        found = _WORDS.search(last)
        n = int(found[1]) if found else args.words
        delay = _DELAY.search(last)
        return Reply(text=text(n), chunk_delay=float(delay[1]) if delay else args.chunk_delay)

    fake = FakeOpenAI()
    fake.responder = responder
    await serve_until_signalled(fake)


# ------------------------------------------------------------------------------ py-spy helper


class Profiler:
    """`py-spy record` of one process over a phase; `top()` gives its hottest functions.

    py-spy (PyPI `py-spy`) samples from outside the process, pausing it for each sample (at
    200/s that costs the process about 1-2%; without pausing, stacks come out torn). Only the
    thread holding the GIL is sampled: Python's work, not waits in epoll or on a queue (nor
    SQLite's C code in aiosqlite's thread, which runs without the GIL).
    """

    def __init__(self, pid: int, out: Path, rate: int = 200) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: asyncio.subprocess.Process | None = None
        self.error = ""

    @staticmethod
    def available() -> str | None:
        here = Path(sys.executable).parent / "py-spy"
        return str(here) if here.exists() else shutil.which("py-spy")

    async def __aenter__(self) -> Profiler:
        exe = self.available()
        if exe is None:
            self.error = "py-spy is not installed (pip install py-spy)"
            return self
        self.proc = await asyncio.create_subprocess_exec(
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--format",
            "raw",
            "--rate",
            str(self.rate),
            "--gil",
            "--threads",
            "--output",
            str(self.out),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # let it attach
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            _out, err = await asyncio.wait_for(self.proc.communicate(), 60)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            err = b"py-spy did not stop"
        if not self.out.exists():
            self.error = err.decode(errors="replace")[-500:]

    def top(self, limit: int = 15) -> list[str]:
        """The hottest functions: own time, and time with callees (generic frames left out),
        as a share of the samples of the event loop's thread and of the other threads."""
        if not self.out.exists():
            return [f"(no profile: {self.error.strip() or 'py-spy wrote nothing'})"]
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        other_own: Counter[str] = Counter()
        loop_samples = other_samples = 0
        for line in self.out.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            raw = [f for f in stack.split(";") if f]
            thread = ""
            if raw and raw[0].startswith("thread ("):  # py-spy --threads: "thread (TID): NAME"
                thread = raw.pop(0).partition(": ")[2]
            frames = [_short_frame(f) for f in raw]
            if not frames:
                continue
            if thread != "MainThread":  # the event loop runs in the main thread
                other_samples += count
                name = _THREAD_NUMBER.sub("", thread) or "?"
                other_own[f"{frames[-1]} [{name}]"] += count
                continue
            loop_samples += count
            own[frames[-1]] += count
            for frame in set(frames):
                if frame.split(" ", 1)[0] not in _GENERIC:
                    inclusive[frame] += count
        total = loop_samples + other_samples
        if not total:
            return ["(no samples)"]
        out = [
            f"{total} samples at {self.rate}/s holding the GIL: event-loop (main) thread "
            f"{loop_samples}, other threads {other_samples}",
            "event-loop thread, own time:",
        ]
        out += [f"  {n / loop_samples:6.1%}  {f}" for f, n in own.most_common(limit)]
        out.append("event-loop thread, time with callees:")
        out += [f"  {n / loop_samples:6.1%}  {f}" for f, n in inclusive.most_common(limit)]
        if other_samples:
            out.append("other threads, own time [thread] (share of their samples):")
            out += [f"  {n / other_samples:6.1%}  {f}" for f, n in other_own.most_common(5)]
        return out


_THREAD_NUMBER = re.compile(r"[-_ ]?\d+")
_GENERIC = {
    "BaseEventLoop.run_until_complete",
    "_run_module_as_main",
    "<module>",
    "Runner.run",
    "BaseEventLoop._run_once",
    "_run_code",
    "run",
    "main",
    "BaseEventLoop.run_forever",
    "Handle._run",
    "_serve",
    "Command.main",
    "Command.__call__",
    "Command.invoke",
    "Context.invoke",
    "Server.run",
    "asyncio_run",
    "proxy_server",
    "run_server",
}
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def _short_frame(frame: str) -> str:
    """`func (path/to/site-packages/pkg/mod.py:12)` -> `func (pkg/mod.py)`; lines merged."""
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found['func']} ({path})"


# ------------------------------------------------------------------------ the server's metrics

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


async def scrape(ws_url: str) -> dict[tuple[str, str], float]:
    """The server's `GET /metrics` (Prometheus text): {(name, labels): value}."""
    parts = urlsplit(ws_url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"GET /metrics HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
    )
    body = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    samples: dict[tuple[str, str], float] = {}
    for line in body.decode(errors="replace").split("\r\n\r\n", 1)[-1].splitlines():
        found = _SAMPLE.match(line)
        if found and not line.startswith("#"):
            with contextlib.suppress(ValueError):
                samples[(found["name"], found["labels"] or "")] = float(found["value"])
    return samples


def db_latency(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]
) -> dict[str, dict[str, float]]:
    """Per store operation between two scrapes: calls, mean and p99 (bucket bound) in ms."""
    ops: dict[str, dict[str, float]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}
    for (name, labels), value in after.items():
        if not name.startswith("cortex_db_operation_seconds"):
            continue
        label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        op = label.get("operation", "?")
        delta = value - before.get((name, labels), 0.0)
        entry = ops.setdefault(op, {"calls": 0.0, "sum": 0.0})
        if name.endswith("_count"):
            entry["calls"] = delta
        elif name.endswith("_sum"):
            entry["sum"] = delta
        elif name.endswith("_bucket"):
            bound = float("inf") if label.get("le") == "+Inf" else float(label.get("le", "inf"))
            buckets.setdefault(op, []).append((bound, delta))
    out: dict[str, dict[str, float]] = {}
    for op, entry in ops.items():
        calls = entry["calls"]
        if calls <= 0:
            continue
        p99 = float("inf")
        for bound, cumulative in sorted(buckets.get(op, [])):
            if cumulative >= 0.99 * calls:
                p99 = bound
                break
        out[op] = {"calls": calls, "mean_ms": entry["sum"] / calls * 1000, "p99_ms": p99 * 1000}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("worker", help="a client worker driven by JSON lines on stdin")
    provider = sub.add_parser("provider", help='fake provider: "words=N" in the prompt, N chunks')
    provider.add_argument("--words", type=int, default=1000, help="reply length otherwise")
    provider.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between chunks")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        sys.path.insert(0, str(_HERE.parent.parent))
        asyncio.run(serve_commands(WorkerState()))
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        asyncio.run(_provider_main(args))


if __name__ == "__main__":
    main()
