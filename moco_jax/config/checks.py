"""The pieces ``validation`` checks fields with: ``ConfigError`` and one small test per kind of
value (positive integer, number with a bound, probability, flag, a (low, high) pair)."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work, with the field name in the message."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and infinity are never meaningful settings."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def are_numbers(value: Any, length: int | None = None) -> bool:
    """A tuple/list of numbers (of ``length`` items if given)."""
    return (
        isinstance(value, (tuple, list))
        and (length is None or len(value) == length)
        and all(is_number(v) for v in value)
    )


def check_probability(name: str, value: Any) -> None:
    require(
        is_number(value) and 0.0 <= value <= 1.0,
        f"{name} must be a probability in [0, 1], got {value!r}",
    )


def check_int_at_least(name: str, value: Any, low: int) -> None:
    require(is_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, bound: str) -> None:
    """A finite number ``> 0`` (``bound=">"``) or ``>= 0`` (``bound=">="``)."""
    ok = is_number(value) and (value > 0 if bound == ">" else value >= 0)
    require(ok, f"{name} must be {bound} 0, got {value!r}")


def check_flag(name: str, value: Any) -> None:
    require(is_bool(value), f"{name} must be True or False, got {value!r}")


def check_range_pair(name: str, value: Any, upper: float | None, what: str) -> None:
    """``(low, high)`` with ``0 < low <= high`` (``<= upper`` if given)."""
    bound = f" <= {upper:g}" if upper is not None else ""
    ok = are_numbers(value, 2) and 0 < value[0] <= value[1] and (upper is None or value[1] <= upper)
    require(
        ok,
        f"{name} must be ({what} min, max) with 0 < min <= max{bound}, "
        f"got {tuple(value) if isinstance(value, list) else value!r}",
    )
