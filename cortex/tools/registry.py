"""Tools the model may call: a registry, JSON-schema specs for the provider, safe execution.

A tool is a plain function (sync or async) with type hints and a docstring. Its OpenAI-style
schema is derived from the signature with pydantic, and the same pydantic model validates the
arguments the model sends, so the schema and the check never disagree.

There is no import-time global registry: `@tool` only marks a function, and a `ToolRegistry` built
at start-up (`build_registry()`) imports the operator's modules and collects the marked functions.
`ToolRegistry.run()` never raises for anything the model or the tool did wrong: it returns a failed
`ToolResult` whose message the model can read and recover from.
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

    def content(self) -> str:
        """The text sent back to the model as the `tool` message."""
        if not self.ok:
            return f"Error: {self.error}"
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
    """The tools one server offers, by name, in registration order."""

    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

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
        return self._tools.get(name)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Specs for a completion request: all tools, or only `names` (`UnknownTool` if absent)."""
        if names is None:
            return [t.spec() for t in self._tools.values()]
        wanted = list(dict.fromkeys(names))
        missing = [n for n in wanted if n not in self._tools]
        if missing:
            raise UnknownTool(missing, self._tools)
        return [self._tools[n].spec() for n in wanted]

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
    ) -> ToolResult:
        """Run one tool call from the model; failures come back as `ToolResult(ok=False)`.

        `allowed` narrows the callable set (a `send` frame's `tools`), so a model cannot call a
        tool it was not offered. A sync tool that times out keeps its worker thread until it
        returns (threads cannot be killed); the caller gets its answer at the timeout anyway.
        Cancellation of the caller propagates (it is not a tool failure).
        """
        found = self._tools.get(name)
        if found is None or (allowed is not None and name not in allowed):
            offered = [n for n in self._tools if allowed is None or n in allowed]
            return ToolResult(
                ok=False,
                error=f"unknown tool {name!r}; available tools: {', '.join(offered) or 'none'}",
            )
        try:
            kwargs = parse_arguments(arguments)
        except ValueError as exc:
            return ToolResult(ok=False, error=f"{name}: {exc}")
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


def builtin_registry() -> ToolRegistry:
    """A fresh registry of the built-in tools, which are safe to offer on a shared server."""
    registry = ToolRegistry()
    for fn in BUILTIN_TOOLS:
        registry.add(fn)
    return registry


def build_registry(*, modules: Sequence[str], enabled: Sequence[str] | None) -> ToolRegistry:
    """The registry a server offers: built-ins plus `modules`' tools, narrowed to `enabled`.

    `enabled=None` keeps every tool loaded (the built-ins when no module is named). A name in
    `enabled` that no tool has is an `UnknownTool` (a `ValueError`) now, at start-up, rather than
    a surprise in the middle of a chat.
    """
    registry = builtin_registry()
    for module_name in modules:
        registry.load_module(module_name)
    if enabled is None:
        return registry
    try:
        return registry.subset(enabled)
    except UnknownTool as exc:
        raise UnknownTool(exc.names, registry.names, source="CORTEX_TOOLS") from None
