"""Readers for `display.options`, shared by the panel and serial factories.

Each takes the raw YAML value and its key path, and returns the value or raises
`ConfigError` naming the key (the agent exits 78 on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.errors import ConfigError

__all__ = ["Reader", "boolean", "integer", "kind_of"]

Reader = Callable[[object, str], Any]


def kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


def integer(low: int, high: int) -> Reader:
    def read(value: object, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = " (write it without quotes)" if isinstance(value, str) else ""
            raise ConfigError(key, f"expected an integer, got {kind_of(value)}{hint}")
        if not low <= value <= high:
            raise ConfigError(key, f"must be from {low} to {high}, got {value}")
        return value
    return read


def boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {kind_of(value)}")
    return value
