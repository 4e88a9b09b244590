"""What broke when we tried to break it (issue "Hardening"): each case failed on 495a8b5."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import TIMEOUT, Client, deltas_text, final_message
from websockets.exceptions import ConnectionClosed

from cortex.server.flood import FloodControl, Verdict
from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

# ---- a message bigger than the send budget ---------------------------------------------------


async def test_a_reply_stops_at_max_reply_chars_with_a_clear_status(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(max_reply_chars=5000)
    provider.enqueue(Reply(text="x" * 12_000, chunks=4))
    client: Client = await connect_to(app)
    await client.send(type="send", content="talk a lot")
    events = await client.until_reply()
    final = final_message(events)
    assert (final["status"], final["error_code"], len(final["content"])) == (
        "error",
        "too_large",
        5000,
    )
    assert deltas_text(events) == final["content"]
    (error,) = [e for e in events if e["type"] == "error"]
    assert error["code"] == "too_large" and "CORTEX_MAX_REPLY_CHARS" in error["message"]


async def test_one_long_message_is_not_a_slow_reader_and_catch_up_delivers_it(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    """A stored message far over the send budget (64 KiB here) reaches a client that reads,
    live and in a catch-up, and later events follow it."""
    app = await start_server(send_buffer_bytes=65_536, max_reply_chars=1_000_000)
    long_text = "word " * 60_000  # 300,000 characters in one chunk
    provider.enqueue(Reply(text=long_text, chunks=1), Reply(text="short"))
    client: Client = await connect_to(app)
    await client.send(type="send", content="one big answer")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    assert final_message(await client.until_reply())["content"] == long_text
    await client.send(type="send", conversation_id=conversation_id, content="and now?")
    assert final_message(await client.until_reply())["content"] == "short"
    for _ in range(3):  # every later catch-up, as the page does after a reconnect
        late: Client = await connect_to(app)
        await late.send(type="subscribe", conversation_id=conversation_id, after_seq=0)
        events = await late.until_type("ack")
        contents = [e["message"]["content"] for e in events if e["type"] == "message"]
        assert contents == ["one big answer", long_text, "and now?", "short"]


# ---- flood control ---------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_allowed_frames_between_refused_ones_do_not_reset_the_strikes() -> None:
    """19 pings every 60 ms (15x the limit) used to get an error each and never a close."""
    clock = Clock()
    flood = FloodControl(
        frames_per_s=20,
        frame_burst=60,
        bytes_per_s=10**6,
        byte_burst=10**7,
        strikes=20,
        clock=clock,
    )
    verdicts = []
    for _round in range(20):
        verdicts.extend(flood.admit(10) for _ in range(19))
        clock.now += 0.06
        if Verdict.CLOSE in verdicts:
            break
    assert Verdict.CLOSE in verdicts and clock.now < 1.5


def test_a_client_that_slows_down_is_forgiven_and_bytes_count_too() -> None:
    clock = Clock()
    flood = FloodControl(
        frames_per_s=20,
        frame_burst=5,
        bytes_per_s=1000,
        byte_burst=4000,
        strikes=3,
        clock=clock,
    )
    assert [flood.admit(10) for _ in range(7)][-2:] == [Verdict.REFUSE, Verdict.REFUSE]
    clock.now += 1.0  # quiet for a second: both buckets refill
    assert flood.admit(10) is Verdict.ADMIT and flood.strikes == 0
    assert flood.admit(3000) is Verdict.ADMIT  # within the byte burst
    assert flood.admit(3000) is Verdict.REFUSE  # the bytes, not the frames, are spent


async def test_a_flooding_connection_is_closed_and_others_go_on(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(rate_per_s=20, rate_burst=60, rate_strikes=20)
    other: Client = await connect_to(app)
    flooder: Client = await connect_to(app)
    ping = json.dumps({"type": "ping"})
    reader = asyncio.create_task(_read_all(flooder))  # it reads its answers, so it hears the close
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(TIMEOUT):
            while True:
                for _ in range(19):
                    await flooder.ws.send(ping)
                await asyncio.sleep(0.06)
    await reader
    assert flooder.ws.close_code == 1008
    assert (await other.request(type="ping"))["type"] == "pong"


async def _read_all(client: Client) -> None:
    try:
        async for _ in client.ws:
            pass
    except ConnectionClosed:
        pass


async def test_frames_over_the_byte_rate_are_refused_unread(
    start_server: Any, connect_to: Any
) -> None:
    app = await start_server(rate_bytes_per_s=1024, rate_bytes_burst=8192, rate_strikes=50)
    client: Client = await connect_to(app)
    big = json.dumps({"type": "ping", "request_id": "big", "pad": "x" * 6000})
    await client.ws.send(big)  # within the burst: read (and refused for its unknown field)
    assert (await client.recv())["code"] == "bad_frame"
    await client.ws.send(big)  # the byte budget is spent: refused before it is parsed
    refused = await client.recv()
    assert (refused["code"], refused.get("request_id")) == ("rate_limited", "big")


# ---- lone surrogates -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"type":"ping","request_id":"\\ud800"}',
        '{"type":"send","content":"half an emoji \\ud83d"}',
        '{"type":"rename","conversation_id":"c1","title":"\\udfff"}',
    ],
)
async def test_a_lone_surrogate_is_a_bad_frame_on_an_open_connection(
    client: Client, raw: str, caplog: pytest.LogCaptureFixture
) -> None:
    await client.ws.send(raw)
    error = await client.recv()
    assert (error["type"], error["code"]) == ("error", "bad_frame")
    assert "surrogate" in error["message"]
    assert (await client.request(type="ping"))["type"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- the provider's deadline -----------------------------------------------------------------


async def test_llm_timeout_is_one_deadline_retries_included(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    """A provider that never answers, 2 s and two retries: `provider_timeout` after about 2 s
    (it came after each attempt's 2 s, retries and backoff included, before)."""
    app = await start_server(llm_timeout=2.0, num_retries=2)
    provider.default = Reply(status=503, first_chunk_delay=60)  # holds every attempt
    client: Client = await connect_to(app)
    started = time.monotonic()
    await client.send(type="send", content="anyone there?")
    events = await client.until_reply(timeout=TIMEOUT * 2)
    elapsed = time.monotonic() - started
    assert final_message(events)["error_code"] == "provider_timeout"
    assert 1.9 < elapsed < 4.5, elapsed
    await provider.stop()  # release the held requests


# ---- HTTP paths ------------------------------------------------------------------------------


async def test_hostile_http_paths_get_4xx_and_no_traceback(
    server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A connection a request: the server answers plain HTTP once per connection.
    connector = aiohttp.TCPConnector(force_close=True)
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession(base, connector=connector) as session:
        async with session.get("/static/" + "a" * 5000) as response:
            assert response.status == 404
        query = "before_seq=99999999999999999999999"
        async with session.get(f"/api/conversations/x/messages?{query}") as response:
            assert response.status == 400
        async with session.head("/healthz") as response:
            assert response.status == 200 and await response.read() == b""
            assert int(response.headers["Content-Length"]) > 0
        async with session.post("/healthz") as response:
            assert response.status == 405 and response.headers["Allow"] == "GET, HEAD"
        async with session.delete("/api/conversations") as response:
            assert response.status == 405
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- titles, metrics, timestamps, files, idempotency keys --------------------------------------


async def test_an_automatic_title_never_replaces_a_rename(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(auto_title=True)
    provider.enqueue(
        Reply(text="a slow first answer", chunks=4, chunk_delay=0.1),
        Reply(text="Model's title"),
    )
    client: Client = await connect_to(app)
    await client.send(type="send", content="please name this well")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    renamed = await client.request(type="rename", conversation_id=conversation_id, title="Mine")
    assert renamed["type"] == "ack"
    await client.until_reply()
    titles = list(app.manager._titles)  # started with the reply's end, before typing off
    if titles:
        await asyncio.wait(titles, timeout=TIMEOUT)
    listing = await client.request(type="conversations")
    assert listing["items"][0]["title"] == "Mine"


async def test_tool_labels_are_registered_tools_only(
    start_server: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    app = await start_server(max_tool_rounds=1, metrics_public=True)
    invented = "calculator<img src=x onerror=alert(22)>"
    provider.enqueue(Reply(text="", tool_calls=[ToolCallSpec(name=invented, arguments="{}")]))
    client: Client = await connect_to(app)
    await client.send(type="send", content="call something")
    await client.until_reply()
    async with aiohttp.ClientSession(f"http://127.0.0.1:{app.port}") as session:
        async with session.get("/metrics") as response:
            body = await response.text()
    assert "onerror" not in body
    assert 'cortex_tool_calls_total{outcome="error",tool="unknown"} 1.0' in body


async def test_stored_timestamps_are_utc_with_z(client: Client, server: Any) -> None:
    await client.send(type="send", content="what time is it?")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    await client.until_reply()
    page = await client.request(type="history", conversation_id=conversation_id)
    listing = await client.request(type="conversations")
    moments = [m["created_at"] for m in page["messages"]]
    moments += [listing["items"][0]["created_at"], listing["items"][0]["updated_at"]]
    assert all(m.endswith("Z") for m in moments), moments


async def test_a_new_database_file_is_its_owners_only(
    client: Client, server: Any, tmp_path: Path
) -> None:
    await client.send(type="send", content="private")
    await client.until_reply()
    files = sorted(await asyncio.to_thread(lambda: list(tmp_path.glob("cortex.db*"))))
    assert files and files[0].name == "cortex.db"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


async def test_a_reused_client_msg_id_with_other_content_is_refused(client: Client) -> None:
    first = await client.request(type="send", content="first text", client_msg_id="k1")
    assert first["type"] == "ack"
    await client.until_reply()
    again = await client.request(type="send", content="first text", client_msg_id="k1")
    assert again["type"] == "ack" and again["message_id"] == first["message_id"]
    other = await client.request(type="send", content="other text", client_msg_id="k1")
    assert (other["type"], other["code"]) == ("error", "bad_frame")
    assert "client_msg_id already used" in other["message"]


async def test_a_message_at_the_limit_in_escaped_json_is_accepted(
    start_server: Any, connect_to: Any
) -> None:
    """The unparsed-length bound refuses junk, not a message within the limit that a client
    spelled with JSON escapes (Python's json.dumps writes an emoji as twelve characters)."""
    app = await start_server(max_message_chars=5000, use_mock=True)
    client: Client = await connect_to(app)
    frame = json.dumps({"type": "send", "content": "😀" * 5000, "request_id": "big"})
    assert len(frame) > 5000 * 12
    await client.ws.send(frame)
    answer = await client.until(lambda e: e.get("request_id") == "big")
    assert answer[-1]["type"] == "ack"
    await client.until_reply()


async def test_a_connection_drops_the_deltas_below_the_text_it_was_given() -> None:
    """The text so far may come from Redis ahead of its deltas' PUBLISH: deltas that arrive
    later and overlap it are cut or dropped, so offsets stay exact (no repeat)."""
    import collections

    from cortex.protocol import DeltaFrame, delta_frame
    from cortex.server.connection import Connection

    conn = Connection.__new__(Connection)  # the delivery side only: no socket needed
    conn.closing, conn._floors, conn._drained = False, {}, None
    conn._queue, conn._queued_chars, conn._wakeup = collections.deque(), 0, asyncio.Event()
    conn._max_frames, conn._max_chars = 100, 1_000_000
    conn._writing = True  # frames queue behind a write in progress: the queue shows them
    conn.trim_below("m", 10)
    for offset, text in [(0, "abcd"), (4, "efghij"), (8, "ijKLM"), (13, "NO")]:
        conn.deliver(delta_frame("c", "m", offset, text))
    conn.deliver(delta_frame("c", "other", 0, "untouched"))
    sent = [(f.message_id, f.offset, f.text) for f in conn._queue if isinstance(f, DeltaFrame)]
    assert sent == [("m", 10, "KLM"), ("m", 13, "NO"), ("other", 0, "untouched")]
    # A later subscribe hands the text over from the start: an old floor must not cut it.
    conn.trim_below("m", 20)
    conn.trim_below("m", 0)
    conn.deliver(delta_frame("c", "m", 0, "the whole text again"))
    last = conn._queue[-1]
    assert isinstance(last, DeltaFrame) and (last.offset, last.text) == (0, "the whole text again")
    assert conn._floors == {}


class CatchUpClient:
    """A subscriber that records the events it is handed, honouring `trim_below` as
    `server.Connection` does (a delta wholly below the floor is dropped)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.floors: dict[str, int] = {}

    def deliver(self, frame: str) -> None:
        event = json.loads(frame)
        floor = self.floors.get(event.get("message_id", ""), 0)
        if event["type"] != "delta" or event["offset"] + len(event["text"]) > floor:
            self.events.append(event)

    async def room(self) -> None:
        return None

    def trim_below(self, message_id: str, offset: int) -> None:
        self.floors[message_id] = offset


async def test_a_reply_that_ends_during_a_catch_up_still_gets_its_text_as_deltas(
    store: Any, tmp_path: Path
) -> None:
    """The catch-up reads a reply as streaming, then the reply is stored whole before its text
    so far is read: the client is still handed that text as a delta, so the deltas it holds
    build the final `message` (bench/soak.py's 500-client finding)."""
    from conftest import make_settings

    from cortex.fanout.hub import Hub
    from cortex.pipeline.live import Live
    from cortex.pipeline.reads import Reads
    from cortex.pipeline.views import message_event

    stored = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id=None
    )
    conv_id = stored.conversation.id
    started = await store.start_reply(conv_id, default_model="mock")
    row_id = started.row.id
    hub = Hub()

    class EndsMeanwhile(Reads):
        async def _text_so_far(self, conversation_id: str) -> tuple[str, str]:
            row = await store.finish_message(row_id, content="the whole reply", status="complete")
            hub.publish(conversation_id, message_event(row))
            return "", ""

    reads = EndsMeanwhile(settings=make_settings(tmp_path), store=store, hub=hub, live=Live())
    client = CatchUpClient()
    await reads.subscribe("u", conv_id, 0, client)
    kinds = [(e["type"], e.get("message", {}).get("status")) for e in client.events]
    assert kinds[-3:] == [("delta", None), ("message", "complete"), ("ack", None)]
    built = "".join(e["text"] for e in client.events if e["type"] == "delta")
    assert built == client.events[-2]["message"]["content"] == "the whole reply"


async def test_a_catch_up_that_shows_a_reply_whole_drops_its_deltas_still_on_their_way(
    store: Any, tmp_path: Path
) -> None:
    """A client a `send` subscribed has the first words of a reply when it asks for a
    catch-up; the reply ends while the catch-up reads, so the catch-up shows it whole. The
    reply's earlier states buffered meanwhile (its row as it began streaming, its deltas) must
    not follow that final `message`: a client would reopen the finished reply or append them
    to it (bench/soak.py's "deltas built 9 chars" finding)."""
    from conftest import make_settings

    from cortex.fanout.hub import Hub
    from cortex.pipeline.live import ActiveReply, Live
    from cortex.pipeline.reads import Reads
    from cortex.pipeline.views import message_event
    from cortex.protocol import delta_frame

    stored = await store.add_user_message(
        owner="u", conversation_id=None, content="hi", client_msg_id=None
    )
    conv_id = stored.conversation.id
    streaming = (await store.start_reply(conv_id, default_model="mock")).row
    row_id = streaming.id
    words = ["the ", "whole ", "reply"]

    class EndsMeanwhile(Hub):
        async def watch(self, conversation_id: str) -> None:
            self.publish(conversation_id, message_event(streaming))  # as if it began now
            for offset, word in ((4, words[1]), (10, words[2])):  # into the catch-up's buffer
                self.publish(conversation_id, delta_frame(conversation_id, row_id, offset, word))
            row = await store.finish_message(row_id, content="".join(words), status="complete")
            self.publish(conversation_id, message_event(row))

    hub = EndsMeanwhile()
    client = CatchUpClient()
    hub.subscribe(conv_id, client)  # as a `send` does
    hub.publish(conv_id, delta_frame(conv_id, row_id, 0, words[0]))
    live = Live()
    # Stored whole, but still live here for a moment (its worker has not let go of it yet).
    live.active[conv_id] = ActiveReply(row_id, streaming.seq, list(words), len("".join(words)))
    reads = Reads(settings=make_settings(tmp_path), store=store, hub=hub, live=live)
    await reads.subscribe("u", conv_id, 0, client)
    kinds = [(e["type"], e.get("message", {}).get("status")) for e in client.events]
    first_final = kinds.index(("message", "complete"))
    assert first_final > 0 and kinds[0] == ("delta", None)
    assert ("delta", None) not in kinds[first_final:], kinds
    assert ("message", "streaming") not in kinds[first_final:], kinds
    assert kinds[-1] == ("ack", None)
    finals = [e["message"] for e in client.events if e["type"] == "message"]
    assert {m["content"] for m in finals if m["role"] == "assistant"} == {"the whole reply"}
