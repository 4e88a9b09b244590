"""Soak: many clients chatting at once, dropping, coming back and cancelling; then check storage.

    .venv/bin/python bench/soak.py [--clients 200] [--seconds 60] [--seed 1] [--json]

Processes (all on 127.0.0.1): a fake OpenAI-compatible provider (this script in provider
mode: replies of a few dozen words, a few ms to tens of ms apart, some answered with 429 or
500, cut mid-stream or stalled), a `cortex serve` process on a fresh SQLite file, and this
script with every client in one event loop.

Each client keeps one conversation (now and then it starts a new one), sends messages with a
`client_msg_id`, records every `ack`, and waits for the reply. Along the way it
- drops its connection mid-reply (a clean close or a TCP abort), reconnects, resubscribes with
  `after_seq` and keeps waiting for the reply it was owed;
- drops the connection right after a `send`, before the ack, and resends the same frame on a
  new connection (the retry after a lost ack);
- resends an acknowledged message (the server must re-ack it, not store it twice);
- cancels the reply at once or after a few deltas (a reply ends with its final `message`;
  a cancelled one whose wait ends with `typing` off and no final `message` is recorded).
Some clients have a second connection (a "tab") that only watches their conversation.
Every connection assembles the deltas it gets: offsets must continue the text with no gap, a
repeat must match, and the final `message` must equal what the deltas built.

After `--seconds`, the server gets SIGTERM while the clients are still busy (a graceful
shutdown under load). Then the SQLite file is read directly and the script checks:
- every acknowledged user message is stored exactly once, as acknowledged (id, seq, text);
  no client_msg_id is stored twice, nothing is stored that no client sent;
- no assistant reply is left `streaming`; each reply is complete, cancelled, error or
  interrupted, and its text is the provider's text for that message (whole when complete, a
  prefix otherwise): the provider's reply is a function of the user message, and names it,
  so a message answered twice or out of order shows too;
- what clients were told (final status and text) is what is stored, and no stored reply
  went without its final `message` (as after a cancel that hits the reply's finalisation);
- seq: unique and increasing per conversation, as clients see it too;
- the server exited 0 with no ERROR or traceback in its log.
It prints the counts, latencies, the server's peak RSS and the error rates, and exits 1 if a
check failed (2 for a problem of the harness itself).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import resource
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    ForeignLoad,
    children,
    log_problems,
    machine,
    percentile,
    proc_cpu_seconds,
    proc_fd_count,
    proc_status,
    start_cortex,
    start_fake_provider,
)
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

TERMINAL = ("complete", "cancelled", "error", "interrupted")
RECV_TIMEOUT = 45.0  # no event for this long while one is owed: a stuck reply
REPLY_TIMEOUT = 90.0  # from send (or reconnect) to the final message
EXIT_MARGIN = 15.0  # Router.drain waits `grace`, then up to 10 s for the replies it cancelled
# After a cancel's ack: no event for this long ends the wait. Every reply, cancelled ones too,
# ends with its final message, so this only separates "slow under overload" from "never".
CANCEL_SILENCE = 30.0


# ------------------------------------------------------------------------ provider's replies


def tag_of(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()[:6]


def reply_text(content: str, words: tuple[int, int]) -> str:
    """The provider's answer to a user message: a pure function of it, so storage is checkable.

    Every word starts with the message's tag, so a stored reply names the message it answers.
    """
    digest = hashlib.sha256(content.encode()).hexdigest()
    low, high = words
    n = low + int(digest[6:14], 16) % (high - low + 1)
    return " ".join(f"{digest[:6]}-{i}" for i in range(n))


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):  # OpenAI content parts
                return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def pick(roll: float, kinds: list[tuple[float, str]]) -> str:
    """The kind whose share of [0, 1) the roll falls in; "ok" past all of them."""
    for rate, kind in kinds:
        if roll < rate:
            return kind
        roll -= rate
    return "ok"


async def provider_process(args: argparse.Namespace) -> None:
    """Provider mode: serve scripted, partly failing replies until SIGTERM; print stats."""
    from cortex.testing.fake_openai import FakeOpenAI, Reply

    rng = random.Random(args.seed * 7919 + 1)
    stats: Counter[str] = Counter()
    words = (args.words[0], args.words[1])

    def respond(body: dict[str, Any]) -> Reply:
        text = reply_text(_last_user_text(body), words)
        n_words = len(text.split())
        delay = rng.uniform(*args.chunk_delay)
        first = rng.uniform(*args.first_delay)
        kind = pick(
            rng.random(),
            [
                (args.fail_429, "429"),
                (args.fail_500, "500"),
                (args.fail_cut, "cut"),
                (args.fail_stall, "stall"),
            ],
        )
        stats[kind] += 1
        if kind == "429":
            return Reply(status=429, first_chunk_delay=first)
        if kind == "500":
            return Reply(status=500, first_chunk_delay=first)
        if kind == "cut":
            at = rng.randint(1, max(1, n_words - 1))
            return Reply(text=text, chunk_delay=delay, first_chunk_delay=first, cut_after=at)
        if kind == "stall":
            at = rng.randint(1, max(1, n_words - 1))
            return Reply(text=text, chunk_delay=delay, first_chunk_delay=first, stall_after=at)
        return Reply(text=text, chunk_delay=delay, first_chunk_delay=first)

    fake = FakeOpenAI()
    fake.responder = respond
    base_url = await fake.start(port=0)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    print(f"READY {base_url}", flush=True)
    try:
        await done.wait()
    finally:
        await fake.stop()
        print("STATS " + json.dumps(dict(stats)), flush=True)


# ------------------------------------------------------------------------------ the clients


@dataclass
class Ledger:
    """What every client sent, was acknowledged and was told; shared by all clients."""

    sent: dict[str, str] = field(default_factory=dict)  # client_msg_id -> content
    acks: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    finals: dict[str, tuple[str, str]] = field(default_factory=dict)  # msg id -> status, text
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # error events by code
    closes: Counter[str] = field(default_factory=Counter)  # unexpected close codes
    violations: list[str] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)  # client_msg_ids whose reply was cancelled
    # Replies whose wait ended with `typing` off after a cancel, without a final `message`:
    # (conversation, seq of the user message, client_msg_id).
    no_final_after_cancel: list[tuple[str, int, str]] = field(default_factory=list)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def violation(self, text: str) -> None:
        self.counts["violations"] += 1
        if len(self.violations) < 200:
            self.violations.append(text)

    def final(self, message: dict[str, Any], where: str) -> None:
        """A final assistant message as a client saw it; all clients must agree."""
        seen = (str(message["status"]), str(message["content"]))
        before = self.finals.setdefault(str(message["id"]), seen)
        if before != seen:
            self.violation(
                f"{where}: message {message['id']} final {seen[0]}/{len(seen[1])} chars, "
                f"another client saw {before[0]}/{len(before[1])} chars"
            )


class Drop(Exception):
    """This client drops its connection on purpose (the session ends, it reconnects)."""


class Session:
    """The events of one connection: assembles deltas and checks offsets and order."""

    def __init__(self, ledger: Ledger, name: str, after_seq: dict[str, int]) -> None:
        self.ledger = ledger
        self.name = name
        self.texts: dict[str, str] = {}  # message id -> text assembled from offset 0
        self.seq_of: dict[str, int] = {}  # message id -> seq
        self.floor = dict(after_seq)  # conversation -> highest seq announced in this session
        # Conversations whose catch-up interleaves with live events (a subscribe on a connection
        # a re-ack already subscribed): seq order is not checked until the subscribe's ack.
        self.resync: dict[str, str] = {}

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "ack" and event.get("request_id") in self.resync.values():
            self.resync.pop(str(event.get("conversation_id")), None)
        elif kind == "delta":
            self._delta(event)
        elif kind == "message":
            self._message(event)
        elif kind == "error":
            self.ledger.errors[str(event.get("code"))] += 1

    def _delta(self, event: dict[str, Any]) -> None:
        mid, offset, text = str(event["message_id"]), int(event["offset"]), str(event["text"])
        have = self.texts.get(mid)
        if have is None:
            if offset == 0:
                self.texts[mid] = text
            else:
                # Joined mid-reply (a `send` subscribes without catch-up); a subscribe follows.
                self.ledger.counts["deltas_unanchored"] += 1
            return
        if offset == len(have):
            self.texts[mid] = have + text
        elif offset < len(have):
            overlap = have[offset : offset + len(text)]
            if not text.startswith(overlap):
                self.ledger.violation(
                    f"{self.name}: delta of {mid} at {offset} does not match the text so far"
                )
            self.texts[mid] = have[:offset] + text if offset + len(text) > len(have) else have
            self.ledger.counts["deltas_overlap"] += 1
        else:
            self.ledger.violation(
                f"{self.name}: gap in {mid}: delta at offset {offset}, have {len(have)} chars"
            )
            self.texts.pop(mid, None)

    def _message(self, event: dict[str, Any]) -> None:
        message = event["message"]
        conv, mid, seq = str(event["conversation_id"]), str(message["id"]), int(message["seq"])
        if mid not in self.seq_of:
            floor = self.floor.get(conv, 0)
            if seq <= floor and conv not in self.resync:
                self.ledger.violation(
                    f"{self.name}: message seq {seq} of {conv} after seq {floor} was announced"
                )
            self.floor[conv] = max(floor, seq)
            self.seq_of[mid] = seq
        if message["role"] != "assistant":
            return
        if message["status"] == "streaming":
            self.texts.setdefault(mid, "")  # the row is announced before its first delta
            return
        self.ledger.final(message, self.name)
        have = self.texts.pop(mid, None)
        if have is not None and have != message["content"]:
            self.ledger.violation(
                f"{self.name}: {mid} ended {message['status']} with {len(message['content'])} "
                f"chars; its deltas built {len(have)} chars"
                + ("" if message["content"].startswith(have) else " that differ")
            )


@dataclass
class Plan:
    """Probabilities of the disturbances, per message."""

    lost_ack: float
    drop: float
    cancel: float
    duplicate: float
    new_conversation: float
    think: tuple[float, float]


class Shutdown(Exception):
    """The server closed the connection with 1001 (going away)."""


class SoakClient:
    """One user: sends, waits for the reply, and disturbs things as its plan says."""

    def __init__(
        self,
        index: int,
        url: str,
        plan: Plan,
        ledger: Ledger,
        rng: random.Random,
        stopping: asyncio.Event,
        watcher: asyncio.Queue[str] | None,
        max_messages: int,
    ) -> None:
        self.index = index
        self.name = f"client {index}"
        self.url = url
        self.plan = plan
        self.ledger = ledger
        self.rng = rng
        self.stopping = stopping
        self.watcher = watcher
        self.max_messages = max_messages
        self.conversation: str | None = None
        self.seen: dict[str, int] = {}  # conversation -> highest seq seen
        self.open_rows: dict[str, set[int]] = defaultdict(set)  # seen streaming, not final
        self.last_final: dict[str, tuple[int, str]] = {}  # newest final reply: seq, status
        self.unacked: dict[str, Any] | None = None  # a send whose ack has not arrived
        self.owed: int | None = None  # seq of our user message whose reply we wait for
        self.owed_since = 0.0
        self.sent = 0
        self.requests = 0
        self.ws: ClientConnection | None = None

    def after_seq(self, conv: str) -> int:
        """What to resubscribe from: the newest seq seen, or before a row seen unfinished.

        A row seen `streaming` is not caught up by a later `after_seq` past it, so a client
        that saw a reply start must resubscribe from before it to learn how it ended.
        """
        open_rows = self.open_rows.get(conv)
        if open_rows:
            return min(open_rows) - 1
        return self.seen.get(conv, 0)

    # ---- plumbing

    async def _send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(frame))

    async def _next(self, session: Session, timeout: float = RECV_TIMEOUT) -> dict[str, Any]:
        assert self.ws is not None
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        event: dict[str, Any] = json.loads(raw)
        session.handle(event)
        if event.get("type") == "message":
            conv, message = str(event["conversation_id"]), event["message"]
            seq, status = int(message["seq"]), str(message["status"])
            self.seen[conv] = max(self.seen.get(conv, 0), seq)
            if status == "streaming":
                self.open_rows[conv].add(seq)
            else:
                self.open_rows[conv].discard(seq)
                if message["role"] == "assistant" and seq > self.last_final.get(conv, (0, ""))[0]:
                    self.last_final[conv] = (seq, status)
        return event

    async def _drop(self) -> None:
        assert self.ws is not None
        self.ledger.counts["drops"] += 1
        transport = getattr(self.ws, "transport", None)
        if transport is not None and self.rng.random() < 0.5:
            self.ledger.counts["drops_tcp_abort"] += 1
            transport.abort()  # a TCP reset, no close frame
        else:
            await self.ws.close()
        raise Drop

    # ---- the client's life

    async def run(self) -> None:
        failures = 0
        while not self.stopping.is_set():
            try:
                async with connect(
                    self.url, compression=None, open_timeout=15, close_timeout=2, max_size=None
                ) as ws:
                    failures = 0
                    self.ws = ws
                    self.ledger.counts["connections"] += 1
                    await self._session(ws)
                    return  # max_messages reached
            except Drop:
                pass
            except Shutdown:
                return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if code == 1001 or self.stopping.is_set():
                    self.ledger.counts["closed_by_shutdown"] += 1
                    return
                self.ledger.closes[str(code)] += 1
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                if self.stopping.is_set():
                    return
                self.ledger.counts[f"connect_failed:{type(exc).__name__}"] += 1
                failures += 1
                if failures > 5:
                    self.ledger.violation(f"{self.name}: gave up connecting after {exc!r}")
                    return
            finally:
                self.ws = None
            if self.stopping.is_set():
                return
            await asyncio.sleep(self.rng.uniform(0.0, 0.5))  # then reconnect
            self.ledger.counts["reconnects"] += 1

    async def _session(self, ws: ClientConnection) -> None:
        session = Session(self.ledger, self.name, {})
        if self.conversation is not None:
            await self._subscribe(session, self.conversation)
        if self.unacked is not None:
            self.ledger.counts["resends_after_lost_ack"] += 1
            frame = self.unacked
            await self._send(frame)
            await self._await_ack(session, frame, retry=True)
        if self.owed is not None:
            await self._await_reply(session, plan=None)
        while self.sent < self.max_messages:
            await self._think(ws)
            await self._chat(session)

    async def _subscribe(self, session: Session, conv: str, *, live: bool = False) -> None:
        """Catch up on `conv`; `live`: this connection may already get its live events."""
        after = self.after_seq(conv)
        session.floor[conv] = after
        self.requests += 1
        rid = f"sub-{self.index}-{self.requests}"
        if live:
            session.resync[conv] = rid
        await self._send(
            {"type": "subscribe", "conversation_id": conv, "after_seq": after, "request_id": rid}
        )

    async def _think(self, ws: ClientConnection) -> None:
        """Pause between messages; a close meanwhile ends the session."""
        pause = asyncio.ensure_future(asyncio.sleep(self.rng.uniform(*self.plan.think)))
        closed = asyncio.ensure_future(ws.wait_closed())
        await asyncio.wait([pause, closed], return_when=asyncio.FIRST_COMPLETED)
        pause.cancel()
        closed.cancel()
        code = ws.close_code
        if code is None:
            return
        if code == 1001 or self.stopping.is_set():
            self.ledger.counts["closed_by_shutdown"] += 1
            raise Shutdown
        self.ledger.closes[str(code)] += 1
        raise Drop

    async def _chat(self, session: Session) -> None:
        rng, plan = self.rng, self.plan
        self.sent += 1
        cmid = f"s{self.index}-{self.sent}"
        words = " ".join(f"w{rng.randrange(10_000)}" for _ in range(rng.randint(3, 12)))
        content = f"{cmid} {words}"
        frame: dict[str, Any] = {
            "type": "send",
            "content": content,
            "client_msg_id": cmid,
            "request_id": cmid,
        }
        if self.conversation is not None and rng.random() >= plan.new_conversation:
            frame["conversation_id"] = self.conversation
        else:
            self.ledger.counts["new_conversations"] += 1
        self.ledger.sent[cmid] = content
        self.ledger.counts["sends"] += 1
        self.unacked = frame
        sent_at = time.perf_counter()
        await self._send(frame)
        if rng.random() < plan.lost_ack:
            self.ledger.counts["drops_before_ack"] += 1
            await self._drop()
        ack = await self._await_ack(session, frame, retry=False)
        if ack is None:
            return
        self.ledger.latency["ack_ms"].append((time.perf_counter() - sent_at) * 1000)
        roll = rng.random()
        what = (
            "cancel" if roll < plan.cancel else "drop" if roll < plan.cancel + plan.drop else None
        )
        await self._await_reply(session, plan=what, sent_at=sent_at)
        if rng.random() < plan.duplicate:
            self.ledger.counts["duplicate_resends"] += 1
            frame["conversation_id"] = ack["conversation_id"]
            await self._send(frame)
            again = await self._await_ack(session, frame, retry=True, duplicate=True)
            if again is not None and (again["message_id"], again["seq"]) != (
                ack["message_id"],
                ack["seq"],
            ):
                self.ledger.violation(f"{self.name}: resent {cmid} acked as a new message")

    async def _await_ack(
        self, session: Session, frame: dict[str, Any], *, retry: bool, duplicate: bool = False
    ) -> dict[str, Any] | None:
        cmid = str(frame["client_msg_id"])
        while True:
            try:
                event = await self._next(session)
            except TimeoutError:
                self.ledger.violation(f"{self.name}: no ack for {cmid} in {RECV_TIMEOUT:g} s")
                raise
            if event.get("request_id") != cmid:
                continue
            if event["type"] == "error":
                self.ledger.counts[f"send_refused:{event.get('code')}"] += 1
                self.unacked = None
                return None
            if event["type"] != "ack":
                continue
            conv, mid, seq = str(event["conversation_id"]), str(event["message_id"]), event["seq"]
            self.ledger.acks.setdefault(cmid, []).append((conv, mid, int(seq)))
            self.ledger.counts["reacks" if retry else "acks"] += 1
            self.unacked = None
            if duplicate:
                return event
            if conv != self.conversation:
                self.conversation = conv
                if self.watcher is not None:
                    self.watcher.put_nowait(conv)
                if retry:
                    # A re-ack subscribes without catch-up: ask for what this connection missed.
                    await self._subscribe(session, conv, live=True)
            self.owed = int(seq)
            self.owed_since = time.monotonic()
            return event

    async def _await_reply(
        self, session: Session, plan: str | None, sent_at: float | None = None
    ) -> None:
        """Wait for the final `message` of the reply to our message `self.owed`.

        With `plan` "cancel" the reply is cancelled after a few deltas (or at once); "drop":
        the connection is dropped mid-reply (the next session waits on).
        """
        assert self.owed is not None and self.conversation is not None
        rng, conv, owed = self.rng, self.conversation, self.owed
        cancel_at = rng.randint(0, 25) if plan == "cancel" else -1
        drop_at = rng.randint(0, 40) if plan == "drop" else -1
        deltas = 0
        cancel_rid: str | None = None
        cancel_acked = False
        if cancel_at == 0:
            cancel_rid = await self._cancel(conv)
        while True:
            final = self.last_final.get(conv)
            if final is not None and final[0] > owed:
                # Replies come in order: the first final reply after our message is ours.
                self.ledger.counts[f"reply_{final[1]}"] += 1
                if cancel_rid is not None:
                    self.ledger.counts[f"cancel_then_{final[1]}"] += 1
                if sent_at is not None:
                    self.ledger.latency["reply_ms"].append((time.perf_counter() - sent_at) * 1000)
                self.owed = None
                return
            remaining = REPLY_TIMEOUT - (time.monotonic() - self.owed_since)
            wait = min(RECV_TIMEOUT, remaining, CANCEL_SILENCE if cancel_acked else RECV_TIMEOUT)
            try:
                if remaining <= 0:
                    raise TimeoutError
                event = await self._next(session, timeout=wait)
            except TimeoutError:
                if cancel_acked:
                    # Not even `typing` off: the cancel stopped the reply before it began.
                    self.ledger.counts["cancel_then_silence"] += 1
                    cmid = f"s{self.index}-{self.sent}"
                    self.ledger.no_final_after_cancel.append((conv, owed, cmid))
                    self.owed = None
                    return
                self.ledger.violation(
                    f"{self.name}: no final reply to seq {owed} of {conv} "
                    f"{time.monotonic() - self.owed_since:.0f} s after the ack"
                )
                self.owed = None
                return
            kind = event.get("type")
            if event.get("conversation_id") != conv:
                continue
            if kind == "ack" and cancel_rid is not None and event.get("request_id") == cancel_rid:
                cancel_acked = True
            elif kind == "typing" and not event.get("active") and cancel_acked:
                # The reply ended (typing off comes last) and no final message came: a cancel
                # before the reply's row existed, or one that hit its finalisation.
                self.ledger.counts["cancel_then_no_final_message"] += 1
                cmid = f"s{self.index}-{self.sent}"
                self.ledger.no_final_after_cancel.append((conv, owed, cmid))
                self.owed = None
                return
            elif kind == "delta":
                deltas += 1
                if deltas == 1 and sent_at is not None:
                    self.ledger.latency["first_delta_ms"].append(
                        (time.perf_counter() - sent_at) * 1000
                    )
                if deltas == cancel_at:
                    cancel_rid = await self._cancel(conv)
                if deltas == drop_at:
                    self.ledger.counts["drops_mid_reply"] += 1
                    await self._drop()

    async def _cancel(self, conv: str) -> str:
        self.ledger.counts["cancels"] += 1
        self.ledger.cancelled.add(f"s{self.index}-{self.sent}")
        self.requests += 1
        rid = f"cancel-{self.index}-{self.requests}"
        await self._send({"type": "cancel", "conversation_id": conv, "request_id": rid})
        return rid


async def watch(
    index: int, url: str, conversations: asyncio.Queue[str], ledger: Ledger, stopping: asyncio.Event
) -> None:
    """A second tab: subscribes to each conversation its client uses and only checks events."""
    try:
        async with connect(url, compression=None, open_timeout=15, max_size=None) as ws:
            ledger.counts["watchers"] += 1
            session = Session(ledger, f"watcher {index}", {})

            async def subscriptions() -> None:
                while True:
                    conv = await conversations.get()
                    await ws.send(
                        json.dumps({"type": "subscribe", "conversation_id": conv, "after_seq": 0})
                    )

            feeder = asyncio.create_task(subscriptions())
            try:
                async for raw in ws:
                    session.handle(json.loads(raw))
            finally:
                feeder.cancel()
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        if code != 1001 and not stopping.is_set():
            ledger.closes[f"watcher:{code}"] += 1
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        if not stopping.is_set():
            ledger.violation(f"watcher {index}: {exc!r}")


# ------------------------------------------------------------------------------ the checks


def check_database(path: Path, ledger: Ledger, words: tuple[int, int]) -> dict[str, Any]:
    """Read the SQLite file of the stopped server and check it against what clients saw."""
    problems: list[str] = []

    def problem(text: str) -> None:
        if len(problems) < 200:
            problems.append(text)
        counts["failed_checks"] += 1

    counts: Counter[str] = Counter()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT id, conversation_id, seq, role, content, status, client_msg_id, "
            "error_code, finish_reason FROM messages ORDER BY conversation_id, seq"
        ).fetchall()
        last_seq = dict(db.execute("SELECT id, last_seq FROM conversations").fetchall())
    finally:
        db.close()
    by_cmid: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    by_conv: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        mid, conv, seq, role, content, status, cmid, error_code, finish = row
        by_conv[conv].append(row)
        counts[f"{role}:{status}"] += 1
        if error_code:
            counts[f"error_code:{error_code}"] += 1
        if cmid is not None:
            by_cmid[cmid].append(row)
        if status == "streaming":
            problem(f"message {mid} (seq {seq} of {conv}) was left streaming")
    # 1. Every acknowledged message stored exactly once, as acknowledged.
    for cmid, acks in ledger.acks.items():
        stored = by_cmid.get(cmid, [])
        if len(stored) != 1:
            problem(f"acknowledged {cmid} is stored {len(stored)} times")
            continue
        mid, conv, seq, role, content = stored[0][:5]
        for ack in acks:
            if ack != (conv, mid, seq):
                problem(f"{cmid}: ack {ack} but stored as {(conv, mid, seq)}")
        if role != "user" or content != ledger.sent.get(cmid):
            problem(f"{cmid}: stored as {role} with other content")
    counts["acknowledged_checked"] = len(ledger.acks)
    for cmid, stored in by_cmid.items():
        if len(stored) > 1 and cmid not in ledger.acks:
            problem(f"{cmid} (never acknowledged) is stored {len(stored)} times")
        if cmid not in ledger.sent:
            problem(f"stored {cmid} was never sent by any client")
        elif cmid not in ledger.acks:
            counts["stored_not_acknowledged"] += 1
    # 2. Per conversation: seq order, and which reply answers which message. A reply's text
    # starts with the tag of the message it answers; an empty one (failed or cancelled before
    # its first chunk) answers the oldest message still waiting, since replies go in order.
    unanswered: list[tuple[Any, ...]] = []
    answered_by: dict[str, tuple[Any, ...]] = {}  # client_msg_id -> its reply row
    for conv, items in by_conv.items():
        seqs = [r[2] for r in items]
        if seqs != sorted(set(seqs)):
            problem(f"conversation {conv}: seqs not unique: {seqs}")
        if seqs and last_seq.get(conv) != seqs[-1]:
            problem(f"conversation {conv}: last_seq {last_seq.get(conv)} but max seq {seqs[-1]}")
        if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
            counts["conversations_with_seq_gaps"] += 1
        waiting: list[tuple[Any, ...]] = []
        for row in items:
            if row[3] == "user":
                waiting.append(row)
                continue
            if row[3] != "assistant":
                continue
            text, status = row[4], row[5]
            if not text:
                counts[f"replies_without_text:{status}"] += 1
                if not waiting:
                    problem(f"reply {row[0]} (seq {row[2]} of {conv}) answers no message")
                    continue
                user = waiting.pop(0)
            else:
                tag = text.split("-", 1)[0]
                index = next((i for i, u in enumerate(waiting) if tag_of(u[4]) == tag), None)
                if index is None:
                    problem(
                        f"reply {row[0]} (seq {row[2]} of {conv}) answers no waiting message "
                        "(answered twice, or out of order)"
                    )
                    continue
                user = waiting.pop(index)
                unanswered.extend(waiting[:index])  # replies go in order: these get none
                del waiting[:index]
            answered_by[user[6]] = row
            expected = reply_text(user[4], words)
            if status == "complete" and text != expected:
                problem(f"reply {row[0]} is complete but its text is not the provider's")
            elif status != "complete" and not expected.startswith(text):
                problem(f"reply {row[0]} ({status}) is not a prefix of the provider's text")
        unanswered.extend(waiting)
    acked_unanswered: list[str] = []
    for user in unanswered:
        cmid = user[6]
        if cmid in ledger.cancelled:
            counts["unanswered_after_cancel"] += 1  # cancelled before its reply row existed
        elif cmid in ledger.acks:
            counts["acknowledged_without_reply"] += 1
            acked_unanswered.append(f"{cmid} (seq {user[2]} of {user[1]})")
        else:
            counts["unanswered_not_acknowledged"] += 1
    # 2b. A cancel whose reply ended without a final `message`: if the reply has a row, its
    # final state was stored but never announced (clients are left with a `streaming` row).
    for conv, _seq, cmid in ledger.no_final_after_cancel:
        row = answered_by.get(cmid)
        if row is None:
            counts["cancel_before_reply_row"] += 1
        else:
            problem(
                f"reply {row[0]} (seq {row[2]} of {conv}) is stored {row[5]}, but its final "
                "message was never sent (the cancel hit its finalisation)"
            )
    # 3. What clients were told is what is stored.
    stored_by_id = {r[0]: r for r in rows}
    for mid, (status, text) in ledger.finals.items():
        row = stored_by_id.get(mid)
        if row is None:
            problem(f"clients saw final message {mid}, which is not stored")
        elif (row[5], row[4]) != (status, text):
            problem(f"message {mid}: clients saw {status}, stored {row[5]} (or other text)")
    counts["conversations"] = len(by_conv)
    counts["messages"] = len(rows)
    return {
        "counts": dict(counts),
        "problems": problems,
        "unanswered": [f"{u[6]} (seq {u[2]} of {u[1]})" for u in unanswered[:50]],
        "acknowledged_unanswered": acked_unanswered[:50],
    }


# ------------------------------------------------------------------------------ the run


@dataclass
class Sampler:
    """Polls the server process: peak RSS, open descriptors, CPU."""

    pid: int
    peak_rss_kib: int = 0
    peak_fds: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            status = proc_status(self.pid)
            if not status:
                return
            self.peak_rss_kib = max(self.peak_rss_kib, status.get("VmHWM", 0))
            fds = proc_fd_count(self.pid)
            self.peak_fds = max(self.peak_fds, fds)
            self.samples.append((time.monotonic(), status.get("VmRSS", 0), fds))
            await asyncio.sleep(0.5)


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def provider_argv(args: argparse.Namespace) -> list[str]:
    return [
        str(Path(__file__).resolve()),
        "--provider-process",
        "--seed",
        str(args.seed),
        "--words",
        *map(str, args.words),
        "--chunk-delay",
        *map(str, args.chunk_delay),
        "--first-delay",
        *map(str, args.first_delay),
        "--fail-429",
        str(args.fail_429),
        "--fail-500",
        str(args.fail_500),
        "--fail-cut",
        str(args.fail_cut),
        "--fail-stall",
        str(args.fail_stall),
    ]


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fd_limit = raise_fd_limit(4 * args.clients + 1024)  # children inherit it
    ledger = Ledger()
    plan = Plan(
        lost_ack=args.p_lost_ack,
        drop=args.p_drop,
        cancel=args.p_cancel,
        duplicate=args.p_duplicate,
        new_conversation=args.p_new_conversation,
        think=(args.think[0], args.think[1]),
    )
    words = (args.words[0], args.words[1])
    async with children() as started:
        fake = await start_fake_provider(provider_argv(args), workdir, name="provider")
        started.append(fake)
        server = await start_cortex(
            workdir,
            fake.url,
            {
                "CORTEX_NUM_RETRIES": str(args.num_retries),
                "CORTEX_STREAM_IDLE_TIMEOUT": str(args.idle_timeout),
                "CORTEX_SHUTDOWN_GRACE_S": str(args.grace),
            },
        )
        started.append(server)
        idle_rss = proc_status(server.pid).get("VmRSS", 0)
        sampler = Sampler(server.pid)
        sampling = asyncio.create_task(sampler.run())
        stopping = asyncio.Event()
        rng = random.Random(args.seed)
        tasks: list[asyncio.Task[None]] = []
        cpu0 = proc_cpu_seconds(server.pid)
        own0 = time.process_time()
        ours0 = own0 + cpu0 + proc_cpu_seconds(fake.pid)
        foreign = ForeignLoad()
        started_at = time.monotonic()
        ramp = min(5.0, args.seconds / 4)
        for i in range(args.clients):
            queue: asyncio.Queue[str] | None = None
            if rng.random() < args.watchers:
                queue = asyncio.Queue()
                tasks.append(asyncio.create_task(watch(i, server.url, queue, ledger, stopping)))
            client = SoakClient(
                i,
                server.url,
                plan,
                ledger,
                random.Random(rng.random()),
                stopping,
                queue,
                args.max_messages,
            )
            tasks.append(asyncio.create_task(_delayed(i * ramp / args.clients, client)))
        await asyncio.sleep(args.seconds)
        # Graceful shutdown while the clients are still busy.
        stopping.set()
        sigterm_at = time.monotonic()
        cpu_before_stop = proc_cpu_seconds(server.pid)
        own_cpu = time.process_time() - own0
        provider_cpu = proc_cpu_seconds(fake.pid)
        ours_before_stop = own0 + own_cpu + cpu_before_stop + provider_cpu
        peak_before_stop = proc_status(server.pid).get("VmHWM", 0)
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(server.proc.wait(), args.grace + 60)
        except TimeoutError:
            ledger.violation(f"the server did not exit within {args.grace + 60:g} s of SIGTERM")
            server.proc.kill()
            code = await server.proc.wait()
        stop_s = time.monotonic() - sigterm_at
        _done, pending = await asyncio.wait(tasks, timeout=15)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                ledger.violation(f"client task failed: {result!r}")
        ledger.counts["clients_still_running_after_stop"] = len(pending)
        sampling.cancel()
        await fake.stop()
        assert fake.proc.stdout is not None
        tail = (await fake.proc.stdout.read()).decode()
        provider_stats: dict[str, int] = next(
            (json.loads(line[6:]) for line in tail.splitlines() if line.startswith("STATS ")), {}
        )
        other_cpu = foreign.fraction(ours_before_stop - ours0)
    duration = sigterm_at - started_at
    log_errors, log_lines = log_problems(server.log_path)
    db = check_database(workdir / "cortex.db", ledger, words)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "args": {k: v for k, v in vars(args).items() if k != "provider_process"},
        "fd_limit": fd_limit,
        "duration_s": round(duration, 1),
        "other_processes_cpu_fraction": round(other_cpu, 3),
        "clients": dict(ledger.counts),
        "error_events": dict(ledger.errors),
        "unexpected_closes": dict(ledger.closes),
        "violations": ledger.violations,
        "latency_ms": {
            name: {
                "n": len(values),
                "p50": round(percentile(values, 50), 1),
                "p95": round(percentile(values, 95), 1),
                "p99": round(percentile(values, 99), 1),
                "max": round(max(values), 1) if values else None,
            }
            for name, values in ledger.latency.items()
        },
        "provider_requests": provider_stats,
        "clients_cpu_fraction_of_one_core": round(own_cpu / duration, 3),
        "provider_cpu_fraction_of_one_core": round(
            (provider_cpu - (ours0 - own0 - cpu0)) / duration, 3
        ),
        "server": {
            "idle_rss_kib": idle_rss,
            "peak_rss_kib": max(sampler.peak_rss_kib, peak_before_stop),
            "peak_fds": sampler.peak_fds,
            "cpu_s": round(cpu_before_stop - cpu0, 1),
            "cpu_fraction_of_one_core": round((cpu_before_stop - cpu0) / duration, 3),
            "exit_code": code,
            "stop_s": round(stop_s, 2),
            "log_errors": log_errors,
            "log_error_lines": log_lines,
        },
        "database": db,
    }


async def _delayed(delay: float, client: SoakClient) -> None:
    await asyncio.sleep(delay)
    await client.run()


def failures(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if report["violations"]:
        out.append(f"{len(report['violations'])} protocol violations seen by clients")
    if report["database"]["problems"]:
        out.append(f"{report['database']['counts'].get('failed_checks')} storage checks failed")
    server = report["server"]
    if server["exit_code"] != 0:
        out.append(f"server exit code {server['exit_code']}")
    if server["log_errors"]:
        out.append(f"{server['log_errors']} error lines in the server log")
    limit = report["args"]["grace"] + EXIT_MARGIN
    if server["stop_s"] > limit:
        out.append(
            f"the server took {server['stop_s']:.1f} s to exit after SIGTERM "
            f"(grace {report['args']['grace']:g} s, allowed {limit:g} s)"
        )
    if report["clients"].get("acks", 0) == 0:
        out.append("no message was acknowledged at all")
    return out


def warnings(report: dict[str, Any]) -> list[str]:
    """Outcomes that break no check of this script but that a user would notice."""
    db: Counter[str] = Counter(report["database"]["counts"])
    c: Counter[str] = Counter(report["clients"])
    out: list[str] = []
    if db["acknowledged_without_reply"]:
        out.append(f"{db['acknowledged_without_reply']} acknowledged messages never answered")
    silent = c["cancel_then_no_final_message"] + c["cancel_then_silence"]
    if silent:
        out.append(f"{silent} cancelled replies ended with no final message")
    return out


def render(report: dict[str, Any]) -> str:
    c: Counter[str] = Counter(report["clients"])
    db: Counter[str] = Counter(report["database"]["counts"])
    s = report["server"]
    m = report["machine"]
    a = report["args"]
    replies = sum(v for k, v in c.items() if k.startswith("reply_"))
    provider = Counter(report["provider_requests"])
    provider_total = sum(provider.values())

    def rate(n: int, total: int) -> str:
        return f"{n} ({n / total:.1%})" if total else str(n)

    out = [
        f"soak  {report['date']}  {m['cpus']} x {m['cpu_model']}, python {m['python']}, "
        f"litellm {m['litellm']}, cortex {m['cortex_commit']}",
        f"{a['clients']} clients for {report['duration_s']} s (seed {a['seed']}), think "
        f"{a['think'][0]:g}-{a['think'][1]:g} s, replies {a['words'][0]}-{a['words'][1]} words "
        f"{a['chunk_delay'][0] * 1000:g}-{a['chunk_delay'][1] * 1000:g} ms apart; other "
        f"processes used {report['other_processes_cpu_fraction']:.0%} of the CPU meanwhile",
        "",
        "clients",
        f"  sends {c['sends']}, acks {c['acks']}, re-acks {c['reacks']}, send refused "
        f"{sum(v for k, v in c.items() if k.startswith('send_refused'))}",
        f"  connections {c['connections']} (+{c['watchers']} watchers), drops mid-reply "
        f"{c['drops_mid_reply']}, drops before ack {c['drops_before_ack']}, resends after "
        f"lost ack {c['resends_after_lost_ack']}, duplicate resends {c['duplicate_resends']}",
        f"  cancels {c['cancels']} -> cancelled {c['cancel_then_cancelled']}, complete "
        f"{c['cancel_then_complete']}, error {c['cancel_then_error']}, typing off with no "
        f"final message {c['cancel_then_no_final_message']}, silence "
        f"{c['cancel_then_silence']}",
        f"  replies seen {replies}: complete {rate(c['reply_complete'], replies)}, cancelled "
        f"{rate(c['reply_cancelled'], replies)}, error {rate(c['reply_error'], replies)}, "
        f"interrupted {rate(c['reply_interrupted'], replies)}",
        f"  error events {report['error_events'] or {}}; unexpected closes "
        f"{report['unexpected_closes'] or {}}; closed by shutdown {c['closed_by_shutdown']}",
        f"  other: { {k: v for k, v in c.items() if k.startswith(('connect_', 'deltas_'))} }",
    ]
    for name, q in report["latency_ms"].items():
        out.append(
            f"  {name:<15} n={q['n']:<6} p50 {q['p50']:>7} p95 {q['p95']:>7} p99 {q['p99']:>7} "
            f"max {q['max']}"
        )
    out += [
        "provider",
        "  requests "
        + ", ".join(f"{k} {rate(v, provider_total)}" for k, v in sorted(provider.items()))
        + f"; CPU {report['provider_cpu_fraction_of_one_core']:.0%} of one core (the clients: "
        f"{report['clients_cpu_fraction_of_one_core']:.0%})",
        "server",
        f"  RSS idle {s['idle_rss_kib'] / 1024:.0f} MiB, peak (VmHWM) "
        f"{s['peak_rss_kib'] / 1024:.0f} MiB; peak open fds {s['peak_fds']}; CPU "
        f"{s['cpu_s']} s ({s['cpu_fraction_of_one_core']:.0%} of one core)",
        f"  SIGTERM -> exit {s['exit_code']} in {s['stop_s']} s; error lines in log "
        f"{s['log_errors']}",
    ]
    out += [f"    {line}" for line in s["log_error_lines"][:10]]
    statuses = ", ".join(
        f"{k} {v}" for k, v in sorted(db.items()) if k.startswith(("user:", "assistant:"))
    )
    codes = ", ".join(
        f"{k.split(':')[1]} {v}" for k, v in sorted(db.items()) if k.startswith("error_code:")
    )
    out += [
        "database",
        f"  {db['conversations']} conversations, {db['messages']} messages: {statuses}; "
        f"error codes: {codes or 'none'}",
        f"  acknowledged messages checked {db['acknowledged_checked']}, stored but never "
        f"acknowledged {db['stored_not_acknowledged']}, conversations with seq gaps "
        f"{db['conversations_with_seq_gaps']}",
        f"  unanswered user messages: acknowledged {db['acknowledged_without_reply']}, after a "
        f"cancel {db['unanswered_after_cancel']}, never acknowledged "
        f"{db['unanswered_not_acknowledged']}; cancels that ended with no reply row and no "
        f"final message {db['cancel_before_reply_row']}",
        "  replies without text: "
        + (
            ", ".join(
                f"{k.split(':')[1]} {v}"
                for k, v in sorted(db.items())
                if k.startswith("replies_without_text")
            )
            or "none"
        ),
    ]
    if report["database"]["acknowledged_unanswered"]:
        out.append(
            "  acknowledged, never answered, no cancel: "
            f"{report['database']['acknowledged_unanswered'][:10]}"
        )
    problems = report["violations"][:15] + report["database"]["problems"][:15]
    if problems:
        out.append("problems")
        out += [f"  {p}" for p in problems]
    failed = failures(report)
    out.append("")
    out.append("RESULT: " + ("FAIL: " + "; ".join(failed) if failed else "ok, every check passed"))
    noticed = warnings(report)
    if noticed:
        out.append("WARNINGS: " + "; ".join(noticed))
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--think", type=float, nargs=2, default=[2.0, 8.0], metavar=("MIN", "MAX"))
    p.add_argument("--max-messages", type=int, default=1000, help="per client (a bound)")
    p.add_argument("--watchers", type=float, default=0.1, help="share of clients with a 2nd tab")
    p.add_argument("--p-lost-ack", type=float, default=0.03, help="drop right after a send")
    p.add_argument("--p-drop", type=float, default=0.10, help="drop mid-reply")
    p.add_argument("--p-cancel", type=float, default=0.08, help="cancel the reply")
    p.add_argument("--p-duplicate", type=float, default=0.03, help="resend an acked message")
    p.add_argument("--p-new-conversation", type=float, default=0.05)
    p.add_argument("--words", type=int, nargs=2, default=[20, 60], metavar=("MIN", "MAX"))
    p.add_argument(
        "--chunk-delay", type=float, nargs=2, default=[0.005, 0.03], metavar=("MIN", "MAX")
    )
    p.add_argument(
        "--first-delay", type=float, nargs=2, default=[0.02, 0.2], metavar=("MIN", "MAX")
    )
    p.add_argument("--fail-429", type=float, default=0.02, help="share of provider requests")
    p.add_argument("--fail-500", type=float, default=0.02)
    p.add_argument("--fail-cut", type=float, default=0.02, help="connection cut mid-stream")
    p.add_argument("--fail-stall", type=float, default=0.005, help="stall mid-stream")
    p.add_argument("--num-retries", type=int, default=1, help="CORTEX_NUM_RETRIES")
    p.add_argument("--idle-timeout", type=float, default=2.0, help="CORTEX_STREAM_IDLE_TIMEOUT")
    p.add_argument("--grace", type=float, default=5.0, help="CORTEX_SHUTDOWN_GRACE_S")
    p.add_argument("--keep", action="store_true", help="keep the work directory (db, logs)")
    p.add_argument("--json", action="store_true", help="JSON on stdout, the table on stderr")
    p.add_argument("--provider-process", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.think[0] <= 0:
        p.error("--clients, --seconds and the think time must be positive")
    if args.words[0] < 2 or args.words[1] < args.words[0]:
        p.error("--words MIN MAX with 2 <= MIN <= MAX")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.provider_process:
        asyncio.run(provider_process(args))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="cortex-soak-"))
    try:
        report = asyncio.run(asyncio.wait_for(soak(args, workdir), args.seconds + args.grace + 240))
    except Exception as exc:
        print(f"soak: the harness failed: {exc!r}; work directory {workdir}", file=sys.stderr)
        return 2
    failed = failures(report)
    report["result"] = {"ok": not failed, "failures": failed, "warnings": warnings(report)}
    table = render(report)
    keep = args.keep or bool(failed)
    report["workdir"] = str(workdir) if keep else None
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)
    if keep:
        print(f"work directory kept: {workdir}", file=sys.stderr)
    else:
        _rmtree(workdir)
    return 1 if failed else 0


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
