"""The soak's clients and its storage check, shared by bench/soak.py and tests/test_soak.py.

Long on purpose (one job: a client that misbehaves in every way a real one can, and the
check that holds the server to what each client was told); split, its halves would share
every record type.

Many clients chat with one server at once, dropping, coming back and cancelling, while a fake
provider answers with partly failing replies; then the server's database is read and checked
against what every client sent, was acknowledged and was told.

The provider's answer to a user message is a pure function of it (`reply_text`): every word
starts with a tag of the message, so a stored reply names the message it answers, and its text
is known (whole when complete, a prefix otherwise). `soak_responder` gives the fake provider
(cortex.testing.fake_openai) those answers, some of them failing.

Each client (`SoakClient`) keeps one conversation (now and then it starts a new one), sends
messages with a `client_msg_id`, records every `ack` in the shared `Ledger`, and waits for the
reply. Along the way it
- drops its connection mid-reply (a clean close or a TCP abort), reconnects, resubscribes with
  `after_seq` and keeps waiting for the reply it was owed;
- drops the connection right after a `send`, before the ack, and resends the same frame on a
  new connection (the retry after a lost ack);
- resends an acknowledged message (the server must re-ack it, not store it twice);
- cancels the reply at once or after a few deltas (a reply ends with its final `message`;
  a cancelled one whose wait ends with `typing` off and no final `message` is recorded).
Some clients have a second connection (a "tab", `watch`) that only watches their conversation.
Every connection assembles the deltas it gets: offsets must continue the text with no gap, a
repeat must match, the final `message` must equal what the deltas built, and no delta may
follow it. (Only a catch-up asked for on a connection live events already reach may show the
reply whole before its deltas built it; they must then build a prefix of it.) `Crowd` starts
and stops them all.

`check_database` reads the SQLite file of the stopped server and checks:
- every acknowledged user message is stored exactly once, as acknowledged (id, seq, text);
  no client_msg_id is stored twice, nothing is stored that no client sent;
- no assistant reply is left `streaming`; each reply is complete, cancelled, error or
  interrupted, and its text is the provider's text for that message (whole when complete, a
  prefix otherwise), so a message answered twice or out of order shows too;
- what clients were told (final status and text) is what is stored, and no stored reply
  went without its final `message` (as after a cancel that hits the reply's finalisation);
- seq: unique and increasing per conversation, as clients see it too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from cortex.testing.deltas import ReplyText
from cortex.testing.fake_openai import Reply, last_user_text

__all__ = [
    "Crowd",
    "Ledger",
    "Plan",
    "ProviderPlan",
    "SoakClient",
    "check_database",
    "reply_text",
    "soak_responder",
]

RECV_TIMEOUT = 45.0  # no event for this long while one is owed: a stuck reply
REPLY_TIMEOUT = 90.0  # from send (or reconnect) to the final message
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


def pick(roll: float, kinds: list[tuple[float, str]]) -> str:
    """The kind whose share of [0, 1) the roll falls in; "ok" past all of them."""
    for rate, kind in kinds:
        if roll < rate:
            return kind
        roll -= rate
    return "ok"


@dataclass
class ProviderPlan:
    """The fake provider's replies: their length and pace, and how often it fails."""

    words: tuple[int, int] = (20, 60)  # reply length in words, min and max
    chunk_delay: tuple[float, float] = (0.005, 0.03)  # seconds between chunks, min and max
    first_delay: tuple[float, float] = (0.02, 0.2)  # seconds before the first chunk
    fail_429: float = 0.02  # shares of requests answered 429, 500, cut mid-stream, stalled
    fail_500: float = 0.02
    fail_cut: float = 0.02
    fail_stall: float = 0.005


def soak_responder(
    plan: ProviderPlan, seed: int
) -> tuple[Callable[[dict[str, Any]], Reply], Counter[str]]:
    """A `FakeOpenAI.responder` answering `reply_text` of the last user message, failing as
    `plan` says; and the counts of what it answered ("ok", "429", "500", "cut", "stall")."""
    rng = random.Random(seed * 7919 + 1)
    stats: Counter[str] = Counter()

    def respond(body: dict[str, Any]) -> Reply:
        text = reply_text(last_user_text(body), plan.words)
        n_words = len(text.split())
        delay = rng.uniform(*plan.chunk_delay)
        first = rng.uniform(*plan.first_delay)
        kind = pick(
            rng.random(),
            [
                (plan.fail_429, "429"),
                (plan.fail_500, "500"),
                (plan.fail_cut, "cut"),
                (plan.fail_stall, "stall"),
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

    return respond, stats


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
        self.texts: dict[str, ReplyText] = {}  # message id -> text joined from offset 0
        self.seq_of: dict[str, int] = {}  # message id -> seq
        self.floor = dict(after_seq)  # conversation -> highest seq announced in this session
        # Conversations whose catch-up interleaves with live events (a subscribe on a connection
        # a re-ack already subscribed): seq order is not checked until the subscribe's ack.
        self.resync: dict[str, str] = {}
        self.finished: set[str] = set()  # replies whose final `message` came

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
        reply = self.texts.get(mid)
        if reply is None:
            if mid in self.finished:
                self.ledger.violation(f"{self.name}: delta of {mid} at {offset} after its end")
            elif offset == 0:
                self.texts[mid] = ReplyText(text)
            else:
                # Joined mid-reply (a `send` subscribes without catch-up); a subscribe follows.
                self.ledger.counts["deltas_unanchored"] += 1
            return
        have = len(reply.text)
        joined = reply.add(offset, text)
        if joined == "gap":
            self.ledger.violation(
                f"{self.name}: gap in {mid}: delta at offset {offset}, have {have} chars"
            )
            self.texts.pop(mid, None)
        elif joined != "next":
            if joined == "mismatch":
                self.ledger.violation(
                    f"{self.name}: delta of {mid} at {offset} does not match the text so far"
                )
            self.ledger.counts["deltas_overlap"] += 1

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
            self.texts.setdefault(mid, ReplyText())  # announced before its first delta
            return
        self.ledger.final(message, self.name)
        self.finished.add(mid)
        reply = self.texts.pop(mid, None)
        have = None if reply is None else reply.text
        if have is not None and conv in self.resync and message["content"].startswith(have):
            # The catch-up this connection asked for, while live events already reached it,
            # read the reply whole: its snapshot overtakes the deltas still on their way
            # (which the server drops).
            self.ledger.counts["catch_up_overtook_deltas"] += 1
        elif have is not None and have != message["content"]:
            self.ledger.violation(
                f"{self.name}: {mid} ended {message['status']} with {len(message['content'])} "
                f"chars; its deltas built {len(have)} chars"
                + ("" if message["content"].startswith(have) else " that differ")
            )


@dataclass
class Plan:
    """Probabilities of the disturbances, per message, and the pause between messages."""

    lost_ack: float = 0.03  # drop right after a send
    drop: float = 0.10  # drop mid-reply
    cancel: float = 0.08  # cancel the reply
    duplicate: float = 0.03  # resend an acknowledged message
    new_conversation: float = 0.05
    think: tuple[float, float] = (2.0, 8.0)  # seconds, min and max


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


class Crowd:
    """Every client of a soak (and the watching tabs of some) on one server.

    `start()` them; when the run is over, `wind_down()` before the server is stopped (so that
    closes are taken for the shutdown they are), then `join()` once it has exited.
    """

    def __init__(
        self,
        url: str,
        plan: Plan,
        ledger: Ledger,
        *,
        clients: int,
        seed: int,
        watchers: float = 0.1,
        max_messages: int = 1000,
        ramp: float = 5.0,
    ) -> None:
        self.url, self.plan, self.ledger = url, plan, ledger
        self.clients, self.seed, self.watchers = clients, seed, watchers
        self.max_messages, self.ramp = max_messages, ramp
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the clients, their starts spread evenly over `ramp` seconds; `watchers` is
        the share of clients with a second tab."""
        rng = random.Random(self.seed)
        for i in range(self.clients):
            queue: asyncio.Queue[str] | None = None
            if rng.random() < self.watchers:
                queue = asyncio.Queue()
                self.tasks.append(
                    asyncio.create_task(watch(i, self.url, queue, self.ledger, self.stopping))
                )
            client = SoakClient(
                i,
                self.url,
                self.plan,
                self.ledger,
                random.Random(rng.random()),
                self.stopping,
                queue,
                self.max_messages,
            )
            self.tasks.append(asyncio.create_task(_delayed(i * self.ramp / self.clients, client)))

    def wind_down(self) -> None:
        """The run is over: a close from now on is the server's shutdown, not a fault."""
        self.stopping.set()

    async def join(self, timeout: float = 15.0) -> int:
        """Wait up to `timeout` for the clients to end, cancel the rest; a client that failed
        is a violation. Returns how many were still running."""
        self.wind_down()
        if not self.tasks:
            return 0
        _done, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*self.tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                self.ledger.violation(f"client task failed: {result!r}")
        self.ledger.counts["clients_still_running_after_stop"] = len(pending)
        return len(pending)


async def _delayed(delay: float, client: SoakClient) -> None:
    await asyncio.sleep(delay)
    await client.run()


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
