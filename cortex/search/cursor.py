"""The opaque page cursor of a search: where the next page starts, tied to its query.

A cursor is base64 of a small JSON object. It is validated, not trusted: a cursor that does not
decode, names an offset out of bounds, or was made for another query (or other filters) is a
`bad_frame` error. A forged one can only page the caller's own results, since every search is
filtered by its owner in the database.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from ..errors import BadFrame

MAX_OFFSET = 10_000  # deeper than anyone pages; bounds the work a cursor can ask for
MAX_CURSOR_CHARS = 200


def _tag(scope: str) -> str:
    return hashlib.sha256(scope.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def encode(offset: int, scope: str) -> str:
    """A cursor for the page at `offset` of the search identified by `scope`."""
    raw = json.dumps({"o": offset, "s": _tag(scope)}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(cursor: str, scope: str) -> int:
    """The offset in a cursor made for `scope`; `BadFrame` for anything else."""
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        offset = data["o"]
        valid = (
            isinstance(data, dict)
            and set(data) == {"o", "s"}
            and type(offset) is int
            and 0 < offset <= MAX_OFFSET
            and data["s"] == _tag(scope)
        )
    except (ValueError, TypeError, KeyError, binascii.Error, UnicodeError):
        valid = False
    if not valid:
        raise BadFrame("invalid cursor: not one this search returned")
    return int(offset)
