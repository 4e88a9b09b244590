"""Example operator tool module: a fake, offline weather service.

Enable it with (from the repository root):

    PYTHONPATH=examples CORTEX_TOOL_MODULES=weather_tools \\
        CORTEX_TOOLS=current_time,weather,forecast cortex serve

The numbers are made up from the city's name, so answers are stable and need no network.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Annotated, Literal

from pydantic import Field

from cortex.tools import tool

City = Annotated[str, Field(description="City name, e.g. 'Paris' or 'Osaka'", min_length=1)]
Unit = Literal["celsius", "fahrenheit"]
_SKIES = ("sunny", "cloudy", "rainy", "windy", "snowy")


def _fake_day(city: str, day: int, unit: Unit) -> dict[str, object]:
    seed = zlib.crc32(f"{city.strip().lower()}/{day}".encode())
    celsius = seed % 35 - 5
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"temperature": temp, "unit": unit, "sky": _SKIES[seed % len(_SKIES)]}


@tool
def weather(city: City, unit: Unit = "celsius") -> dict[str, object]:
    """Current weather in a city.

    This paragraph is not sent to the model: only the first one is.
    """
    if city.strip().lower() == "atlantis":
        raise ValueError("no weather station in Atlantis; ask for a real city")
    return {"city": city, **_fake_day(city, 0, unit)}


@tool(name="forecast", description="Weather for the next days in a city (fake data).")
async def daily_forecast(
    city: City,
    days: Annotated[int, Field(ge=1, le=7, description="How many days, 1 to 7")] = 3,
    unit: Unit = "celsius",
) -> list[dict[str, object]]:
    await asyncio.sleep(0)  # a real tool would await an HTTP call here
    return [{"day": d, **_fake_day(city, d, unit)} for d in range(1, days + 1)]
