"""`@tool`: marks a function as a tool, and changes nothing else.

`from cortex.tools import tool` is how an operator's module marks its functions; a
`ToolRegistry` built at start-up collects the marked functions of the modules it loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

F = TypeVar("F", bound=Callable[..., Any])
MARK = "__cortex_tool__"


@dataclass(frozen=True)
class Mark:
    name: str | None
    description: str | None
    parameters: dict[str, Any] | None


@overload
def tool(fn: F, /) -> F: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> Callable[[F], F]: ...
def tool(
    fn: F | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    parameters: dict[str, Any] | None = None,
) -> F | Callable[[F], F]:
    """Mark `fn` as a tool; `ToolRegistry.load_module()` registers it.

    Only sets an attribute, so importing a module of tools changes no global state and each
    registry (each test, each server) decides what it holds. Usable bare (`@tool`) or with
    overrides (`@tool(name=..., description=..., parameters=...)`).
    """

    def mark(func: F) -> F:
        setattr(func, MARK, Mark(name, description, parameters))
        return func

    return mark if fn is None else mark(fn)
