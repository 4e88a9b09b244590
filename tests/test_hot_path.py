"""The per-chunk hot path: one stall timer per stream, deltas encoded once with orjson."""

from __future__ import annotations

import asyncio
import json

import pytest

from cortex.llm.silence import SilenceTimer
from cortex.protocol import delta_frame


@pytest.mark.parametrize("text", ["plain", 'é "q" \n\t \u2028 \x7f 😀', "\ud83d lone"])
def test_delta_frame_is_the_json_of_the_event(text: str) -> None:
    frame = delta_frame("c1", "m1", 7, text)
    event = {"type": "delta", "conversation_id": "c1", "message_id": "m1", "offset": 7}
    assert json.loads(frame) == {**event, "text": text}
    assert (frame.offset, frame.text, frame.message_id) == (7, text, "m1")


async def test_a_stream_of_chunks_sets_one_timer_and_a_silence_still_ends_it() -> None:
    loop = asyncio.get_running_loop()
    made: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def counting_call_at(
        when: float, callback: object, *args: object, **kwargs: object
    ) -> asyncio.TimerHandle:
        handle = call_at(when, callback, *args, **kwargs)  # type: ignore[arg-type]
        if getattr(callback, "__self__", None).__class__ is SilenceTimer:
            made.append(handle)
        return handle

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as scope:
                silence = SilenceTimer(scope, 0.2)
                began = loop.time()
                for _ in range(500):  # chunks 1 ms apart: never silent for 0.2 s
                    silence.arm()
                    await asyncio.sleep(0.001)
                    silence.disarm()
                # A timer moves on each time it fires early (every 0.2 s of the loop, however
                # slow a loaded machine makes the 500 sleeps), never once per chunk.
                fired_early = (loop.time() - began) / 0.2
                assert len(made) <= fired_early + 2, (len(made), fired_early)
                silence.arm()
                await asyncio.sleep(5)  # silent: the timer ends the scope after ~0.2 s
    finally:
        del loop.call_at
    silence.stop()
