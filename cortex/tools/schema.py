"""A tool's JSON schema and argument model, derived from its signature with pydantic.

The same model validates the arguments the model sends, so the schema and the check never
disagree; schemas are inlined (no `$ref`) because some providers reject references.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model


def first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())


def arguments_model(fn: Callable[..., Any], name: str, *, hinted: bool) -> type[BaseModel]:
    """A pydantic model of `fn`'s keyword-passable parameters.

    With `hinted`, every parameter needs a type hint (the schema is made from them); with a
    hand-written schema an unhinted parameter accepts any JSON value.

    Fields get internal names and the parameter name as alias, so parameters called `schema`,
    `json` or `_x` do not collide with `BaseModel` attributes or become private attributes.
    """
    hints = typing.get_type_hints(fn, include_extras=True)  # resolves `from __future__` strings
    fields: dict[str, Any] = {}
    extra: Literal["forbid", "allow"] = "forbid"
    for i, param in enumerate(inspect.signature(fn).parameters.values()):
        if param.kind is param.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise ValueError(f"tool {name!r}: parameter {param.name!r} must be passable by keyword")
        if hinted and param.name not in hints:
            raise ValueError(f"tool {name!r}: parameter {param.name!r} needs a type hint")
        default = ... if param.default is param.empty else param.default
        fields[f"p{i}"] = (hints.get(param.name, Any), Field(default, alias=param.name))
    config = ConfigDict(extra=extra, arbitrary_types_allowed=True)
    model: type[BaseModel] = create_model(f"{name}_arguments", __config__=config, **fields)
    return model


# JSON-schema keywords whose value is a map of name -> schema, a schema, or a list of schemas;
# everything else (default, enum, const, examples, ...) is data and is left untouched.
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions"})
_SCHEMA_ONE = frozenset({"items", "additionalProperties", "not", "contains", "propertyNames"})
_SCHEMA_LISTS = frozenset({"anyOf", "allOf", "oneOf", "prefixItems"})


def _clean(schema: Any, defs: dict[str, Any] | None, seen: tuple[str, ...]) -> Any:
    """Drop pydantic's `title`s and, given `defs`, inline `$ref`s (some providers reject them)."""
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if defs is not None and isinstance(ref, str) and ref.startswith("#/$defs/"):
        key = ref.removeprefix("#/$defs/")
        if key in seen or key not in defs:
            raise _Recursive
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        return _clean({**defs[key], **siblings}, defs, (*seen, key))
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _clean(v, defs, seen) for k, v in value.items()}
        elif key in _SCHEMA_ONE:
            out[key] = _clean(value, defs, seen)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_clean(v, defs, seen) for v in value]
        else:
            out[key] = value
    return out


class _Recursive(Exception):
    """A self-referencing model: keep its `$defs` instead of inlining."""


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})
    try:
        body = {k: v for k, v in schema.items() if k != "$defs"}
        cleaned: dict[str, Any] = _clean(body, defs, ())
    except _Recursive:
        cleaned = _clean(schema, None, ())  # titles only; `$ref`s stay and point at `$defs`
    return cleaned
