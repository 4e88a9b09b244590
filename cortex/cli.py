"""`cortex serve | migrate | chat | token`: the command line. Settings are built here, once."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from . import __version__
from .access import TokenScrubber
from .auth import AuthConfigError
from .config import MOCK_MODEL, Settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cortex", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cortex {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="migrate the database and run the server")
    serve_cmd.add_argument("--host", help="bind address (CORTEX_HOST)")
    serve_cmd.add_argument("--port", type=int, help="port (CORTEX_PORT)")
    commands.add_parser("migrate", help="apply pending database migrations and exit")
    chat_cmd = commands.add_parser("chat", help="chat with a running server in the terminal")
    chat_cmd.add_argument("--url", help="WebSocket URL (default: ws://CORTEX_HOST:CORTEX_PORT/ws)")
    chat_cmd.add_argument("--conversation", help="continue this conversation id")
    chat_cmd.add_argument("--token", help="bearer token (or CORTEX_TOKEN)")
    token_cmd = commands.add_parser("token", help="create, list and revoke API tokens")
    token_actions = token_cmd.add_subparsers(dest="action", required=True)
    create_cmd = token_actions.add_parser("create", help="create a token for USER (shown once)")
    create_cmd.add_argument("user", metavar="USER")
    create_cmd.add_argument("--name", default="", help="a label, e.g. the device it is for")
    token_actions.add_parser("list", help="list tokens (never the tokens themselves)")
    revoke_cmd = token_actions.add_parser("revoke", help="revoke a token by its id")
    revoke_cmd.add_argument("id", metavar="ID", type=int)
    args = parser.parse_args(argv)

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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(TokenScrubber())  # a second line behind the one on websockets' logger
    if args.command == "migrate":
        from .store import migrate

        migrate(settings.database_url)
        print(f"database {settings.database_url} is at the newest revision")
        return 0
    if args.command == "serve":
        try:
            return asyncio.run(_serve(settings))
        except AuthConfigError as exc:
            print(f"cortex: {exc}", file=sys.stderr)
            return 2
    if args.command == "token":
        from .tokens_cli import run_token_command

        return run_token_command(settings, args)
    from .chat import run_chat

    url = args.url or f"ws://{settings.host}:{settings.port}/ws"
    return asyncio.run(run_chat(url, conversation_id=args.conversation, token=args.token))


async def _serve(settings: Settings) -> int:
    from .app import running

    log = logging.getLogger("cortex")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with running(settings) as app:
        model = settings.model()
        log.info(
            "cortex %s listening on http://%s:%d (WebSocket at /ws), database %s, model %s%s",
            __version__,
            settings.host,
            app.port,
            _safe_url(settings.database_url),
            model,
            " (built-in mock: set CORTEX_DEFAULT_MODEL and a provider key for a real one)"
            if model == MOCK_MODEL
            else "",
        )
        print(f"Cortex is running: open http://{settings.host}:{app.port}/", flush=True)
        await stop.wait()
        log.info(
            "shutting down: finishing replies in progress (up to %gs)", settings.shutdown_grace_s
        )
    return 0


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


if __name__ == "__main__":
    sys.exit(main())
