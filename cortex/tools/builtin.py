"""The built-in tools: safe to offer on a shared server (no I/O, no eval, bounded work)."""

from __future__ import annotations

import ast
import math
import operator
import typing
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field

from .marks import tool

# --- built-in tools --------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 10_000  # about 3,000 digits: far past any everyday sum, cheap to compute
_MAX_DEPTH = 100

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_REFUSED: dict[type[ast.AST], str] = {
    ast.Name: "names are",
    ast.Call: "function calls are",
    ast.Attribute: "attributes are",
    ast.Subscript: "subscripts are",
    ast.Compare: "comparisons are",
    ast.BoolOp: "boolean operators are",
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


def _checked(value: Any) -> int | float:
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError("the result is too large")
    return typing.cast(int | float, value)


def _eval(node: ast.AST, depth: int) -> int | float:
    if depth > _MAX_DEPTH:
        raise ValueError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):  # bool is an int subclass: refuse it too
            raise ValueError(f"only numbers are allowed, not {node.value!r}")
        return _checked(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        # Estimate an integer power before computing it: 9**9**9 must be refused, not attempted.
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                raise ValueError("the result is too large")
        try:
            return _checked(_BINARY[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("the result is too large") from None
    what = _REFUSED.get(type(node), type(node).__name__)
    raise ValueError(f"{what} not allowed; use numbers, + - * / // % ** and ( )")


@tool
def calculator(
    expression: Annotated[
        str,
        Field(description="Arithmetic on numbers with + - * / // % ** and ( ), e.g. '(2 + 3) * 4'"),
    ],
) -> int | float:
    """Evaluate an arithmetic expression exactly, for sums the model should not do in its head."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ValueError("not a valid arithmetic expression") from None
    return _eval(tree.body, 0)


@tool
def current_time(
    timezone: Annotated[
        str, Field(description="IANA time zone name such as 'Europe/Paris' or 'UTC'")
    ] = "UTC",
) -> str:
    """The current date and time in a time zone, as ISO 8601 text."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"unknown time zone {timezone!r}; use an IANA name such as 'Europe/Paris'"
        ) from None
    return datetime.now(zone).isoformat(timespec="seconds")


BUILTIN_TOOLS: tuple[Callable[..., Any], ...] = (current_time, calculator)
