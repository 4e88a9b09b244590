"""Tool calling through the real pipeline: streamed tool-call fragments in, tools run, the
model called again with the results, everything stored and replayed in OpenAI order."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, final_message

from cortex.testing.fake_openai import FakeOpenAI, Reply, ToolCallSpec

TOOLS_MODULE = '''
import asyncio
from cortex.tools import tool

# Every test runs on the direct stream path and on LiteLLM's (conftest).
BOTH_LLM_PATHS = True

# The protocol promises hold on either store (docs/scaling.md).
BOTH_BACKENDS = True

@tool
def explode(reason: str) -> str:
    """Always fails, to show how a failing tool is reported."""
    raise RuntimeError(f"boom: {reason}")

@tool
async def dawdle(seconds: float) -> str:
    """Sleeps longer than the tool timeout."""
    await asyncio.sleep(seconds)
    return "done"
'''


@pytest.fixture
async def tool_app(tmp_path: Path, start_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "cortex_test_tools.py").write_text(textwrap.dedent(TOOLS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return await start_server(
        tool_modules=["cortex_test_tools"], tool_timeout=0.3, max_tool_rounds=3
    )


def _events(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


async def test_two_tool_calls_run_and_the_model_answers(
    tool_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    provider.enqueue(
        Reply(
            text="Let me work that out.",
            tool_calls=[
                ToolCallSpec(name="calculator", arguments='{"expression": "2 + 3 * 4"}', id="c1"),
                ToolCallSpec(
                    name="current_time", arguments='{"timezone": "Europe/Paris"}', id="c2"
                ),
            ],
        ),
        Reply(text="2 + 3 * 4 is 14."),
    )
    client: Client = await connect_to(tool_app)
    await client.send(type="send", content="What is 2 + 3 * 4, and the time in Paris?")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    events = await client.until_reply()

    calls = _events(events, "tool_call")
    assert [(c["call_id"], c["name"]) for c in calls] == [
        ("c1", "calculator"),
        ("c2", "current_time"),
    ]
    assert calls[0]["arguments"] == {"expression": "2 + 3 * 4"}
    results = {r["call_id"]: r for r in _events(events, "tool_result")}
    assert results["c1"]["ok"] is True and results["c1"]["result"] == 14
    assert results["c2"]["ok"] is True and "T" in results["c2"]["result"]
    assert final_message(events)["content"] == "2 + 3 * 4 is 14."
    assert len(_events(events, "typing")) == 2  # one typing span for the whole reply

    # The first request offered the tools; the second replayed the turn in OpenAI order.
    offered = {t["function"]["name"] for t in provider.requests[0]["tools"]}
    assert {"calculator", "current_time", "explode", "dawdle"} <= offered
    second = provider.requests[1]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["id"] for c in second[2]["tool_calls"]] == ["c1", "c2"]
    assert second[2]["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": '{"expression": "2 + 3 * 4"}',
    }
    assert [(m["tool_call_id"], m["content"]) for m in second[3:]][0] == ("c1", "14")

    rows, _ = await tool_app.store.messages(conversation_id)
    assert [(r.role, r.status) for r in rows] == [
        ("user", "complete"),
        ("assistant", "complete"),
        ("tool", "complete"),
        ("tool", "complete"),
        ("assistant", "complete"),
    ]
    assert rows[1].content == "Let me work that out." and len(rows[1].tool_calls) == 2
    assert rows[1].finish_reason == "tool_calls"

    # The next user message sends the whole tool turn to the provider again.
    provider.enqueue(Reply(text="You're welcome."))
    await client.send(type="send", conversation_id=conversation_id, content="Thanks!")
    await client.until_reply()
    replay = provider.requests[2]["messages"]
    assert [m["role"] for m in replay] == [
        "system",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "user",
    ]


@pytest.mark.parametrize(
    ("name", "arguments", "error_part"),
    [
        ("explode", '{"reason": "testing"}', "boom: testing"),
        ("dawdle", '{"seconds": 5}', "timed out"),
        ("no_such_tool", "{}", "unknown tool"),
        ("calculator", '{"expression": ', "not valid JSON"),
        ("calculator", '{"expr": "1+1"}', "invalid arguments"),
    ],
)
async def test_failing_tools_are_reported_to_model_and_client(
    tool_app: Any,
    connect_to: Any,
    provider: FakeOpenAI,
    name: str,
    arguments: str,
    error_part: str,
) -> None:
    provider.enqueue(
        Reply(text="", tool_calls=[ToolCallSpec(name=name, arguments=arguments, id="bad")]),
        Reply(text="Sorry, that tool failed."),
    )
    client: Client = await connect_to(tool_app)
    await client.send(type="send", content="try it")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    events = await client.until_reply()
    (result,) = _events(events, "tool_result")
    assert result["ok"] is False and error_part in result["error"]
    assert final_message(events)["content"] == "Sorry, that tool failed."
    tool_message = provider.requests[1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["tool_call_id"] == "bad"
    assert error_part in tool_message["content"]
    rows, _ = await tool_app.store.messages(conversation_id)
    assert rows[2].role == "tool" and rows[2].status == "error"
    assert rows[2].error_code == "tool_error"
    assert (await client.request(type="ping"))["type"] == "pong"


async def test_tool_round_limit(tool_app: Any, connect_to: Any, provider: FakeOpenAI) -> None:
    counter = iter(range(100))
    provider.responder = lambda body: Reply(
        text="",
        tool_calls=[
            ToolCallSpec(
                name="calculator", arguments='{"expression": "1+1"}', id=f"loop{next(counter)}"
            )
        ],
    )
    client: Client = await connect_to(tool_app)
    await client.send(type="send", content="loop forever")
    conversation_id = (await client.until_type("ack"))[-1]["conversation_id"]
    events = await client.until_reply()
    assert len(provider.requests) == 3
    assert [e["code"] for e in _events(events, "error")] == ["tool_error"]
    final = final_message(events)
    assert final["status"] == "error" and "limit of 3 tool rounds" in final["content"]
    rows, _ = await tool_app.store.messages(conversation_id)
    assert sum(r.role == "tool" for r in rows) == 3
    assert rows[-1].error_code == "tool_error"


async def test_send_narrows_tools_and_refuses_unknown_names(
    tool_app: Any, connect_to: Any, provider: FakeOpenAI
) -> None:
    client: Client = await connect_to(tool_app)
    error = await client.request(type="send", content="hi", tools=["calculator", "nope"])
    assert error["type"] == "error" and error["code"] == "bad_frame" and "nope" in error["message"]
    provider.enqueue(
        Reply(
            text="",
            tool_calls=[ToolCallSpec(name="explode", arguments='{"reason": "x"}', id="sneaky")],
        ),
        Reply(text="ok"),
    )
    await client.send(type="send", content="only math", tools=["calculator"])
    events = await client.until_reply()
    assert [t["function"]["name"] for t in provider.requests[0]["tools"]] == ["calculator"]
    (result,) = _events(events, "tool_result")
    assert result["ok"] is False  # a tool not offered for this message is not run
    assert "boom" not in json.dumps(result)
