"""`cortex serve | migrate | doctor | chat | token`: the command line.

Settings are built here, once, and passed down. Only the standard library is imported before
the arguments are parsed, so `cortex --help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    from .config import Settings

_SETTINGS_NOTE = (
    "Settings come from CORTEX_* environment variables, also read from ./.env "
    "(see README.md and docs/operations.md)."
)
_Formatter = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cortex",
        description="Cortex: a self-hosted chat router. WebSocket clients, any LLM through "
        "LiteLLM, every conversation stored.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser(
        "serve",
        help="migrate the database and run the server",
        description="Apply pending migrations, then serve the WebSocket (/ws), the HTTP API "
        "(/api/), /healthz, /readyz, /metrics and the chat page on one port. SIGTERM or "
        "Ctrl+C lets replies in progress finish (CORTEX_SHUTDOWN_GRACE_S), then exits.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    serve_cmd.add_argument("--host", help="bind address (default CORTEX_HOST, 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port; 0 picks a free one (CORTEX_PORT)")

    commands.add_parser(
        "migrate",
        help="apply pending database migrations and exit",
        description="Bring CORTEX_DATABASE_URL to the newest schema (alembic upgrade head). "
        "`cortex serve` does this at start too.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )

    doctor_cmd = commands.add_parser(
        "doctor",
        help="check the configuration: database, migrations, auth, provider keys, the model",
        description="Check that the database is reachable and migrated, that the access "
        "settings allow starting, that the chosen provider's keys are present, and that the "
        "model answers a one-token request. Prints a report; exit status 1 if a check failed.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    doctor_cmd.add_argument(
        "--no-model", action="store_true", help="do not send the one-token request"
    )
    doctor_cmd.add_argument(
        "--timeout", type=float, default=20.0, help="seconds each check may take (default 20)"
    )

    chat_cmd = commands.add_parser(
        "chat",
        help="chat with a running server in the terminal",
        description="A terminal client: replies stream as they arrive; it reconnects and "
        "catches up when the connection drops. Type /help inside for its commands "
        "(/new, /list, /open ID, /history, /cancel, /model NAME, /quit). "
        "Ctrl+C during a reply cancels it.",
        epilog="The token comes from --token or CORTEX_TOKEN. " + _SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    chat_cmd.add_argument("--url", help="WebSocket URL (default: ws://CORTEX_HOST:CORTEX_PORT/ws)")
    chat_cmd.add_argument("--conversation", metavar="ID", help="continue this conversation")
    chat_cmd.add_argument("--token", help="bearer token (default: CORTEX_TOKEN)")
    chat_cmd.add_argument("--model", help="model for new conversations (the server's default)")

    token_cmd = commands.add_parser(
        "token",
        help="create, list and revoke API tokens",
        description="Manage stored API tokens (docs/auth.md). No server needs to be running.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    token_actions = token_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    create_cmd = token_actions.add_parser(
        "create",
        help="create a token for USER (shown once)",
        description="Create a token for USER and print it once, alone on stdout.",
    )
    create_cmd.add_argument("user", metavar="USER")
    create_cmd.add_argument("--name", default="", help="a label, e.g. the device it is for")
    token_actions.add_parser(
        "list",
        help="list tokens (never the tokens themselves)",
        description="List stored tokens: id, user, name, dates. Tokens are never shown.",
    )
    revoke_cmd = token_actions.add_parser(
        "revoke",
        help="revoke a token by its id",
        description="Revoke a token; open sessions using it are closed.",
    )
    revoke_cmd.add_argument("id", metavar="ID", type=int)

    mcp_cmd = commands.add_parser(
        "mcp",
        help="try the MCP servers of CORTEX_MCP_CONFIG by hand",
        description="Connect the servers of CORTEX_MCP_CONFIG as `cortex serve` would "
        "(docs/tools.md): list their state and tools, or call one tool.",
        epilog=_SETTINGS_NOTE,
        formatter_class=_Formatter,
    )
    mcp_actions = mcp_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    mcp_actions.add_parser("list", help="each server: connected or not, why, its tools")
    call_cmd = mcp_actions.add_parser(
        "call", help="call TOOL on SERVER with JSON arguments and print the result"
    )
    call_cmd.add_argument("server", metavar="SERVER")
    call_cmd.add_argument("tool", metavar="TOOL", help="the tool's own name on its server")
    call_cmd.add_argument("arguments", metavar="JSON", nargs="?", default="{}")
    for sub in (mcp_cmd, call_cmd):
        sub.add_argument(
            "--timeout", type=float, default=20.0, help="seconds to wait for a connection"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pydantic import ValidationError

    from .config import Settings
    from .errors import StartupError
    from .ops.logs import configure_logging

    try:
        settings = Settings()
    except ValidationError as exc:
        # Name the setting and the problem, never the value: it may be a secret.
        for error in exc.errors():
            loc = "_".join(str(part) for part in error["loc"])
            name = loc if loc.isupper() else f"CORTEX_{loc.upper()}"  # aliases are upper case
            print(f"cortex: {name}: {error['msg']}", file=sys.stderr)
        return 2
    if getattr(args, "host", None):
        settings.host = args.host
    if getattr(args, "port", None) is not None:
        settings.port = args.port
    if args.command in ("doctor", "chat", "mcp"):
        # Their output is the report or the conversation; only warnings go to the log.
        quiet = max(logging.getLevelName(settings.log_level.upper()), logging.WARNING)
        configure_logging(settings.model_copy(update={"log_level": logging.getLevelName(quiet)}))
    else:
        configure_logging(settings)
    try:
        return _run(args, settings)
    except StartupError as exc:
        # A setting or the machine stops the start: one line that says which, no traceback.
        print(f"cortex: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "migrate":
        from .banner import safe_url
        from .store import migrate

        migrate(settings.database_url)
        print(f"database {safe_url(settings.database_url)} is at the newest revision")
        return 0
    if args.command == "serve":
        return run_event_loop(_serve(settings), use_uvloop=settings.uvloop)
    if args.command == "doctor":
        from .doctor import run_doctor

        return run_doctor(
            settings, call_model=not args.no_model, limit_s=args.timeout, out=sys.stdout
        )
    if args.command == "token":
        from .auth.cli import run_token_command

        return run_token_command(settings, args)
    if args.command == "mcp":
        from .tools.mcp.command import run_mcp_command

        return run_mcp_command(settings, args, out=sys.stdout)
    from .client.chat import run_chat

    url = args.url or f"ws://{settings.host}:{settings.port}/ws"
    return asyncio.run(
        run_chat(url, conversation_id=args.conversation, token=args.token, model=args.model)
    )


def run_event_loop(main: Coroutine[Any, Any, int], *, use_uvloop: bool) -> int:
    """Run the server on uvloop when installed (and not turned off): its loop and socket
    writes cost less CPU per streamed chunk (docs/performance.md); else on asyncio's loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


async def _serve(settings: Settings) -> int:
    from .app import running
    from .banner import auth_mode, banner, safe_url
    from .ops.logs import event

    log = logging.getLogger("cortex")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with running(settings) as app:
        # LiteLLM's import leaves ~400,000 long-lived objects; a full collection walking them
        # stalled every stream for 200+ ms (bench/capacity.py). Move them out of the GC's way.
        gc.collect()
        gc.freeze()
        required = app.gate is not None and app.gate.authenticator.required
        event(
            log,
            "started",
            version=__version__,
            address=f"http://{settings.host}:{app.port}/",
            database=safe_url(settings.database_url),
            model=settings.model(),
            auth=auth_mode(settings, required),
        )
        for line in banner(app):
            print(line, flush=True)
        print(f"Cortex is running: open http://{settings.host}:{app.port}/", flush=True)
        await stop.wait()
        log.info(
            "shutting down: finishing replies in progress (up to %gs)", settings.shutdown_grace_s
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
