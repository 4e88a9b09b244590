"""A short soak against a real `cortex serve` process; then its database is checked.

30 clients chat for 15 s, dropping connections, resending, cancelling and watching from a
second tab, while the fake provider fails some replies (429, 500, cut, stalled); then the
server gets SIGTERM while they are busy. What is stored must be what the clients sent, were
acknowledged and were told (cortex.testing.soak.check_database). bench/soak.py runs the same
clients and the same check for longer and with more of them.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest
from conftest import TIMEOUT
from processes import cortex_process

from cortex.testing.fake_openai import FakeOpenAI
from cortex.testing.processes import log_problems
from cortex.testing.soak import Crowd, Ledger, Plan, ProviderPlan, check_database, soak_responder

pytestmark = pytest.mark.slow

CLIENTS = 30
SECONDS = 15.0
GRACE_S = 2.0  # CORTEX_SHUTDOWN_GRACE_S: replies still running then are cancelled


def logged_errors(folder: Path) -> list[str]:
    """The error lines (ERROR, CRITICAL, tracebacks) of the server logs in `folder`."""
    return [line for log in folder.glob("cortex-*.log") for line in log_problems(log)[1]]


async def test_a_short_soak_stores_what_the_clients_were_told(
    tmp_path: Path, provider: FakeOpenAI
) -> None:
    replies = ProviderPlan()
    provider.responder, answered = soak_responder(replies, seed=1)
    database = tmp_path / "soak.db"
    ledger = Ledger()
    async with cortex_process(
        tmp_path,
        provider,
        f"sqlite+aiosqlite:///{database}",
        num_retries="1",
        stream_idle_timeout="2",  # a stalled provider stream ends the reply
        shutdown_grace_s=str(GRACE_S),
    ) as (proc, url):
        crowd = Crowd(
            url, Plan(think=(1.0, 4.0)), ledger, clients=CLIENTS, seed=1, ramp=SECONDS / 4
        )
        crowd.start()
        await asyncio.sleep(SECONDS)  # the soak itself: the clients run for this long
        # A graceful shutdown while the clients are still busy.
        crowd.wind_down()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), GRACE_S + TIMEOUT * 2)
        still_running = await crowd.join(timeout=TIMEOUT)

    stored = check_database(database, ledger, replies.words)
    assert stored["problems"] == []
    assert ledger.violations == []
    assert still_running == 0
    assert code == 0
    assert logged_errors(tmp_path) == []
    # It was a soak: messages went through, and the provider failed some of them.
    assert ledger.counts["acks"] >= CLIENTS
    assert stored["counts"].get("assistant:complete", 0) >= CLIENTS
    assert sum(answered.values()) > answered["ok"]
