"""Tool names the providers accept: `server__tool`, within `^[a-zA-Z0-9_-]{1,64}$`.

A name that is too long, or holds other characters, is cut and given a hash of the original,
so the same server and tool always get the same name (stored conversations replay it).
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["SEPARATOR", "tool_name"]

SEPARATOR = "__"
MAX_NAME = 64
_BAD = re.compile(r"[^A-Za-z0-9_-]")
_HASH = 8


def tool_name(server: str, tool: str) -> str:
    """The registry name of `tool` on `server`; stable, unique in practice, always valid."""
    plain = f"{server}{SEPARATOR}{tool}"
    clean = _BAD.sub("_", plain)
    if clean == plain and len(plain) <= MAX_NAME:
        return plain
    digest = hashlib.sha256(plain.encode()).hexdigest()[:_HASH]
    return f"{clean[: MAX_NAME - _HASH - 1]}_{digest}"
