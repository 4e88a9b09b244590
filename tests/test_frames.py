"""Frame types are declared once (their protocol class) and everything else follows: the
parser, the dispatch table, the metrics' labels. The docs and the page must name every type."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from cortex.ops.metrics import OTHER, Metrics
from cortex.protocol import INBOUND_FRAMES, INBOUND_TYPES, OUTBOUND_TYPES, Inbound
from cortex.server.dispatch import DispatchTable, frame_handlers

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
PAGE_DISPATCH = ROOT / "cortex" / "static" / "js" / "main.js"


def documented_types(section: str) -> set[str]:
    """The frame types in the first column of a docs/protocol.md section's table."""
    text = PROTOCOL_DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", body, flags=re.M))


def test_every_client_frame_is_documented() -> None:
    assert documented_types("Client to server") == set(INBOUND_TYPES)


def test_every_server_event_is_documented() -> None:
    assert documented_types("Server to client") == set(OUTBOUND_TYPES)


def test_the_page_handles_every_server_event() -> None:
    handled = set(re.findall(r'case "([a-z_]+)":', PAGE_DISPATCH.read_text()))
    assert set(OUTBOUND_TYPES) <= handled, set(OUTBOUND_TYPES) - handled


def test_every_client_frame_has_a_handler() -> None:
    table = frame_handlers(cast(Any, None), cast(Any, None), cast(Any, None))
    assert table.missing() == []


@pytest.fixture
def new_frame_type() -> Iterator[type[Inbound]]:
    """A frame class declared the way every frame is: it registers itself."""

    class Wave(Inbound):
        type: Literal["wave"]

    try:
        yield Wave
    finally:
        del INBOUND_FRAMES["wave"]


def test_a_frame_without_a_handler_is_refused(new_frame_type: type[Inbound]) -> None:
    assert "wave" in INBOUND_FRAMES
    with pytest.raises(RuntimeError, match="no handler: wave"):
        frame_handlers(cast(Any, None), cast(Any, None), cast(Any, None))
    table = DispatchTable()
    assert "wave" in table.missing()


def test_metrics_label_every_frame_type_and_only_those() -> None:
    body = Metrics().render()[0].decode()
    labels_in = set(re.findall(r'cortex_frames_in_total\{type="([a-z_]+)"\}', body))
    labels_out = set(re.findall(r'cortex_frames_out_total\{type="([a-z_]+)"\}', body))
    assert labels_in == {*INBOUND_TYPES, "invalid", "rate_limited"}
    assert labels_out == {*OUTBOUND_TYPES, OTHER}
