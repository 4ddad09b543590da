"""Tools for the tests of `gemma run --tools`."""

import os
import signal
import time
from typing import Literal


def get_weather(city: str, unit: Literal["celsius", "fahrenheit"] = "celsius") -> dict:
    """Current weather for a city.

    Args:
        city: The city's name.
        unit: Temperature unit.
    """
    print("looking up", city)  # goes to stderr, not into the result
    return {"city": city, "temperature": 12, "unit": unit}


def add(a: int, b: int, scale: float | None = None, tags: list[str] | None = None) -> int:
    """Add two numbers."""
    return (a + b) * (scale or 1)


def sleepy(seconds: float) -> str:
    """Sleep for a while."""
    time.sleep(seconds)
    return "awake"


def broken() -> None:
    """Always fails."""
    raise RuntimeError("the sensor is offline")


def crash() -> None:
    """Dies of a signal."""
    os.kill(os.getpid(), signal.SIGSEGV)


def huge() -> str:
    """A result too large to pass on whole."""
    return "x" * 100_000


def undocumented(x: int) -> int:
    return x


def _private() -> None:
    """Not a tool."""
