"""The pieces ``validation`` checks fields with: ``ConfigError`` and one small test per kind of
value (positive integer, number with a bound, probability, flag, a (low, high) pair)."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A config value that cannot work, with the field name in the message."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool): NaN and infinity are never meaningful settings."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _numbers(value: Any, length: int | None = None) -> bool:
    """A tuple/list of numbers (of ``length`` items if given)."""
    return (
        isinstance(value, (tuple, list))
        and (length is None or len(value) == length)
        and all(_is_number(v) for v in value)
    )


def _probability(name: str, value: Any) -> None:
    _require(
        _is_number(value) and 0.0 <= value <= 1.0,
        f"{name} must be a probability in [0, 1], got {value!r}",
    )


def _int_at_least(name: str, value: Any, low: int) -> None:
    _require(_is_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value: Any, bound: str) -> None:
    """A finite number ``> 0`` (``bound=">"``) or ``>= 0`` (``bound=">="``)."""
    ok = _is_number(value) and (value > 0 if bound == ">" else value >= 0)
    _require(ok, f"{name} must be {bound} 0, got {value!r}")


def _flag(name: str, value: Any) -> None:
    _require(_is_bool(value), f"{name} must be True or False, got {value!r}")


def _range_pair(name: str, value: Any, upper: float | None, what: str) -> None:
    """``(low, high)`` with ``0 < low <= high`` (``<= upper`` if given)."""
    bound = f" <= {upper:g}" if upper is not None else ""
    ok = _numbers(value, 2) and 0 < value[0] <= value[1] and (upper is None or value[1] <= upper)
    _require(
        ok,
        f"{name} must be ({what} min, max) with 0 < min <= max{bound}, "
        f"got {tuple(value) if isinstance(value, list) else value!r}",
    )
