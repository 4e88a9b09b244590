"""`cortex token create | list | revoke`: manage stored tokens; no server needs to be running.

A created token is printed once, alone on stdout (`TOKEN=$(cortex token create alice)` works);
everything else goes to stderr. Only the token's sha256 is stored, so it cannot be shown again.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime

from ..config import Settings
from ..store import TokenStore, make_engine, migrate
from .tokens import check_user, generate_token, hash_token

MAX_NAME_CHARS = 200  # tokens.name is String(200)


def run_token_command(settings: Settings, args: argparse.Namespace) -> int:
    """Run `cortex token <action>`; returns the exit status."""
    if args.action == "create":
        try:
            user = check_user(args.user)
        except ValueError as exc:
            return _fail(str(exc), status=2)
        name = args.name.strip()
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            return _fail(f"--name must be printable and at most {MAX_NAME_CHARS} characters", 2)
        migrate(settings.database_url)
        return _run(settings, lambda store: _create(store, user, name))
    migrate(settings.database_url)
    if args.action == "list":
        return _run(settings, _list)
    return _run(settings, lambda store: _revoke(store, args.id))


def _run(settings: Settings, action: Callable[[TokenStore], Awaitable[int]]) -> int:
    async def main() -> int:
        engine = make_engine(settings)
        try:
            return await action(TokenStore(engine))
        finally:
            await engine.dispose()

    return asyncio.run(main())


async def _create(store: TokenStore, user: str, name: str) -> int:
    token = generate_token()
    row = await store.create(user=user, name=name, token_hash=hash_token(token))
    print(token, flush=True)
    print(
        f"created token {row.id} for user {user}. It is shown only this once: store it now. "
        "(A server that started with auth off, on loopback with no tokens, keeps it off until "
        "it restarts.)",
        file=sys.stderr,
    )
    return 0


async def _list(store: TokenStore) -> int:
    rows = await store.all()
    if not rows:
        print("no tokens; create one with `cortex token create USER`", file=sys.stderr)
        return 0
    table = [("ID", "USER", "NAME", "CREATED (UTC)", "LAST USED (UTC)", "REVOKED (UTC)")]
    for row in rows:
        table.append(
            (
                str(row.id),
                row.user,
                row.name or "-",
                _when(row.created_at),
                _when(row.last_used_at),
                _when(row.revoked_at),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0


async def _revoke(store: TokenStore, token_id: int) -> int:
    found = await store.revoke(token_id)
    if found is None:
        return _fail(f"no token with id {token_id}", status=1)
    row, revoked_now = found
    if not revoked_now:
        print(f"token {token_id} (user {row.user}) was already revoked", file=sys.stderr)
        return 0
    print(
        f"revoked token {token_id} (user {row.user}); new connections with it are refused now, "
        "open ones are closed within CORTEX_AUTH_RECHECK_S",
        file=sys.stderr,
    )
    return 0


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else "-"


def _fail(message: str, status: int) -> int:
    print(f"cortex: {message}", file=sys.stderr)
    return status
