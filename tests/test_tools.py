"""Tool registry: schema derivation, the built-in tools, execution failures, module loading."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from cortex.tools import (
    Tool,
    ToolRegistry,
    ToolResult,
    UnknownTool,
    build_registry,
    builtin_registry,
    parse_arguments,
    tool,
)
from cortex.tools.builtin import MAX_EXPRESSION_CHARS, MAX_INT_BITS, calculator, current_time

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def params(fn: Any, **kwargs: Any) -> dict[str, Any]:
    registry = ToolRegistry()
    parameters: dict[str, Any] = registry.add(fn, **kwargs).spec()["function"]["parameters"]
    return parameters


# --- schema derivation -----------------------------------------------------------------------


def test_scalar_types_required_and_defaults() -> None:
    def f(s: str, i: int, x: float, b: bool = False, n: int | None = None) -> None:
        """Doc."""

    assert params(f) == {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "s": {"type": "string"},
            "i": {"type": "integer"},
            "x": {"type": "number"},
            "b": {"type": "boolean", "default": False},
            "n": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
        },
        "required": ["s", "i", "x"],
    }


def test_list_literal_and_field_description() -> None:
    def f(
        tags: list[str],
        mode: Literal["fast", "slow"] = "fast",
        title: Annotated[str, Field(description="Shown to the model")] = "x",
    ) -> None:
        """Doc."""

    props = params(f)["properties"]
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["mode"] == {"type": "string", "enum": ["fast", "slow"], "default": "fast"}
    # A parameter *named* "title" must survive the removal of pydantic's `title` keywords.
    assert props["title"] == {"type": "string", "description": "Shown to the model", "default": "x"}


class Place(BaseModel):
    """A place."""

    city: str
    country: str = "FR"


def test_pydantic_model_parameter_is_inlined_without_titles() -> None:
    def f(place: Place) -> None:
        """Doc."""

    schema = params(f)
    assert "$defs" not in schema
    assert schema["properties"]["place"] == {
        "type": "object",
        "description": "A place.",
        "properties": {"city": {"type": "string"}, "country": {"type": "string", "default": "FR"}},
        "required": ["city"],
    }
    assert "title" not in json.dumps(schema)


class Node(BaseModel):
    name: str
    children: list[Node] = []


def test_recursive_model_keeps_its_defs() -> None:
    def f(root: Node) -> None:
        """Doc."""

    schema = params(f)
    assert schema["properties"]["root"] == {"$ref": "#/$defs/Node"}
    assert schema["$defs"]["Node"]["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert "title" not in json.dumps(schema)


def test_parameters_named_like_basemodel_attributes() -> None:
    def f(schema: str, json: int = 1) -> None:
        """Doc."""

    assert set(params(f)["properties"]) == {"schema", "json"}


def test_description_is_first_docstring_paragraph() -> None:
    def f() -> None:
        """First line
        continues here.

        Details the model does not need.
        """

    spec = ToolRegistry().add(f).spec()
    assert spec == {
        "type": "function",
        "function": {
            "name": "f",
            "description": "First line continues here.",
            "parameters": {"type": "object", "additionalProperties": False, "properties": {}},
        },
    }


def test_explicit_name_description_and_schema_override() -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}

    def f(q: str) -> str:
        return q

    made = ToolRegistry().add(f, name="search", description="Search.", parameters=schema)
    assert made.spec()["function"] == {
        "name": "search",
        "description": "Search.",
        "parameters": schema,
    }
    made.spec()["function"]["parameters"]["x"] = 1  # callers get copies
    assert "x" not in made.parameters


async def test_explicit_schema_allows_unhinted_parameters() -> None:
    registry = ToolRegistry()
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}
    registry.add(lambda q: q * 2, name="twice", description="Twice.", parameters=schema)
    assert (await registry.run("twice", '{"q": "ab"}', timeout=1)).result == "abab"
    missing = await registry.run("twice", "{}", timeout=1)
    assert missing.error == "twice: invalid arguments: q: Field required"


@pytest.mark.parametrize(
    ("fn", "kwargs", "message"),
    [
        (lambda: None, {}, "name"),  # "<lambda>" is no provider's idea of a name
        (lambda: None, {"name": "ok"}, "docstring"),
        (lambda x: x, {"name": "ok", "description": "d"}, "type hint"),
        (
            lambda q: q,
            {"name": "ok", "description": "d", "parameters": {"type": "array"}},
            "object",
        ),
    ],
)
def test_add_refuses_unusable_tools(fn: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ToolRegistry().add(fn, **kwargs)


def test_duplicate_names_refused_but_same_function_is_idempotent() -> None:
    def f() -> None:
        """Doc."""

    def g() -> None:
        """Doc."""

    registry = ToolRegistry()
    assert registry.add(f) is registry.add(f)
    with pytest.raises(ValueError, match="two tools"):
        registry.add(g, name="f")


def test_tool_decorator_only_marks() -> None:
    def f() -> None:
        """Doc."""

    assert tool(f) is f
    assert tool(name="x")(f) is f
    assert ToolRegistry().names == []


# --- calculator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 / 2", 3.5),
        ("7 // 2", 3),
        ("-7 % 3", 2),
        ("2 ** 10", 1024),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("+-+3", -3),
        ("2 ** -1", 0.5),
        ("1.5e3 + 1_000", 2500.0),
        ("  42  ", 42),
    ],
)
def test_calculator(expression: str, value: float) -> None:
    result = calculator(expression)
    assert result == value and type(result) is type(value)


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("x + 1", "names"),
        ("__import__('os').system('true')", "function calls"),
        ("(1).real", "attributes"),
        ("[1][0]", "not allowed"),
        ("1 < 2", "comparisons"),
        ("True + 1", "only numbers"),
        ("'a' * 3", "only numbers"),
        ("1j", "only numbers"),
        ("9 ** 9 ** 9", "too large"),
        ("2 ** 100000", "too large"),
        ("(2 ** 9000) * (2 ** 9000)", "too large"),
        ("10.0 ** 400", "too large"),
        ("1e400", "too large"),
        ("(-8) ** 0.5", "real number"),
        ("1 / 0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1 +", "not a valid"),
        ("", "not a valid"),
        ("1" + "+1" * MAX_EXPRESSION_CHARS, "longer than"),
        ("-" * 300 + "1", "nested too deeply"),
    ],
)
def test_calculator_refuses(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def _expressions() -> st.SearchStrategy[str]:
    # Powers only take a small literal exponent and a parenthesised base, so Python's own
    # evaluation (the oracle) stays cheap; the rest is free-form, precedence included.
    number = st.integers(min_value=0, max_value=12).map(str)

    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner)
        power = st.tuples(inner, st.integers(min_value=-3, max_value=4))
        return st.one_of(
            binary.map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            inner.map(lambda e: f"({e})"),
            inner.map(lambda e: f"-{e}"),
            power.map(lambda t: f"({t[0]}) ** {t[1]}"),
        )

    return st.recursive(number, extend, max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_expressions())
def test_calculator_agrees_with_python(expression: str) -> None:
    try:
        expected: Any = eval(expression, {"__builtins__": {}})  # the oracle; input is generated
    except (ZeroDivisionError, OverflowError) as exc:
        expected = exc
    try:
        got: Any = calculator(expression)
    except ValueError as exc:
        if isinstance(expected, Exception):
            return
        # Only our size bounds may refuse what Python computes.
        assert "too large" in str(exc) or "real number" in str(exc)
        too_big = isinstance(expected, int) and expected.bit_length() > MAX_INT_BITS
        assert too_big or isinstance(expected, complex), (expression, expected)
        return
    assert not isinstance(expected, Exception), (expression, expected)
    assert got == expected and type(got) is type(expected)


# --- current_time ----------------------------------------------------------------------------


def test_current_time_in_a_zone() -> None:
    utc = datetime.fromisoformat(current_time())
    assert utc.utcoffset() == timedelta(0)
    tokyo = datetime.fromisoformat(current_time("Asia/Tokyo"))
    assert tokyo.utcoffset() == timedelta(hours=9)
    assert abs(tokyo - utc) < timedelta(seconds=5)


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", "America", ""])
def test_current_time_refuses_unknown_zone(zone: str) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        current_time(zone)


# --- run() -----------------------------------------------------------------------------------


@pytest.fixture
def registry() -> ToolRegistry:
    reg = builtin_registry()

    async def slow(seconds: float) -> str:
        """Sleep."""
        await asyncio.sleep(seconds)
        return "done"

    def broken() -> None:
        """Always fails."""
        raise RuntimeError("disk on fire")

    def odd() -> object:
        """Returns something JSON cannot encode."""
        return {"when": datetime(2024, 1, 2, 3, 4, 5), "what": object, "nan": float("nan")}

    def locate(place: Place, note: str = "") -> str:
        """Locate a place."""
        assert isinstance(place, Place)
        return f"{place.city}, {place.country}{note}"

    async def own_timeout() -> None:
        """A tool whose own client timed out."""
        raise TimeoutError("upstream took too long")

    def circular() -> list[Any]:
        """A value that refers to itself."""
        loop: list[Any] = []
        loop.append(loop)
        return loop

    for fn in (slow, broken, odd, locate, own_timeout, circular):
        reg.add(fn)
    return reg


async def test_run_ok(registry: ToolRegistry) -> None:
    result = await registry.run("calculator", '{"expression": "6 * 7"}', timeout=1)
    assert result == ToolResult(ok=True, result=42)
    assert result.content() == "42"


async def test_run_validates_into_pydantic_models(registry: ToolRegistry) -> None:
    result = await registry.run("locate", '{"place": {"city": "Lyon"}}', timeout=1)
    assert result.result == "Lyon, FR"


async def test_run_empty_arguments_mean_none(registry: ToolRegistry) -> None:
    result = await registry.run("current_time", "", timeout=1)
    assert result.ok and result.result.endswith("+00:00")


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("calculator", '{"expression": ', "not valid JSON"),
        ("calculator", '["1 + 1"]', "must be a JSON object"),
        ("calculator", "{}", "expression: Field required"),
        ("calculator", '{"expression": 3}', "expression: Input should be a valid string"),
        ("calculator", '{"expression": "1", "x": 1}', "x: Extra inputs are not permitted"),
        ("locate", '{"place": {}}', "place.city: Field required"),
        ("nope", "{}", "unknown tool 'nope'; available tools: current_time, calculator"),
        ("calculator", '{"expression": "1/0"}', "calculator: division by zero"),
        ("broken", "{}", "broken: RuntimeError: disk on fire"),
        ("own_timeout", "{}", "own_timeout: TimeoutError: upstream took too long"),
    ],
)
async def test_run_failures_are_results(
    registry: ToolRegistry, name: str, arguments: str, message: str
) -> None:
    result = await registry.run(name, arguments, timeout=1)
    assert not result.ok and result.result is None
    assert result.error is not None and message in result.error
    assert result.content() == f"Error: {result.error}"


async def test_run_timeout(registry: ToolRegistry) -> None:
    result = await registry.run("slow", '{"seconds": 30}', timeout=0.05)
    assert result == ToolResult(ok=False, error="slow: timed out after 0.05 s")


async def test_run_respects_allowed(registry: ToolRegistry) -> None:
    result = await registry.run("calculator", '{"expression": "1"}', timeout=1, allowed=["slow"])
    assert result.error == "unknown tool 'calculator'; available tools: slow"


async def test_run_result_is_json_ready(registry: ToolRegistry) -> None:
    result = await registry.run("odd", "{}", timeout=1)
    assert result.result["when"] == "2024-01-02T03:04:05"
    assert result.result["what"] == str(object)
    assert result.result["nan"] is None
    json.loads(result.content())


async def test_run_result_falls_back_to_text(registry: ToolRegistry) -> None:
    result = await registry.run("circular", "{}", timeout=1)
    assert result == ToolResult(ok=True, result="[[...]]")


async def test_sync_tool_runs_off_the_event_loop() -> None:
    started = threading.Event()
    released = threading.Event()

    def blocking() -> list[Any]:
        """Waits for the loop to release it: would deadlock if run on the loop."""
        started.set()
        return [threading.get_ident(), released.wait(timeout=2)]

    registry = ToolRegistry()
    registry.add(blocking)
    task = asyncio.create_task(registry.run("blocking", "{}", timeout=3))
    assert await asyncio.to_thread(started.wait, 2)
    released.set()  # only reachable if the loop is free while the tool runs
    result = await task
    assert result.ok and result.result[1] is True
    assert result.result[0] != threading.get_ident()


async def test_async_tool_is_awaited_on_the_loop() -> None:
    async def where() -> int:
        """Thread id."""
        return threading.get_ident()

    registry = ToolRegistry()
    registry.add(where)
    assert (await registry.run("where", "{}", timeout=1)).result == threading.get_ident()


def test_parse_arguments() -> None:
    assert parse_arguments(' {"a": 1} ') == {"a": 1}
    assert parse_arguments("  ") == {}
    with pytest.raises(ValueError, match="JSON object"):
        parse_arguments("null")


def test_tool_without_model_passes_arguments_through() -> None:
    made = Tool("echo", "Echo.", {"type": "object"}, lambda **kw: kw)
    registry = ToolRegistry()
    registry._tools["echo"] = made  # a hand-built Tool has no arguments model
    result = asyncio.run(registry.run("echo", '{"a": [1]}', timeout=1))
    assert result.result == {"a": [1]}


# --- modules and build_registry --------------------------------------------------------------


@pytest.fixture
def clean_modules() -> Iterator[None]:
    """Forget the modules these tests import from temporary paths (and only those)."""
    yield
    for name in [n for n in sys.modules if n.startswith("cortex_test_") or n == "weather_tools"]:
        del sys.modules[name]


@pytest.fixture
def tool_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None) -> str:
    source = '''
        from __future__ import annotations

        from typing import Annotated

        from pydantic import Field

        from cortex.tools import tool

        @tool
        def shout(text: Annotated[str, Field(description="What to shout")]) -> str:
            """Upper-case some text."""
            return text.upper()

        @tool(name="add_up", description="Add numbers.")
        async def total(numbers: list[float]) -> float:
            return sum(numbers)

        def helper() -> None:
            """Not a tool: not marked."""
    '''
    (tmp_path / "cortex_test_tools_mod.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "cortex_test_tools_mod"


async def test_load_module(tool_module: str) -> None:
    registry = ToolRegistry()
    loaded = registry.load_module(tool_module)
    assert [t.name for t in loaded] == registry.names == ["shout", "add_up"]
    assert loaded[0].parameters["properties"]["text"]["description"] == "What to shout"
    assert loaded[1].description == "Add numbers."
    assert (await registry.run("shout", '{"text": "hi"}', timeout=1)).result == "HI"
    assert (await registry.run("add_up", '{"numbers": [1, 2.5]}', timeout=1)).result == 3.5
    assert registry.load_module(tool_module) == loaded  # loading twice is harmless


def test_load_module_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_modules: None
) -> None:
    with pytest.raises(ValueError, match="cannot import tool module 'no_such_cortex_mod'"):
        ToolRegistry().load_module("no_such_cortex_mod")
    (tmp_path / "cortex_test_empty_mod.py").write_text("def f() -> None: ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="no @tool functions"):
        ToolRegistry().load_module("cortex_test_empty_mod")


def test_build_registry_defaults_to_everything(tool_module: str) -> None:
    assert build_registry(modules=[], enabled=None).names == ["current_time", "calculator"]
    registry = build_registry(modules=[tool_module], enabled=None)
    assert registry.names == ["current_time", "calculator", "shout", "add_up"]


def test_build_registry_enabled_filters_in_order(tool_module: str) -> None:
    registry = build_registry(modules=[tool_module], enabled=["shout", "calculator"])
    assert registry.names == ["shout", "calculator"]
    assert [s["function"]["name"] for s in registry.specs()] == ["shout", "calculator"]
    assert build_registry(modules=[], enabled=[]).names == []


def test_build_registry_unknown_enabled_name(tool_module: str) -> None:
    with pytest.raises(ValueError, match=r"CORTEX_TOOLS: unknown tool\(s\) 'shuot'; available: "):
        build_registry(modules=[tool_module], enabled=["calculator", "shuot"])


def test_specs_narrowing() -> None:
    registry = builtin_registry()
    assert [s["function"]["name"] for s in registry.specs(["calculator"])] == ["calculator"]
    with pytest.raises(UnknownTool) as info:
        registry.specs(["calculator", "weather"])
    assert info.value.names == ("weather",)


async def test_example_weather_module(monkeypatch: pytest.MonkeyPatch, clean_modules: None) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    registry = build_registry(modules=["weather_tools"], enabled=["weather", "forecast"])
    weather = registry.get("weather")
    assert weather is not None and weather.description == "Current weather in a city."
    ok = await registry.run("weather", '{"city": "Paris", "unit": "fahrenheit"}', timeout=1)
    assert ok.ok and ok.result["city"] == "Paris" and ok.result["unit"] == "fahrenheit"
    days = await registry.run("forecast", '{"city": "Osaka", "days": 2}', timeout=1)
    assert [d["day"] for d in days.result] == [1, 2]
    bad = await registry.run("forecast", '{"city": "Osaka", "days": 9}', timeout=1)
    assert bad.error == "forecast: invalid arguments: days: Input should be less than or equal to 7"
    nowhere = await registry.run("weather", '{"city": "Atlantis"}', timeout=1)
    assert (
        nowhere.content() == "Error: weather: no weather station in Atlantis; ask for a real city"
    )


def test_docs_show_the_example_module_verbatim() -> None:
    docs = (EXAMPLES.parent / "docs" / "tools.md").read_text()
    assert f"```python\n{(EXAMPLES / 'weather_tools.py').read_text()}```" in docs
