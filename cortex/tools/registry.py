"""Tools the model may call: a registry, JSON-schema specs for the provider, safe execution.

A tool is a plain function (sync or async) with type hints and a docstring. Its OpenAI-style
schema is derived from the signature with pydantic, and the same pydantic model validates the
arguments the model sends, so the schema and the check never disagree.

There is no import-time global registry: `@tool` only marks a function, and a `ToolRegistry` built
at start-up (`build_registry()`) imports the operator's modules and collects the marked functions.
`ToolRegistry.run()` never raises for anything the model or the tool did wrong: it returns a failed
`ToolResult` whose message the model can read and recover from.

Past 400 lines because Python and MCP tools share it: one registry decides what the model is
offered (selection, per-user lists, the 128-tool cap) and runs whichever kind it is asked for.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import inspect
import json
import logging
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from .builtin import BUILTIN_TOOLS
from .marks import MARK, Mark, tool
from .schema import arguments_model, clean_schema, first_paragraph

__all__ = [
    "Tool",
    "ToolRegistry",
    "ToolResult",
    "UnknownTool",
    "build_registry",
    "builtin_registry",
    "parse_arguments",
    "tool",
]

log = logging.getLogger(__name__)

# OpenAI refuses a request with more tools than this; the rest are left out, and logged.
MAX_OFFERED = 128
# Providers accept this much of a function name (OpenAI's rule; the strictest in common use).
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_ERROR_CHARS = 500
_MAX_VALIDATION_ERRORS = 5


# --- describing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    """A registered tool: what the model is told (`spec()`) and what runs (`fn`)."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    # Validates the model's arguments; built from the signature even when `parameters` was
    # written by hand, because the function is what must accept them.
    arguments_model: type[BaseModel] | None = field(default=None, repr=False, compare=False)
    # An MCP tool: the server it runs on, that server's own per-call timeout, and the users
    # who may call it (None: everyone). A Python tool has none of these.
    server: str | None = None
    timeout: float | None = None
    users: frozenset[str] | None = None

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style entry for the `tools` list of a completion request (a fresh copy)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": copy.deepcopy(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one call: `result` (JSON-ready) when `ok`, else a short `error`."""

    ok: bool
    result: Any = None
    error: str | None = None
    # An MCP tool's result is already text (cut to size), sent as it is; `server` names it.
    text: str | None = None
    server: str | None = None

    def content(self) -> str:
        """The text sent back to the model as the `tool` message."""
        if not self.ok:
            return f"Error: {self.error}"
        if self.text is not None:
            return self.text
        return json.dumps(self.result, ensure_ascii=False, default=str)


class UnknownTool(ValueError):
    """Names that match no registered tool (a config or frame error, caught before any call)."""

    def __init__(self, names: Iterable[str], available: Iterable[str], *, source: str = "") -> None:
        self.names = tuple(names)
        listed = ", ".join(repr(n) for n in self.names)
        known = ", ".join(available) or "none"
        prefix = f"{source}: " if source else ""
        super().__init__(f"{prefix}unknown tool(s) {listed}; available: {known}")


def _describe(
    fn: Callable[..., Any],
    *,
    name: str | None,
    description: str | None,
    parameters: dict[str, Any] | None,
) -> Tool:
    """Build a `Tool`, refusing at start-up anything a provider or the model could not use."""
    if not callable(fn):
        raise ValueError(f"a tool must be callable, not {type(fn).__name__}")
    tool_name = name or str(getattr(fn, "__name__", ""))
    if not _NAME_RE.match(tool_name):
        raise ValueError(f"tool name {tool_name!r} must be 1-64 letters, digits, '_' or '-'")
    text = description if description is not None else first_paragraph(inspect.getdoc(fn))
    if not text:
        raise ValueError(f"tool {tool_name!r} needs a docstring or a description")
    model = arguments_model(fn, tool_name, hinted=parameters is None)
    if parameters is None:
        schema = clean_schema(model.model_json_schema())
    elif isinstance(parameters, dict) and parameters.get("type") == "object":
        schema = copy.deepcopy(parameters)
    else:
        raise ValueError(f"tool {tool_name!r}: parameters must be a JSON schema of type 'object'")
    return Tool(tool_name, text, schema, fn, model)


# --- running ---------------------------------------------------------------------------------


def parse_arguments(raw: str) -> dict[str, Any]:
    """Decode the model's argument string; `ValueError` says what is wrong, for the model.

    An empty string counts as no arguments: some models send it for parameterless tools.
    """
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"arguments are not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"arguments must be a JSON object, not {type(value).__name__}")
    return value


def _validation_message(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = [
        f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: {err['msg']}"
        for err in errors[:_MAX_VALIDATION_ERRORS]
    ]
    if len(errors) > _MAX_VALIDATION_ERRORS:
        parts.append(f"... and {len(errors) - _MAX_VALIDATION_ERRORS} more")
    return "; ".join(parts)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


async def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    if inspect.iscoroutinefunction(fn):
        return await fn(**kwargs)
    # Sync tools run in a worker thread so a slow one does not stall every connection.
    result = await asyncio.to_thread(fn, **kwargs)
    if inspect.isawaitable(result):  # e.g. an object whose `__call__` is async
        result = await result
    return result


class ToolRegistry:
    """The tools one server offers, by name: Python tools in registration order, then the
    tools of each MCP server that is up (they come and go with their server)."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}
        self._remote: dict[str, dict[str, Tool]] = {}  # server -> its tools, while it is up
        # Servers in the config file's order, whichever connects first, so the tools offered
        # (and those left out past MAX_OFFERED) do not depend on who won a race.
        self.server_order: list[str] = []
        self._seen_remote: set[str] = set()  # a down server's tools are still known names
        self._remote_enabled: frozenset[str] | None = None  # CORTEX_TOOLS' MCP names
        self.left_out: list[str] = []  # the last tools past MAX_OFFERED (for `cortex doctor`)
        self.known = _Known(self)

    def add(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> Tool:
        """Register `fn`; a second, different tool with the same name is a `ValueError`."""
        new = _describe(fn, name=name, description=description, parameters=parameters)
        old = self._tools.get(new.name)
        if old is not None:
            if old.fn is fn:  # the same function reached twice (e.g. re-exported): harmless
                return old
            raise ValueError(f"two tools are named {new.name!r}")
        self._tools[new.name] = new
        return new

    def load_module(self, module_name: str) -> list[Tool]:
        """Import `module_name` and register every `@tool` function in its namespace."""
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import tool module {module_name!r}: {exc}") from exc
        added: list[Tool] = []
        for obj in list(vars(module).values()):
            mark = getattr(obj, MARK, None)
            if isinstance(mark, Mark) and callable(obj):
                added.append(
                    self.add(
                        obj,
                        name=mark.name,
                        description=mark.description,
                        parameters=mark.parameters,
                    )
                )
        if not added:
            raise ValueError(f"tool module {module_name!r} has no @tool functions")
        return added

    def get(self, name: str) -> Tool | None:
        return self._all().get(name)

    @property
    def names(self) -> list[str]:
        return list(self._all())

    def knows(self, name: str) -> bool:
        """A Python tool, or an MCP tool seen since start (its server may be down just now)."""
        return name in self._tools or name in self._seen_remote

    def set_server_tools(self, server: str, tools: Iterable[Tool]) -> None:
        """Replace `server`'s tools (none while it is down); CORTEX_TOOLS still applies."""
        kept: dict[str, Tool] = {}
        for found in tools:
            if found.name in self._tools:
                log.warning("MCP tool %s clashes with a Python tool; left out", found.name)
            elif self._remote_enabled is None or found.name in self._remote_enabled:
                kept[found.name] = found
        if server not in self.server_order:
            self.server_order.append(server)
        if kept:
            self._remote[server] = kept
        else:
            self._remote.pop(server, None)
        self._seen_remote.update(kept)

    def _all(self) -> dict[str, Tool]:
        merged = dict(self._tools)
        for server in self.server_order:
            merged.update(self._remote.get(server, {}))
        return merged

    def specs(
        self, names: Iterable[str] | None = None, *, user: str | None = None
    ) -> list[dict[str, Any]]:
        """Specs for a completion request: all tools, or only `names` (`UnknownTool` if never
        known), without the tools of servers that are down or that `user` may not use, and at
        most `MAX_OFFERED` of them (OpenAI's limit)."""
        pool = self._all()
        if names is None:
            chosen = list(pool.values())
        else:
            wanted = list(dict.fromkeys(names))
            missing = [n for n in wanted if not self.knows(n)]
            if missing:
                raise UnknownTool(missing, pool)
            chosen = [pool[n] for n in wanted if n in pool]
        chosen = [t for t in chosen if t.users is None or user in t.users]
        left_out = [t.name for t in chosen[MAX_OFFERED:]]
        if left_out and left_out != self.left_out:
            log.warning(
                "%d tools offered, the limit is %d; left out: %s",
                len(chosen),
                MAX_OFFERED,
                ", ".join(left_out),
            )
        self.left_out = left_out
        return [t.spec() for t in chosen[:MAX_OFFERED]]

    def subset(self, names: Iterable[str]) -> ToolRegistry:
        """A registry of only `names`, in that order (`UnknownTool` if one is absent)."""
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._tools]
        if missing:
            raise UnknownTool(missing, self._tools)
        narrowed = ToolRegistry()
        narrowed._tools = {n: self._tools[n] for n in wanted}
        return narrowed

    async def run(
        self,
        name: str,
        arguments: str,
        *,
        # The caller's per-call budget, applied inside with asyncio.timeout(); part of the API.
        timeout: float,  # noqa: ASYNC109
        allowed: Collection[str] | None = None,
        user: str | None = None,
    ) -> ToolResult:
        """Run one tool call from the model; failures come back as `ToolResult(ok=False)`.

        `allowed` narrows the callable set (a `send` frame's `tools`), so a model cannot call a
        tool it was not offered. A sync tool that times out keeps its worker thread until it
        returns (threads cannot be killed); the caller gets its answer at the timeout anyway.
        Cancellation of the caller propagates (it is not a tool failure).
        """
        pool = self._all()
        found = pool.get(name)
        if found is not None and found.users is not None and user not in found.users:
            found = None  # not offered to this user, so not callable either
        if found is None or (allowed is not None and name not in allowed):
            offered = [
                n
                for n, t in pool.items()
                if (allowed is None or n in allowed) and (t.users is None or user in t.users)
            ]
            return ToolResult(
                ok=False,
                error=f"unknown tool {name!r}; available tools: {', '.join(offered) or 'none'}",
            )
        try:
            kwargs = parse_arguments(arguments)
        except ValueError as exc:
            return ToolResult(ok=False, error=f"{name}: {exc}", server=found.server)
        if found.server is not None:
            # An MCP tool: its server checks the arguments, and the call applies the server's
            # own timeout (or this one) and cancels the request at the server when it expires.
            outcome: ToolResult = await found.fn(kwargs, timeout=found.timeout or timeout)
            return outcome
        if found.arguments_model is not None:
            try:
                validated = found.arguments_model.model_validate(kwargs)
            except ValidationError as exc:
                return ToolResult(
                    ok=False, error=_short(f"{name}: invalid arguments: {_validation_message(exc)}")
                )
            fields = type(validated).model_fields
            kwargs = {
                info.alias or key: getattr(validated, key) for key, info in fields.items()
            } | dict(validated.model_extra or {})
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                value = await _call(found.fn, kwargs)
        except Exception as exc:  # a tool's bug must not end the reply, only this call
            if isinstance(exc, TimeoutError) and scope.expired():  # ours, not the tool's own
                return ToolResult(ok=False, error=f"{name}: timed out after {timeout:g} s")
            # ValueError is how a tool says "your input is wrong": its message is meant for the
            # model as it is. Any other type is named, as a hint that something else broke.
            detail = str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"
            error = _short(f"{name}: {detail}")
            log.info("tool call failed: %s", error)
            log.debug("tool %s traceback", name, exc_info=True)
            return ToolResult(ok=False, error=error)
        # JSON-ready now, so that storing and sending the result cannot fail later.
        try:
            ready = to_jsonable_python(value, fallback=str, inf_nan_mode="null")
        except Exception:  # e.g. a circular reference: the text form still tells the model
            ready = str(value)
        return ToolResult(ok=True, result=ready)


class _Known:
    """A live `in` test of the names a `send` may list (intake holds it, the registry changes)."""

    def __init__(self, registry: ToolRegistry) -> None:
        self._registry = registry

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._registry.knows(name)


def builtin_registry() -> ToolRegistry:
    """A fresh registry of the built-in tools, which are safe to offer on a shared server."""
    registry = ToolRegistry()
    for fn in BUILTIN_TOOLS:
        registry.add(fn)
    return registry


def build_registry(
    *, modules: Sequence[str], enabled: Sequence[str] | None, mcp_servers: Collection[str] = ()
) -> ToolRegistry:
    """The registry a server offers: built-ins plus `modules`' tools, narrowed to `enabled`.

    `enabled=None` keeps every tool loaded (the built-ins when no module is named). A name in
    `enabled` that no tool has is an `UnknownTool` (a `ValueError`) now, at start-up, rather than
    a surprise in the middle of a chat.
    """
    registry = builtin_registry()
    for module_name in modules:
        registry.load_module(module_name)
    registry.server_order = list(mcp_servers)
    if enabled is None:
        return registry
    # `server__tool` names of configured MCP servers are checked when their server connects.
    prefixes = tuple(f"{server}__" for server in mcp_servers)
    remote = [n for n in enabled if n not in registry._tools and n.startswith(prefixes)]
    try:
        narrowed = registry.subset([n for n in enabled if n not in remote])
    except UnknownTool as exc:
        raise UnknownTool(exc.names, registry.names, source="CORTEX_TOOLS") from None
    narrowed.server_order = list(mcp_servers)
    if prefixes:
        narrowed._remote_enabled = frozenset(remote)
    return narrowed
