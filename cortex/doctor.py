"""`cortex doctor`: check the configuration before (or while) serving, and say what to fix.

Checks, in order: the database is reachable and migrated (alembic's current revision against the
newest one this Cortex ships), Redis answers (when `CORTEX_REDIS_URL` is set), the access
settings would let the server start, the chosen provider's keys are present (LiteLLM's
`validate_environment`), and the model answers a one-token request through the same
`LlmService` the server uses. Exit status 1 if any check failed; warnings (a database not
migrated yet, which `cortex serve` does at start) leave it at 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.engine import make_url

from . import __version__
from .banner import safe_url
from .config import MOCK_MODEL, Settings

Status = Literal["ok", "warn", "fail", "skip"]
_MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str


@dataclass(slots=True)
class _State:
    revision: str | None = None  # the database's, when it could be read
    key_ok: bool = True


async def run_checks(
    settings: Settings,
    *,
    call_model: bool = True,
    limit_s: float = 20.0,
    environ: Mapping[str, str] | None = None,
) -> list[Check]:
    """Every check, in order; none raises."""
    env = os.environ if environ is None else environ
    state = _State()
    checks = [Check("settings", "ok", _describe_settings(settings, env))]
    checks.extend(await _database(settings, state, limit_s))
    if settings.redis_url is not None:
        checks.append(await _redis(settings.redis_url.get_secret_value(), limit_s))
    checks.append(await _auth(settings, state))
    checks.extend(_keys(settings, state, env))
    checks.append(_stream_path(settings))
    checks.extend(await _mcp(settings, limit_s, env))
    if not call_model:
        checks.append(Check("model", "skip", "not called (--no-model)"))
    elif not state.key_ok:
        checks.append(Check("model", "skip", "not called: a provider key is missing"))
    else:
        checks.append(await _model(settings, limit_s))
    return checks


def report(checks: list[Check], out: TextIO) -> int:
    """Print the report; the exit status is 1 if any check failed."""
    width = max(len(check.name) for check in checks)
    print(f"cortex doctor (cortex {__version__})", file=out)
    for check in checks:
        print(f"  {_MARKS[check.status]}  {check.name:<{width}}  {check.detail}", file=out)
    failed = sum(1 for check in checks if check.status == "fail")
    warned = sum(1 for check in checks if check.status == "warn")
    if failed:
        print(f"{failed} check{'s' if failed > 1 else ''} failed.", file=out)
    elif warned:
        print(f"No failures; {warned} warning{'s' if warned > 1 else ''}.", file=out)
    else:
        print("Everything looks right.", file=out)
    out.flush()
    return 1 if failed else 0


def _describe_settings(settings: Settings, env: Mapping[str, str]) -> str:
    model = settings.model(env)
    shown = f"{model} (the built-in mock)" if model == MOCK_MODEL else model
    return f"model {shown}; database {safe_url(settings.database_url)}; auth {settings.auth}"


def _error(exc: BaseException, settings: Settings) -> str:
    """An exception in one line, without the database password."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    password = _password(settings.database_url)
    if password:
        message = message.replace(password, "***")
    return f"{type(exc).__name__}: {message[:300]}"


def _password(url: str) -> str | None:
    with contextlib.suppress(Exception):
        return make_url(url).password
    return None


def _sqlite_file(url: str) -> list[Check] | None:
    """For a SQLite file that is missing (or whose directory is): the checks to report."""
    parsed = make_url(url)
    if not parsed.drivername.startswith("sqlite") or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database or "")
    if not path.parent.is_dir():
        return [
            Check("database", "fail", f"directory {path.parent} does not exist"),
            Check("migrations", "skip", "no database"),
        ]
    if not path.exists():
        return [
            Check("database", "warn", f"{path} does not exist yet (cortex serve creates it)"),
            Check("migrations", "skip", "no database yet"),
        ]
    return None


async def _database(settings: Settings, state: _State, limit_s: float) -> list[Check]:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from .store.engine import alembic_config, make_engine

    url = settings.database_url
    try:
        missing = _sqlite_file(url)
    except Exception as exc:
        return [Check("database", "fail", f"CORTEX_DATABASE_URL is not a database URL: {exc}")]
    if missing is not None:
        return missing
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    started = time.monotonic()
    try:
        engine = make_engine(settings)
    except ModuleNotFoundError as exc:
        return [
            Check("database", "fail", f"the driver {exc.name} is not installed (pip install it)"),
            Check("migrations", "skip", "no database"),
        ]
    except Exception as exc:
        return [
            Check("database", "fail", _error(exc, settings)),
            Check("migrations", "skip", "no database"),
        ]
    try:
        async with asyncio.timeout(limit_s), engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            current = await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_heads()
            )
    except TimeoutError:
        return [
            Check("database", "fail", f"{safe_url(url)} did not answer in {limit_s:g} s"),
            Check("migrations", "skip", "no database"),
        ]
    except Exception as exc:
        return [
            Check("database", "fail", f"cannot reach {safe_url(url)}: {_error(exc, settings)}"),
            Check("migrations", "skip", "no database"),
        ]
    finally:
        await engine.dispose()
    checks = [Check("database", "ok", f"reachable ({(time.monotonic() - started) * 1000:.0f} ms)")]
    state.revision = current[0] if current else None
    newest = ", ".join(heads)
    if tuple(sorted(current)) == tuple(sorted(heads)):
        checks.append(Check("migrations", "ok", f"at {newest}, the newest"))
    elif not current:
        checks.append(
            Check("migrations", "warn", "not migrated yet: run `cortex migrate` (serve does it)")
        )
    elif all(_known(rev, url) for rev in current):
        checks.append(
            Check(
                "migrations",
                "warn",
                f"at {', '.join(current)}, the newest is {newest}: run `cortex migrate` "
                "(cortex serve does it at start)",
            )
        )
    else:
        checks.append(
            Check(
                "migrations",
                "fail",
                f"the database is at {', '.join(current)}, which this Cortex does not know "
                "(was it migrated by a newer version?)",
            )
        )
    return checks


def _known(revision: str, url: str) -> bool:
    from alembic.script import ScriptDirectory

    from .store.engine import alembic_config

    try:
        return ScriptDirectory.from_config(alembic_config(url)).get_revision(revision) is not None
    except Exception:
        return False


async def _redis(url: str, limit_s: float) -> Check:
    """Several processes share events and reply leases through Redis: without it, replies wait."""
    shown = safe_url(url)
    client = Redis.from_url(url, socket_connect_timeout=limit_s, socket_timeout=limit_s)
    started = time.monotonic()
    try:
        await asyncio.wait_for(client.ping(), limit_s)
    except (RedisError, OSError, TimeoutError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return Check("redis", "fail", f"{shown} unreachable: {type(exc).__name__}: {detail[:200]}")
    finally:
        await client.aclose()
    return Check("redis", "ok", f"{shown} reachable ({(time.monotonic() - started) * 1000:.0f} ms)")


async def _auth(settings: Settings, state: _State) -> Check:
    from .auth.gate import OriginPolicy
    from .auth.tokens import AuthConfigError, auth_required, parse_env_tokens
    from .store import TokenStore, make_engine

    try:
        env = (
            parse_env_tokens(settings.auth_tokens.get_secret_value())
            if settings.auth_tokens
            else {}
        )
        OriginPolicy(settings.allowed_origins)
        stored = 0
        if state.revision is not None and state.revision >= "0002":  # the tokens table exists
            engine = make_engine(settings)
            try:
                stored = await TokenStore(engine).count_active()
            finally:
                await engine.dispose()
        required = auth_required(settings, env_tokens=len(env), stored_tokens=stored)
    except AuthConfigError as exc:
        return Check("auth", "fail", exc.message)
    except Exception as exc:
        return Check("auth", "warn", f"could not count stored tokens: {_error(exc, settings)}")
    if required:
        return Check("auth", "ok", f"tokens required ({len(env)} configured, {stored} stored)")
    if settings.auth == "none":
        return Check("auth", "warn", "OFF on purpose (CORTEX_AUTH=none)")
    return Check("auth", "ok", f"off: {settings.host} is loopback and no token exists")


def _keys(settings: Settings, state: _State, env: Mapping[str, str]) -> list[Check]:
    model = settings.model(env)
    if model == MOCK_MODEL:
        return [Check("provider key", "ok", "none needed: the built-in mock model")]
    from .llm import load_litellm

    litellm = load_litellm(remote_cost_map=settings.litellm_remote_cost_map)
    checks = []
    for name in (model, *settings.fallback_models):
        found = _key_check(litellm, name, settings)
        if found.status == "fail":
            state.key_ok = False
        checks.append(found)
    return checks


def _key_check(litellm: Any, model: str, settings: Settings) -> Check:
    label = "provider key"
    quiet = io.StringIO()  # LiteLLM prints a banner to stdout for a model it does not know
    with contextlib.redirect_stdout(quiet):
        try:
            litellm.get_llm_provider(model=model, api_base=settings.llm_api_base)
        except Exception:
            return Check(
                label,
                "fail",
                f"LiteLLM does not know the provider of {model!r}: name it as provider/model, "
                "e.g. openai/gpt-4o-mini or ollama_chat/llama3.1",
            )
        result = litellm.validate_environment(
            model=model, api_key=settings.llm_api_key, api_base=settings.llm_api_base
        )
    missing = list(result.get("missing_keys") or [])
    if result.get("keys_in_environment") or not missing:
        source = " (CORTEX_LLM_API_KEY)" if settings.llm_api_key else ""
        return Check(label, "ok", f"{model}: present{source}")
    return Check(
        label,
        "fail",
        f"{model} needs {' or '.join(missing) if len(missing) > 1 else missing[0]}, which is "
        "not set (export it, put it in .env, or set CORTEX_LLM_API_KEY)",
    )


def _stream_path(settings: Settings) -> Check:
    """Which reader a reply of the default model streams through (`CORTEX_LLM_FAST_PATH`)."""
    from .llm import LlmService

    model = settings.model()
    quiet = io.StringIO()  # LiteLLM prints a banner to stdout for a model it does not know
    with contextlib.redirect_stdout(quiet):
        path = LlmService(settings).path_for(model)
    if path == "direct":
        return Check("stream path", "ok", f"{model}: direct (Cortex reads the OpenAI-format SSE)")
    why = "CORTEX_LLM_FAST_PATH is off" if not settings.llm_fast_path else "not OpenAI-format SSE"
    return Check("stream path", "ok", f"{model}: LiteLLM ({why})")


async def _model(settings: Settings, limit_s: float) -> Check:
    from .llm import LlmService

    model = settings.model()
    quick = settings.model_copy(update={"num_retries": 0, "fallback_models": []})
    service = LlmService(quick)
    started = time.monotonic()
    try:
        async with asyncio.timeout(limit_s):
            answer = await service.complete(
                [{"role": "user", "content": "Say OK."}], model=model, max_tokens=1
            )
    except TimeoutError:
        return Check("model", "fail", f"{model} did not answer within {limit_s:g} s")
    except Exception as exc:
        return Check("model", "fail", f"{model} failed: {_error(exc, settings)}")
    elapsed = (time.monotonic() - started) * 1000
    said = " ".join(answer.text.split())[:40]
    return Check("model", "ok", f"{model} answered in {elapsed:.0f} ms ({said!r})")


async def _mcp(settings: Settings, limit_s: float, env: Mapping[str, str]) -> list[Check]:
    """Each MCP server: connected or not, why, its tools; and the tools past 128 left out."""
    if settings.mcp_config is None:
        return []
    from .tools.mcp.command import describe
    from .tools.mcp.config import McpConfigError
    from .tools.mcp.probe import probe

    try:
        found = await probe(settings, limit_s=limit_s, environ=env)
    except McpConfigError as exc:
        return [Check("mcp", "fail", str(exc))]
    statuses: dict[str, Status] = {"up": "ok", "disabled": "skip"}
    checks = [
        Check(f"mcp {s['server']}", statuses.get(str(s["state"]), "fail"), describe(s))
        for s in found.servers
    ]
    if found.left_out:
        left = ", ".join(found.left_out)
        checks.append(Check("mcp tools", "warn", f"past the 128 offered, left out: {left}"))
    return checks


def run_doctor(settings: Settings, *, call_model: bool, limit_s: float, out: TextIO) -> int:
    checks = asyncio.run(run_checks(settings, call_model=call_model, limit_s=limit_s))
    return report(checks, out)
