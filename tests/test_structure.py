"""The package's rooms and the arrows between them (docs/architecture.md).

Every import counts, those under `if TYPE_CHECKING:` and inside functions included: no module
may import itself back through others, and no room may import a room above it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cortex"

# Each room may import the rooms named here (and itself). The entry points on top (`app`,
# `cli`, `doctor`, `banner`, `__main__`) and the test support in `testing` may import any room.
BASE = {"cortex", "cortex.config", "cortex.errors", "cortex.protocol"}
ALLOWED: dict[str, set[str]] = {
    "cortex": set(),
    "cortex.errors": set(),
    "cortex.config": set(),
    "cortex.protocol": {"cortex.errors"},
    "ops": BASE,
    "store": BASE | {"ops"},
    "llm": BASE | {"ops", "attachments"},
    "tools": BASE | {"ops"},
    "fanout": BASE | {"ops"},
    "auth": BASE | {"ops", "store"},
    "search": BASE | {"ops", "store"},
    "pipeline": BASE | {"ops", "store", "llm", "tools", "fanout", "search", "attachments"},
    "server": BASE | {"ops", "store", "auth", "pipeline", "fanout", "attachments"},
    "client": BASE,
    "attachments": BASE | {"ops"},  # pure: sniffing, image, text and PDF checks, model parts
}
TOP = {"cortex.app", "cortex.cli", "cortex.doctor", "cortex.banner", "cortex.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every cortex module `path` imports, wherever the import stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("cortex"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("cortex"):
                continue
            found.add(target)
            for alias in node.names:  # `from . import export` imports a module
                if (
                    (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/"))
                    .with_suffix(".py")
                    .exists()
                ):
                    found.add(f"{target}.{alias.name}")
    return found


def graph() -> dict[str, set[str]]:
    modules = {
        module_name(p): p
        for p in PACKAGE.rglob("*.py")
        if "migrations" not in p.parts  # alembic's scripts, loaded by path
    }
    return {name: {i for i in imports_of(path) if i in modules} for name, path in modules.items()}


def room(module: str) -> str:
    """A folder's name for the modules in it; a module's own name at the top of the package."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else module


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each circle of imports once, as the path that closes it."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a room to one it may not import."""
    problems = []
    for module, targets in sorted(edges.items()):
        if module in TOP or room(module) == "testing":
            continue
        here = room(module)
        for target in sorted(targets):
            there = room(target)
            if there != here and there not in ALLOWED[here]:
                problems.append(f"{module} -> {target}")
    return problems


def every_module_has_a_room(names: Iterable[str]) -> list[str]:
    return [n for n in names if n not in TOP and room(n) not in ALLOWED and room(n) != "testing"]


def test_no_import_circles() -> None:
    assert cycles(graph()) == []


def test_arrows_run_one_way() -> None:
    edges = graph()
    assert every_module_has_a_room(edges) == []
    assert wrong_way(edges) == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            {"cortex.store.repo": {"cortex.pipeline.reads"}},
            "cortex.store.repo -> cortex.pipeline.reads",
        ),
        (
            {"cortex.ops.logs": {"cortex.server.endpoint"}},
            "cortex.ops.logs -> cortex.server.endpoint",
        ),
    ],
)
def test_the_checks_see_a_wrong_arrow_and_the_circle_it_makes(
    extra: dict[str, set[str]], expected: str
) -> None:
    edges = graph()
    for module, targets in extra.items():
        edges[module] = edges[module] | targets
    assert expected in wrong_way(edges)
    assert cycles(edges)  # each also closes a circle through the arrows that run down
